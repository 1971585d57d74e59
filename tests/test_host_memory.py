"""bigjax/host_memory.py: after keep_freed_host_memory, a freed large block is reused without page
faults (what XLA:CPU's per-step temporary arena gets); without it every reuse faults anew."""

import os
import subprocess
import sys

import jax

from bigjax import host_memory

ROOT = os.path.join(os.path.dirname(__file__), "..")

# A fresh interpreter (malloc's arena choices are per process, fixed on first use): allocate and
# touch 64 MB three times, freeing it in between, and print the minor faults of the last round.
PROBE = """
import resource, sys
if sys.argv[1] == "keep":
    from bigjax.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
import numpy as np
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(16 << 20, np.float32)  # 64 MB: above malloc's mmap threshold
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
    # 64 MB is 16,384 pages of 4 KB, or 32 of 2 MB with transparent huge pages: faulted anew each
    # round by default (544 here); kept, the third round touches pages already mapped (0 here)
    default, kept = faults("default"), faults("keep")
    assert default >= 16, default
    assert kept <= 2, kept


def test_runs_on_cpu_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu()
    monkeypatch.delenv("JAX_PLATFORMS")  # then: no accelerator plugin installed on this machine
    assert host_memory.runs_on_cpu() == (jax.default_backend() == "cpu")
