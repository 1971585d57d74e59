"""Generation speed: bigjax's cached decoding (`Generator`, one compiled prefill + while_loop per
bucket) next to Hugging Face `generate` on PyTorch, same random GPT-2-small weights, same CPU.

    .venv/bin/python bench/generate_bench.py                        # batch 1 and 16
    .venv/bin/python bench/generate_bench.py --layers 2 --reps 1    # smoke run

A GPT-2-small-sized model (d_model 768, 12 layers, 12 heads, vocabulary 50257; `--layers` to
shrink it) is made with random weights by `transformers`, saved as safetensors and imported into
bigjax, so both sides run the same numbers. For each batch size, greedy decoding of
`--prompt-len` random prompt tokens: a run with one new token (prefill) and a run with
`--new-tokens` (no early stop on EOS), the two systems alternating run by run; prefill tokens/s =
batch x prompt length / the one-token time, decode tokens/s = batch x (new tokens - 1) / (the
difference). Times are medians; the load average is printed first and last. bigjax's compile
time is reported per bucket (batch rows, prompt bucket, new-token bucket).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from torchvision_ref import make_transformers_importable  # noqa: E402

make_transformers_importable()  # the test extra's torchvision may be a CUDA build (see there)

import jax  # noqa: E402
import numpy as np  # noqa: E402


def hf_model(layers: int, path: str):
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_positions=1024, n_embd=768, n_head=12,
                                     vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    import torch

    from bigjax import mesh as mesh_lib
    from bigjax.config import MeshConfig
    from bigjax.generate import Generator

    print(f"load average at start: {os.getloadavg()}; torch threads {torch.get_num_threads()}, "
          f"jax {jax.devices()[0].platform} x{jax.device_count()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model = hf_model(args.layers, tmp)
        mesh = mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
        gen = Generator.from_hf(tmp, mesh=mesh)
    T, N = args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    for B in args.batches:
        prompts = rng.integers(0, 50257, (B, T))
        ids = torch.tensor(prompts, dtype=torch.long)

        def ours(n: int):
            return lambda: gen.generate_ids(prompts.tolist(), n)

        def theirs(n: int):
            def run():
                with torch.no_grad():
                    torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            return run

        before = set(gen.compile_seconds)
        same = (gen.generate_ids(prompts.tolist(), N) ==
                theirs_tokens(torch_model, ids, N)).mean()  # also compiles the bucket
        bucket = next(k for k in gen.compile_seconds if k not in before)
        times: dict[str, list[float]] = {k: [] for k in ("ours1", "theirs1", "oursN", "theirsN")}
        for _ in range(args.reps):
            times["ours1"].append(timed(ours(1)))
            times["theirs1"].append(timed(theirs(1)))
            times["oursN"].append(timed(ours(N)))
            times["theirsN"].append(timed(theirs(N)))
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = lambda one, many: (B * T / one, B * (N - 1) / max(many - one, 1e-9))
        (op, od), (tp, td) = rate(med["ours1"], med["oursN"]), rate(med["theirs1"], med["theirsN"])
        print(f"batch {B}: prompt {T}, {N} new tokens; bucket (rows, prompt, new) = "
              f"{bucket[:3]}, compiled in {gen.compile_seconds[bucket]:.1f} s; greedy tokens equal "
              f"to HF's: {same:.1%}", flush=True)
        print(f"  prefill tokens/s: bigjax {op:9.0f}   HF/PyTorch {tp:9.0f}   ratio {op / tp:.2f}x",
              flush=True)
        print(f"  decode tokens/s:  bigjax {od:9.1f}   HF/PyTorch {td:9.1f}   ratio {od / td:.2f}x",
              flush=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)


def theirs_tokens(model, ids, n: int) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


if __name__ == "__main__":
    main()
