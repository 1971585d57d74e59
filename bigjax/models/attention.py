"""Attention implementations behind one call, and the mask description they all read.

A mask is described, not materialised (`AttentionMask`: causal or not, segment ids of packed
documents, which keys are real, which key index each query sits at), so each implementation builds
only what it needs:

- `xla`: the plain computation (a B×T×S mask, float32 logits, softmax); the reference.
- `chunked`: blocks of scores within a budget (cache-sized on CPU). Rows that fit one block take
  xla's computation over chunks of rows, recomputed in the backward pass; longer rows go
  flash-style, in float32, over blocks of queries and keys with an online softmax and its own
  backward pass (each block recomputed from the saved log-sum-exp): the T×S scores never exist
  whole, and blocks above the causal diagonal or between different documents are skipped.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`: NVIDIA GPUs, bfloat16; packed
  documents as a B×1×T×S mask (a bias to cuDNN). cuDNN's packed layout (documents as ragged
  slices of a row) is there behind `_CUDNN_PACKED_DOCS`, off until a whole step is timed.
- `splash`: the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu`): TPUs.

`auto` picks per call: splash on TPU and cudnn on GPU where the call allows them, else chunked on
CPU and for long sequences, xla otherwise. An explicit choice that cannot serve a call is a
ConfigError naming what it lacks. A query with no key to attend to outputs zeros.

Attention dropout draws its keep mask from a hash of (seed, batch row, head, query index, key
index): every implementation with dropout drops the same entries whatever its blocks or sharding,
and backward passes recompute the mask instead of storing it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from bigjax.errors import ConfigError
from bigjax.models import axes
from bigjax.models.dropout import keep_scale, mix, seeds_of
from bigjax.models.matmul import einsum_f32

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "chunked")

# Float32 scores of one `chunked` block kept near this size on CPU, so that softmax and its
# backward pass run in a core's cache instead of main memory; elsewhere blocks are larger and
# span the whole (per-device) batch.
_CPU_CHUNK_BYTES = 2 << 20
_DEVICE_BLOCK_BYTES = 256 << 20
# From this many query x key pairs, `auto` prefers chunked to xla on GPU and TPU: long contexts
# never build the B×heads×T×S float32 scores.
_LONG = 1024 * 1024
# Tests run the splash kernel in Pallas's interpreter on CPU (slow: tests only).
_SPLASH_INTERPRET = False


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend to, described rather than materialised.

    `causal`: key index <= the query's index. `segment_ids` (B×S): only keys of the query's own
    segment (packed documents). `valid` (B×S): only real keys (False: padding). `query_index`
    (B×T): each query's index among the S keys when queries are gathered at some positions
    (BERT's last layer); None: the queries are the keys' own sequence (T = S).
    """

    causal: bool = False
    segment_ids: jax.Array | None = None
    valid: jax.Array | None = None
    query_index: jax.Array | None = None

    def at(self, index_BP: jax.Array) -> "AttentionMask":
        """The mask of queries gathered at these indices (B×P) of this mask's queries."""
        index = (index_BP if self.query_index is None
                 else jnp.take_along_axis(self.query_index, index_BP, axis=1))
        return dataclasses.replace(self, query_index=index.astype(jnp.int32))

    def query_indices(self, T: int) -> jax.Array:
        """1×T or B×T int32."""
        return (jnp.arange(T, dtype=jnp.int32)[None] if self.query_index is None
                else self.query_index.astype(jnp.int32))

    def query_segment_ids(self) -> jax.Array | None:
        if self.segment_ids is None or self.query_index is None:
            return self.segment_ids
        return jnp.take_along_axis(self.segment_ids, self.query_index, axis=1)

    def dense(self, T: int, S: int) -> jax.Array:
        """Boolean B×T×S (1×T×S when the same for every row)."""
        ok = _allowed(self.causal, self.query_indices(T), self.query_segment_ids(),
                      jnp.arange(S, dtype=jnp.int32), self.segment_ids, self.valid, T, S)
        return jnp.broadcast_to(ok, ok.shape[:1] + (T, S))


jax.tree_util.register_dataclass(AttentionMask, data_fields=["segment_ids", "valid", "query_index"],
                                 meta_fields=["causal"])


def _allowed(causal, q_index_RT, q_seg_RT, k_index_S, k_seg_RS, k_valid_RS, T, S) -> jax.Array:
    """Broadcastable to R×T×S, no larger than its parts need (padding alone: R×1×S)."""
    parts = []
    if causal:
        parts.append(k_index_S[None, None, :] <= q_index_RT[:, :, None])
    if q_seg_RT is not None:
        parts.append(q_seg_RT[:, :, None] == k_seg_RS[:, None, :])
    if k_valid_RS is not None:
        parts.append(k_valid_RS[:, None, :].astype(bool))
    return functools.reduce(jnp.logical_and, parts) if parts else jnp.ones((1, 1, 1), bool)


