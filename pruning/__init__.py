"""Network pruning, kept apart from the method's stages.

``pruning.depgraph``        structured pruning with torch-pruning (DepGraph) to a MACs speed-up; the one
                            progressive pruning loop (``pruning_steps``)
``pruning.regularizer``     DepGraph's group-L2 regulariser as an explicit gradient (meta-training)
``pruning.sparse_learning`` that regulariser as a training hook (the DepGraph sparse-learning baseline)
``pruning.curves``          accuracy-vs-speed-up curves, their scores and plots
``pruning.unstructured``    global L1 / N:M unstructured pruning, masked fine-tuning, sparse MACs
"""
