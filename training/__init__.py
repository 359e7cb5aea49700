"""Training and evaluation of image classifiers: ``training.config`` (the recipe, :class:`TrainConfig`) and
``training.loop`` (:func:`train`, :func:`evaluate`, :func:`evaluate_splits`)."""
