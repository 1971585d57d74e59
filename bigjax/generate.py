"""Generation from a decoder with a key/value cache: the pure token loop, sampling, and the
text-level API behind `Trainer.generate` and `bigjax generate`.

`generate_tokens(model, ...)` is a pure function of a model that implements the cache interface
(bigjax/models/kv_cache.py) and token arrays: one prefill `extend` over the left-padded prompts,
then one token per step inside a `lax.while_loop`. `Generator` jits it on the run's mesh once per
bucket (batch rows, prompt length and new tokens, each rounded up to a power of two), so a new
prompt length or `max_new_tokens` within a bucket reuses the compiled loop.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigjax import mesh as mesh_lib
from bigjax.errors import ConfigError
from bigjax.models.kv_cache import supports_cache
from bigjax.paths import run_path, write_text
from bigjax.step import with_activation_sharding

MIN_BUCKET = 16  # the smallest prompt and new-token bucket: tiny requests share one compile


class Sampling(NamedTuple):
    """How the next token is chosen: greedy (temperature 0), else a draw from softmax(logits / T)
    restricted to the `top_k` most likely tokens (0 = all) and then to the smallest set whose
    probability reaches `top_p` (1 = all), as Hugging Face orders these filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def next_token(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """int32 B: each row's next token. Row b draws from `fold_in(key, b)`, so a prompt's sample
    does not depend on how many rows share its batch."""
    if s.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    x = logits_BV.astype(jnp.float32) / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(x, min(s.top_k, x.shape[-1]))[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1:
        desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # a token stays while the tokens more likely than it hold less than top_p (the first
        # always stays); the cut is at the least likely token kept
        kept = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p
        cutoff = jnp.take_along_axis(desc, kept.sum(-1, keepdims=True) - 1, axis=-1)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(x.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)


def generate_tokens(model, prompt_BP: jax.Array, lengths_B: jax.Array, key: jax.Array,
                    max_new_tokens: jax.Array | int, *, new_tokens: int, sampling: Sampling,
                    eos_id: int | None, pad_id: int,
                    on_token: Callable[[np.ndarray], None] | None = None) -> jax.Array:
    """int32 B×`new_tokens`: the tokens generated after each prompt, `pad_id` after a row's EOS
    (kept) and beyond `max_new_tokens` (a traced scalar <= new_tokens: one compile serves every
    count). Prompts are left-padded: row b's `lengths_B[b]` tokens end at column P-1.
    `on_token(tokens_B)` is called on the host after every step (streaming). Pure: jit it."""
    B, Pn = prompt_BP.shape
    lengths_B = lengths_B.astype(jnp.int32)
    pad_B = Pn - lengths_B
    valid_BS = jnp.arange(Pn + new_tokens, dtype=jnp.int32)[None] >= pad_B[:, None]
    positions = jnp.maximum(jnp.arange(Pn, dtype=jnp.int32)[None] - pad_B[:, None], 0)
    cache = model.init_cache(B, Pn + new_tokens)
    logits, cache = model.extend(prompt_BP, cache, jnp.int32(0), positions, valid_BS)
    limit = jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), new_tokens)

    def cond(carry):
        t, _, _, _, done = carry
        return (t < limit) & ~done.all()

    def body(carry):
        t, logits, cache, out, done = carry
        tok = jnp.where(done, pad_id, next_token(logits, jax.random.fold_in(key, t), sampling))
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
        if on_token is not None:
            io_callback(on_token, None, tok, ordered=True)
        if eos_id is not None:
            done = done | (tok == eos_id)
        logits, cache = model.extend(tok[:, None], cache, Pn + t, (lengths_B + t)[:, None],
                                     valid_BS)
        return t + 1, logits, cache, out, done

    out = jnp.full((B, new_tokens), pad_id, jnp.int32)
    carry = (jnp.int32(0), logits, cache, out, jnp.zeros((B,), bool))
    return jax.lax.while_loop(cond, body, carry)[3]


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The power of two >= n (at least `minimum`): the sizes compiled loops are made for."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Completion:
    prompt: str
    completion: str  # the text after the prompt, cut before a stop string
    tokens: list[int]  # the new token ids (EOS and whatever follows it left out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Generator:
    """Prompts -> completions for a decoder's parameters on a mesh (`Trainer.generate`, the CLI).

    `graphdef`, `params`, `model_state`: the model as the state holds it; `param_shardings`:
    the params' NamedShardings on `mesh` (the batch splits over the rules' batch axes)."""

    def __init__(self, graphdef, params, model_state, *, param_shardings, mesh, rules,
                 max_seq_len: int, tokenizer, model_name: str):
        model = nnx.merge(graphdef, jax.eval_shape(lambda: params), model_state, copy=True)
        if not supports_cache(model):
            raise ConfigError(f"generate needs a decoder with a key/value cache (init_cache and "
                              f"extend, README 'Generation'); model.name={model_name} has none")
        self.graphdef, self.params, self.model_state = graphdef, params, model_state
        self.mesh, self.rules, self.tokenizer = mesh, rules, tokenizer
        self.max_seq_len = max_seq_len
        self.param_shardings = param_shardings
        self.compile_seconds: dict[tuple, float] = {}  # per compiled bucket (bench, README)
        self._compiled: dict[tuple, Callable] = {}
        self._on_token: Callable | None = None

    @classmethod
    def from_components(cls, parts, params, model_state, tokenizer=None) -> "Generator":
        """For a built run (`bigjax.build`) and its parameters (a Trainer's state)."""
        cfg = parts.cfg
        return cls(parts.spec.graphdef, params, model_state,
                   param_shardings=parts.shardings.params, mesh=parts.mesh,
                   rules=cfg.sharding.rules, tokenizer=tokenizer, model_name=cfg.model.name,
                   max_seq_len=getattr(cfg.model, "max_seq_len", 1 << 30))

    @classmethod
    def from_hf(cls, hf_dir: str, mesh: Mesh | None = None,
                overrides: dict[str, Any] | None = None) -> "Generator":
        """For a Hugging Face checkpoint dir (config.json, model.safetensors and, for text, its
        tokenizer files), on `mesh` (default: every device on the data axis). `overrides`:
        config keys, e.g. {"model.dtype": "bfloat16"}."""
        from bigjax import hf
        from bigjax.build import build
        from bigjax.config import updated
        from bigjax.data.tokenizer import load_tokenizer
        cfg = hf.model_config_for(hf_dir)
        if overrides:
            cfg = updated(cfg, overrides)
        if mesh is None:
            mesh = mesh_lib.make_mesh(cfg.mesh)
        parts = build(updated(cfg, {"train.batch_size": mesh.size}), mesh)
        params = jax.device_put(hf.load_params(hf_dir, cfg), parts.shardings.params)
        model_state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                   parts.abstract.model_state)
        has_tokenizer = any((run_path(hf_dir) / f).is_file()
                            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        return cls.from_components(parts, params, model_state,
                                   load_tokenizer(hf_dir) if has_tokenizer else None)

    # ---- token ids ---------------------------------------------------------------------------
    def _executable(self, key: tuple, args: tuple) -> Callable:
        """The loop compiled for one bucket (rows, prompt width, new tokens) and setting; the
        compile time is kept in `compile_seconds`."""
        if key in self._compiled:
            return self._compiled[key]
        _, _, new_tokens, sampling, eos_id, pad_id, stream = key
        graphdef = self.graphdef
        on_token = (lambda tok: self._on_token(np.asarray(tok))) if stream else None

        def fn(params, model_state, prompt, lengths, rng, max_new):
            model = nnx.merge(graphdef, params, model_state, copy=True)
            return generate_tokens(model, prompt, lengths, rng, max_new, new_tokens=new_tokens,
                                   sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                                   on_token=on_token)

        replicated = NamedSharding(self.mesh, P())
        rows = NamedSharding(self.mesh, mesh_lib.batch_spec(self.rules, self.mesh, 1))
        model_state_sh = jax.tree.map(lambda _: replicated, self.model_state)
        jitted = jax.jit(with_activation_sharding(fn, self.mesh, self.rules),
                         in_shardings=(self.param_shardings, model_state_sh, rows, rows,
                                       replicated, replicated), out_shardings=replicated)
        t0 = time.perf_counter()
        self._compiled[key] = jitted.lower(*args).compile()
        self.compile_seconds[key[:4]] = time.perf_counter() - t0
        return self._compiled[key]

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     sampling: Sampling = Sampling(), *, seed: int = 0, eos_id: int | None = None,
                     pad_id: int | None = None,
                     on_token: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """int32 len(prompts) × max_new_tokens (rows past EOS hold `pad_id`, default EOS)."""
        self._check(prompts, max_new_tokens, sampling)
        pad_id = (eos_id if eos_id is not None else 0) if pad_id is None else pad_id
        n = len(prompts)
        rows = bucket(n, 1)
        rows += -rows % mesh_lib.batch_divisor(self.rules, self.mesh)
        width, new = bucket(max(len(p) for p in prompts)), bucket(max_new_tokens)
        prompt = np.full((rows, width), pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)  # filler rows: one pad token, never read back
        for i, p in enumerate(prompts):
            prompt[i, width - len(p):] = p
            lengths[i] = len(p)
        self._on_token = None if on_token is None else (lambda tok: on_token(tok[:n]))
        args = (self.params, self.model_state, prompt, lengths, jax.random.key(seed),
                np.int32(max_new_tokens))
        fn = self._executable((rows, width, new, sampling, eos_id, pad_id, on_token is not None),
                              args)
        return np.asarray(jax.device_get(fn(*args)))[:n, :max_new_tokens]

    def _check(self, prompts, max_new_tokens: int, sampling: Sampling) -> None:
        sampling.check()
        if not len(prompts):
            raise ConfigError("generate needs at least one prompt (got an empty list)")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, p in enumerate(prompts):
            if not len(p):
                raise ConfigError(f"prompt {i + 1} is empty after tokenization: give it some text")
            if len(p) + max_new_tokens > self.max_seq_len:
                raise ConfigError(
                    f"prompt {i + 1} has {len(p)} tokens; with max_new_tokens={max_new_tokens} "
                    f"that passes model.max_seq_len={self.max_seq_len}: at most "
                    f"{max(self.max_seq_len - max_new_tokens, 0)} prompt tokens fit")

    # ---- text --------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: Sequence[str] = (), stream: Callable[[str], None] | None = None
                 ) -> list[Completion]:
        """One Completion per prompt, in order. `stream(text)`: called with each new piece of
        text as it is generated (one prompt only)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not len(prompts):
            raise ConfigError("generate needs at least one prompt (got an empty list)")
        tok = self.tokenizer
        if tok is None:
            raise ConfigError("this model has no tokenizer (no tokenizer.json, "
                              "tokenizer_config.json or vocab.json next to its weights): give "
                              "token ids to generate_ids instead of text")
        ids = [list(tok(p)["input_ids"]) for p in prompts]
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        on_token = None
        if stream is not None:
            if len(prompts) != 1:
                raise ConfigError(f"streaming takes one prompt, got {len(prompts)}")
            on_token = _Streamer(tok, eos, tuple(stop), stream)
        out = self.generate_ids(ids, max_new_tokens, Sampling(temperature, top_k, top_p),
                                seed=seed, eos_id=eos, pad_id=pad, on_token=on_token)
        return [_completion(tok, p, row, eos, tuple(stop)) for p, row in zip(prompts, out)]


def _until_eos(row: Sequence[int], eos: int | None) -> list[int]:
    row = [int(t) for t in row]
    return row[:row.index(eos)] if eos is not None and eos in row else row


def _cut(text: str, stop: tuple[str, ...]) -> tuple[str, int | None]:
    """The text before the earliest stop string, and where that string starts (None: absent)."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(hits)], min(hits)) if hits else (text, None)


