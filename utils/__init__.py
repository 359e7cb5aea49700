"""Glue reusable by any layer (seeding, devices, logging, torchrun, checkpoints, atomic file output); nothing
here imports another package of the project."""
