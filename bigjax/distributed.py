"""Joins JAX's distributed runtime when this process is one of several; a no-op for one process.

Each of the three values (coordinator address, process count, this process's id) is taken from the
first place that has it: the `distributed.*` config keys, the BIGJAX_COORDINATOR /
BIGJAX_NUM_PROCESSES / BIGJAX_PROCESS_ID variables, then the cluster's own variables (SLURM under
srun, a Kubernetes JobSet). TPU pod VMs (`distributed.coordinator: auto`, or TPU_WORKER_HOSTNAMES
listing several hosts) are left to JAX's own detection. Faults are bounded by
`distributed.timeout_s`: JAX's heartbeat ends every process when one dies, and a watchdog ends a
process whose peers never join, each with a message instead of a hang.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import jax

from bigjax.config import DistributedConfig
from bigjax.errors import BigjaxError, first_line

DEFAULT_PORT = 8476  # coordinator port when a cluster gives a host but no port
AUTO = "auto"  # distributed.coordinator value: let JAX detect the cluster (TPU pod VMs)


class DistributedError(BigjaxError):
    pass


@dataclass(frozen=True)
class Cluster:
    """Where this process stands; None values are left for JAX's detection (TPU pods)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    source: str  # for messages: which config keys or variables said so
    local_device_ids: tuple[int, ...] | None = None


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    raw = env.get(key, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {key}={raw!r} is not an integer")


def _port(env: Mapping[str, str]) -> int:
    return _env_int(env, "BIGJAX_COORDINATOR_PORT") or _env_int(env, "JAX_COORDINATOR_PORT") \
        or DEFAULT_PORT


def _slurm(env: Mapping[str, str]) -> Cluster | None:
    """A task of `srun` with several tasks; the coordinator is the step's first node."""
    count = _env_int(env, "SLURM_STEP_NUM_TASKS") or _env_int(env, "SLURM_NTASKS")
    if not env.get("SLURM_STEP_NODELIST") or count is None or count < 2:
        return None  # outside srun (e.g. the batch script itself) a task is one process
    from jax._src.clusters.slurm_cluster import SlurmCluster  # JAX's parser of SLURM node lists

    host = SlurmCluster.get_coordinator_address(None, None).rsplit(":", 1)[0]
    nodes = _env_int(env, "SLURM_STEP_NUM_NODES") or _env_int(env, "SLURM_NNODES") or 1
    local_id = _env_int(env, "SLURM_LOCALID")
    # Several tasks per node means one task per GPU; one task per node sees all its GPUs
    # (JAX's own SLURM detection always pins one device per task).
    local = (local_id,) if count > nodes and local_id is not None else None
    return Cluster(f"{host}:{_port(env)}", count, _env_int(env, "SLURM_PROCID"),
                   "SLURM variables", local)


def _jobset(env: Mapping[str, str]) -> Cluster | None:
    """A pod of an Indexed Job in a JobSet; pod 0 of job 0 hosts the coordinator.

    JobSet pods are reachable as <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>,
    the subdomain being the JobSet's headless service (by default named like the JobSet).
    """
    name, index = env.get("JOBSET_NAME", ""), _env_int(env, "JOB_COMPLETION_INDEX")
    if not name or index is None:
        return None
    job = env.get("REPLICATED_JOB_NAME", "workers")
    subdomain = env.get("JOBSET_SUBDOMAIN", "") or name
    return Cluster(f"{name}-{job}-0-0.{subdomain}:{_port(env)}", None, index, "JobSet variables")


def _tpu_pod(cfg: DistributedConfig, env: Mapping[str, str]) -> bool:
    hosts = env.get("TPU_WORKER_HOSTNAMES", "") or env.get("TPU_PROCESS_ADDRESSES", "")
    return (cfg.coordinator or env.get("BIGJAX_COORDINATOR", "")) == AUTO or "," in hosts \
        or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def detect(cfg: DistributedConfig) -> Cluster | None:
    """The cluster this process belongs to (from cfg and os.environ), or None when it runs alone."""
    env = os.environ
    if _tpu_pod(cfg, env):
        return Cluster(None, cfg.num_processes or None,
                       cfg.process_id if cfg.process_id >= 0 else None, "TPU pod (JAX detects)")
    coordinator = cfg.coordinator or env.get("BIGJAX_COORDINATOR", "")
    num = cfg.num_processes or _env_int(env, "BIGJAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int(env, "BIGJAX_PROCESS_ID")
    explicit = [k for k, v in (("coordinator", coordinator), ("num_processes", num),
                               ("process_id", pid)) if v not in ("", None)]
    found = _slurm(env) or _jobset(env)
    source = found.source if found else "distributed.* config keys or BIGJAX_* variables"
    if found:
        coordinator = coordinator or found.coordinator
        num = num or found.num_processes
        pid = pid if pid is not None else found.process_id
    elif not explicit:
        return None
    if num == 1 and pid in (None, 0):
        return None
    missing = [k for k, v in (("coordinator", coordinator), ("num_processes", num),
                              ("process_id", pid)) if v in ("", None)]
    if missing:
        env_name = {"coordinator": "BIGJAX_COORDINATOR", "num_processes": "BIGJAX_NUM_PROCESSES",
                    "process_id": "BIGJAX_PROCESS_ID"}
        raise DistributedError(
            f"distributed: {source} give {', '.join(explicit) or 'part of the setup'} but not "
            + ", ".join(f"{k} (set distributed.{k} or {env_name[k]})" for k in missing))
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"distributed.coordinator={coordinator!r} is not host:port "
                               "(e.g. 10.0.0.1:8476)")
    if num < 1 or not 0 <= pid < num:
        raise DistributedError(f"distributed: process_id={pid} is outside 0..num_processes-1 "
                               f"(num_processes={num}, from {source})")
    return Cluster(coordinator, num, pid, source, found.local_device_ids if found else None)


class Watchdog:
    """Ends this process with one line and `exit_code` when `timeout_s` pass without a `beat`
    (0 = disarmed); `stop` disarms it. The thread sleeps until the exact deadline, no polling."""

    def __init__(self, timeout_s: float, message: Callable[[float, str], str], exit_code: int, *,
                 what: str = "the start", stacks: bool = False):
        self._timeout_s, self._message, self._exit_code = timeout_s, message, exit_code
        self._last, self._what, self._stacks = time.monotonic(), what, stacks
        self._held = 0  # inside `holding`
        self._done = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="bigjax-watchdog", daemon=True).start()

    def beat(self, what: str) -> None:
        self._last, self._what = time.monotonic(), what

    @contextlib.contextmanager
    def holding(self, what: str) -> Iterator[None]:
        """No deadline inside, a beat after: a checkpoint save may rightly take longer than the
        timeout (its device-to-host copy on a loaded host, slow storage), and a write that hangs
        is the checkpointer's to time out."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            self.beat(what)

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while (left := self._last + self._timeout_s - time.monotonic()) > 0 or self._held:
            if self._done.wait(left if left > 0 else self._timeout_s):
                return
        if self._done.is_set():
            return
        if self._stacks:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        idle = time.monotonic() - self._last
        print(f"bigjax: error: distributed: {self._message(idle, self._what)}", file=sys.stderr,
              flush=True)
        os._exit(self._exit_code)


def hang_watchdog(timeout_s: int) -> Watchdog:
    """Armed on several processes only: a peer stuck alive (a storage read, a deadlocked
    collective) keeps JAX's heartbeat going, so nothing else would end the wait. Prints every
    thread's stack, then one line, and exits 1 so the launcher can restart the job from the last
    complete checkpoint. The trainer beats after each step and evaluation batch; checkpoint saves
    do not count against the timeout."""
    def message(idle: float, what: str) -> str:
        return (f"process {jax.process_index()} of {jax.process_count()} made no progress for "
                f"{idle:.0f} s after {what} (distributed.hang_timeout_s={timeout_s}); a process is "
                "hung (stacks above); exiting so that the job restarts from its last complete "
                "checkpoint")
    return Watchdog(timeout_s if jax.process_count() > 1 else 0, message, 1,
                    what="the first step", stacks=True)


def initialize(cfg: DistributedConfig) -> Cluster | None:
    """Join the runtime (before any JAX computation). Returns the cluster, None for one process."""
    cluster = detect(cfg)
    if cluster is None or jax.distributed.is_initialized():
        return cluster
    who = (f"process {cluster.process_id} of {cluster.num_processes}" if cluster.num_processes
           else "this process")
    # JAX's own join timeout aborts with a C++ stack trace; this one speaks a few seconds earlier
    watchdog = Watchdog(cfg.timeout_s, lambda idle, what: (
        f"{who} waited distributed.timeout_s={cfg.timeout_s} s for all processes to join the "
        f"coordinator at {cluster.coordinator or 'the detected address'} ({cluster.source}); "
        "check that every process was started and can reach that address"), 2)
    try:
        jax.distributed.initialize(
            cluster.coordinator, num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            local_device_ids=list(cluster.local_device_ids) if cluster.local_device_ids else None,
            # we resolved everything ourselves; JAX's detection would pin one GPU per SLURM task
            cluster_detection_method=None if cluster.coordinator is None else "deactivate",
            initialization_timeout=cfg.timeout_s + 10,  # the watchdog speaks first
            # a dead peer is noticed after this, and ending everyone fits in timeout_s
            heartbeat_timeout_seconds=max(2, cfg.timeout_s // 2),
            shutdown_timeout_seconds=cfg.timeout_s)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"distributed: cannot join the runtime ({cluster.source}): "
                               f"{first_line(e)}")
    finally:
        watchdog.stop()
    return cluster


_calls = 0  # every process makes the same calls in the same order: a fresh key for each


def _key(kind: str, name: str) -> str:
    global _calls
    _calls += 1
    return f"bigjax/{kind}/{name}/{_calls}"


def _client():
    from jax._src import distributed as jax_distributed  # orbax reaches the client the same way
    return jax_distributed.global_state.client


def barrier(name: str, timeout_s: int) -> None:
    """Every process waits here until all have arrived; a no-op for one process."""
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(_key("barrier", name), timeout_s * 1000)


def agree(name: str, value: str, timeout_s: int) -> str:
    """Process 0's `value` on every process; another process with a different view raises.

    Used where each process decides from its own view of shared storage (the resume step).
    """
    if jax.process_count() == 1:
        return value
    key = _key("agree", name)
    if jax.process_index() == 0:
        _client().key_value_set(key, value)
        return value
    theirs = _client().blocking_key_value_get(key, timeout_s * 1000)
    if theirs != value:
        raise DistributedError(
            f"distributed: process {jax.process_index()} sees {name}={value} but process 0 sees "
            f"{theirs}; all processes must share run.dir on the same storage")
    return theirs


def exit_if_peer_lost(e: BaseException, advice: Callable[[], str] | None = None) -> None:
    """On several processes, end at once with one line when a JAX runtime error escapes.

    Mostly it is a collective whose peer died. Exiting normally would first wait in JAX's shutdown
    barrier for that peer (distributed.timeout_s) and then abort with a C++ stack trace.
    `advice`: what a rerun does (bigjax.resume.rerun_advice), appended to the line.
    """
    if not isinstance(e, jax.errors.JaxRuntimeError) or jax.process_count() == 1:
        return
    first = first_line(e)
    rerun = f"; {advice()}" if advice else ""
    print(f"bigjax: error: distributed: process {jax.process_index()} of {jax.process_count()}: "
          f"a computation across processes failed, most likely because another process died "
          f"(see its log): {first}{rerun}", file=sys.stderr, flush=True)
    os._exit(1)
