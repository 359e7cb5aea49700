"""Hydra entry point for single-process (CIFAR-scale) experiments.

    python main/main.py                          # default job on the offline default task
    python main/main.py run=MODE task=TASK ...   # any run mode; `run=help` lists them

All logic lives in the ``stages`` package; this script only parses the config and hands over the run directory.
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stages import execute


@hydra.main(config_path="../configs", config_name="main", version_base="1.3")
def main(cfg: DictConfig) -> None:
    execute(cfg, run_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
