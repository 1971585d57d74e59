"""Imported before `bigjax.cli` in a test process: process 1 of a multi-process run hangs, alive,
in its data loader after HANG_AFTER batches (its heartbeat thread keeps running), as a process
stuck on a storage read would."""

import os
import time

import jax

from bigjax.data.loader import TrainLoader

_next, _after = TrainLoader.__next__, int(os.environ["HANG_AFTER"])
_served = [0]


def _next_or_hang(self):
    if jax.process_index() == 1 and _served[0] >= _after:
        while True:
            time.sleep(3600)
    _served[0] += 1
    return _next(self)


TrainLoader.__next__ = _next_or_hang
