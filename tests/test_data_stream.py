"""The streaming LM path (bigjax.data.stream, lm_stream, stream_loader): the same windows as the
in-memory path, every token of an epoch once across processes, exact resume, bad input refused."""

import collections
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from bigjax.checkpoint import Checkpointer
from bigjax.cli import run
from bigjax.config import CheckpointConfig, load_config
from bigjax.data.lm import PackedWindows, TokenStream, build_lm_data
from bigjax.data.loader import TrainLoader
from bigjax.data.stream_loader import StreamLoader
from bigjax.errors import BigjaxError, ConfigError, DataError
from stream_helpers import SEQ_LEN, CharTok, source, write_corpus

from bigjax.data.lm_stream import MixtureSource

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    return root, write_corpus(root)


def stream_tokens(docs):
    return TokenStream.from_docs(CharTok()(docs)["input_ids"], CharTok.eos_token_id)


def test_unshuffled_stream_equals_in_memory_windows(corpus):
    root, docs = corpus
    got = list(source(root).pipeline(0, 1, seed=0, shuffle=False, epochs=1))
    want = PackedWindows(stream_tokens(docs), SEQ_LEN)
    assert len(got) == len(want) > 40
    for i, ex in enumerate(got):  # every array of every window, bit for bit
        for k, v in want[i].items():
            np.testing.assert_array_equal(ex[k], v, err_msg=f"window {i} {k}")



def test_window_example_positions_match_the_diff_definition():
    # window_example finds document starts without np.diff (it runs once per window); compare it
    # with the definition it replaced on windows that start inside a document, hold one-token
    # documents and span many documents
    from bigjax.data.stream import window_example
    rng = np.random.default_rng(0)
    for _ in range(50):
        docs = np.cumsum(rng.random(SEQ_LEN + 1) < 0.3).astype(np.int32) + 5
        seg = docs[:-1] - docs[0]
        idx = np.arange(SEQ_LEN, dtype=np.int32)
        want = idx - np.maximum.accumulate(np.where(np.diff(seg, prepend=-1) != 0, idx, 0))
        got = window_example(np.arange(SEQ_LEN + 1, dtype=np.int32), docs)
        np.testing.assert_array_equal(got["positions"], want)
        np.testing.assert_array_equal(got["segment_ids"], seg)
        assert got["positions"].dtype == np.int32


def test_documents_tokenized_in_chunks_equal_one_call_each_and_resume_mid_chunk(corpus,
                                                                                monkeypatch):
    # chunks of 4 cut every file (9..14 documents) mid-way: a state taken between two documents
    # of one chunk must restore to the very next document, never skip the rest of the chunk
    from bigjax.data import stream
    monkeypatch.setattr(stream, "TOKENIZE_CHUNK", 4)
    root, _ = corpus
    src = source(root)
    shards = [stream.Shard(f) for f in src.files]
    ds = stream.Documents(shards, src.reading, seed=1, shuffle=True, epochs=2,
                          tokenize=src.tokenize)
    it = iter(ds)
    states, docs = [], []
    while True:
        states.append(it.get_state())
        try:
            docs.append(next(it).tolist())
        except StopIteration:
            break
    texts = list(stream.Documents(shards, src.reading, seed=1, shuffle=True, epochs=2))
    assert docs == [CharTok()(t)["input_ids"] + [CharTok.eos_token_id] for t in texts]
    # a bad record (None) stays in place, a prepared document (ids) gets its end token only
    many = src.tokenize.many(["ab", None, np.array([7, 8], np.int32)])
    assert [None if m is None else m.tolist() for m in many] == [[99, 100, 1], None, [7, 8, 1]]
    for k in range(0, len(docs), 5):
        again = iter(ds)
        again.set_state(states[k])
        assert [next(again).tolist() for _ in range(min(6, len(docs) - k))] == docs[k:k + 6], k

