"""Run dirs through etils.epath (bigjax/paths.py): URI forms, bad run.dir values, and everything
bigjax itself reads and writes in a run dir, on a `gs://` that is not the os (tests/fake_bucket.py):
config, labels, metrics, the loss plot, tokenizers, the checkpoint probing and the moving aside of
damaged checkpoints. Plus the allowlist that keeps os.path / open() off run-dir paths."""

from __future__ import annotations

import ast
import json
import os
import tempfile

import pytest
from etils import epath

from fake_bucket import bucket  # noqa: F401  (fixture)
from bigjax import cli
from bigjax.checkpoint import list_checkpoints, set_aside, unwritable_reason
from bigjax.config import init_run_dir, load_config, save_config
from bigjax.data.classification import load_label_names, save_label_names
from bigjax.data.tokenizer import load_tokenizer, save_tokenizer
from bigjax.data.wordpiece import train_wordpiece
from bigjax.errors import CheckpointError, ConfigError
from bigjax.init_from import resolve_step_dir
from bigjax.paths import run_path, run_str
from bigjax.report import MetricsFile, plot_losses, read_metrics
from bigjax.resume import REQUIRED_FILES, missing_files, newest_complete_step, rerun_advice

RUN = "gs://bucket/run"


def test_run_path_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_str(f"file://{tmp_path}/run") == f"{tmp_path}/run"
    assert run_str("rel/run") == f"{tmp_path}/rel/run"  # orbax needs absolute local paths
    assert str(run_path("rel/run", absolute=False)) == "rel/run"  # messages keep what was typed
    assert run_str("gs://bucket/a/b/") == "gs://bucket/a/b"
    assert run_str(epath.Path("s3://bucket/a")) == "s3://bucket/a"
    assert init_run_dir("gs://bucket/run/checkpoints/20@20") == "gs://bucket/run"
    assert init_run_dir("file:///x/run/checkpoints") == "/x/run"


@pytest.mark.parametrize("value, problem", [
    ("gcs://bucket/run", "unknown storage 'gcs://' (expected a local path, file:///abs/path, "
                         "gs://BUCKET/PATH or s3://BUCKET/PATH)"),
    ("gs://", "unknown storage 'gs://' (expected a local path, file:///abs/path, "
              "gs://BUCKET/PATH or s3://BUCKET/PATH)"),
    ("file://host/run", "a file:// URI needs an absolute path (file:///x)"),
])
def test_a_bad_run_dir_is_one_line_before_anything_runs(value, problem, tmp_path, capsys,
                                                        monkeypatch):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"run.dir={value}"])
    assert str(e.value) == f"run.dir='{value}': {problem}"
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert cli.run(["train", str(tmp_path / "c.yaml"), f"run.dir={value}"]) == 2
    assert capsys.readouterr().err.strip() == f"bigjax: error: run.dir='{value}': {problem}"
    assert os.listdir(tmp_path / "cwd") == []  # epath would have made a local `gcs:` dir


def test_a_file_uri_with_a_host_is_one_line_for_every_command(capsys):
    assert cli.run(["eval", "file://host/run"]) == 2
    assert cli.run(["checkpoints", "file://host/run"]) == 2
    assert capsys.readouterr().err.strip().split("\n") == [
        "bigjax: error: 'file://host/run': a file:// URI needs an absolute path (file:///x)"] * 2


def _fake_step(step_dir: epath.Path, files=REQUIRED_FILES + ("commit_success.txt",)) -> None:
    for f in files:
        (step_dir / f).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / f).write_text(json.dumps({"step": step_dir.name}) if "meta" in f else "x")


def test_damaged_checkpoints_on_object_storage(bucket):
    """A gs:// step is written in place and finished by orbax's commit file: one without it is
    an unfinished save, one without a required file is damaged; both are passed over, and moving
    a damaged one aside keeps its files (epath's copy-then-delete rename)."""
    ckpts = epath.Path(RUN) / "checkpoints"
    _fake_step(ckpts / "10")
    _fake_step(ckpts / "20", REQUIRED_FILES)  # killed before the commit file
    _fake_step(ckpts / "30", [f for f in REQUIRED_FILES if f != "state/manifest.ocdbt"]
               + ["commit_success.txt"])
    assert missing_files(ckpts / "10") == []
    assert missing_files(ckpts / "20") == ["commit_success.txt"]
    assert missing_files(ckpts / "30") == ["state/manifest.ocdbt"]
    assert newest_complete_step(ckpts) == 10
    assert [(c.step, c.problem) for c in list_checkpoints(RUN)] == [
        (10, ""), (20, "unfinished save (orbax ignores it)"), (30, "missing state/manifest.ocdbt")]
    assert resolve_step_dir(RUN) == ckpts / "10"  # init.from picks the newest complete one
    with pytest.raises(CheckpointError, match=r"no complete checkpoint at step 30 \(complete "
                                              r"steps: \[10\]\)"):
        resolve_step_dir(f"{RUN}@30")

    before = {f for f in bucket() if "/checkpoints/30/" in f}
    [moved] = set_aside(ckpts, [30])
    assert str(moved).startswith(f"{RUN}/checkpoints_damaged/30-")
    assert not (ckpts / "30").exists()
    assert {f.replace("/checkpoints/30/", f"/checkpoints_damaged/{moved.name}/")
            for f in before} == {f for f in bucket() if "_damaged/" in f}
    assert (moved / "meta" / "metadata").read_text() == '{"step": "30"}'


