"""Hydra entry point: generate data models into the data-model store (the library is ``stages.generate``).

    python generate_dataset/generate.py task=T num=N index=I store=DIR
    python generate_dataset/generate.py -m task=T num=N index=0,1,2,3 hydra/launcher=joblib   # 4 shards in parallel

Shard I writes only ``DIR/shard_000I/``; all shard folders together are the store. Re-running a command
resumes: finished data models are kept and skipped. The run dir gets ``config.yaml`` and ``results.json``
(the shard's summary), as every run does.
"""
import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stages import generate
from stages.common import run_recorded

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = run_recorded(generate.run, cfg, HydraConfig.get().runtime.output_dir)
    log.info("shard summary: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