def test_every_token_of_an_epoch_once_across_processes(corpus):
    root, docs = corpus
    src, count = source(root), 3
    inputs, tail = collections.Counter(), 0
    shards = []
    for p in range(count):
        mine = src.process_shards(p, count)
        shards += [s.name for s in mine]
        windows = list(src.pipeline(p, count, seed=7, shuffle=True, epochs=1))
        for ex in windows:
            inputs.update(ex["inputs"].tolist())
        # this process's stream: its files' documents; it drops the tail after its last window
        n = sum(len(stream_tokens(docs_of(s.name)).tokens) for s in mine)
        tail += n - len(windows) * SEQ_LEN
        assert 0 < n - len(windows) * SEQ_LEN <= SEQ_LEN  # the last target + at most a window
    assert sorted(shards) == src.files  # each file read by exactly one process
    corpus_tokens = collections.Counter(stream_tokens(docs).tokens.tolist())
    assert not inputs - corpus_tokens  # nothing invented, nothing read twice ...
    assert sum((corpus_tokens - inputs).values()) == tail  # ... and only the tails missing


def docs_of(path):
    with open(path) as fh:
        return [json.loads(line)["text"] for line in fh]


def test_file_shares_balance_bytes_but_give_every_worker_a_file():
    from bigjax.data.lm_stream import file_shares
    assert file_shares([100, 10, 10, 10, 10], 2) == [[0], [1, 2, 3, 4]]  # by bytes
    # two workers each: the big file's process still gets a second file
    assert file_shares([100, 10, 10, 10, 10], 2, need=2) == [[0, 4], [1, 2, 3]]


def test_shuffling_is_seeded_and_reorders(corpus):
    src = source(corpus[0])
    epoch = lambda seed: [ex["inputs"].tolist()
                          for ex in src.pipeline(0, 1, seed=seed, shuffle=True, epochs=1)]
    a, b = epoch(1), epoch(2)
    # another file order cuts other windows, so only the count (same stream length) is shared
    assert a == epoch(1) and a != b and len(a) == len(b)


