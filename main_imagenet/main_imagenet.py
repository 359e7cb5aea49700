"""Hydra entry point for ImageNet-scale experiments under torchrun (DDP, one process per GPU).

    torchrun --nproc_per_node=8 main_imagenet/main_imagenet.py run=MODE task=resnet50_on_ImageNet paths.data_dir=/data

Every run mode works here (``stages.DDP_RUNS``); without torchrun it runs as a single process. Only rank 0 logs
below warnings and writes results; all logic lives in ``stages``. ``@record`` hands the failing rank's error to
torchrun, whose summary then names the rank and the message.
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from stages import execute
from utils.distributed import broadcast_object, torchrun_session


@hydra.main(config_path="../configs", config_name="imagenet", version_base="1.3")
@record
def main(cfg: DictConfig) -> None:
    with torchrun_session(cfg.distributed, cfg.device):
        # rank 0's run dir on every rank (the same unless hydra.run.dir has a timestamp that differs between ranks)
        execute(cfg, run_dir=broadcast_object(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
