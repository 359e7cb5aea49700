"""Install the meta-pruning research code base.

``pip install -e .`` makes the top-level packages importable from anywhere, so the Hydra entry scripts run
from any directory. Every package is listed in ``packages`` (``tests/test_layout.py`` checks that none is
missing), in dependency order: glue, then data / models / codec and metanetwork, then pruning and training,
then the stages.
"""
from setuptools import setup

setup(
    name="meta-pruning-gnn",
    version="0.1.0",
    description="Meta pruning via graph metanetworks (Liu, Wang, Zhang; arXiv 2506.12041), reimplemented",
    python_requires=">=3.11",
    packages=[
        "utils",
        "data_loaders",
        "generate_dataset",
        "generate_dataset.models",
        "nn",
        "pruning",
        "training",
        "stages",
    ],
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "torch_geometric==2.8.1",
        "torch-pruning==1.6.1",
        "hydra-core>=1.3,<1.4",
        "hydra-joblib-launcher>=1.2,<1.3",
        "h5py",
        "einops",
        "termcolor",
        "matplotlib",
        "tqdm",
        "scikit-learn",
        "numpy",
        "scipy",
    ],
    extras_require={
        # torch_scatter ships no wheel for this torch: install it separately, after torch, with
        #   pip install --no-build-isolation torch_scatter==2.1.2
        "scatter": ["torch_scatter==2.1.2"],
        "slurm": ["hydra-submitit-launcher>=1.2,<1.3"],
        # experiment trackers (configs/logger/, utils/tracking.py): imported only when logger=<name> is chosen
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "mlflow": ["mlflow"],
        # tensorboard: tests/test_tracking.py reads its event files back
        "dev": ["pytest", "pytest-timeout", "tensorboard"],
    },
)
