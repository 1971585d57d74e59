"""Attention implementations (`model.attention`): every one that runs on CPU gives the plain XLA
computation's outputs and gradients on random packed, padded, grouped-query batches; blocks,
sharding and remat change nothing, dropout included; auto picks by backend and call, and an
explicit choice that cannot serve is one line.

Splash runs here in Pallas's interpreter (`attention._SPLASH_INTERPRET`); cuDNN's kernel needs a
GPU, so only the arguments bigjax gives it are checked, through jax's XLA implementation of the
same function."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bigjax import mesh as mesh_lib
from bigjax.cli import run
from bigjax.config import MeshConfig, load_config
from bigjax.errors import ConfigError
from bigjax.models import attention, create_model
from bigjax.models.attention import AttentionMask, Needs
from bigjax.models.axes import constraints

TOL = dict(atol=1e-5, rtol=1e-5)


def batch(seed, *, B=4, T=80, N=4, K=4, H=8, causal=False, segments=False, padding=False,
          gathered=0):
    """q, k, v and a mask: segment ids of 1-4 packed documents per row (or ids in any order),
    trailing padding of 0..T-1 keys per row (some rows keep nothing: their queries have no key),
    queries gathered at `gathered` random positions."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
    seg = rng.integers(0, 4, (B, T))
    # packed documents are runs of one id (chunked skips blocks of other documents); any ids work
    seg = jnp.asarray(seg if segments == "shuffled" else np.sort(seg, 1), jnp.int32) \
        if segments else None
    valid = jnp.asarray(np.arange(T)[None] < rng.integers(0, T, (B, 1))) if padding else None
    mask = AttentionMask(causal, seg, valid)
    if gathered:
        mask = mask.at(jnp.asarray(rng.integers(0, T, (B, gathered)), jnp.int32))
        q = q[:, :gathered]
    return q, k, v, mask


