"""masked_lm and classification: masking statistics and determinism, losses against a direct
computation, exact additive metrics (macro F1 equal to scikit-learn's)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import accuracy_score, f1_score

from bigjax.config import load_config
from bigjax.data.loader import TrainLoader
from bigjax.data.mlm import MaskedExamples
from bigjax.errors import ConfigError
from bigjax.tasks import make_task

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 2, 3, 4


class FakeTokenizer:
    """What MaskedExamples reads from a tokenizer: specials, the mask id and the size."""
    mask_token_id = MASK
    all_special_ids = [PAD, 1, CLS, SEP, MASK]

    def __len__(self):
        return VOCAB


def sequences(n: int, T: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, T + 1, n)
    ids = rng.integers(5, VOCAB, (n, T)).astype(np.int32)
    ids[:, 0] = CLS
    ids[np.arange(n), lengths - 1] = SEP
    attn = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids[attn == 0] = PAD
    return {"input_ids": ids, "attention_mask": attn, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def masked():
    arrays = sequences(3000, 48)
    return arrays, MaskedExamples(arrays, FakeTokenizer(), seed=7, probability=0.15, epochs=3)


def selection(ex: dict, T: int) -> np.ndarray:
    """The T-long selected-position mask of one example (positions with weight 1)."""
    sel = np.zeros(T, bool)
    sel[ex["masked_positions"][ex["weights"] > 0]] = True
    return sel


def test_masking_statistics(masked):
    arrays, ds = masked
    ex = [ds[i] for i in range(len(arrays["input_ids"]))]  # epoch 0: every example once
    ids, attn = arrays["input_ids"], arrays["attention_mask"]
    T = ids.shape[1]
    assert all(e["masked_positions"].shape == (round(0.15 * T),) for e in ex)  # 7 of 48
    sel = np.stack([selection(e, T) for e in ex])
    new = np.stack([e["input_ids"] for e in ex])
    maskable = (attn > 0) & (ids > MASK)
    assert not sel[~maskable].any()  # never padding, [CLS], [SEP]
    assert (new[~sel] == ids[~sel]).all()  # unselected positions are untouched
    # as in the original BERT: round(15% of the maskable tokens) per sequence, at least one
    want = [max(1, round(0.15 * m)) for m in maskable.sum(1)]
    assert sel.sum(1).tolist() == want
    for e, row in zip(ex, ids):  # targets: the original tokens at the positions, ascending
        n = int(e["weights"].sum())
        assert np.all(np.diff(e["masked_positions"][:n]) > 0)
        assert np.array_equal(e["targets"][:n], row[e["masked_positions"][:n]])
        assert not e["targets"][n:].any() and not e["masked_positions"][n:].any()
    assert abs(sel.sum() / maskable.sum() - 0.15) < 0.01  # ~85k maskable tokens
    to_mask = (new[sel] == MASK).mean()
    kept = (new[sel] == ids[sel]).mean()
    randomized = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(randomized - 0.1) < 0.01
    # random replacements are ordinary tokens, never specials
    assert (new[sel & (new != MASK)] > MASK).all()


def test_masking_is_a_function_of_seed_epoch_and_index(masked):
    arrays, ds = masked
    n = len(arrays["input_ids"])
    again = MaskedExamples(arrays, FakeTokenizer(), seed=7, probability=0.15, epochs=3)
    other_seed = MaskedExamples(arrays, FakeTokenizer(), seed=8, probability=0.15, epochs=3)
    picks = [0, 5, n + 5, 2 * n + 17]
    for k in picks:
        assert all(np.array_equal(ds[k][f], again[k][f]) for f in ds[k])
    assert len(ds) == 3 * n
    picked = lambda d, ks: np.stack([d[k]["masked_positions"] for k in ks])
    first = range(50)
    assert not np.array_equal(picked(ds, first), picked(other_seed, first))
    # the same examples in another epoch are masked differently, with the same tokens underneath
    assert not np.array_equal(picked(ds, first), picked(ds, [n + i for i in first]))
    for k in (5, n + 5):
        n_pred = int(ds[k]["weights"].sum())
        assert np.array_equal(ds[k]["targets"][:n_pred],
                              arrays["input_ids"][5][ds[k]["masked_positions"][:n_pred]])


def test_masked_batches_resume_exactly(masked):
    _, ds = masked
    first = TrainLoader(ds, 8, seed=1, shuffle=True, sharding=None)
    for _ in range(3):
        next(first)
    state = first.state()
    expected = [next(first) for _ in range(2)]
    resumed = TrainLoader(ds, 8, seed=1, shuffle=True, sharding=None)
    resumed.restore(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def logits_model(logits):
    """A 'model' with the BERT call signature that returns fixed logits."""
    def model(input_ids, *, token_type_ids=None, attention_mask=None, rngs=None):
        return logits
    return model


def test_masked_lm_loss_covers_selected_positions_only():
    rng = np.random.default_rng(0)
    B, T, V = 4, 6, 11
    logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    weights = (rng.random((B, T)) < 0.3).astype(np.float32)
    task = make_task(load_config(None, ["task.name=masked_lm"]))
    batch = {"input_ids": targets, "attention_mask": np.ones((B, T)), "targets": targets,
             "weights": weights}
    stats = task.stats(logits_model(logits), batch, None)
    per_token = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    want = per_token[weights > 0].mean()
    metrics = task.finalize({k: float(v) for k, v in stats.items()})
    assert metrics["loss"] == pytest.approx(want, rel=1e-6)
    assert float(stats["weight"]) == weights.sum()


def test_classification_metrics_are_additive_and_match_sklearn():
    rng = np.random.default_rng(1)
    B, K = 40, 3
    logits = rng.normal(size=(B, K)).astype(np.float32)
    labels = rng.integers(0, K, B).astype(np.int32)
    labels[:4] = 2  # make sure class 2 has support
    weights = np.ones(B, np.float32)
    weights[-6:] = 0  # eval padding rows: must not count
    task = make_task(load_config(None, ["task.name=classification", "task.num_labels=3"]))

    def stats(rows):
        batch = {"input_ids": np.zeros((len(rows), 4), np.int32),
                 "attention_mask": np.ones((len(rows), 4)), "labels": labels[rows],
                 "weights": weights[rows]}
        return {k: float(v) for k, v in task.stats(logits_model(jnp.asarray(logits[rows])),
                                                   batch, None).items()}

    whole = stats(np.arange(B))
    a, b = stats(np.arange(0, 17)), stats(np.arange(17, B))
    summed = {k: a[k] + b[k] for k in a}
    assert summed.keys() == whole.keys()
    for k in whole:
        assert summed[k] == pytest.approx(whole[k], rel=1e-6), k
    m = task.finalize(summed)
    real = slice(0, B - 6)
    pred = logits.argmax(-1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels[real], pred[real]), abs=1e-7)
    assert m["macro_f1"] == pytest.approx(f1_score(labels[real], pred[real], average="macro"),
                                          abs=1e-7)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[real], labels[real])
    assert m["loss"] == pytest.approx(float(ce.mean()), rel=1e-6)


def test_classification_macro_f1_skips_classes_absent_from_labels_and_predictions():
    task = make_task(load_config(None, ["task.name=classification", "task.num_labels=4"]))
    # classes 0 and 1 only; 2 and 3 never occur: F1 = mean(F1_0, F1_1) as in scikit-learn
    labels, pred = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    sums = {"loss_sum": 1.0, "weight": 5.0, "correct": 3.0}
    for k in range(4):
        sums |= {f"tp_{k}": float(((pred == k) & (labels == k)).sum()),
                 f"fp_{k}": float(((pred == k) & (labels != k)).sum()),
                 f"fn_{k}": float(((pred != k) & (labels == k)).sum())}
    assert task.finalize(sums)["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))


def test_classification_needs_two_labels():
    with pytest.raises(ConfigError) as e:
        make_task(load_config(None, ["task.name=classification", "task.num_labels=1"]))
    assert str(e.value) == "task.num_labels must be at least 2 for classification, got 1"


def test_mlm_probability_must_be_a_fraction():
    with pytest.raises(ConfigError) as e:
        make_task(load_config(None, ["task.name=masked_lm", "task.mlm_probability=1.5"]))
    assert str(e.value) == "task.mlm_probability must be in (0, 1), got 1.5"


def test_masked_lm_validates_on_data_eval_split(tmp_path):
    """Regression: masked_lm held out data.val_fraction even when data.eval_split named files."""
    from bigjax.data.mlm import build_mlm_data
    words = ["red", "green", "blue", "cat", "dog", "runs", "sleeps", "fast", "slow", "big"]
    rng = np.random.default_rng(0)
    train = [" ".join(rng.choice(words, 6)) for _ in range(40)]
    held = ["red cat runs fast", "blue dog sleeps slow", train[3]]  # the last is a training text
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    cfg = load_config(None, ["task.name=masked_lm", "model.name=bert", "data.pack=false",
                             f"data.source={tmp_path}/train.jsonl", "data.vocab_size=64",
                             f"data.eval_split={tmp_path}/eval.jsonl", "train.seq_len=16"])
    data = build_mlm_data(cfg, str(tmp_path / "run"))
    assert (data.info["train_texts"], data.info["eval_texts"]) == (40, 2)
    tok = data.tokenizer
    decoded = [tok.decode(ids, skip_special_tokens=True) for ids in data.eval.arrays["input_ids"]]
    assert decoded == held[:2]


def test_masked_lm_reads_the_builtin_corpus(tmp_path):
    """Masked-LM data from a builtin (or tfds) source, not only from files."""
    from bigjax.data.mlm import build_mlm_data
    cfg = load_config(None, ["task.name=masked_lm", "model.name=bert", "data.source=builtin:pydocs",
                             "data.max_chars=20000", "data.vocab_size=300", "train.seq_len=32",
                             f"run.dir={tmp_path}"])
    data = build_mlm_data(cfg, str(tmp_path))
    ex = data.train[0]
    assert ex["input_ids"].shape == (32,) and ex["masked_positions"].shape == (5,)
    assert len(data.train) > 10 and len(data.eval) > 0
    assert (tmp_path / "tokenizer").is_dir()
