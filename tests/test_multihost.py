"""Several real processes on this machine, joined by JAX's coordinator on localhost.

Two processes with 4 simulated devices each train like one process with 8; a `local.sh` run whose
process is killed ends at once with one line naming it and the step a rerun resumes from, and the
rerun (as SLURM tasks) resumes there; SLURM and JobSet variables place real processes.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "gpt_tiny.yaml")
LOCAL = os.path.join(ROOT, "launch", "local.sh")
STEPS, EVERY, TIMEOUT_S = 16, 8, 20
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "data.vocab_size=512", "data.max_chars=40000", "train.seq_len=32",
        "train.batch_size=16", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
        "train.eval_batches=1", "train.progress=false", "train.peak_tflops=1",
        "optimizer.warmup_steps=0", f"distributed.timeout_s={TIMEOUT_S}"]
TWO = TINY + ["mesh.dcn_data=2"]  # one host = one process here: data parallelism across them
KILLED = TWO + [f"checkpoint.every={EVERY}"]  # saving changes no loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every run here compiles the same small programs: JAX's persistent cache compiles each once
# (all but jax 0.10's float32 steps, whose oneDNN products XLA cannot store: README "Checkpoints").
JIT_CACHE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def clean_env(devices: int | None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BIGJAX_", "SLURM_", "JOB", "TPU_", "XLA_FLAGS"))}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    # BIGJAX_COMPILE_CACHE off: only the JAX_COMPILATION_CACHE_DIR a test passes, not ~/.cache
    env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, BIGJAX_COMPILE_CACHE="off", **JIT_CACHE,
               **extra)
    return env


def train_cmd(run_dir, overrides) -> list[str]:
    return [sys.executable, "-u", "-m", "bigjax.cli", "train", CONFIG, *overrides,
            f"run.dir={run_dir}"]


def local_sh(run_dir, log_dir, cache, overrides=TWO, stderr=subprocess.PIPE) -> subprocess.Popen:
    # XLA_FLAGS without a device count: local.sh gives each process its default 4
    return subprocess.Popen(["bash", LOCAL, "2", CONFIG, *overrides, f"run.dir={run_dir}"],
                            env=clean_env(None, BIGJAX_LOG_DIR=str(log_dir),
                                          JAX_COMPILATION_CACHE_DIR=str(cache)),
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def slurm_task(run_dir, task: int, port: int, log, cache) -> subprocess.Popen:
    """One `srun` task as SLURM would start it: two tasks on this node."""
    env = clean_env(4, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                    SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_STEP_NUM_NODES="1",
                    BIGJAX_COORDINATOR_PORT=str(port), JAX_COMPILATION_CACHE_DIR=str(cache))
    return subprocess.Popen(train_cmd(run_dir, KILLED), env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, what: str, timeout: float = 400) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
    return out


def losses(run_dir) -> dict[int, dict]:
    """The last row logged for each step (a resumed run appends)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return {r["step"]: r for r in rows if "loss" in r}