# ---- choosing an implementation ---------------------------------------------------------------

class Needs(NamedTuple):
    """What one call asks of an implementation."""

    causal: bool = False
    segments: bool = False  # packed documents
    gathered: bool = False  # queries at some positions only
    dropout: bool = False
    dtype: str | None = None
    head_dim: int | None = None
    long: bool = False  # T×S >= _LONG


def lacks(implementation: str, backend: str | None = None, needs: Needs = Needs()) -> str | None:
    """What `implementation` lacks to serve `needs` on `backend` (None: not checked), as the end
    of a sentence starting with its name; None if nothing."""
    if implementation == "cudnn":
        if backend is not None and backend != "gpu":
            return f"needs an NVIDIA GPU (cuDNN); this JAX backend is {backend}"
        if needs.dtype is not None and needs.dtype not in ("bfloat16", "float16"):
            return f"needs model.dtype=bfloat16 (cuDNN flash attention has no {needs.dtype})"
        if needs.head_dim is not None and (needs.head_dim % 8 or needs.head_dim > 256):
            return f"needs a head dim that is a multiple of 8, at most 256 (got {needs.head_dim})"
        if needs.dropout:
            return ("has no attention dropout (jax.nn.dot_product_attention takes no rate); "
                    "set model.attention_dropout=0")
    elif implementation == "splash":
        if backend is not None and backend != "tpu" and not _SPLASH_INTERPRET:
            return f"needs a TPU (Pallas splash attention); this JAX backend is {backend}"
        if needs.dropout:
            return "has no attention dropout; set model.attention_dropout=0"
    if implementation in ("cudnn", "splash") and needs.causal and needs.gathered:
        return "cannot apply a causal mask to queries gathered at some positions"
    return None


def check(implementation: str, backend: str | None = None, needs: Needs = Needs()) -> None:
    """ConfigError if an explicit choice cannot serve `needs` (`auto` always can)."""
    reason = None if implementation == "auto" else lacks(implementation, backend, needs)
    if reason:
        raise ConfigError(f"model.attention={implementation} {reason} (model.attention=auto "
                          "picks one that can)")


def check_backend(implementation: str) -> None:
    """ConfigError if an explicit kernel needs another backend than this process's. Asks JAX for
    the backend only then: after `jax.distributed.initialize`, which must come first."""
    if implementation in ("cudnn", "splash"):
        check(implementation, jax.default_backend())


def choose(implementation: str, needs: Needs, backend: str) -> str:
    """The implementation that serves a call: the explicit one (or ConfigError), or auto's pick."""
    if implementation != "auto":
        check(implementation, backend, needs)
        return implementation
    for fast in {"tpu": ("splash",), "gpu": ("cudnn",)}.get(backend, ()):
        if lacks(fast, backend, needs) is None:
            return fast
    return "chunked" if backend == "cpu" or needs.long else "xla"


def keeps_scores(implementation: str, backend: str, needs: Needs, B: int, T: int, S: int,
                 N: int) -> bool:
    """Whether the call that `implementation` serves with B rows, T queries, S keys and N heads
    (per device) holds B×N×T×S probabilities for its backward pass (planning memory): xla's and
    chunked's whole rows do (or blocks of them as large), flash-style blocks and fused kernels keep
    only a log-sum-exp per query."""
    chosen = choose(implementation, needs, backend)
    if chosen == "chunked":
        return _block_sizes(B, T, S, N, backend)[1:] == (T, S)
    return chosen == "xla"