def outputs_and_grads(impl, q, k, v, mask, rate=0.0):
    """Output, and the gradients of a random projection of it, jitted."""
    cot = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)
    key = jax.random.key(5) if rate else None

    def f(q, k, v, mask):
        g = lambda q, k, v: attention.attend(q, k, v, mask, implementation=impl, dropout=rate,
                                             key=key)
        return (g(q, k, v),) + jax.grad(lambda *a: (g(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)

    return jax.jit(f)(q, k, v, mask)


def assert_same(got, want):
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=name, **TOL)


CASES = {
    "causal_packed": dict(causal=True, segments=True),
    "bidirectional_padded": dict(padding=True),
    "gqa_causal_packed_padded": dict(K=2, causal=True, segments=True, padding=True),
    "gathered_queries_padded": dict(padding=True, gathered=5),  # BERT's last layer
    "gathered_queries_causal_packed": dict(K=2, causal=True, segments=True, gathered=7),
    "bidirectional_shuffled_segments_padded": dict(segments="shuffled", padding=True),
}


@pytest.fixture
def splash_on_cpu(monkeypatch):
    monkeypatch.setattr(attention, "_SPLASH_INTERPRET", True)


@pytest.fixture
def small_blocks(monkeypatch):
    """chunked's flash-style path at small sizes: blocks of 64 queries x 64 keys (4 heads), so
    T=80 takes two of each, the second padded; without it short rows take the plain computation
    in chunks of rows (test_chunked_blocks_change_nothing covers that)."""
    monkeypatch.setattr(attention, "_CPU_CHUNK_BYTES", 64 * 64 * 4 * 4)
    assert attention._block_sizes(4, 80, 80, 4, "cpu") == (1, 64, 64)


# splash has no attention dropout, nor a causal mask for gathered queries (its explicit choice is
# a one-line error there, tested below): those combinations are not generated
COMBOS = [(impl, case, rate) for impl in ("chunked", "splash") for case in CASES
          for rate in (0.0, 0.3)
          if impl == "chunked" or not (rate or CASES[case].get("causal") and CASES[case].get("gathered"))]


@pytest.mark.parametrize("impl, case, rate", COMBOS,
                         ids=[f"{i}-{c}-{'dropout' if r else 'no_dropout'}" for i, c, r in COMBOS])
def test_every_cpu_implementation_equals_xla(splash_on_cpu, small_blocks, impl, case, rate):
    q, k, v, mask = batch(0, **CASES[case])
    got = outputs_and_grads(impl, q, k, v, mask, rate)
    want = outputs_and_grads("xla", q, k, v, mask, rate)
    assert_same(got, want)
    assert float(jnp.abs(want[0]).max()) > 0.1 and float(jnp.abs(want[2]).max()) > 0.1


@pytest.mark.parametrize("T", [256, 200])  # 200: queries and keys padded up to whole blocks
def test_chunked_blocks_change_nothing(monkeypatch, T):
    """Many blocks of queries and keys (causal ones above the diagonal skipped), or whole rows
    in chunks of two, give xla's result, dropout included: its masks hash global indices."""
    q, k, v, mask = batch(1, B=4, T=T, N=4, K=2, H=16, causal=True, segments=True, padding=True)
    want = outputs_and_grads("xla", q, k, v, mask, 0.2)
    monkeypatch.setattr(attention, "_CPU_CHUNK_BYTES", 64 * 64 * 4 * 4)
    assert attention._block_sizes(4, T, T, 4, "cpu") == (1, 64, 64)
    assert_same(outputs_and_grads("chunked", q, k, v, mask, 0.2), want)
    monkeypatch.setattr(attention, "_CPU_CHUNK_BYTES", 2 * 4 * T * T * 4)
    assert attention._block_sizes(4, T, T, 4, "cpu") == (2, T, T)
    assert_same(outputs_and_grads("chunked", q, k, v, mask, 0.2), want)


def test_blocks_of_other_documents_are_skipped():
    """Query and key blocks without a segment id in common are skipped (the results above show
    the skipping changes nothing); ids in any order are compared by range, not by position."""
    seg = jnp.asarray([[0] * 64 + [1] * 64 + [2] * 128], jnp.int32)
    overlap = attention._segment_overlap(seg, seg, 64, 64)
    needed = np.array([[bool(overlap(i, j)) for j in range(4)] for i in range(4)])
    np.testing.assert_array_equal(needed, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    # rows of a chunk share the decision: a block is skipped only if it is masked in every row
    two = jnp.concatenate([seg, jnp.asarray([[0] * 128 + [1] * 128], jnp.int32)])
    overlap = attention._segment_overlap(two, two, 64, 64)
    assert bool(overlap(1, 0)) and not bool(overlap(0, 2))
    shuffled = jnp.asarray([[0, 2] * 64, [1, 1] * 64], jnp.int32)
    assert bool(attention._segment_overlap(shuffled, shuffled, 64, 64)(0, 1))


def test_cudnn_arguments_give_xla_results(monkeypatch):
    """What bigjax hands cuDNN (causal flag, padding as key lengths, packed documents as slices of
    the packed layout or as a mask, grouped heads, gathered queries) computes xla's attention when
    jax's XLA implementation runs it instead (the packed layout: its meaning spelled out in
    `_packed_reference`; on a GPU, bench/gpu_attention.py checks the kernel)."""
    monkeypatch.setattr(attention, "_CUDNN_IMPLEMENTATION", "xla")
    monkeypatch.setattr(attention, "_CUDNN_PACKED_DOCS", 16)  # off by default; on here
    for case in [dict(causal=True), dict(K=2, causal=True, padding=True), dict(padding=True),
                 dict(K=2, padding=True, gathered=5), dict(causal=True, segments=True),
                 dict(K=2, causal=True, segments=True), dict(causal=True, segments="shuffled"),
                 dict(K=2, causal=True, segments=True, padding=True),
                 dict(segments="shuffled", padding=True, gathered=5)]:
        q, k, v, mask = batch(2, **case)
        cot = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

        def f(impl):
            g = ((lambda *a: attention._cudnn(*a, mask)) if impl == "cudnn" else
                 (lambda *a: attention.attend(*a, mask, implementation="xla")))
            return (g(q, k, v),) + jax.grad(lambda *a: (g(*a) * cot).sum(), (0, 1, 2))(q, k, v)

        assert_same(jax.jit(lambda: f("cudnn"))(), jax.jit(lambda: f("xla"))())


def test_cudnn_packed_layout_arguments():
    """Each run of equal ids is one slice: start and length, -1 past the row's last run."""
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 2], [5] * 8, [0, 1, 2, 2, 2, 3, 3, 3]], jnp.int32)
    offsets, lengths = attention.packed_offsets(seg, 4)
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1],
                                            [0, 1, 2, 5, -1]])
    np.testing.assert_array_equal(lengths, [[2, 3, 3, -1], [8, -1, -1, -1], [1, 1, 3, 3]])