def committed_steps(run_dir) -> list[int]:
    ckpts = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with 8 devices and `local.sh 2` with 4 each, side by side."""
    base = tmp_path_factory.mktemp("multihost")
    one = subprocess.Popen(train_cmd(base / "one", TINY),
                           env=clean_env(8, JAX_COMPILATION_CACHE_DIR=str(base / "jit_cache")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    two = local_sh(base / "two", base / "two_logs", base / "jit_cache")
    return {"base": base, "one_out": finish(one, "one process"), "two_out": finish(two, "local.sh 2")}


def test_two_processes_train_like_one(reference):
    base = reference["base"]
    one, two = losses(base / "one"), losses(base / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) < 1e-5, step
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in reference["one_out"]
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in reference["two_out"]
    eval_one = float(reference["one_out"].split("eval_loss=")[1].split()[0])
    eval_two = float(reference["two_out"].split("eval_loss=")[1].split()[0])
    assert abs(eval_one - eval_two) < 1e-4  # printed with 4 decimals


def test_only_process_zero_reports(reference):
    logs = reference["base"] / "two_logs"
    p0, p1 = (logs / "process-0.log").read_text(), (logs / "process-1.log").read_text()
    assert "eval_loss=" in p0 and "model:" in p0
    assert "eval_loss" not in p1 and "model:" not in p1 and "Traceback" not in p1
    with open(reference["base"] / "two" / "metrics.jsonl") as fh:
        steps = [json.loads(line)["step"] for line in fh]
    assert steps == [*range(1, STEPS + 1), STEPS]  # train steps, the final eval (eval_every 0)


@pytest.fixture(scope="module")
def killed(reference, tmp_path_factory):
    """`local.sh 2` whose process 1 is killed after the first checkpoint, then the same run again as
    two SLURM tasks."""
    base, cache = tmp_path_factory.mktemp("killed"), reference["base"] / "jit_cache"
    run_dir = base / "run"
    # the same data as the reference run: start from its tokenizer rather than train another
    shutil.copytree(reference["base"] / "two" / "tokenizer", run_dir / "tokenizer")
    with open(base / "launcher.err", "w+") as err:  # a file: the pids are read while it runs
        launcher = local_sh(run_dir, base / "logs", cache, KILLED, stderr=err)
        deadline = time.time() + 400
        while not committed_steps(run_dir) and time.time() < deadline:
            assert launcher.poll() is None, "local.sh ended early"
            time.sleep(0.05)
        pid = int(re.search(r"^local.sh: process 1 pid (\d+) ", (base / "launcher.err").read_text(),
                            re.M).group(1))
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        out = launcher.communicate(timeout=TIMEOUT_S + 60)[0]
        survivor_s = time.time() - killed_at
    complete = committed_steps(run_dir)
    port = free_port()
    with open(base / "rerun0.log", "w") as log0, open(base / "rerun1.log", "w") as log1:
        rerun = [slurm_task(run_dir, i, port, log, cache) for i, log in enumerate((log0, log1))]
        rcs = [t.wait(timeout=400) for t in rerun]
    return {"run_dir": run_dir, "rc": launcher.returncode, "survivor_s": survivor_s,
            "complete": complete, "out": out, "err": (base / "launcher.err").read_text(),
            "log0": (base / "logs" / "process-0.log").read_text(), "rerun_rcs": rcs,
            "rerun0": (base / "rerun0.log").read_text(), "rerun1": (base / "rerun1.log").read_text()}


def test_a_dead_process_ends_the_run_with_one_line(killed):
    """The launcher stops the survivor rather than wait for JAX's heartbeat or gloo to abort it, and
    keeps any C++ abort report in the survivor's log: the terminal ends with one bigjax line."""
    assert killed["rc"] == 128 + signal.SIGKILL, killed["err"][-2000:]
    last = killed["complete"][-1]
    assert 0 < last < STEPS  # killed in the middle, after a checkpoint
    resume = (f"rerun the same command to resume from step {last} "
              f"({killed['run_dir']}/checkpoints/{last})")
    # the survivor is stopped by the launcher, unless it aborted on its own first (gloo, rarely)
    assert killed["err"].splitlines()[-1] in (
        f"bigjax launch: process 1 died (killed by SIGKILL); stopped the others; {resume}",
        f"bigjax launch: process 1 died (killed by SIGKILL); the others had ended; {resume}")
    assert killed["survivor_s"] < TIMEOUT_S, killed["log0"][-2000:]
    terminal = killed["out"] + killed["err"]
    native = re.compile(r"\*\*\*|@ +0x|gloo|Check failure|terminate called|Aborted|Killed|"
                        r"^[EF]\d{4} ", re.M)
    assert not native.search(terminal), terminal[-3000:]
    assert "model: " in killed["out"]  # process 0's own output still shows


def test_rerun_resumes_from_the_last_complete_checkpoint(killed, reference):
    assert killed["rerun_rcs"] == [0, 0], killed["rerun0"][-3000:] + killed["rerun1"][-3000:]
    last = killed["complete"][-1]
    assert f"resumed from step {last} " in killed["rerun0"]
    resumed, ref = losses(killed["run_dir"]), losses(reference["base"] / "two")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # before the kill and after the resume alike
        assert abs(resumed[step]["loss"] - ref[step]["loss"]) < 1e-5, step
    assert committed_steps(killed["run_dir"])[-1] == STEPS


PROBE = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from bigjax import distributed
from bigjax.config import DistributedConfig, MeshConfig
from bigjax.mesh import make_mesh
cluster = distributed.initialize(DistributedConfig(timeout_s=%d))
mesh = make_mesh(MeshConfig(dcn_data=2, fsdp=2))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(("data", "fsdp"))),
                                           np.full(4, jax.process_index() + 1.0, np.float32))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
distributed.barrier("probe", timeout_s=60)
try:  # as if the processes saw different newest checkpoints
    agreed = distributed.agree("resume_step", str(5 + jax.process_index()), timeout_s=60)
except distributed.DistributedError as e:
    agreed = str(e)
print(json.dumps({"source": cluster.source, "process": jax.process_index(),
                  "processes": jax.process_count(), "devices": jax.device_count(),
                  "layout": [[d.process_index for d in row.ravel()] for row in mesh.devices],
                  "sum": float(total), "agreed": agreed}))
