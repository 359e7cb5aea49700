"""Hydra entry point for single-process (CIFAR-scale) experiments.

    python main/main.py                          # default job on the offline default task
    python main/main.py run=MODE task=TASK ...   # any run mode; `run=help` lists them

All logic lives in the ``stages`` package; this script only parses the config and hands over the run directory.
It runs one process; under torchrun use ``main_imagenet/main_imagenet.py``, which takes the same run modes,
tasks and settings (``configs/imagenet.yaml`` composes the same shared sections).
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stages import execute
from utils.distributed import launched_by_torchrun


@hydra.main(config_path="../configs", config_name="main", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if launched_by_torchrun():
        raise SystemExit("main/main.py runs a single process; under torchrun launch main_imagenet/main_imagenet.py "
                         "with the same arguments (every run mode and task works there, one process per GPU)")
    execute(cfg, run_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
