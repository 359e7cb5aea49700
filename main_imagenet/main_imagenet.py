"""Hydra entry point for ImageNet-scale experiments under torchrun (DDP, one process per GPU).

    torchrun --nproc_per_node=8 main_imagenet/main_imagenet.py run=MODE task=resnet50_on_ImageNet paths.data_dir=/data

Without torchrun it runs as a single process. Only rank 0 writes results; all logic lives in ``stages``.
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stages import execute
from utils.distributed import cleanup, init_distributed


@hydra.main(config_path="../configs", config_name="imagenet", version_base="1.3")
def main(cfg: DictConfig) -> None:
    init_distributed(cfg.distributed.backend, cfg.device)
    try:
        execute(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
