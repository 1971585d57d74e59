"""LM packing: every token once, attention never crosses a document boundary; padded mode."""

import numpy as np

from bigjax.data.lm import PackedWindows, PaddedDocs, TokenStream
from bigjax.models.layers import attention_mask

EOS = 99
DOCS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15], [16, 17]]


def test_packing_keeps_every_token_once_and_masks_documents():
    stream = TokenStream.from_docs(DOCS, EOS)
    windows = PackedWindows(stream, seq_len=4)
    n_tokens = sum(len(d) + 1 for d in DOCS)  # 22 with an EOS each
    assert len(windows) == (n_tokens - 1) // 4 == 5
    assert windows.dropped_tokens == n_tokens - 1 - 5 * 4 == 1
    inputs = np.concatenate([windows[i]["inputs"] for i in range(len(windows))])
    targets = np.concatenate([windows[i]["targets"] for i in range(len(windows))])
    # every token of the stream is an input exactly once, in order, and targets are shifted by one
    np.testing.assert_array_equal(inputs, stream.tokens[:20])
    np.testing.assert_array_equal(targets, stream.tokens[1:21])

    for i in range(len(windows)):
        ex = windows[i]
        a = i * 4
        doc_in, doc_tg = stream.doc_ids[a:a + 4], stream.doc_ids[a + 1:a + 5]
        mask = np.asarray(attention_mask(ex["segment_ids"][None], None, True, 4))[0]
        # token q may attend to k exactly when k <= q and both belong to the same document
        want = np.tril(doc_in[:, None] == doc_in[None, :])
        np.testing.assert_array_equal(mask, want)
        # a target from the next document carries no weight
        np.testing.assert_array_equal(ex["weights"], (doc_in == doc_tg).astype(np.float32))
        # positions restart at 0 at each document start inside the window
        for q in range(4):
            start = min(k for k in range(q + 1) if doc_in[k] == doc_in[q])
            assert ex["positions"][q] == q - start


def test_window_two_values_spelled_out():
    ex = PackedWindows(TokenStream.from_docs(DOCS, EOS), seq_len=4)[1]
    # stream: 1 2 3 99 | 4 5 6 7 8 9 10 99 | ...; window 1 = tokens 4..7 (inputs 4 5 6 7)
    np.testing.assert_array_equal(ex["inputs"], [4, 5, 6, 7])
    np.testing.assert_array_equal(ex["segment_ids"], [0, 0, 0, 0])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 3])  # continued doc restarts at 0
    ex3 = PackedWindows(TokenStream.from_docs(DOCS, EOS), seq_len=4)[3]
    # stream tokens 12..16: 11 99 | 12 13 14 -> predicting 12 from the EOS of [11] has no weight
    np.testing.assert_array_equal(ex3["inputs"], [11, 99, 12, 13])
    np.testing.assert_array_equal(ex3["segment_ids"], [0, 0, 1, 1])
    np.testing.assert_array_equal(ex3["weights"], [1, 0, 1, 1])
    np.testing.assert_array_equal(ex3["positions"], [0, 1, 0, 1])


def test_padded_docs_truncate_with_a_count_and_mask_padding():
    padded = PaddedDocs(DOCS, EOS, seq_len=4, pad_id=0)
    assert len(padded) == 5  # [11] + EOS has 2 tokens: one target, so it is kept
    assert len(PaddedDocs([[7]], None, 4)) == 0  # a single token has no target
    # docs with EOS: lengths 4, 8, 2, 5, 3 -> windows hold 5 tokens; doc 2 loses 3
    assert (padded.truncated_docs, padded.truncated_tokens) == (1, 3)
    ex = padded[0]
    np.testing.assert_array_equal(ex["inputs"], [1, 2, 3, 0])
    np.testing.assert_array_equal(ex["targets"], [2, 3, 99, 0])
    np.testing.assert_array_equal(ex["weights"], [1, 1, 1, 0])
    mask = np.asarray(attention_mask(ex["segment_ids"][None], None, True, 4))[0]
    assert not mask[:3, 3].any()  # real tokens never see the padding
