"""Generation (bigjax/generate.py; the cache in bigjax/models/kv_cache.py, gpt.py, layers.py):
cached equals uncached, bigjax equals Hugging Face `generate`, sampling draws from the model's
distribution, a mesh equals one device, and the CLI's output and errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from bigjax import cli
from bigjax import mesh as mesh_lib
from bigjax.config import DEFAULT_RULES, MeshConfig
from bigjax.data.tokenizer import train_bpe
from bigjax.generate import Generator, Sampling, bucket, generate_tokens, next_token
from bigjax.models.gpt import GPT, GPTConfig
from bigjax.models.kv_cache import KVCache
from bigjax.step import with_activation_sharding

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9, 1, 2, 3, 4, 17]]  # left padding in a batch
NEW = 8
PAD, EOS = 0, 1  # the BPE tokenizer's <pad> and <|endoftext|>


def left_padded(prompts, width: int, pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), width), pad, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def uncached_greedy(model, prompts, n: int) -> np.ndarray:
    """The whole prefix recomputed by the plain forward pass at every step: no cache. Rows are
    right-padded to one width (causal attention: padding after a token cannot change its
    logits), so one compiled forward pass serves every step."""
    width = max(map(len, prompts)) + n
    forward = jax.jit(lambda t: model(t))
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        tokens = np.array([s + [PAD] * (width - len(s)) for s in seqs], np.int32)
        logits = np.asarray(forward(tokens))
        for i, s in enumerate(seqs):
            s.append(int(logits[i, len(s) - 1].argmax()))
    return np.array([s[len(p):] for s, p in zip(seqs, prompts)])


@pytest.mark.parametrize("kw", [
    dict(positions="learned"),
    dict(positions="rotary", n_kv_heads=2, norm="rmsnorm", mlp="swiglu", use_bias=False,
         tie_embeddings=False, scan_layers=True),
], ids=["learned", "rotary_gqa_scanned"])
def test_cached_greedy_equals_uncached_on_a_left_padded_batch(kw):
    cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                    init_std=0.05, **kw)
    model = GPT(cfg, nnx.Rngs(0))
    tokens, lengths = left_padded(PROMPTS, 16)
    out = jax.jit(lambda t, l: generate_tokens(
        model, t, l, jax.random.key(0), NEW, new_tokens=16, sampling=Sampling(), eos_id=None,
        pad_id=PAD))(tokens, lengths)
    out = np.asarray(out)
    assert (out[:, NEW:] == PAD).all()  # max_new_tokens (traced) < the bucket's 16
    ref = uncached_greedy(model, PROMPTS, NEW)
    np.testing.assert_array_equal(out[:, :NEW], ref)
    assert len(np.unique(ref)) > 4  # varied text: wrong positions or masks would change it


def test_cache_is_sized_by_kv_heads_in_the_compute_dtype_and_sharded_on_the_mesh():
    cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                    dtype="bfloat16", positions="rotary")
    cache = jax.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)).init_cache(4, 24))
    assert (cache.k.shape, cache.k.dtype, cache.v.shape) == ((3, 4, 24, 2, 8), jnp.bfloat16,
                                                             (3, 4, 24, 2, 8))
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
    zeros = jax.jit(with_activation_sharding(
        lambda: KVCache.zeros(3, 4, 24, 2, 8, jnp.bfloat16), mesh, DEFAULT_RULES))()
    assert tuple(zeros.k.sharding.spec)[:4] == (None, "data", None, "tensor")  # rows, kv heads


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert [bucket(n, 1) for n in (1, 3, 8)] == [1, 4, 8]


# ---- Hugging Face: the same greedy tokens as transformers' generate ----------------------------

@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok") / "bpe")
    train_bpe(["the cat sat on the mat. " * 20, "def parse(text): return text"], 300, out)
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer_files):
    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=32, initializer_range=0.2, bos_token_id=EOS,
                                     eos_token_id=EOS, pad_token_id=PAD)
    path = str(tmp_path_factory.mktemp("hf") / "gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    for f in os.listdir(tokenizer_files):
        with open(os.path.join(tokenizer_files, f), "rb") as src, \
                open(os.path.join(path, f), "wb") as dst:
            dst.write(src.read())
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(4)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=48, max_position_embeddings=32,
                                      initializer_range=0.2, tie_word_embeddings=False,
                                      bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    path = str(tmp_path_factory.mktemp("hf") / "llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(path: str, prompts, n: int) -> np.ndarray:
    """transformers' generate on the left-padded batch, new tokens padded to n with PAD."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokens, _ = left_padded(prompts, max(map(len, prompts)))
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=(ids != PAD).long(), do_sample=False,
                             max_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS).numpy()
    new = out[:, tokens.shape[1]:]
    return np.pad(new, ((0, 0), (0, n - new.shape[1])), constant_values=PAD)


def one_device():
    return mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def llama_greedy(llama_dir):
    gen = Generator.from_hf(llama_dir, mesh=one_device())
    return gen, gen.generate_ids(PROMPTS, NEW, eos_id=EOS, pad_id=PAD)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_tokens_equal_hugging_face_generate(family, gpt2_dir, llama_dir, llama_greedy):
    """A batch of prompts of different lengths (left-padded on both sides); learned positions
    and LayerNorm (GPT-2), rotary positions, RMSNorm and grouped-query heads (LLaMA)."""
    if family == "gpt2":
        path = gpt2_dir
        ours = Generator.from_hf(path, mesh=one_device()).generate_ids(PROMPTS, NEW, eos_id=EOS,
                                                                        pad_id=PAD)
    else:
        path, ours = llama_dir, llama_greedy[1]
    ref = hf_greedy(path, PROMPTS, NEW)
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ref)) > 4


