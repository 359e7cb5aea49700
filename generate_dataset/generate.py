"""Hydra entry point: generate data models into the data-model store.

    python generate_dataset/generate.py task=T num=N index=I store=DIR
    python generate_dataset/generate.py -m task=T num=N index=0,1,2,3 hydra/launcher=joblib   # 4 shards in parallel

Shard I writes only ``DIR/shard_I.h5``; all shard files together are the store. Re-running a command
resumes: finished data models are kept and skipped.
"""
import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from generate_dataset.generation import generate_shard

log = logging.getLogger(__name__)


@hydra.main(config_path="../configs", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    summary = generate_shard(cfg, run_dir)
    log.info("shard summary: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
