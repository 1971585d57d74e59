"""A tiny corpus and a character tokenizer for the streaming tests (importable by grain's worker
processes and by the multi-process script), and that script itself:

    python tests/stream_helpers.py PORT PROCESS_ID CORPUS_DIR OUT_JSON

joins a 2-process JAX runtime, writes every window its process streams in one epoch, and checks
that a state gathered from both processes restores each to exactly its next batches.
"""

import json
import os
import sys

import numpy as np

SEQ_LEN = 16


class CharTok:
    """One token per character (ids 2..201), eos 1: token counts are known without a BPE."""
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [ord(c) % 200 + 2 for c in text]}


def write_corpus(root, files=6, docs=9, seed=0) -> list[str]:
    """JSONL files of documents of 1..40 words; returns every document in file order."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    everything = []
    for f in range(files):
        texts = [" ".join(f"w{rng.integers(300)}" for _ in range(rng.integers(1, 40)))
                 for _ in range(docs + f)]  # files of different sizes: balancing matters
        everything += texts
        with open(os.path.join(root, f"part{f:02d}.jsonl"), "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return everything


def source(root, shuffle_windows=4):
    from bigjax.data.lm_stream import StreamSource
    from bigjax.data.stream import Reading, Tokenize

    files = sorted(os.path.join(root, f) for f in os.listdir(root))
    return StreamSource(Reading(), Tokenize(CharTok(), CharTok.eos_token_id), SEQ_LEN,
                        shuffle_windows, files, [os.path.getsize(f) for f in files])


def _main(port: str, pid: str, root: str, out: str) -> None:
    import jax
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid),
                               initialization_timeout=60)
    from bigjax.data.stream_loader import StreamLoader

    src = source(root)
    index, count = jax.process_index(), jax.process_count()
    windows = [ex["inputs"].tolist() for ex in
               src.pipeline(index, count, seed=3, shuffle=True, epochs=1)]
    make = lambda: StreamLoader(src, 4, seed=3, shuffle=True, sharding=None,
                                process_index=index, process_count=count, prefetch=2)
    loader = make()
    for _ in range(5):
        next(loader)
        loader.prefetch()  # read ahead: the state must still be that of the next batch
    state = json.loads(json.dumps(loader.state()))  # gathered from both processes
    want = [next(loader)["inputs"].tolist() for _ in range(3)]
    again = make()
    again.restore(state)
    got = [next(again)["inputs"].tolist() for _ in range(3)]
    with open(out, "w") as fh:
        json.dump({"windows": windows, "states": len(state["processes"]), "resumed": got == want,
                   "shards": [s.name for s in src.process_shards(index, count)]}, fh)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _main(*sys.argv[1:])