def test_cudnn_takes_the_packed_layout_only_for_rows_it_can_hold(monkeypatch):
    """Causal rows of non-decreasing ids and at most `_CUDNN_PACKED_DOCS` documents go through
    the packed layout (here a stand-in that returns 7s); any other batch takes the mask."""
    monkeypatch.setattr(attention, "_CUDNN_IMPLEMENTATION", "xla")
    monkeypatch.setattr(attention, "_cudnn_packed", lambda q, k, v, mask: jnp.full_like(q, 7.0))
    monkeypatch.setattr(attention, "_CUDNN_PACKED_DOCS", 4)
    q, k, v, mask = batch(0, T=16, causal=True)
    packed = lambda *rows: attention._cudnn(q, k, v, AttentionMask(
        True, jnp.asarray(rows, jnp.int32)))
    four = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert np.all(np.asarray(packed(four, four, [9] * 16, sorted(four))) == 7)
    five = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2 + [4] * 2
    assert not np.any(np.asarray(packed(four, four, five, four)) == 7)  # one row too many
    assert not np.any(np.asarray(packed(four, four, four[::-1], four)) == 7)  # ids go down
    padded = AttentionMask(True, jnp.asarray([four] * 4), jnp.ones((4, 16), bool))
    assert not np.any(np.asarray(attention._cudnn(q, k, v, padded)) == 7)


@pytest.mark.parametrize("impl,rate,T", [("chunked", 0.2, 80), ("chunked", 0.2, 16),
                                         ("splash", 0.0, 80)])
def test_sharded_over_batch_and_heads_equals_one_device(splash_on_cpu, small_blocks, impl, rate, T):
    """On a data x fsdp x tensor mesh the kernels run per device (shard_map over batch rows and
    heads) and give the unsharded result, dropout masks included (T=16: whole rows)."""
    q, k, v, mask = batch(3, B=8, T=T, N=4, K=2, causal=True, segments=True, padding=True)
    want = outputs_and_grads("xla", q, k, v, mask, rate)
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = load_config(None, []).sharding.rules
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))

    def f(q, k, v, seg, valid):
        with constraints(mesh_lib.to_sharding(mesh, rules)):
            return outputs_and_grads(impl, q, k, v, AttentionMask(True, seg, valid), rate)

    got = jax.jit(f, in_shardings=(heads, heads, heads, rows, rows))(
        q, k, v, mask.segment_ids, mask.valid)
    assert got[0].sharding.spec[:3] == (("data", "fsdp"), None, "tensor")
    assert_same(got, want)


def test_dropout_keep_mask_statistics():
    """The hashed keep mask drops the rate asked for, independently across rows, heads, queries
    and keys, and differently for another key."""
    seeds = jax.random.bits(jax.random.key(0), (2,), jnp.uint32)
    ar = lambda n: jnp.arange(n, dtype=jnp.int32)
    keep = np.asarray(attention._keep(seeds, ar(4), ar(8), ar(64)[None], ar(64), 8,
                                      0.1))  # 4 rows x 8 heads x 64 x 64
    assert abs(keep.mean() - 0.9) < 0.005
    flat = keep.reshape(32, -1).astype(np.float32)
    corr = np.corrcoef(flat)[~np.eye(32, dtype=bool)]  # between every pair of (row, head)
    assert np.abs(corr).max() < 0.05
    along = np.corrcoef(keep[..., :-1].ravel(), keep[..., 1:].ravel())[0, 1]  # adjacent keys
    assert abs(along) < 0.02
    other = attention._keep(jax.random.bits(jax.random.key(1), (2,), jnp.uint32), ar(4),
                            ar(8), ar(64)[None], ar(64), 8, 0.1)
    assert (np.asarray(other) != keep).mean() > 0.15