"""


def test_jobset_variables_place_real_processes():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PROBE % 60], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=clean_env(4, JOBSET_NAME="bigjax", JOB_COMPLETION_INDEX=str(i),
                                            BIGJAX_NUM_PROCESSES="2",
                                            # pod 0's DNS name exists only in the cluster
                                            BIGJAX_COORDINATOR=f"localhost:{port}"))
             for i in (1, 0)]
    outs = [json.loads(finish(p, "probe", timeout=200).strip().splitlines()[-1]) for p in procs]
    layout = [[0, 0], [0, 0], [1, 1], [1, 1]]  # dcn_data=2: each fsdp pair inside one process
    disagree = ("distributed: process 1 sees resume_step=6 but process 0 sees 5; all processes "
                "must share run.dir on the same storage")
    assert outs == [{"source": "JobSet variables", "process": i, "processes": 2, "devices": 8,
                     "layout": layout, "sum": 12.0, "agreed": agreed}
                    for i, agreed in ((1, disagree), (0, "5"))]


def test_a_process_that_never_joins_ends_the_wait():
    port, timeout_s = free_port(), 3
    start = time.time()
    out = subprocess.run([sys.executable, "-c", PROBE % timeout_s], capture_output=True, text=True,
                         env=clean_env(4, BIGJAX_COORDINATOR=f"localhost:{port}",
                                       BIGJAX_NUM_PROCESSES="2", BIGJAX_PROCESS_ID="0"),
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"bigjax: error: distributed: process 0 of 2 waited distributed.timeout_s={timeout_s} s "
        f"for all processes to join the coordinator at localhost:{port} (distributed.* config "
        "keys or BIGJAX_* variables); check that every process was started and can reach that "
        "address")
    assert time.time() - start < 60  # start-up included; JAX's own timeout would abort (rc 134)


def test_sigterm_stops_every_process_at_one_checkpointed_step(reference, tmp_path):
    """A preemption notice reaches both processes (local.sh forwards it, as a cluster would send it
    to each): JAX's preemption sync point makes them save the same step, and the rerun resumes it."""
    run_dir, logs, cache = tmp_path / "run", tmp_path / "logs", reference["base"] / "jit_cache"
    shutil.copytree(reference["base"] / "two" / "tokenizer", run_dir / "tokenizer")
    long = [o for o in TWO if not o.startswith("train.steps=")] + ["train.steps=100000",
                                                                    "checkpoint.every=100000"]
    proc = subprocess.Popen(["bash", LOCAL, "2", CONFIG, *long, f"run.dir={run_dir}"],
                            env=clean_env(None, BIGJAX_LOG_DIR=str(logs),
                                          JAX_COMPILATION_CACHE_DIR=str(cache)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(losses(run_dir)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-2000:]
    steps = committed_steps(run_dir)
    assert len(steps) == 1 and 3 <= steps[0] < 100000, steps
    stopped = steps[0]
    assert f"stopped by signal at step {stopped}; checkpoint complete" in out
    p1 = (logs / "process-1.log").read_text()
    assert "Traceback" not in p1, p1[-2000:]
    # both processes logged their last step as the saved one: no process ran ahead
    assert max(losses(run_dir)) == stopped

    again = [o for o in long if not o.startswith("train.steps=")] + [f"train.steps={stopped + 2}"]
    rerun = subprocess.run(["bash", LOCAL, "2", CONFIG, *again, f"run.dir={run_dir}"],
                           env=clean_env(None, BIGJAX_LOG_DIR=str(tmp_path / "logs2"),
                                         JAX_COMPILATION_CACHE_DIR=str(cache)),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"resumed from step {stopped} " in rerun.stdout
    assert committed_steps(run_dir)[-1] == stopped + 2


WATCHDOG = """
import sys, time
from bigjax.distributed import Watchdog
w = Watchdog(0.5, lambda idle, what: f"idle {idle:.1f} s after {what}", 3)
w.beat("step 1")
if sys.argv[1] == "save":
    with w.holding("the checkpoint of step 1"):
        time.sleep(1.5)  # three timeouts inside the save
    time.sleep(0.2)
    w.stop()
else:
    time.sleep(1.5)
print("finished")
"""


@pytest.mark.parametrize("during", ["save", "step"])
def test_the_hang_watchdog_does_not_time_a_checkpoint_save(during):
    """A periodic save longer than distributed.hang_timeout_s (orbax's copy to the host on a
    loaded machine took longer than 4 s here once) is not a hang; the clock restarts after it.
    The same idle time outside a save ends the process with its one line."""
    done = subprocess.run([sys.executable, "-c", WATCHDOG, during], capture_output=True,
                          text=True, timeout=120, env=clean_env(None))
    if during == "save":
        assert (done.returncode, done.stdout) == (0, "finished\n"), done.stderr[-2000:]
    else:
        assert done.returncode == 3 and done.stdout == ""
        assert re.search(r"^bigjax: error: distributed: idle \d+\.\d s after step 1$",
                         done.stderr, re.M), done.stderr[-2000:]


def test_a_process_hung_alive_ends_every_process_within_the_hang_timeout(reference, tmp_path):
    """Process 1 stops in its data loader but stays alive (its heartbeat goes on). After its
    distributed.hang_timeout_s without a step it prints its stacks and one line and exits 1;
    process 0, stuck in a collective with it, ends too (peer gone, or its own longer timeout),
    leaving the checkpoints they completed."""
    run_dir, cache, port = tmp_path / "run", reference["base"] / "jit_cache", free_port()
    shutil.copytree(reference["base"] / "two" / "tokenizer", run_dir / "tokenizer")
    overrides = [o for o in TWO if not o.startswith("train.steps=")] + [
        "train.steps=100000", "checkpoint.every=4"]
    code = "import hang_after, sys; from bigjax.cli import main; sys.exit(main(sys.argv[1:]))"
    # the hung process gets the shorter timeout, so which one speaks first is not a race. The gap
    # must cover how far apart their last beats can fall: process 0 dispatches ahead and beats
    # its last once step 10 is done, process 1 beats step 10 only after reading the next batch
    # ahead (loader.prefetch), which on a loaded machine can take seconds. With (10, 4) process 0
    # once spoke first and its exit aborted process 1 (-6). Process 0 normally ends before its
    # own 30 s anyway: JAX sees process 1 gone within its heartbeat timeout (20 // 2 = 10 s).
    timeouts = (30, 4)
    start = time.time()
    procs = [subprocess.Popen(
        [sys.executable, "-u", "-c", code, "train", CONFIG, *overrides, f"run.dir={run_dir}",
         f"distributed.hang_timeout_s={timeouts[i]}"],
        env=clean_env(4, BIGJAX_COORDINATOR=f"localhost:{port}", BIGJAX_NUM_PROCESSES="2",
                      BIGJAX_PROCESS_ID=str(i), HANG_AFTER="10", JAX_COMPILATION_CACHE_DIR=str(cache),
                      PYTHONPATH=os.path.dirname(__file__)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    took = time.time() - start
    # both tails: which process ended first (and how) is what a failure here needs to show
    both = f"process 1:\n{errs[1][-3000:]}\nprocess 0 ({procs[0].returncode}):\n{errs[0][-3000:]}"
    assert procs[1].returncode == 1, both
    hung = re.search(r"^bigjax: error: distributed: process 1 of 2 made no progress for (\d+) s "
                     r"after step 10 \(distributed.hang_timeout_s=4\); a process is hung \(stacks "
                     r"above\); exiting so that the job restarts from its last complete checkpoint$",
                     errs[1], re.M)
    assert hung and 4 <= int(hung.group(1)) < 12, errs[1][-3000:]
    assert "hang_after.py" in errs[1]  # its stack shows where
    assert procs[0].returncode != 0
    assert ("process 0 of 2 made no progress" in errs[0]
            or "most likely because another process died" in errs[0]
            or "another task died" in errs[0]), errs[0][-3000:]
    assert took < 200
    assert committed_steps(run_dir) and committed_steps(run_dir)[-1] in (4, 8)


def test_batchnorm_and_onednn_convolutions_train_across_processes_like_one(tmp_path):
    """An image model across two processes: BatchNorm's statistics are over the global batch
    (a cross-process mean), per-device filter gradients (oneDNN's where built: `auto`, see
    test_conv.py; else XLA's or im2col) are summed across processes, and
    each process reads its rows of one process's global batches (so dropout drops the same
    features of the same images), so each step's loss equals one process with all 8 devices. A
    per-process BatchNorm, a missing cross-process sum or rows interleaved across processes (as
    the loader read them before) moves the loss by more than 2e-3 at step 1 or 2."""
    cnn = os.path.join(ROOT, "configs", "cnn_digits.yaml")
    steps = 6
    small = ["model.channels=[8,16]", "train.batch_size=32",
             f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
             "train.progress=false", "optimizer.warmup_steps=0", f"distributed.timeout_s={TIMEOUT_S}"]
    cache = str(tmp_path / "jit_cache")
    one = subprocess.Popen([sys.executable, "-u", "-m", "bigjax.cli", "train", cnn, *small,
                            f"run.dir={tmp_path / 'one'}"],
                           env=clean_env(8, JAX_COMPILATION_CACHE_DIR=cache),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    two = subprocess.Popen(["bash", LOCAL, "2", cnn, *small, "mesh.dcn_data=2",
                            f"run.dir={tmp_path / 'two'}"],
                           env=clean_env(None, BIGJAX_LOG_DIR=str(tmp_path / "logs"),
                                         JAX_COMPILATION_CACHE_DIR=cache),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one_out, two_out = finish(one, "one process"), finish(two, "local.sh 2")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, (step, a[step], b[step])
    for out in (one_out, two_out):
        assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in out
