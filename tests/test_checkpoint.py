"""Checkpoints under real `bigjax train` subprocesses: SIGTERM, SIGKILL mid-save, exact resume,
damaged checkpoints, resharded restore, init.from, refused configs, read-only disks.

One uninterrupted reference run (module fixture) is compared with every other run: per-step losses
from metrics.jsonl and the final state read back from the orbax checkpoints, bitwise.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bigjax.checkpoint import list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
# Everything explicit (no shared config file that may change under us). Dropout is on, so exact
# resume also covers the step-derived dropout RNG.
CONFIG = f"""
seed: 0
model: {{name: gpt, d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64, max_seq_len: 32,
        positions: learned, norm: layernorm, mlp: gelu_tanh, use_bias: true, tie_embeddings: true,
        dropout: 0.1}}
data: {{source: "builtin:pydocs", max_chars: 200000, vocab_size: 512, val_fraction: 0.02}}
train: {{steps: {STEPS}, batch_size: 8, seq_len: 32, log_every: 1, eval_every: 10,
        eval_batches: 2, progress: false}}
optimizer: {{name: adamw, lr: 0.003, weight_decay: 0.1, schedule: cosine, warmup_steps: 0,
            min_lr_ratio: 0.1, clip_norm: 1.0}}
checkpoint: {{every: 10, keep: 2, keep_best_metric: eval_loss, keep_best_mode: max}}
"""
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    # One compilation cache (bigjax's BIGJAX_COMPILE_CACHE) shared by the children: the resumes
    # below run programs read back from it (on jax 0.10 not the float32 steps: oneDNN's products
    # cannot be stored, README "Checkpoints").
    path = tmp_path_factory.mktemp("jax_cache")
    with open(path / "tiny.yaml", "w") as fh:
        fh.write(CONFIG)
    return str(path)


def _env(cache_dir: str, devices: int = 8) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1", BIGJAX_COMPILE_CACHE=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _cmd(cache_dir: str, run_dir: str, extra: list[str], tokenizer: str | None) -> list[str]:
    tok = [f"data.tokenizer={tokenizer}"] if tokenizer else []
    return [sys.executable, "-m", "bigjax.cli", "train", os.path.join(cache_dir, "tiny.yaml"),
            f"run.dir={run_dir}", *tok, *extra]


def train(cache_dir: str, run_dir: str, extra: list[str] = (), tokenizer: str | None = None,
          devices: int = 8, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *_cmd(cache_dir, run_dir, list(extra), tokenizer)], cwd=ROOT,
                          env=_env(cache_dir, devices), capture_output=True, text=True, timeout=600)


def start(cache_dir: str, run_dir: str, tokenizer: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(cache_dir, run_dir, [], tokenizer), cwd=ROOT, env=_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(run_dir: str, skip_lines: int = 0) -> dict[int, float]:
    """step -> training loss; a resumed run repeats steps, the last row of a step wins."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        # a line still being written by a running child has no newline yet
        rows = [json.loads(line) for line in fh.readlines()[skip_lines:] if line.endswith("\n")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def n_lines(path: str) -> int:
    with open(path) as fh:
        return len(fh.readlines())


def read_state(step_dir: str) -> dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp
    from bigjax.checkpoint import flat_shapes, read_tree_metadata
    item = os.path.join(step_dir, "state")
    meta = read_tree_metadata(item)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(restore_args=args))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert len(flat) == len(flat_shapes(meta))
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in flat}


def snapshot(path: str) -> dict[str, tuple[int, int]]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), path)] = (st.st_size, st.st_mtime_ns)
    return out


def copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bigjax: error:")]
    assert len(errors) == 1 and text in errors[0], proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> str:
    """The uninterrupted run: 30 steps, checkpoints every 10, eval every 10."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    proc = train(cache_dir, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(run_dir, "stdout.txt"), "w") as fh:
        fh.write(proc.stdout)
    return run_dir


def test_a_partial_evaluation_says_how_much_it_scored(reference):
    """train.eval_batches=2 of batch 8 scores 16 validation windows: the rows and the printed
    lines say so, and what a user calls the data (documents, windows) is named at start-up."""
    with open(os.path.join(reference, "metrics.jsonl")) as fh:
        evals = [r for r in map(json.loads, fh) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    total = evals[0]["eval_split_examples"]
    assert total > 16 and all((r["eval_examples"], r["eval_split_examples"]) == (16, total)
                              for r in evals)
    with open(os.path.join(reference, "stdout.txt")) as fh:
        out = fh.read()
    assert re.search(r"^step 30: eval_loss \S+ eval_accuracy \S+ eval_perplexity \S+ "
                     rf"\(partial: 16 of {total} validation examples\)$", out, re.M), out
    assert re.search(r"^model: 0\.\d\dM parameters, mesh \{'data': 8, 'fsdp': 1, 'tensor': 1\}; "
                     r"data: \d+ training documents in \d+ windows of 32 tokens$", out, re.M), out


@pytest.fixture(scope="module")
def tokenizer(reference) -> str:
    return os.path.join(reference, "tokenizer")


def test_the_run_stored_its_programs_in_bigjax_compile_cache(reference, cache_dir):
    # (jax 0.10's float32 steps run products on oneDNN, which XLA cannot store: init always is)
    assert any(f.startswith("jit_init-") for f in os.listdir(cache_dir)), os.listdir(cache_dir)


def test_keep_latest_plus_best_by_eval_metric(reference):
    # keep=2 keeps 20 and 30; keep_best(max eval_loss) also keeps 10, whose eval loss is highest.
    infos = list_checkpoints(reference)
    assert [(c.step, c.complete) for c in infos] == [(10, True), (20, True), (30, True)]
    with open(os.path.join(reference, "metrics.jsonl")) as fh:
        evals = {r["step"]: r["eval_loss"] for r in map(json.loads, fh) if "eval_loss" in r}
    assert {c.step: c.metrics["eval_loss"] for c in infos} == {s: evals[s] for s in (10, 20, 30)}
    assert evals[10] == max(evals[s] for s in (10, 20, 30))


def test_sigterm_then_sigkill_mid_save_then_resume_is_bitwise_identical(tmp_path, cache_dir,
                                                                           reference, tokenizer):
    run_dir = str(tmp_path / "run")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    # 1. SIGTERM once training is under way: the current step finishes and is checkpointed.
    proc = start(cache_dir, run_dir, tokenizer)
    while not (os.path.exists(metrics) and max(losses(run_dir), default=0) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = int(re.search(r"stopped by signal at step (\d+); checkpoint complete in (\S+)",
                            out).group(1))
    assert 3 <= stopped < STEPS
    assert max(losses(run_dir)) == stopped
    infos = list_checkpoints(run_dir)
    assert [(c.step, c.complete) for c in infos if c.step == stopped] == [(stopped, True)]
    assert read_state(os.path.join(ckpt_dir, str(stopped)))["step"] == stopped

    # 2. Resume, then SIGKILL while an async save is in flight (its tmp dir exists).
    proc = start(cache_dir, run_dir, tokenizer)
    tmp_name = None
    while tmp_name is None:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        names = os.listdir(ckpt_dir)
        tmp_name = next((n for n in names if re.fullmatch(r"\d+\.orbax-checkpoint-tmp.*", n)
                         and int(n.split(".")[0]) > stopped), None)
        time.sleep(0.002)
    proc.kill()
    proc.communicate()
    killed_step = int(tmp_name.split(".")[0])
    assert tmp_name in os.listdir(ckpt_dir) and str(killed_step) not in os.listdir(ckpt_dir)

    listing = subprocess.run([sys.executable, "-m", "bigjax.cli", "checkpoints", run_dir],
                             capture_output=True, text=True, env=_env(cache_dir), timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert [(r[0], r[-1] if r[-1] == "complete" else r[5]) for r in rows] == \
        [(str(stopped), "complete"), (str(killed_step), "INCOMPLETE:")]

    # 3. Resume to the end: same losses at every step and the same final state, bit for bit.
    proc = train(cache_dir, run_dir, tokenizer=tokenizer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {stopped} " in proc.stdout
    assert losses(run_dir) == losses(reference)
    got, want = (read_state(os.path.join(d, "checkpoints", str(STEPS))) for d in (run_dir, reference))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_damaged_latest_checkpoints_fall_back_to_an_older_one(tmp_path, cache_dir, reference,
                                                              tokenizer):
    run_dir = copy_run(reference, str(tmp_path / "run"))
    ckpt = os.path.join(run_dir, "checkpoints")
    for root, _, files in os.walk(os.path.join(ckpt, "30", "state")):  # 30: data files cut
        for f in files:
            if os.path.basename(root) == "d":
                path = os.path.join(root, f)
                os.truncate(path, os.path.getsize(path) // 2)
    data_dir = os.path.join(ckpt, "20", "state", "ocdbt.process_0", "d")  # 20: a file removed
    os.remove(os.path.join(data_dir, max(os.listdir(data_dir),
                                         key=lambda f: os.path.getsize(os.path.join(data_dir, f)))))
    before = n_lines(os.path.join(run_dir, "metrics.jsonl"))

    proc = train(cache_dir, run_dir, tokenizer=tokenizer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    expected = [f"warning: checkpoint step 30 in {ckpt}: array metadata unreadable",
                f"warning: checkpoint step 20 in {ckpt} cannot be restored: ",
                f"warning: damaged checkpoint step 30 moved to {ckpt}_damaged/30-",
                f"warning: damaged checkpoint step 20 moved to {ckpt}_damaged/20-"]
    assert len(warnings) == 4 and all(w.startswith(e) for w, e in zip(warnings, expected)), \
        proc.stderr[-3000:]
    assert "resumed from step 10 " in proc.stdout
    assert sorted(n.split("-")[0] for n in os.listdir(run_dir + "/checkpoints_damaged")) == ["20", "30"]
    new = losses(run_dir, skip_lines=before)
    assert sorted(new) == list(range(11, STEPS + 1))
    assert new == {s: v for s, v in losses(reference).items() if s > 10}
    got, want = (read_state(os.path.join(d, "checkpoints", str(STEPS))) for d in (run_dir, reference))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_resharded_restore_continues_within_1e5(tmp_path, cache_dir, reference, tokenizer):
    """Saved on 8 devices as data=8; restored on 4 devices as fsdp=2 x tensor=2: both the device
    count and the axes change. (Reading into fsdp=4 x tensor=2 on 8 devices: test_init_from.py.)"""
    devices, mesh = 4, {"data": 1, "fsdp": 2, "tensor": 2}
    run_dir = copy_run(reference, str(tmp_path / "run"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "30"))
    before = n_lines(os.path.join(run_dir, "metrics.jsonl"))
    proc = train(cache_dir, run_dir, [f"mesh.{k}={v}" for k, v in mesh.items()],
                 tokenizer=tokenizer, devices=devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 20 " in proc.stdout
    new, ref = losses(run_dir, skip_lines=before), losses(reference)
    assert sorted(new) == list(range(21, STEPS + 1))
    np.testing.assert_allclose([new[s] for s in new], [ref[s] for s in new], rtol=0, atol=1e-5)
    with open(os.path.join(run_dir, "checkpoints", "30", "meta", "metadata")) as fh:
        saved_mesh = json.load(fh)["mesh"]
    assert saved_mesh == mesh


def test_init_from_loads_params_only_and_initialises_a_new_head(tmp_path, cache_dir, reference,
                                                                tokenizer):
    # Untied output head (new: lm_head) and rotary positions (pos_embed no longer used). An lr of
    # 1e-30 leaves float32 parameters unchanged by the one step, so they must equal the source.
    run_dir = str(tmp_path / "finetune")
    proc = train(cache_dir, run_dir, ["model.tie_embeddings=false", "model.positions=rotary",
                                      f"init.from={reference}@20", "train.steps=1",
                                      "optimizer.lr=1e-30", "checkpoint.keep_best_metric=",
                                      "train.eval_every=0"],
                 tokenizer=tokenizer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = re.search(r"not in the source, freshly initialised: (.*)", proc.stderr).group(1)
    ignored = re.search(r"in the source but not in this model, ignored: (.*)", proc.stderr).group(1)
    assert fresh.split(", ") == ["lm_head/kernel"]
    assert ignored.split(", ") == ["pos_embed/embedding"]
    got = read_state(os.path.join(run_dir, "checkpoints", "1"))
    src = read_state(os.path.join(reference, "checkpoints", "20"))
    params = {k for k in src if k.startswith("params/")}
    assert {k for k in got if k.startswith("params/")} == \
        params - {"params/pos_embed/embedding"} | {"params/lm_head/kernel"}
    for k in params - {"params/pos_embed/embedding"}:
        np.testing.assert_array_equal(got[k], src[k], err_msg=k)
    assert got["step"] == 1  # not the source's step, and a fresh optimizer state:
    counts = [k for k in got if k.startswith("opt_state/") and k.endswith("/count")]
    assert counts and all(got[k] == 1 for k in counts) and all(src[k] == 20 for k in counts)
    mu = [k for k in got if "/mu/" in k and k.endswith("mlp/up/kernel")]
    assert mu and not np.array_equal(got[mu[0]], src[mu[0]])


def test_resume_refuses_a_different_model_before_writing(tmp_path, cache_dir, reference, tokenizer):
    run_dir = copy_run(reference, str(tmp_path / "run"))
    before = snapshot(run_dir)
    proc = train(cache_dir, run_dir, ["model.d_ff=128", "model.n_layers=2", "model.dropout=0.0",
                                      "train.steps=40"], tokenizer=tokenizer)
    assert_one_line_error(proc, "was written by a different model: model.d_ff (checkpoint 64, "
                                "config 128); model.n_layers (checkpoint 1, config 2); ")
    assert snapshot(run_dir) == before

    # another optimizer: the setting comes first, not a list of 100+ optimizer arrays
    proc = train(cache_dir, run_dir, ["optimizer.name=sgd", "train.steps=40"], tokenizer=tokenizer)
    assert_one_line_error(proc, "does not fit this run's state: the config differs in "
                                "optimizer.name (checkpoint 'adamw', config 'sgd'); arrays ")
    assert snapshot(run_dir) == before

    proc = train(cache_dir, run_dir, ["checkpoint.resume=never"], tokenizer=tokenizer)
    assert_one_line_error(proc, "checkpoint.resume=never but "
                                f"{run_dir}/checkpoints already holds checkpoints (steps [10, 20, 30])")
    assert snapshot(run_dir) == before


def test_resume_must_without_a_checkpoint_fails(tmp_path, cache_dir, tokenizer):
    run_dir = str(tmp_path / "empty")
    proc = train(cache_dir, run_dir, ["checkpoint.resume=must"], tokenizer=tokenizer)
    assert_one_line_error(proc, f"checkpoint.resume=must but {run_dir}/checkpoints holds no "
                                "checkpoint")
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == []


def test_read_only_checkpoint_dir_is_a_clear_error_and_keeps_checkpoints(tmp_path, cache_dir,
                                                                        reference, tokenizer):
    run_dir = copy_run(reference, str(tmp_path / "run"))
    ckpt = os.path.join(run_dir, "checkpoints")
    for root, dirs, files in os.walk(ckpt):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
        os.chmod(root, 0o555)
    before = snapshot(run_dir)
    # This machine runs tests as root, which ignores permissions: drop every capability.
    proc = train(cache_dir, run_dir, ["train.steps=40"], tokenizer=tokenizer,
                 prefix=["setpriv", "--bounding-set=-all"] if os.geteuid() == 0 else [])
    assert_one_line_error(proc, f"checkpoint directory '{ckpt}' is not writable (Permission "
                                "denied); use a run.dir on a writable disk")
    assert snapshot(run_dir) == before
    for root, dirs, files in os.walk(ckpt):
        os.chmod(root, 0o755)


def test_full_disk_is_a_clear_error_and_keeps_the_complete_checkpoint(tmp_path, cache_dir,
                                                                      reference, tokenizer):
    # checkpoints/ is an 8 MB tmpfs in a private mount namespace, filled up as soon as step 10 is
    # complete; the step 20 save fails. The tmpfs dies with the namespace, so copy it out inside.
    run_dir = str(tmp_path / "run")
    ckpt = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt)
    script = (f"mount -t tmpfs -o size=8m tmpfs {ckpt} || exit 99; "
              f"{shlex.join(_cmd(cache_dir, run_dir, [], tokenizer))} & pid=$!; "
              f"while [ ! -d {ckpt}/10 ]; do sleep 0.02; done; "
              f"dd if=/dev/zero of={ckpt}/.filler bs=64k 2>/dev/null; "
              f"wait $pid; rc=$?; rm {ckpt}/.filler; cp -r {ckpt} {run_dir}/after; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=_env(cache_dir),
                          capture_output=True, text=True, timeout=600)
    assert_one_line_error(proc, f"writing a checkpoint to {ckpt} failed: ")
    assert "No space left on" in proc.stderr.splitlines()[-1]  # orbax's or tensorstore's words
    assert proc.stderr.rstrip().endswith(
        "; the complete checkpoints (steps [10]) are untouched; free space or fix permissions, "
        "then run again to resume")
    after = os.path.join(run_dir, "after")
    assert [n for n in os.listdir(after) if n.isdigit()] == ["10"]
    got, want = read_state(os.path.join(after, "10")), read_state(os.path.join(reference, "checkpoints", "10"))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