def describe(q_BTNH: jax.Array, k_BSKH: jax.Array, mask: AttentionMask, dropout: bool) -> Needs:
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    return Needs(causal=mask.causal, segments=mask.segment_ids is not None,
                 gathered=mask.query_index is not None, dropout=dropout,
                 dtype=jnp.dtype(q_BTNH.dtype).name, head_dim=q_BTNH.shape[-1],
                 long=T * S >= _LONG)


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask: AttentionMask, *,
           implementation: str = "auto", dropout: float = 0.0,
           key: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H), masked) v: B×T×N×H from queries B×T×N×H and keys and values
    B×S×K×H (K divides N: grouped-query attention when K < N). Dropout on the attention weights
    when `key` is given and `dropout` > 0."""
    rate = float(dropout) if key is not None and dropout > 0 else 0.0
    impl = choose(implementation, describe(q_BTNH, k_BSKH, mask, rate > 0), jax.default_backend())
    seeds = seeds_of(key) if rate else None
    if impl == "xla":
        return _xla(q_BTNH, k_BSKH, v_BSKH, mask, seeds, 0, 0, q_BTNH.shape[2], rate=rate)
    if impl == "cudnn":
        return _cudnn(q_BTNH, k_BSKH, v_BSKH, mask)
    local = (functools.partial(_chunked, rate=rate) if impl == "chunked"
             else functools.partial(_splash, interpret=_SPLASH_INTERPRET))
    return _per_shard(local, q_BTNH, k_BSKH, v_BSKH, mask, seeds)


# ---- dropout keep masks -----------------------------------------------------------------------

def _keep(seeds, b_R, n_N, t_RT, s_S, n_total: int, rate: float) -> jax.Array:
    """Keep mask R×N×T×S of one block: batch rows b and heads n (global indices), query indices
    t, key indices s."""
    u = lambda x: x.astype(jnp.uint32)
    row = mix(u(b_R[:, None] * n_total + n_N[None]) ^ seeds[0])
    pos = mix(mix(u(t_RT) ^ seeds[1])[:, :, None] ^ u(s_S)[None, None, :])
    return mix(pos[:, None] ^ row[:, :, None, None]) >= keep_scale(rate)[0]


# ---- xla: the plain computation ---------------------------------------------------------------

def _xla(q, k, v, mask: AttentionMask, seeds, b_off, n_off, n_total: int, *, rate: float):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    allowed = _allowed(mask.causal, mask.query_indices(T), mask.query_segment_ids(),
                       jnp.arange(S, dtype=jnp.int32), mask.segment_ids, mask.valid, T, S)
    q = q * jnp.asarray(H ** -0.5, q.dtype)
    if G == 1:  # plain multi-head: each einsum is one batched dot, no transposed score blocks
        logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32)
    else:  # grouped-query: heads grouped over their shared kv head
        logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(B, T, K, G, H), k)
        logits = logits.astype(jnp.float32).reshape(B, N, T, S)
    probs = jax.nn.softmax(logits + jnp.where(allowed[:, None], 0.0, -1e30), axis=-1)
    if rate:
        keep = _keep(seeds, b_off + jnp.arange(B), n_off + jnp.arange(N), mask.query_indices(T),
                     jnp.arange(S), n_total, rate)
        probs = jnp.where(keep, probs * keep_scale(rate)[1], 0.0)
    probs = probs.astype(q.dtype)
    if G == 1:
        out = jnp.einsum("bnts,bsnh->btnh", probs, v)
    else:
        out = jnp.einsum("bkgts,bskh->btkgh", probs.reshape(B, K, G, T, S), v).reshape(B, T, N, H)
    # a query with no key: zeros, not the average of every value that softmax gives
    return jnp.where(allowed.any(-1)[:, :, None, None], out, 0)


# ---- cudnn ------------------------------------------------------------------------------------

_CUDNN_IMPLEMENTATION = "cudnn"  # tests swap in jax's "xla" to check the arguments on CPU
# cuDNN's packed layout (each document a ragged slice of its row: no T×S mask, no work across
# documents) for causal rows whose segment ids never decrease along the row (bigjax's LM data)
# and that hold at most this many documents; a batch with another row takes the mask instead.
# Off (0) by default: the choice is a `lax.cond` in every layer, which XLA:GPU runs by reading
# the predicate on the host, and no whole train step has been timed with it. On an H200 (8 ×
# 2,048, 32 heads over 8, bench/gpu_attention.py, which sets 16): 4 documents 1.65 ms forward
# and backward, cond included, the mask 2.88.
_CUDNN_PACKED_DOCS = 0


def _cudnn(q, k, v, mask: AttentionMask):
    """Packed causal rows through cuDNN's packed layout where the batch allows it (a `lax.cond`
    on the batch's segment ids), else `_cudnn_masked`."""
    seg = mask.segment_ids
    if (not _CUDNN_PACKED_DOCS or not mask.causal or seg is None or mask.valid is not None
            or mask.query_index is not None or seg.shape != q.shape[:2]
            or q.shape[1] != k.shape[1]):
        return _cudnn_masked(q, k, v, mask)
    fits = jnp.all(seg[:, 1:] >= seg[:, :-1]) & (_runs(seg).max() <= _CUDNN_PACKED_DOCS)
    return jax.lax.cond(fits, _cudnn_packed, _cudnn_masked, q, k, v, mask)


def _run_starts(seg_BT: jax.Array) -> jax.Array:
    """B×T: True where a run of equal segment ids (a document) starts."""
    return jnp.concatenate([jnp.ones_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], 1)


def _runs(seg_BT: jax.Array) -> jax.Array:
    """Documents per row (B)."""
    return _run_starts(seg_BT).sum(-1)