def test_rerun_advice_reads_a_gs_run_dir(bucket, tmp_path):
    _fake_step(epath.Path(RUN) / "checkpoints" / "8")
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{dir: {RUN}}}\n")
    assert rerun_advice(str(config), []) == (
        f"rerun the same command to resume from step 8 ({RUN}/checkpoints/8)")


def test_config_labels_and_probe_are_written_whole(bucket):
    cfg = load_config(None, [f"run.dir={RUN}"])
    save_config(cfg, epath.Path(RUN) / "config.yaml")
    assert load_config(f"{RUN}/config.yaml", saved=True) == cfg
    save_label_names(RUN, ["neg", "pos"])
    assert load_label_names(RUN) == ["neg", "pos"]
    assert unwritable_reason(f"{RUN}/checkpoints") is None
    # every write went to a private name first and was renamed; nothing of it is left
    assert bucket() == ["/gs/bucket/run/config.yaml", "/gs/bucket/run/labels.json"]


def test_metrics_file_uploads_whole_objects(bucket):
    path = epath.Path(RUN) / "metrics.jsonl"
    rows = [{"step": i, "loss": 4.0 / i, "eval_loss": 5.0 / i} for i in (1, 2, 3)]
    eager = MetricsFile(path, upload_every_s=0)
    eager.write(json.dumps(rows[0]) + "\n")
    assert read_metrics(RUN) == rows[:1]  # uploaded at once
    eager.close()
    lazy = MetricsFile(path, upload_every_s=3600)  # a resumed run keeps the earlier rows
    for r in rows[1:]:
        lazy.write(json.dumps(r) + "\n")
    assert read_metrics(RUN) == rows[:1]  # not yet: object storage has no append
    lazy.close()
    assert read_metrics(RUN) == rows
    assert plot_losses(RUN) == f"{RUN}/loss.png"
    assert (epath.Path(RUN) / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_round_trip_through_a_local_copy(bucket, tmp_path, monkeypatch):
    """save_pretrained / from_pretrained need local files: a gs:// tokenizer dir is staged and
    downloaded through temporary local dirs, which are removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # /tmp is shared with other work
    texts = ["the cat sat on the mat", "a dog and a cat", "mats and hats"] * 3
    tok = train_wordpiece(texts, 40, f"{RUN}/tokenizer")
    again = load_tokenizer(f"{RUN}/tokenizer")
    assert again("the cat and a dog")["input_ids"] == tok("the cat and a dog")["input_ids"]
    assert again.get_vocab() == tok.get_vocab() and len(tok) > 20
    save_tokenizer(again, f"{RUN}/tokenizer")  # a second writer keeps the first one's files
    assert bucket() == ["/gs/bucket/run/tokenizer/tokenizer.json",
                        "/gs/bucket/run/tokenizer/tokenizer_config.json"]
    assert os.listdir(tmp_path) == []


# ---- no run-dir path reaches os.path / open() -------------------------------------------------
BANNED = ("os.path.", "os.rename", "os.replace", "os.makedirs", "os.listdir", "os.remove",
          "os.walk", "os.rmdir", "shutil.")
# Modules that touch local files on purpose; every other module reaches files through epath.
ALLOWED = {
    "paths.py": "makes the local temporary copies that Hugging Face tokenizers need",
    "perf.py": "its cache of measured peak FLOP/s lives in ~/.cache, never in a run dir",
    "data/corpus.py": "reads the corpus files shipped inside the package",
    # input readers (user data, not run dirs), owned by the streaming-data work
    "data/lm.py": "reads user input files", "data/loader.py": "reads user input files",
    "data/records.py": "reads user input files", "data/sources.py": "reads user input files",
    "data/tfds_source.py": "reads user input files", "data/lm_stream.py": "reads user input files",
    # (data/prepared.py reads a prepared dir through epath: not listed)
    "data/prepare.py": "reads the input files (local); writes the prepared dir through epath",
    "data/image_sources.py": "reads user image folders",
    "hf/torchvision.py": "reads a user's torchvision weights file",
    "kernels/native.py": "compiles its kernels into the Python environment's lib/, never a run dir",
}
ROOT = os.path.join(os.path.dirname(__file__), "..", "bigjax")


def _local_file_calls(path: str) -> list[str]:
    """`os.path.isdir(...)`, `open(...)`, ... calls in a module, with their line numbers."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name == "open" or any(name.startswith(b) or name == b for b in BANNED):
                found.append(f"{name} (line {node.lineno})")
    return found


def test_only_allowlisted_modules_use_local_file_calls():
    offenders = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/")
            if f.endswith(".py") and rel not in ALLOWED:
                calls = _local_file_calls(os.path.join(dirpath, f))
                if calls:
                    offenders[rel] = calls
    assert offenders == {}, ("run-dir paths go through etils.epath (bigjax/paths.py); these "
                             f"modules call the local file system: {offenders}")


def test_the_allowlist_check_sees_what_it_bans(tmp_path):
    """The scan is not vacuous: each banned form is found in a module that uses it."""
    src = tmp_path / "m.py"
    src.write_text("import os, shutil\nos.path.isdir('x')\nopen('x')\nos.rename('a', 'b')\n"
                   "shutil.rmtree('x')\nepath.Path('x').open()\n")
    assert _local_file_calls(str(src)) == [
        "os.path.isdir (line 2)", "open (line 3)", "os.rename (line 4)", "shutil.rmtree (line 5)"]