def batches(loader, n):
    out = []
    for _ in range(n):
        out.append(next(loader))
        loader.prefetch()
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_checkpoint_yields_exactly_the_next_batches(corpus, workers, tmp_path):
    src = source(corpus[0])
    make = lambda: StreamLoader(src, 4, seed=5, shuffle=True, sharding=None, workers=workers,
                                prefetch=2)
    loader = make()  # (two loaders only: each starts its worker processes, seconds apiece)
    want = batches(loader, 17)  # and 2 more read ahead: the state is still that of batch 18
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(async_save=False))
    ckpt.save(17, {"x": jnp.zeros(2)}, loader.state(), {"step": 17}, force=True)
    want += batches(loader, 23)  # past the first epoch (about 30 batches)
    loader.close()
    state = ckpt.restore(17, {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}).data_state
    ckpt.close()
    loader = make()
    loader.restore(state)
    got = batches(loader, 23)
    loader.close()
    for a, b in zip(got, want[17:]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_a_state_of_other_data_is_refused_with_one_line(corpus, tmp_path):
    src = source(corpus[0])
    loader = StreamLoader(src, 4, seed=5, shuffle=True, sharding=None)
    state = loader.state()
    other = source(corpus[0])
    other.seq_len = SEQ_LEN * 2
    with pytest.raises(DataError, match=r"seq_len 16 -> 32.*restore the data\.\*, train\.seq_len"):
        StreamLoader(other, 4, seed=5, shuffle=True, sharding=None).restore(state)
    with pytest.raises(DataError, match=r"process_count 1 -> 2"):
        StreamLoader(src, 4, seed=5, shuffle=True, sharding=None, process_index=1,
                     process_count=2).restore(state)
    write_corpus(str(tmp_path), files=7)
    with pytest.raises(DataError, match=r"stream '[0-9a-f]+' -> '[0-9a-f]+'"):
        StreamLoader(source(str(tmp_path)), 4, seed=5, shuffle=True, sharding=None).restore(state)
    memory = TrainLoader([{"x": np.zeros(2)}] * 8, 4, seed=5, shuffle=True, sharding=None).state()
    with pytest.raises(DataError, match=r"in-memory loader's position .*data\.stream=false"):
        loader.restore(memory)
    for e in (DataError,):
        assert issubclass(e, BigjaxError)


def lm_config(tmp_path, *overrides):
    return load_config(None, ["data.vocab_size=300", "train.seq_len=16", "train.batch_size=4",
                              f"run.dir={tmp_path}/run", *overrides])


def test_bad_streaming_input_is_one_line_before_anything_compiles(corpus, tmp_path):
    root = corpus[0]
    with pytest.raises(DataError, match=r"^data\.source: no files match '/nowhere/\*\.jsonl'"):
        build_lm_data(lm_config(tmp_path, "data.source=/nowhere/*.jsonl", "data.stream=true"), "")
    # 6 files, one held out: 5 cannot feed 1 process x 6 workers (refused before the tokenizer)
    cfg = lm_config(tmp_path, f"data.source={root}/*.jsonl", "data.stream=true",
                    "data.workers=6", "data.val_fraction=0.1")
    with pytest.raises(DataError, match=r"has 5 training files, but streaming gives each of the 1 "
                                        r"processes x 6 data\.workers"):
        build_lm_data(cfg, str(tmp_path))
    with pytest.raises(ConfigError, match=r"^data\.stream=true: builtin:pydocs is an in-memory"):
        build_lm_data(lm_config(tmp_path, "data.stream=true"), "")
    with pytest.raises(ConfigError, match=r"data\.stream: got 'maybe', expected one of 'auto', "):
        lm_config(tmp_path, "data.stream=maybe")
    with pytest.raises(ConfigError, match=r"data\.shuffle_windows must be at least 1, got 0"):
        lm_config(tmp_path, "data.shuffle_windows=0")


def test_a_glob_matching_nothing_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = run(["train", "configs/gpt_tiny.yaml", "data.source=/nowhere/*.txt", "data.stream=true",
              f"run.dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [
        "bigjax: error: data.source: no files match '/nowhere/*.txt' (expected a path or glob "
        "of .txt/.md/.jsonl/.json/.csv/.tsv/.parquet files, tfds:NAME or builtin:pydocs)"], err


def test_the_tokenizer_trains_on_a_bounded_sample(corpus, tmp_path):
    root, docs = corpus
    cfg = lm_config(tmp_path, f"data.source={root}/*.jsonl", "data.stream=true",
                    "data.tokenizer_sample_chars=500", "data.val_fraction=0.2")
    from bigjax.data import lm_stream
    files, _, records, _ = lm_stream.split_inputs(cfg)
    sample = lm_stream.tokenizer_sample(cfg, files, records)()
    assert sample == lm_stream.tokenizer_sample(cfg, files, records)()  # seeded
    # stops at the first document that reaches the budget: under it by less than one document
    assert 500 <= sum(map(len, sample)) < 500 + max(map(len, docs))
    assert set(sample) <= set(docs) and len(set(sample)) == len(sample)  # none read twice


def test_two_processes_stream_disjoint_shares_and_resume_from_a_gathered_state(corpus, tmp_path):
    root, docs = corpus
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": os.path.dirname(HERE)}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "stream_helpers.py"), str(port),
                               str(i), root, str(tmp_path / f"{i}.json")], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
    outs = [json.load(open(tmp_path / f"{i}.json")) for i in range(2)]
    assert all(o["resumed"] and o["states"] == 2 for o in outs)
    assert not set(outs[0]["shards"]) & set(outs[1]["shards"])
    assert sorted(outs[0]["shards"] + outs[1]["shards"]) == source(root).files
    inputs = collections.Counter(t for o in outs for w in o["windows"] for t in w)
    corpus_tokens = collections.Counter(stream_tokens(docs).tokens.tolist())
    assert not inputs - corpus_tokens
    assert sum((corpus_tokens - inputs).values()) <= 2 * (SEQ_LEN + 1)  # two tails at most


def test_a_3_to_1_mixture_supplies_tokens_3_to_1_and_resumes_its_counts(corpus, tmp_path):
    other = str(tmp_path / "other")
    write_corpus(other, files=3, docs=5, seed=1)  # smaller: it wraps around several epochs
    mix = MixtureSource([source(corpus[0]), source(other)], [3.0, 1.0], [corpus[0], other])
    make = lambda: StreamLoader(mix, 4, seed=2, shuffle=True, sharding=None, prefetch=2)
    loader = make()
    seen = batches(loader, 100)
    state = json.loads(json.dumps(loader.state()))
    seen += batches(loader, 100)
    assert all("source_id" not in b for b in seen)  # counted by the loader, unseen by the step
    first, second = loader.metrics()["source_tokens_0"], loader.metrics()["source_tokens_1"]
    assert first + second == 200 * 4 * SEQ_LEN
    assert abs(first / second - 3) < 0.05 * 3  # the bound; grain's mix is deterministic
    resumed = make()
    resumed.restore(state)
    for a, b in zip(batches(resumed, 100), seen[100:]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert resumed.metrics() == loader.metrics()


def test_a_mixture_source_that_cannot_be_read_is_one_line_naming_it(corpus, tmp_path):
    cfg = lm_config(tmp_path, f"data.sources=[{{source: '{corpus[0]}/*.jsonl', weight: 3}}, "
                              "{source: '/nowhere/*.jsonl', weight: 1}]")
    with pytest.raises(DataError, match=r"^data\.sources\[1\] \(/nowhere/\*\.jsonl\): no files "
                                        r"match '/nowhere/\*\.jsonl'"):
        build_lm_data(cfg, str(tmp_path))
    for bad, message in [("-1", r"data\.sources\[1\]\.weight must be a finite number >= 0, got "
                                r"-1\.0 \(source b\)"), ("0", r"data\.sources: every weight is 0")]:
        with pytest.raises(ConfigError, match=message):
            lm_config(tmp_path, f"data.sources=[{{source: a, weight: 0}}, "
                                f"{{source: b, weight: {bad}}}]")


def test_prepare_once_then_train_on_token_ids_with_the_same_windows(corpus, tmp_path):
    from bigjax.data.prepare import prepare
    root = corpus[0]
    out = str(tmp_path / "prepared")
    raw = lm_config(tmp_path, f"data.source={root}/*.jsonl", "data.stream=true",
                    "data.tokenizer_sample_chars=3000", "data.val_fraction=0.2")
    done = prepare(raw, out)
    assert (done["written"], done["skipped"]) == (6, 0)
    assert done["manifest"]["tokens"] == done["tokens"] > 0
    os.remove(os.path.join(out, "shard-00003.json"))  # as if killed while writing shard 3
    again = prepare(raw, out)
    assert (again["written"], again["skipped"]) == (1, 5)
    assert again["manifest"] == done["manifest"]
    # training on the prepared dir reads ids; on the raw files with its tokenizer, tokenizes
    first = lambda cfg: [ex["inputs"].tolist() for ex in build_lm_data(cfg, str(tmp_path))
                         .train.pipeline(0, 1, seed=0, shuffle=False, epochs=1)]
    from_ids = first(lm_config(tmp_path, f"data.source={out}", "data.val_fraction=0.2"))
    tokenized = first(lm_config(tmp_path, f"data.source={root}/*.jsonl", "data.stream=true",
                                f"data.tokenizer={out}/tokenizer", "data.val_fraction=0.2"))
    assert from_ids == tokenized and len(from_ids) > 20
    other = str(tmp_path / "other_tok")
    from bigjax.data.tokenizer import train_bpe
    train_bpe(["another corpus entirely"] * 20, 300, other)
    with pytest.raises(DataError, match=rf"^data\.source: {out} was prepared with tokenizer "
                                        r"[0-9a-f]{16} .* but data\.tokenizer .* leave "
                                        r"data\.tokenizer empty"):
        build_lm_data(lm_config(tmp_path, f"data.source={out}", f"data.tokenizer={other}"), "")