def packed_offsets(seg_BT: jax.Array, M: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed-layout arguments for rows of at most M runs of equal ids: each run's start
    (B×(M+1)) and length (B×M), -1 past a row's last run."""
    B, T = seg_BT.shape
    start = _run_starts(seg_BT)
    starts = jnp.sort(jnp.where(start, jnp.arange(T), T), 1)[:, :M]  # T past the last run
    ends = jnp.concatenate([starts[:, 1:], jnp.full((B, 1), T)], 1)
    real = jnp.arange(M)[None] < start.sum(-1, keepdims=True)
    offsets = jnp.where(real, starts, -1).astype(jnp.int32)
    lengths = jnp.where(real, jnp.minimum(ends, T) - starts, -1).astype(jnp.int32)
    return jnp.concatenate([offsets, jnp.full((B, 1), -1, jnp.int32)], 1), lengths


def _cudnn_packed(q, k, v, mask: AttentionMask):
    offsets, lengths = packed_offsets(mask.segment_ids, _CUDNN_PACKED_DOCS)
    if _CUDNN_IMPLEMENTATION != "cudnn":  # tests on CPU: the layout's meaning, spelled out
        return _packed_reference(q, k, v, offsets, lengths)
    # the packed layout is not in jax.nn.dot_product_attention's signature; this function is
    # what it calls, with the same arguments in jax 0.10.2, 0.11.2 and 0.12
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    return cudnn.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5, mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def _packed_reference(q, k, v, offsets, lengths):
    """What cuDNN computes from packed-layout arguments: causal attention inside each slice
    [offset, offset + length) of a row."""
    T = q.shape[1]
    t = jnp.arange(T)
    inside = ((t[None, None] >= offsets[:, :-1, None]) & (t[None, None] < (offsets[:, :-1] +
              lengths)[:, :, None]) & (lengths[:, :, None] > 0))  # B M T
    run = jnp.where(inside.any(1), jnp.argmax(inside, 1), -1)  # B T: the slice of each position
    return _xla(q, k, v, AttentionMask(True, run), None, 0, 0, q.shape[2], rate=0.0)


def _cudnn_masked(q, k, v, mask: AttentionMask):
    """Causal flag, padding as key lengths (padding must be trailing, as tokenizers pad), packed
    documents as a boolean B×1×T×S mask, which cuDNN reads as an additive bias shared by the heads
    (jax.nn.dot_product_attention takes no segment ids)."""
    lengths = None if mask.valid is None else mask.valid.astype(jnp.int32).sum(-1)
    same_doc = None
    if mask.segment_ids is not None:
        q_seg = jnp.broadcast_to(mask.query_segment_ids(), q.shape[:2])
        same_doc = q_seg[:, None, :, None] == mask.segment_ids[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=same_doc, is_causal=mask.causal,
                                       key_value_seq_lengths=lengths,
                                       implementation=_CUDNN_IMPLEMENTATION)
    return _zero_keyless_rows(out, mask)


def _zero_keyless_rows(out_BTNH, mask: AttentionMask):
    """Zeros for the queries no key is open to, as xla and chunked give (the kernels average
    every value there). Only padding makes such queries: without it each query sees itself."""
    if mask.valid is None:
        return out_BTNH
    B, T = out_BTNH.shape[:2]
    valid = mask.valid.astype(bool)
    q_index = jnp.broadcast_to(mask.query_indices(T), (B, T))
    if mask.segment_ids is None:
        if mask.causal:
            seen = jnp.take_along_axis(jnp.cumsum(valid, -1), q_index, axis=1) > 0
        else:
            seen = jnp.broadcast_to(valid.any(-1, keepdims=True), (B, T))
    else:  # the first real key of the query's segment: O(S log S) per row, no T×S
        none = np.iinfo(np.int32).max
        key_seg = jnp.where(valid, mask.segment_ids.astype(jnp.int32), none)
        order = jnp.argsort(key_seg, axis=-1, stable=True)
        sorted_seg = jnp.take_along_axis(key_seg, order, axis=-1)
        q_seg = jnp.broadcast_to(mask.query_segment_ids(), (B, T)).astype(jnp.int32)
        first = jnp.minimum(jax.vmap(jnp.searchsorted)(sorted_seg, q_seg), valid.shape[1] - 1)
        seen = (jnp.take_along_axis(sorted_seg, first, axis=1) == q_seg) & (q_seg != none)
        if mask.causal:
            seen = seen & (jnp.take_along_axis(order, first, axis=1) <= q_index)
    return jnp.where(seen[:, :, None, None], out_BTNH, 0)


# ---- per device: shard_map over the batch and heads ---------------------------------------------

def _per_shard(fn: Callable, q, k, v, mask: AttentionMask, seeds):
    """`fn(q, k, v, mask, seeds, b_off, n_off, n_total)` on each device's rows and heads (offsets:
    of its first row and head) when a mesh is bound (the train step binds one), else on all."""
    N, K = q.shape[2], k.shape[2]
    q_sharding = axes.sharding_of(("batch", "length", "heads", "kv"))
    if q_sharding is None or q_sharding.mesh.size == 1:
        return fn(q, k, v, mask, seeds, 0, 0, N)
    mesh = q_sharding.mesh
    q_spec = tuple(q_sharding.spec) + (None,) * 4
    kv_spec = tuple(axes.sharding_of(("batch", "length", "kv_heads", "kv")).spec) + (None,) * 4
    batch, heads = q_spec[0], q_spec[2]
    size = lambda a: 1 if a is None else math.prod(
        mesh.shape[name] for name in ((a,) if isinstance(a, str) else a))
    if q.shape[0] % size(batch) or kv_spec[0] != batch:
        batch = None  # a batch that does not split (say one sequence) is whole on every device
    if heads != kv_spec[2] or K % size(heads):
        heads = None  # heads that do not split with their kv heads stay whole on every device
    qkv = P(batch, None, heads, None)
    rows = lambda x: None if x is None else P(batch if x.shape[0] > 1 else None, None)
    mask_spec = AttentionMask(mask.causal, rows(mask.segment_ids), rows(mask.valid),
                              rows(mask.query_index))

    def local(q, k, v, mask, seeds):
        b_off = 0 if batch is None else jax.lax.axis_index(batch) * q.shape[0]
        n_off = 0 if heads is None else jax.lax.axis_index(heads) * q.shape[2]
        return fn(q, k, v, mask, seeds, b_off, n_off, N)

    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, mask_spec, P()),
                         out_specs=qkv, check_vma=False)(q, k, v, mask, seeds)


