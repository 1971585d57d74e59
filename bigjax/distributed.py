"""Joins JAX's distributed runtime when this process is one of several; a no-op for one process."""

from __future__ import annotations

import os

import jax

from bigjax.config import DistributedConfig

_initialized = False


def initialize(cfg: DistributedConfig) -> None:
    global _initialized
    if _initialized:
        return
    coordinator = cfg.coordinator or os.environ.get("BIGJAX_COORDINATOR", "")
    num = cfg.num_processes or int(os.environ.get("BIGJAX_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("BIGJAX_PROCESS_ID", "-1"))
    if not coordinator or num <= 1:
        return
    jax.distributed.initialize(coordinator, num_processes=num, process_id=pid,
                               initialization_timeout=cfg.timeout_s)
    _initialized = True
