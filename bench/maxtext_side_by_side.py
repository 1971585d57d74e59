"""bigjax and MaxText training the same decoder on this CPU, alternately, in one run.

The decoder of the compute issue: d_model 256, 4 layers, 4 heads of 64, SwiGLU MLP 1,024,
vocabulary 32,000 (untied output layer, as MaxText's default), sequence 256, batch 4, float32, on
one CPU device; with full remat (MaxText's default) and with the least each system has (bigjax
`model.remat=none`; MaxText `remat_policy=minimal`, the fastest of its policies, which still
recomputes elementwise work). MaxText 0.2.5 runs through `../shared/peers/maxtext_cpu.sh`
(Python >= 3.12 from pyenv; it installs itself into a temporary venv on first use), bigjax
through `bigjax bench`; each round runs both once per setting, and the tables give medians over
rounds of each system's median step and their ratio.

MaxText runs on its own jax (0.12 from Python 3.12). `--bigjax-python` runs bigjax (this source
tree) under each interpreter given, one column each in the same alternation: a Python 3.12
environment with bigjax's dependencies (`PYTHON=python3.12 bash scripts/setup.sh` in a second
clone) puts bigjax on the same jax and XLA as MaxText.

    .venv/bin/python bench/maxtext_side_by_side.py --rounds 3 --steps 20
    .venv/bin/python bench/maxtext_side_by_side.py --bigjax-python .venv/bin/python \
        ../bigjax312/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIGJAX = ["model.vocab_size=32000", "model.d_model=256", "model.n_layers=4", "model.n_heads=4",
          "model.head_dim=64", "model.d_ff=1024", "model.mlp=swiglu", "model.tie_embeddings=false",
          "model.max_seq_len=256", "train.seq_len=256", "train.batch_size=4",
          "model.dtype=float32", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
SETTINGS = {"remat full": ("model.remat=full", "remat_policy=full"),
            "least remat": ("model.remat=none", "remat_policy=minimal")}
MT_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+), .*Tokens/s/device: ([0-9.]+)")


def jax_version(python: str) -> str:
    try:
        out = subprocess.run([python, "-c", "import jax; print(jax.__version__)"], cwd=ROOT,
                             capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(f"maxtext_side_by_side: --bigjax-python {python}: {e.strerror}")
    if out.returncode or not out.stdout.strip():
        raise SystemExit(f"maxtext_side_by_side: --bigjax-python {python} cannot import jax")
    return out.stdout.strip()


def bigjax_tokens_per_s(python: str, remat: str, steps: int) -> float:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as MaxText's run
    # `-m` from ROOT: this source tree's bigjax, whichever environment the interpreter has
    out = subprocess.run([python, "-m", "bigjax.cli", "bench", "configs/gpt_tiny.yaml",
                          *BIGJAX, remat, "--steps", str(steps), "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
        raise SystemExit(f"maxtext_side_by_side: bigjax under {python} failed (exit "
                         f"{out.returncode}): " + " | ".join(tail))
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def maxtext_tokens_per_s(script: str, remat: str, steps: int) -> float:
    """Median tokens/s over MaxText's logged steps after the first two (compile, warm-up)."""
    out = subprocess.run(["bash", script, f"steps={steps + 2}", "dtype=float32",
                          "weight_dtype=float32", remat], capture_output=True, text=True)
    rates = [float(m.group(3)) for m in MT_LINE.finditer(out.stdout + out.stderr)
             if int(m.group(1)) >= 2]
    if out.returncode or not rates:
        tail = (out.stdout + out.stderr).strip().splitlines()[-5:]
        raise SystemExit(f"maxtext_side_by_side: MaxText failed (exit {out.returncode}): "
                         + " | ".join(tail))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--maxtext", default=os.path.join(ROOT, "..", "shared", "peers",
                                                      "maxtext_cpu.sh"))
    ap.add_argument("--bigjax-python", nargs="+", default=[sys.executable], metavar="PYTHON",
                    help="interpreters to run bigjax under, one column each (default: this one)")
    args = ap.parse_args()
    systems = {f"bigjax (jax {jax_version(py)})": py for py in args.bigjax_python}
    if len(systems) < len(args.bigjax_python):
        ap.error("--bigjax-python: two interpreters with the same jax version")
    sys.path.insert(0, ROOT)
    from bigjax.perf import cpu_description
    print(f"CPU: {cpu_description()}", flush=True)
    results: dict[str, dict[str, list[float]]] = {s: {k: [] for k in [*systems, "MaxText"]}
                                                  for s in SETTINGS}
    for r in range(args.rounds):
        for name, (ours, theirs) in SETTINGS.items():
            res = results[name]
            for label, py in systems.items():
                res[label].append(bigjax_tokens_per_s(py, ours, args.steps))
            res["MaxText"].append(maxtext_tokens_per_s(args.maxtext, theirs, args.steps))
            print(f"round {r + 1} {name}: " + ", ".join(
                f"{k} {v[-1]:,.0f}" for k, v in res.items()) + " tokens/s", flush=True)
    print("| setting | system | tokens/s | ratio to MaxText (median of rounds) |")
    print("|---|---|---|---|")
    for name, res in results.items():
        for label in [*systems, "MaxText"]:
            ratio = statistics.median(b / m for b, m in zip(res[label], res["MaxText"]))
            print(f"| {name} | {label} | {statistics.median(res[label]):,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