# ---- through the models -----------------------------------------------------------------------

T_MODEL = 80  # two blocks of 64 under small_blocks
GPT = ["model.vocab_size=64", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
       "model.d_ff=64", "model.n_layers=2", f"model.max_seq_len={T_MODEL}",
       f"train.seq_len={T_MODEL}", "model.positions=rotary", "model.dropout=0.1"]
BERT = ["model.name=bert", "task.name=masked_lm", "model.vocab_size=64", "model.d_model=32",
        "model.n_heads=4", "model.d_ff=64", "model.n_layers=2", f"model.max_seq_len={T_MODEL}",
        f"train.seq_len={T_MODEL}", "model.dropout=0.1"]


@functools.lru_cache(maxsize=None)
def model_loss_and_grads(overrides: tuple, impl: str):
    cfg = load_config(None, list(overrides) + [f"model.attention={impl}"])
    graphdef, params = nnx.split(create_model(cfg, nnx.Rngs(params=0)), nnx.Param)
    rng = np.random.default_rng(4)
    T = T_MODEL
    ids = jnp.asarray(rng.integers(1, 64, (4, T)), jnp.int32)
    if cfg.model.name == "gpt":
        kw = {"segment_ids": jnp.asarray(np.sort(rng.integers(0, 3, (4, T)), 1), jnp.int32)}
    else:
        kw = {"attention_mask": jnp.asarray(np.arange(T)[None] < np.array([[T], [9], [70], [4]])),
              "masked_positions": jnp.asarray(rng.integers(0, 4, (4, 12)), jnp.int32)}
    train = cfg.model.dropout > 0

    def loss(params):
        model = nnx.merge(graphdef, params, copy=True)
        out = model(ids, rngs=nnx.Rngs(dropout=jax.random.key(7)) if train else None, **kw)
        return (jax.nn.log_softmax(out)[..., 3]).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.tree.leaves(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("overrides,impl", [
    (GPT, "chunked"), (BERT, "chunked"), (BERT + ["model.dropout=0.0"], "splash"),
], ids=["gpt_gqa_packed_dropout-chunked", "bert_masked_lm_dropout-chunked", "bert_masked_lm-splash"])
def test_models_train_alike_on_every_cpu_implementation(splash_on_cpu, small_blocks, overrides,
                                                       impl):
    """GPT (grouped-query heads, packed documents) and BERT (padding, the last layer's queries at
    the masked positions only) through their forward and backward passes."""
    loss, grads = model_loss_and_grads(tuple(overrides), impl)
    ref_loss, ref_grads = model_loss_and_grads(tuple(overrides), "xla")
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-5)


# ---- choosing, and one-line errors ------------------------------------------------------------

@pytest.mark.parametrize("backend,needs,want", [
    ("tpu", Needs(causal=True, segments=True), "splash"),
    ("tpu", Needs(dropout=True), "xla"),
    ("tpu", Needs(dropout=True, long=True), "chunked"),
    ("gpu", Needs(causal=True, dtype="bfloat16", head_dim=64), "cudnn"),
    ("gpu", Needs(dtype="bfloat16", head_dim=64, gathered=True), "cudnn"),
    ("gpu", Needs(causal=True, segments=True, dtype="bfloat16", head_dim=64), "cudnn"),
    ("gpu", Needs(causal=True, segments=True, dtype="bfloat16", head_dim=64, long=True), "cudnn"),
    ("gpu", Needs(causal=True, segments=True, dtype="float32", head_dim=64, long=True), "chunked"),
    ("gpu", Needs(causal=True, dtype="float32", head_dim=64), "xla"),
    ("gpu", Needs(dtype="bfloat16", head_dim=64, dropout=True), "xla"),
    ("cpu", Needs(), "chunked"),
])
def test_auto_picks_the_fastest_that_serves_the_call(backend, needs, want):
    assert attention.choose("auto", needs, backend) == want


