"""Which checkpoint a rerun of a run resumes from, read from the run dir alone.

No JAX here: `launch/local.sh` asks after one of its processes died, and the answer should come
in a fraction of a second. `python -m bigjax.resume [--after-error] CONFIG [key=value ...]` prints
the advice for the run that `bigjax train CONFIG [key=value ...]` writes.
"""

from __future__ import annotations

import sys

from etils import epath

from bigjax.config import RunConfig, read_config_data
from bigjax.errors import BigjaxError
from bigjax.paths import COMMIT_FILE, PathLike, run_path

# Files every finished checkpoint has; a step dir without one of them was cut short or damaged.
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt",
                  "data/metadata", "meta/metadata")


def required_files(step_dir: PathLike) -> tuple[str, ...]:
    """On gs:// orbax writes a step in place (no atomic rename there) and marks it finished with
    its commit file last; elsewhere a step dir appears by rename, finished."""
    gcs = str(step_dir).startswith("gs://")
    return REQUIRED_FILES + (COMMIT_FILE,) if gcs else REQUIRED_FILES


def missing_files(step_dir: PathLike) -> list[str]:
    step_dir = epath.Path(step_dir)
    return [f for f in required_files(step_dir) if not (step_dir / f).is_file()]


def newest_complete_step(checkpoints_dir: PathLike) -> int | None:
    """The newest `<step>` dir with every required file (the one a resume picks), or None."""
    checkpoints_dir = epath.Path(checkpoints_dir)
    try:
        names = [p.name for p in checkpoints_dir.iterdir()]
    except OSError:
        return None
    for step in sorted((int(n) for n in names if n.isdigit()), reverse=True):
        if not missing_files(checkpoints_dir / str(step)):
            return step
    return None


def _run_settings(config: str, overrides: list[str]) -> tuple[str | None, str]:
    """(run.dir, checkpoint.resume) as the YAML and overrides give them, without checking the
    rest (a config that does not load may be what a process died of)."""
    try:
        data = read_config_data(config, overrides)
    except BigjaxError:
        return None, "auto"
    section = lambda name: data.get(name) if isinstance(data.get(name), dict) else {}
    run_dir = section("run").get("dir", RunConfig().dir)
    return (str(run_dir) if run_dir else None), str(section("checkpoint").get("resume", "auto"))


def rerun_advice(config: str, overrides: list[str], after_error: bool = False) -> str:
    """What running the `bigjax train` command again does, e.g. `rerun the same command to resume
    from step 6 (runs/x/checkpoints/6)`. `after_error`: the run ended with a bigjax error, which
    has to be fixed first."""
    run_dir, resume = _run_settings(config, overrides)
    rerun = "fix the error above, then rerun" if after_error else "rerun the same command"
    directory = run_path(run_dir, absolute=False) / "checkpoints" if run_dir else None
    step = newest_complete_step(directory) if directory else None
    if directory and step is None:
        return f"{rerun} to start again (no complete checkpoint in {directory})"
    if resume == "never":  # the run refuses a run dir with checkpoints
        rerun += " with checkpoint.resume=auto"
    if step is None:
        return f"{rerun} to resume from the newest complete checkpoint"
    return f"{rerun} to resume from step {step} ({directory / str(step)})"


if __name__ == "__main__":
    args = sys.argv[1:]
    after_error = bool(args) and args[0] == "--after-error"
    args = args[after_error:]
    if not args:
        sys.exit("usage: python -m bigjax.resume [--after-error] CONFIG [key=value ...]")
    print(rerun_advice(args[0], args[1:], after_error))
