"""Hydra entry point: generate data models into the data-model store (the library is ``stages.generate``).

    python generate_dataset/generate.py task=T num=N index=I store=DIR
    python generate_dataset/generate.py -m task=T num=N index=0,1,2,3 hydra/launcher=joblib   # 4 shards in parallel
    torchrun --nproc_per_node=8 generate_dataset/generate.py task=resnet50_on_ImageNet num=N index=I store=DIR

Shard I writes only ``DIR/shard_000I/``; all shard folders together are the store. Re-running a command
resumes: finished data models are kept and skipped. The run dir gets ``config.yaml`` and ``results.json``
(the shard's summary), as every run does. Under torchrun every rank trains each data model together (DDP) and
rank 0 alone writes the shard and the run dir (its run dir is used by every rank); ``@record`` hands a failing
rank's error to torchrun's summary.
"""
import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from stages import generate
from stages.common import run_recorded
from utils.distributed import broadcast_object, torchrun_session
from utils.tracking import tracking_session

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="generate", version_base="1.3")
@record
def main(cfg: DictConfig) -> None:
    with torchrun_session(cfg.distributed, cfg.device):
        # configs/generate.yaml's run dir has a timestamp, which two ranks may resolve a second apart: use rank 0's
        run_dir = broadcast_object(HydraConfig.get().runtime.output_dir)
        with tracking_session(cfg, run_dir):  # logger=...: every data model's training rows
            summary = run_recorded(generate.run, cfg, run_dir)
        if summary:
            log.info("shard summary: %s", json.dumps(summary))

if __name__ == "__main__":
    main()