# ---- sampling ---------------------------------------------------------------------------------

def test_seeded_sampling_repeats_and_top_k_1_is_greedy(llama_greedy):
    gen, greedy = llama_greedy
    nucleus = Sampling(temperature=1.0, top_p=0.9)
    a, b = (gen.generate_ids(PROMPTS, NEW, nucleus, seed=3, eos_id=EOS) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert (gen.generate_ids(PROMPTS, NEW, nucleus, seed=4, eos_id=EOS) != a).any()
    assert (a != greedy).any()  # sampled, not greedy
    top1 = gen.generate_ids(PROMPTS, NEW, Sampling(temperature=1.0, top_k=1), seed=5, eos_id=EOS,
                            pad_id=PAD)
    np.testing.assert_array_equal(top1, greedy)


# chi-square critical values at p = 0.001 (a correct sampler fails one run in a thousand), by
# degrees of freedom; with 20000 draws a probability off by 0.02 exceeds them several times over
CRITICAL = {2: 13.82, 3: 16.27, 5: 20.52}
LOGITS = np.log(np.array([0.30, 0.25, 0.20, 0.12, 0.08, 0.05]))


CASES = [  # (sampling, the distribution it must draw from)
    (Sampling(temperature=1.0), [0.30, 0.25, 0.20, 0.12, 0.08, 0.05]),
    (Sampling(temperature=1.0, top_k=3), [0.30, 0.25, 0.20, 0, 0, 0]),
    # 0.30 + 0.25 + 0.20 = 0.75 reaches 0.7: the next token is the first one left out
    (Sampling(temperature=1.0, top_p=0.7), [0.30, 0.25, 0.20, 0, 0, 0]),
    (Sampling(temperature=0.5), np.array([0.30, 0.25, 0.20, 0.12, 0.08, 0.05]) ** 2),
]


def test_next_token_distribution_matches_the_softmax():
    """20000 draws from the same logits per setting (one compile for all of them)."""
    n = 20000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, 6))
    draws = jax.jit(lambda l: [next_token(l, jax.random.key(7), s) for s, _ in CASES])(logits)
    for (sampling, expected), got in zip(CASES, draws):
        expected = np.asarray(expected) / np.sum(expected)
        counts = np.bincount(np.asarray(got), minlength=6)
        kept = expected > 0
        assert (counts[~kept] == 0).all(), sampling  # filtered tokens never drawn
        chi2 = float((((counts - n * expected) ** 2)[kept] / (n * expected[kept])).sum())
        assert chi2 < CRITICAL[int(kept.sum()) - 1], (sampling, counts, chi2)


# ---- a mesh -------------------------------------------------------------------------------------

def test_data_2_tensor_2_mesh_generates_what_one_device_does(llama_dir, llama_greedy):
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
    gen = Generator.from_hf(llama_dir, mesh=mesh)
    assert gen.params["layer_0"]["attn"]["key"]["kernel"].sharding.spec == P(None, "tensor", None)
    np.testing.assert_array_equal(gen.generate_ids(PROMPTS, NEW, eos_id=EOS, pad_id=PAD),
                                  llama_greedy[1])


# ---- the CLI ------------------------------------------------------------------------------------

def test_cli_json_lines_and_streaming_equal_hugging_face(gpt2_dir, capsys):
    prompts = ["the cat", "def parse(text): return"]
    assert cli.run(["generate", f"hf:{gpt2_dir}", *prompts, "--max-new-tokens", "6",
                    "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    ref = hf_greedy(gpt2_dir, [tok(p)["input_ids"] for p in prompts], 6)
    for row, want in zip(rows, ref):
        tokens = [int(t) for t in want]
        tokens = tokens[:tokens.index(EOS)] if EOS in tokens else tokens
        assert row["tokens"] == tokens
        assert row["completion"] == tok.decode(tokens, skip_special_tokens=True)
    assert cli.run(["generate", f"hf:{gpt2_dir}", prompts[0], "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == prompts[0] + rows[0]["completion"] + "\n"


@pytest.mark.parametrize("args,message", [
    ([], "generate needs at least one prompt"),
    (["x" * 200, "--max-new-tokens", "8"], "at most 24 prompt tokens fit"),
    (["hi", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
    (["hi", "--top-p", "1.5"], r"top_p must be in \(0, 1\] \(1 = off\), got 1.5"),
    (["hi", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_cli_bad_input_is_one_line_exit_2(gpt2_dir, capsys, args, message):
    import re
    assert cli.run(["generate", f"hf:{gpt2_dir}", *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1
    assert re.search(message, out.err), out.err


def test_cli_refuses_a_model_that_is_not_a_decoder(tmp_path, capsys):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    transformers.BertForMaskedLM(config).save_pretrained(str(tmp_path / "bert"))
    assert cli.run(["generate", f"hf:{tmp_path / 'bert'}", "hi"]) == 2
    err = capsys.readouterr().err
    assert "generate needs a decoder" in err and "model.name=bert" in err
