"""Network <-> graph codec (``nn.graph``, handlers in ``nn.graph_handlers``), the metanetwork GNN
(``nn.metanetwork``) and metanetwork checkpoints / application to a network (``nn.apply``).

Not ``torch.nn``: modules that use both import torch's as ``from torch import nn as tnn``.
"""