def _completion(tok, prompt: str, row, eos: int | None, stop: tuple[str, ...]) -> Completion:
    tokens = _until_eos(row, eos)
    text, at = _cut(tok.decode(tokens, skip_special_tokens=True), stop)
    if at is not None:  # keep the tokens up to the one that completed the stop string
        for k in range(1, len(tokens) + 1):
            if _cut(tok.decode(tokens[:k], skip_special_tokens=True), stop)[1] is not None:
                tokens = tokens[:k]
                break
    return Completion(prompt, text, tokens)


class _Streamer:
    """Per-step tokens of one row -> new text: decodes the whole completion so far and passes on
    what was not passed yet (a token may end mid-character: held until the character is whole),
    stopping at EOS or before a stop string."""

    def __init__(self, tok, eos: int | None, stop: tuple[str, ...], write: Callable[[str], None]):
        self.tok, self.eos, self.stop, self.write = tok, eos, stop, write
        self.ids: list[int] = []
        self.sent, self.finished = 0, False

    def __call__(self, tokens_B: np.ndarray) -> None:
        t = int(tokens_B[0])
        if self.finished or t == self.eos:
            self.finished = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        text, at = _cut(text, self.stop)
        if at is None:
            # a stop string may be forming at the end: hold back its longest possible start
            hold = max((k for s in self.stop for k in range(1, len(s))
                        if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        else:
            self.finished = True
        if text.endswith("\ufffd") and not self.finished:
            return
        if len(text) > self.sent:
            self.write(text[self.sent:])
            self.sent = len(text)


SAMPLES = "samples.jsonl"


def write_samples(run_dir: str, step: int, samples: Sequence[Completion], tb=None) -> None:
    """One row per prompt in `run_dir`/samples.jsonl ({"step", "prompt", "completion",
    "tokens"}) and, given a TensorBoard writer, a text entry per prompt at `step`."""
    import json
    path = run_path(run_dir) / SAMPLES
    # object stores cannot append: the (small) file is written whole, through a temporary name
    rows = "".join(json.dumps({"step": step, **c.to_dict()}) + "\n" for c in samples)
    write_text(path, (path.read_text(encoding="utf-8") if path.exists() else "") + rows)
    if tb is not None:
        for i, c in enumerate(samples):
            tb.add_text(f"samples/{i}", f"**{c.prompt}**{c.completion}", step)
        tb.flush()


def print_completions(generate: Callable[..., list[Completion]], prompts: Sequence[str], *,
                      json_lines: bool, **kw) -> None:
    """What `bigjax generate` prints (process 0): JSON lines, or each prompt and its completion
    as text, one prompt streamed as it is generated."""
    import json
    import sys
    if not prompts:
        raise ConfigError("generate needs at least one prompt (give one or more texts after the "
                          "run dir)")
    show = jax.process_index() == 0
    if json_lines:
        for c in generate(list(prompts), **kw):
            print(json.dumps(c.to_dict()), flush=True) if show else None
    elif len(prompts) == 1:
        out = lambda text: (sys.stdout.write(text), sys.stdout.flush()) if show else None
        started = []

        def write(text: str) -> None:  # the prompt first, once the input is known to be good
            if not started:
                started.append(out(prompts[0]))
            out(text)

        generate(list(prompts), stream=write, **kw)
        write("\n")
    else:
        for c in generate(list(prompts), **kw):
            print(f"{c.prompt}{c.completion}\n", flush=True) if show else None