# ---- chunked: flash-style blocks with an online softmax -----------------------------------------

class _Blocks(NamedTuple):
    causal: bool
    gathered: bool  # query indices arbitrary: no block skipping
    rate: float
    rows: int  # batch rows per chunk (the outer loop)
    tq: int  # queries per block
    sk: int  # keys per block
    n_total: int  # heads over all devices (dropout indices)


def _pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def _block_sizes(B: int, T: int, S: int, N: int, backend: str) -> tuple[int, int, int]:
    """(rows, tq, sk): a block's float32 scores (rows×N×tq×sk) near the budget. Short sequences
    take whole rows (several per chunk on CPU); long ones one row at a time on CPU, and square
    blocks of queries and keys (4 causal rows of 2048 tokens, 4 heads, on this project's CPU:
    forward+backward 0.52 s with 256×256 blocks, 0.55 s with 512×256 or 128×128, 0.65 s with
    512×512)."""
    if backend == "cpu":
        budget, rows = _CPU_CHUNK_BYTES // 4, 1
        if N * T * S <= budget:
            rows = min(B, budget // (N * T * S))
            while B % rows:
                rows -= 1
            return rows, T, S
    else:
        budget, rows = _DEVICE_BLOCK_BYTES // 4, B
        if B * N * T * S <= budget:
            return B, T, S
    # square blocks: fewer loop steps than thin ones, finer causal skipping than large ones
    side = max(64, _pow2_floor(math.isqrt(max(1, budget // (rows * N)))))
    sk = min(S, side)
    tq = min(T, side if sk == side else max(64, _pow2_floor(budget // (rows * N * sk))))
    return rows, tq, sk


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _chunked(q, k, v, mask: AttentionMask, seeds, b_off, n_off, n_total: int, *, rate: float):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    rows, tq, sk = _block_sizes(B, T, S, N, jax.default_backend())
    if (tq, sk) == (T, S):
        return _whole_rows(q, k, v, mask, seeds, b_off, n_off, n_total, rows=rows, rate=rate)
    Tp, Sp = _round_up(T, tq), _round_up(S, sk)
    pad = lambda x, n, value=0: x if x.shape[1] == n else jnp.pad(
        x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    # segment ids repeat their last: padding widens no block's range of segments
    pad_edge = lambda x, n: x if x.shape[1] == n else jnp.pad(x, [(0, 0), (0, n - x.shape[1])],
                                                              mode="edge")
    q = pad(q * jnp.asarray(H ** -0.5, q.dtype), Tp)
    k, v = pad(k, Sp), pad(v, Sp)
    gathered = mask.query_index is not None
    if gathered:
        q_index = pad(jnp.broadcast_to(mask.query_index.astype(jnp.int32), (B, T)), Tp)
    else:
        q_index = jnp.broadcast_to(jnp.arange(Tp, dtype=jnp.int32), (B, Tp))
    q_seg = mask.query_segment_ids()
    q_seg = None if q_seg is None else pad_edge(jnp.broadcast_to(q_seg, (B, T)), Tp)
    every_row = lambda x: None if x is None else jnp.broadcast_to(x, (B, S))
    k_seg = None if mask.segment_ids is None else pad_edge(every_row(mask.segment_ids), Sp)
    valid = every_row(mask.valid)
    if Sp > S:  # padded keys are not real
        valid = jnp.ones((B, S), bool) if valid is None else valid
    valid = None if valid is None else pad(valid.astype(bool), Sp, False)
    aux = (q_index, q_seg, k_seg, valid, jnp.asarray(b_off, jnp.int32),
           jnp.asarray(n_off, jnp.int32), seeds)
    blocks = _Blocks(mask.causal, gathered, rate, rows, tq, sk, n_total)
    # heads first: every block's matmuls batch over (row, head) with contiguous operands
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    out = _flash(heads_first(q), heads_first(k), heads_first(v), aux, blocks)
    return heads_first(out)[:, :T]


def _whole_rows(q, k, v, mask: AttentionMask, seeds, b_off, n_off, n_total: int, *, rows: int,
                rate: float):
    """Short sequences: the plain computation over chunks of `rows` batch rows, each recomputed
    in the backward pass (its scores are one cache-sized block). XLA differentiates this faster
    on CPU than the blockwise backward pass below, and the values are xla's own."""
    B, T = q.shape[:2]
    n = B // rows
    if n == 1:
        return _xla(q, k, v, mask, seeds, b_off, n_off, n_total, rate=rate)
    split = lambda x: None if x is None else x.reshape(n, rows, *x.shape[1:])
    every_row = lambda x: None if x is None else jnp.broadcast_to(x, (B,) + x.shape[1:])

    def chunk(xs):
        c, q, k, v, seg, valid, index = xs
        part = AttentionMask(mask.causal, seg, valid, index)
        return _xla(q, k, v, part, seeds, b_off + c * rows, n_off, n_total, rate=rate)

    xs = (jnp.arange(n, dtype=jnp.int32), split(q), split(k), split(v),
          split(every_row(mask.segment_ids)), split(every_row(mask.valid)),
          split(every_row(mask.query_index)))
    return jax.lax.map(jax.checkpoint(chunk), xs).reshape(q.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, aux, blocks: _Blocks):
    return _flash_fwd(q, k, v, aux, blocks)[0]


def _flash_fwd(q, k, v, aux, blocks: _Blocks):
    out, lse = _over_rows(_forward_rows, blocks, (q, k, v) + aux[:4], aux[4:])
    return out, (q, k, v, aux, out, lse)


def _flash_bwd(blocks: _Blocks, res, d_out):
    q, k, v, aux, out, lse = res
    dq, dk, dv = _over_rows(_backward_rows, blocks, (q, k, v) + aux[:4] + (out, lse, d_out), aux[4:])
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _over_rows(fn, blocks: _Blocks, per_row: tuple, shared: tuple):
    """`fn(blocks, b0, n_off, seeds, *per_row)` over chunks of `blocks.rows` batch rows."""
    b_off, n_off, seeds = shared
    B = per_row[0].shape[0]
    n = B // blocks.rows
    if n == 1:
        return fn(blocks, b_off, n_off, seeds, *per_row)
    split = lambda x: x.reshape(n, blocks.rows, *x.shape[1:])
    xs = jax.tree.map(split, per_row)
    ys = jax.lax.map(lambda a: fn(blocks, b_off + a[0] * blocks.rows, n_off, seeds, *a[1]),
                     (jnp.arange(n, dtype=jnp.int32), xs))
    return jax.tree.map(lambda y: y.reshape(B, *y.shape[2:]), ys)


def _loop(lo, hi, body, init):
    if isinstance(lo, int) and isinstance(hi, int) and hi - lo == 1:
        return body(lo, init)
    return jax.lax.fori_loop(lo, hi, body, init)


def _kv_end(blocks: _Blocks, i, nk: int):
    """How many key blocks query block i needs (causal: none above the diagonal)."""
    if not blocks.causal or blocks.gathered:
        return nk
    end = ((i + 1) * blocks.tq - 1) // blocks.sk + 1
    return min(nk, end) if isinstance(i, int) else jnp.minimum(nk, end)


def _q_start(blocks: _Blocks, j):
    """The first query block that key block j is open to."""
    if not blocks.causal or blocks.gathered:
        return 0
    return (j * blocks.sk) // blocks.tq


def _segment_overlap(q_seg, k_seg, tq: int, sk: int):
    """`overlap(i, j)`: whether query block i and key block j share a segment id range (no
    overlap: every pair is masked, the block is skipped). Packed documents mask most blocks of
    long rows: with documents of T/4 tokens, 3 of every 4 below the diagonal. None without
    segment ids."""
    if q_seg is None:
        return None
    R = q_seg.shape[0]
    per_block = lambda x, n: x.reshape(R, -1, n)
    q_lo, q_hi = per_block(q_seg, tq).min((0, 2)), per_block(q_seg, tq).max((0, 2))
    k_lo, k_hi = per_block(k_seg, sk).min((0, 2)), per_block(k_seg, sk).max((0, 2))
    return lambda i, j: (k_hi[j] >= q_lo[i]) & (k_lo[j] <= q_hi[i])


def _skipping(body, needed):
    """`body(j, carry)` where `needed(j)`, else the carry unchanged."""
    if needed is None:
        return body
    return lambda j, carry: jax.lax.cond(needed(j), body, lambda j, carry: carry, j, carry)


def _slice(x, start, size, axis):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_mask(blocks, t_RT, q_seg, s_S, k_seg, valid):
    return _allowed(blocks.causal, t_RT, q_seg, s_S, k_seg, valid, t_RT.shape[1],
                    s_S.shape[0])[:, None]  # R, 1, Tq, Sk


# Block matmuls, heads first (q-like R×N×T×H, k-like R×K×S×H, scores R×N×T×S, float32 out):
# grouped-query heads (K < N) are viewed as K×G only inside the einsum, so plain multi-head
# attention never carries a unit axis (XLA:CPU lays those out slowly).
def _dot(spec: str, grouped: str, a, b, out_shape):
    return einsum_f32(spec, a, b) if grouped is None else \
        einsum_f32(grouped[0], *grouped[1]).reshape(out_shape)


def _qk(q, k):  # R×N×T×H, R×K×S×H -> R×N×T×S
    (R, N, T, H), K, S = q.shape, k.shape[1], k.shape[2]
    return _dot("rnth,rnsh->rnts", None if K == N else
                ("rkgth,rksh->rkgts", (q.reshape(R, K, N // K, T, H), k)), q, k, (R, N, T, S))


def _pv(p, v):  # R×N×T×S, R×K×S×H -> R×N×T×H
    (R, N, T, S), K, H = p.shape, v.shape[1], v.shape[3]
    return _dot("rnts,rnsh->rnth", None if K == N else
                ("rkgts,rksh->rkgth", (p.reshape(R, K, N // K, T, S), v)), p, v, (R, N, T, H))


def _ptx(p, x, K: int):  # R×N×T×S, R×N×T×H -> R×K×S×H (summed over the heads of a kv head)
    (R, N, T, S), H = p.shape, x.shape[3]
    return _dot("rnts,rnth->rnsh", None if K == N else
                ("rkgts,rkgth->rksh", (p.reshape(R, K, N // K, T, S), x.reshape(R, K, N // K, T, H))),
                p, x, (R, K, S, H))


def _forward_rows(blocks: _Blocks, b0, n_off, seeds, q, k, v, q_index, q_seg, k_seg, valid):
    """Heads first: q R×N×T×H, k and v R×K×S×H. Returns out (as q) and the log-sum-exp of each
    query's scores, R×N×T (0 for a query with no key)."""
    R, N, Tp, H = q.shape
    tq, sk = blocks.tq, blocks.sk
    nq, nk = Tp // tq, k.shape[2] // sk
    b_R, n_N = b0 + jnp.arange(R), n_off + jnp.arange(N)
    overlap = _segment_overlap(q_seg, k_seg, tq, sk)

    def q_block(i):
        qi = _slice(q, i * tq, tq, 2)
        ti, qsi = _slice(q_index, i * tq, tq, 1), _slice(q_seg, i * tq, tq, 1)

        def kv_step(j, carry):
            m, l, acc = carry
            s_S = j * sk + jnp.arange(sk, dtype=jnp.int32)
            s = _qk(qi, _slice(k, j * sk, sk, 2))
            ok = _block_mask(blocks, ti, qsi, s_S, _slice(k_seg, j * sk, sk, 1),
                             _slice(valid, j * sk, sk, 1))
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with no key so far
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            if blocks.rate:
                keep = _keep(seeds, b_R, n_N, ti, s_S, blocks.n_total, blocks.rate)
                p = jnp.where(keep, p * keep_scale(blocks.rate)[1], 0.0)
            pv = _pv(p.astype(v.dtype), _slice(v, j * sk, sk, 2))
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((R, N, tq), -jnp.inf), jnp.zeros((R, N, tq)), jnp.zeros((R, N, tq, H)))
        needed = None if overlap is None else functools.partial(overlap, i)
        m, l, acc = _loop(0, _kv_end(blocks, i, nk), _skipping(kv_step, needed), init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
        return out.astype(q.dtype), lse

    if nq == 1:
        return q_block(0)
    outs, lses = jax.lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))
    return (jnp.moveaxis(outs, 0, 2).reshape(R, N, Tp, H),
            jnp.moveaxis(lses, 0, 2).reshape(R, N, Tp))


def _backward_rows(blocks: _Blocks, b0, n_off, seeds, q, k, v, q_index, q_seg, k_seg, valid,
                   out, lse, d_out):
    """Flash attention's backward pass, key block by key block: dq accumulates across them."""
    R, N, Tp, H = q.shape
    K, Sp = k.shape[1], k.shape[2]
    tq, sk = blocks.tq, blocks.sk
    nq, nk = Tp // tq, Sp // sk
    b_R, n_N = b0 + jnp.arange(R), n_off + jnp.arange(N)
    # rowsum(dO * O) = rowsum(dP * P) of softmax's backward pass, dropout included
    delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1)
    overlap = _segment_overlap(q_seg, k_seg, tq, sk)

    def kv_block(dq, j):
        kj, vj = _slice(k, j * sk, sk, 2), _slice(v, j * sk, sk, 2)
        s_S = j * sk + jnp.arange(sk, dtype=jnp.int32)
        k_seg_j, valid_j = _slice(k_seg, j * sk, sk, 1), _slice(valid, j * sk, sk, 1)

        def q_step(i, carry):
            dq, dk, dv = carry
            qi, doi = _slice(q, i * tq, tq, 2), _slice(d_out, i * tq, tq, 2)
            ti = _slice(q_index, i * tq, tq, 1)
            ok = _block_mask(blocks, ti, _slice(q_seg, i * tq, tq, 1), s_S, k_seg_j, valid_j)
            p = jnp.where(ok, jnp.exp(_qk(qi, kj) - _slice(lse, i * tq, tq, 2)[..., None]), 0.0)
            dp = _qk(doi, vj)
            if blocks.rate:
                z = jnp.where(_keep(seeds, b_R, n_N, ti, s_S, blocks.n_total, blocks.rate),
                              keep_scale(blocks.rate)[1], 0.0)
                pd, dp = p * z, dp * z
            else:
                pd = p
            dv = dv + _ptx(pd.astype(v.dtype), doi, K)
            ds = (p * (dp - _slice(delta, i * tq, tq, 2)[..., None])).astype(q.dtype)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, _slice(dq, i * tq, tq, 2) + _pv(ds, kj), i * tq, 2)
            return dq, dk + _ptx(ds, qi, K), dv

        zeros = jnp.zeros((R, K, sk, H), jnp.float32)
        needed = None if overlap is None else (lambda i: overlap(i, j))
        dq, dk, dv = _loop(_q_start(blocks, j), nq, _skipping(q_step, needed), (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros(q.shape, jnp.float32)
    if nk == 1:
        dq, (dk, dv) = kv_block(dq0, 0)
    else:
        dq, (dks, dvs) = jax.lax.scan(kv_block, dq0, jnp.arange(nk, dtype=jnp.int32))
        dk, dv = (jnp.moveaxis(d, 0, 2).reshape(R, K, Sp, H) for d in (dks, dvs))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ---- splash: the Pallas TPU kernel ------------------------------------------------------------

_SEGMENT_PAD = np.iinfo(np.int32).min  # the segment of padding keys: no query's


def _splash(q, k, v, mask: AttentionMask, seeds, b_off, n_off, n_total: int, *, interpret: bool):
    """Causal or full static mask, segment ids for packing and padding (padding keys get a
    segment no query has); T and S padded to the kernel's blocks (multiples of 128)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    B, T, N, H = q.shape
    S = k.shape[1]
    bq, bkv = min(512, _round_up(T, 128)), min(512, _round_up(S, 128))
    Tp, Sp = _round_up(T, bq), _round_up(S, bkv)
    pad = lambda x, n, value=0: x if x.shape[1] == n else jnp.pad(
        x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # B×T×N×H -> B×N×T×H
    q_ = heads_first(pad(q * jnp.asarray(H ** -0.5, q.dtype), Tp))
    k_, v_ = heads_first(pad(k, Sp)), heads_first(pad(v, Sp))
    q_seg = mask.query_segment_ids()
    q_seg = jnp.zeros((B, T), jnp.int32) if q_seg is None else jnp.broadcast_to(q_seg, (B, T))
    k_seg = jnp.zeros((B, S), jnp.int32) if mask.segment_ids is None else mask.segment_ids
    if mask.valid is not None:
        k_seg = jnp.where(mask.valid.astype(bool), k_seg, _SEGMENT_PAD)
    segments = sa.SegmentIds(pad(q_seg.astype(jnp.int32), Tp),
                             pad(k_seg.astype(jnp.int32), Sp, _SEGMENT_PAD))
    base = sa.CausalMask((Tp, Sp)) if mask.causal else sa.FullMask((Tp, Sp))
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                          block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                          block_kv_dq=bkv)
    # one example: q N×T×H, k and v K×S×H (K < N: grouped-query heads share their kv head)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([base] * N), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes, interpret=interpret)
    out = jax.vmap(kernel)(q_, k_, v_, segments)[:, :, :T]
    return _zero_keyless_rows(heads_first(out), mask)