def test_an_explicit_choice_that_cannot_serve_a_call_names_what_it_lacks():
    with pytest.raises(ConfigError, match=r"^model.attention=cudnn has no attention dropout "
                                          r"\(jax.nn.dot_product_attention takes no rate\); set "
                                          r"model.attention_dropout=0 \(model.attention=auto picks "
                                          r"one that can\)$"):
        attention.choose("cudnn", Needs(causal=True, dropout=True, dtype="bfloat16"), "gpu")
    with pytest.raises(ConfigError, match=r"^model.attention=splash cannot apply a causal mask"):
        attention.choose("splash", Needs(causal=True, gathered=True), "tpu")
    assert attention.choose("xla", Needs(dropout=True, segments=True), "gpu") == "xla"


@pytest.mark.parametrize("overrides,message", [
    (["model.name=bert", "model.attention=splash", "model.dropout=0.0"],
     "model.attention=splash needs a TPU (Pallas splash attention); this JAX backend is cpu "
     "(model.attention=auto picks one that can)"),
    (["model.name=bert", "model.attention=cudnn", "model.dtype=bfloat16", "model.dropout=0.0"],
     "model.attention=cudnn needs an NVIDIA GPU (cuDNN); this JAX backend is cpu "
     "(model.attention=auto picks one that can)"),
])
def test_a_kernel_this_backend_lacks_is_an_error_when_the_model_is_built(overrides, message):
    from bigjax.build import build
    cfg = load_config(None, ["train.batch_size=8"] + overrides)  # the config alone is fine
    with pytest.raises(ConfigError) as err:
        build(cfg, mesh_lib.make_mesh(cfg.mesh))
    assert str(err.value) == message


@pytest.mark.parametrize("overrides,message", [
    (["model.attention=cudnn"], "model.attention=cudnn needs model.dtype=bfloat16 (cuDNN flash "
     "attention has no float32) (model.attention=auto picks one that can)"),
    (["model.attention=cudnn", "model.dtype=bfloat16", "model.head_dim=12"],
     "model.attention=cudnn needs a head dim that is a multiple of 8, at most 256 (got 12) "
     "(model.attention=auto picks one that can)"),
    (["model.attention=splash", "model.dropout=0.1"], "model.attention=splash has no attention "
     "dropout; set model.attention_dropout=0 (model.attention=auto picks one that can)"),
    (["model.attention=flash"], "model.attention"),
])
def test_bad_attention_choices_are_one_line_before_anything_is_written(tmp_path, capsys, overrides,
                                                                       message):
    run_dir = tmp_path / "run"
    rc = run(["train", "configs/gpt_tiny.yaml", f"run.dir={run_dir}", *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bigjax: error: " + message), err
    assert not run_dir.exists()


def test_resume_and_eval_may_change_the_kernel():
    from bigjax.checkpoint import model_config_diff
    from bigjax.config import to_dict
    saved = to_dict(load_config(None, ["model.attention=chunked"]))["model"]
    assert model_config_diff(saved, to_dict(load_config(None, []))["model"]) == []


def test_a_kernel_this_backend_lacks_is_one_line_through_the_cli(tmp_path, capsys):
    """Known only once the backend is (after jax.distributed starts): one line and exit 2 when the
    model is built, before anything is compiled or checkpointed."""
    run_dir = tmp_path / "run"
    small = ["data.max_chars=60000", "data.vocab_size=300", "train.steps=2", "train.seq_len=32",
             "model.max_seq_len=32", "train.batch_size=8", "model.d_model=32", "model.d_ff=64"]
    rc = run(["train", "configs/gpt_tiny.yaml", f"run.dir={run_dir}", *small,
              "model.attention=splash"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err == ("bigjax: error: model.attention=splash needs a TPU (Pallas splash attention); "
                   "this JAX backend is cpu (model.attention=auto picks one that can)"), err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
