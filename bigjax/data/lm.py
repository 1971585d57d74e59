"""Language-model examples: documents concatenated into one token stream, cut into windows.

Each window carries segment ids (one per document) and positions that restart at each document,
so attention never crosses a document boundary; a target that belongs to the next document gets
weight 0. Every token of the stream is in exactly one window (the tail shorter than a window is
counted and dropped, not silently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TokenStream:
    tokens: np.ndarray  # int32
    doc_ids: np.ndarray  # int32, nondecreasing

    @classmethod
    def from_docs(cls, docs_ids: list[list[int]], eos_id: int | None) -> "TokenStream":
        lens = [len(d) + (eos_id is not None) for d in docs_ids]
        flat = [t for d in docs_ids for t in (d + [eos_id] if eos_id is not None else d)]
        tokens = np.asarray(flat, np.int32)
        doc_ids = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
        return cls(tokens, doc_ids)


class PackedWindows:
    """Random-access source of fixed-length LM examples (grain MapDataset source)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        # windows overlap by one token, so inputs of window i+1 start where targets of window i end
        self.n = max((len(stream.tokens) - 1) // seq_len, 0)
        self.dropped_tokens = len(stream.tokens) - 1 - self.n * seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = self.stream
        a, b = i * self.seq_len, (i + 1) * self.seq_len + 1
        tok, doc = s.tokens[a:b], s.doc_ids[a:b]
        seg = doc[:-1] - doc[0]
        # positions restart at each document start inside the window (a document continued from
        # the previous window starts at 0 too), so they never exceed seq_len
        idx = np.arange(self.seq_len, dtype=np.int32)
        starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1) != 0, idx, 0))
        return {
            "inputs": tok[:-1],
            "targets": tok[1:],
            "weights": (doc[1:] == doc[:-1]).astype(np.float32),
            "segment_ids": seg,
            "positions": idx - starts,
        }


class PaddedDocs:
    """One example per document (`data.pack: false`): truncated to seq_len, padded with weight 0.

    Documents longer than a window are cut; `truncated_docs` / `truncated_tokens` count what was
    cut, so nothing is dropped without a number in the logs.
    """

    def __init__(self, docs_ids: list[list[int]], eos_id: int | None, seq_len: int, pad_id: int = 0):
        self.seq_len, self.pad_id = seq_len, pad_id
        docs = [d + [eos_id] if eos_id is not None else d for d in docs_ids]
        self.docs = [np.asarray(d, np.int32) for d in docs if len(d) >= 2]  # need one target
        self.truncated_docs = sum(len(d) > seq_len + 1 for d in self.docs)
        self.truncated_tokens = sum(max(len(d) - seq_len - 1, 0) for d in self.docs)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d = self.docs[i][: self.seq_len + 1]
        n, L = len(d) - 1, self.seq_len
        inputs = np.full(L, self.pad_id, np.int32)
        targets = np.full(L, self.pad_id, np.int32)
        inputs[:n], targets[:n] = d[:-1], d[1:]
        weights = np.zeros(L, np.float32)
        weights[:n] = 1.0
        # padding is its own segment, so real tokens never attend to it
        return {"inputs": inputs, "targets": targets, "weights": weights,
                "segment_ids": (weights == 0).astype(np.int32),
                "positions": np.arange(L, dtype=np.int32)}
