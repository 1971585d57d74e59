"""Bad input through the CLI: one line on stderr, exit code 2, nothing in the run dir touched."""

import os
import subprocess
import sys

import pytest

from bigjax.cli import run

SMALL = ["data.max_chars=60000", "data.vocab_size=300", "train.steps=2", "train.seq_len=32",
         "model.max_seq_len=32", "train.batch_size=8", "model.d_model=32", "model.d_ff=64"]


def _err(capsys, *args) -> str:
    rc = run(["train", "configs/gpt_tiny.yaml", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=3"], "mesh: data*fsdp*tensor = 3*1*1 = 3, but there are 8 devices (set "
     "mesh.data=-1 to use the rest); on CPU, simulate 3 devices by starting with "
     "XLA_FLAGS=--xla_force_host_platform_device_count=3"),
    (["mesh.fsdp=3"], "mesh: fsdp*tensor*dcn_data = 3 does not divide the 8 devices; on CPU, "
     "simulate 3 devices by starting with XLA_FLAGS=--xla_force_host_platform_device_count=3"),
    (["mesh.data=4", "mesh.fsdp=2", "train.batch_size=12"],
     "train.batch_size=12 (micro-batch 12 with grad_accum=1) is not divisible by the "
     "batch-sharded mesh axes data*fsdp=8"),
    (["train.bogus=1"], "unknown config key 'train.bogus'"),
])
def test_config_errors_before_anything_is_written(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    err = _err(capsys, f"run.dir={run_dir}", *SMALL, *overrides)
    assert err.startswith("bigjax: error: " + message), err
    assert not run_dir.exists()


def test_indivisible_model_dimension_names_the_parameter(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    err = _err(capsys, f"run.dir={run_dir}", *SMALL, "mesh.data=1", "mesh.tensor=8",
               "model.n_heads=4")
    assert err.startswith("bigjax: error: parameter 'layer_0/attn/key/kernel' dimension 4 is not "
                          "divisible by mesh axes ('tensor',) of size 8"), err
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'
    assert not (run_dir / "checkpoints").exists()


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _err(capsys, f"run.dir={blocker}/run", *SMALL)
    assert err.startswith(f"bigjax: error: run.dir '{blocker}/run' is not writable"), err
    assert blocker.read_text() == "x"


def test_missing_config_file_in_a_real_process_has_no_traceback():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "bigjax.cli", "train", "nope.yaml"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip() == "bigjax: error: config file 'nope.yaml' does not exist"


def test_train_help_explains_usage(capsys):
    with pytest.raises(SystemExit) as e:
        run(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "key.sub=value" in out and "resumes" in out
