"""The FLOPs per token behind MFU agree with what XLA counts in the forward+backward pass, for a
decoder and for BERT heads that compute only the positions they read."""

from __future__ import annotations

import json
import platform

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bigjax.config import load_config
from bigjax.models import create_model
from bigjax.perf import flops_per_token
from bigjax.tasks import num_predictions

# wide: the weight matmuls dominate (attention 5-8% of the FLOPs, a GPT's tied head 38%); long:
# the attention scores are 36-57% (T large against d_model)
SIZES = {"wide": ["model.vocab_size=2048", "model.d_model=128", "model.n_heads=4",
                  "model.d_ff=512", "model.n_layers=2", "model.max_seq_len=64",
                  "train.seq_len=64"],
         "long": ["model.vocab_size=2048", "model.d_model=64", "model.n_heads=2",
                  "model.d_ff=256", "model.n_layers=2", "model.max_seq_len=512",
                  "train.seq_len=512"]}
B = 1
# the plain attention: `chunked` (CPU's auto) recomputes the scores in its backward pass (7 matmuls
# where model FLOPs count 6, as remat recomputes), and loops, whose body XLA's cost analysis counts
# once
ATTENTION = "model.attention=xla"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("overrides", [
    [],  # GPT decoder, tied head
    ["model.tie_embeddings=false"],
    ["model.name=bert", "task.name=masked_lm"],
    ["model.name=bert", "task.name=classification", "task.num_labels=3"],
    ["model.name=bert"],  # bare encoder: every position through every layer
])
def test_flops_per_token_matches_xla_cost_analysis(size, overrides):
    cfg = load_config(None, SIZES[size] + overrides + [ATTENTION])
    T = cfg.train.seq_len
    # shapes only: nothing is initialised or run
    model = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(params=0)))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    kw = {}
    if cfg.task.name == "masked_lm":
        kw["masked_positions"] = jnp.tile(jnp.arange(num_predictions(T, 0.15)), (B, 1))
    if cfg.model.name == "bert":
        kw["attention_mask"] = jnp.ones((B, T), jnp.int32)

    def loss(params, ids):
        out = nnx.merge(graphdef, params)(ids, **kw)
        # not out.sum(): under its constant cotangent one of the head's backward matmuls goes
        # uncounted (a GPT's formula / XLA 1.12)
        return (out * out).sum()

    lowered = jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((B, T), jnp.int32))
    cost = lowered.cost_analysis()  # the program as written, before XLA's optimisations
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / (B * T)
    # XLA also counts elementwise work (softmax, norms, GELU, the loss) that model FLOPs leave out:
    # 1.7-3.2% more here at "wide", 2.1-4.4% at "long" (formula / XLA 0.969-0.983 and 0.957-0.979).
    # Model FLOPs above XLA's count are wrong; so are 6% below. What fails: no attention term
    # (formula / XLA: wide 0.90-0.93, long 0.41-0.62), the tied head left out (GPT 0.61-0.62,
    # masked-LM 0.86), the BERT pooler / masked-LM transform counted at every token (wide
    # 1.007-1.043).
    assert 0.94 * xla <= flops_per_token(cfg, n_params) <= xla


def test_cpu_peak_is_the_best_of_several_runs_cached_per_machine(tmp_path, monkeypatch):
    from bigjax import perf
    monkeypatch.setenv("BIGJAX_CACHE_DIR", str(tmp_path))
    measured = iter([50e9, 80e9, 60e9])
    monkeypatch.setattr(perf, "measure_matmul_flops", lambda dtype: next(measured))
    first = perf.cpu_peak_flops("float32")
    assert first.flops == 50e9 and "measured now" in first.source
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert list(cache) == [perf.cpu_peak_key("float32")]  # CPU model, CPUs, devices, dtype
    again = perf.cpu_peak_flops("float32")  # from the cache: nothing measured
    assert again.flops == 50e9 and "cached measurement" in again.source
    assert perf.cpu_peak_flops("float32", remeasure=True).flops == 80e9  # a quieter moment
    kept = perf.cpu_peak_flops("float32", remeasure=True)  # a busier one does not lower it
    assert kept.flops == 80e9 and "higher than now" in kept.source


def test_cpu_description_tells_apart_cpus_of_one_model_name(tmp_path):
    """Two virtual machines both named "AMD EPYC" ran ResNet-18 at 0.99x and ~0.7x of PyTorch:
    the family, model and vector unit tell them apart in bench output and in the peak cache."""
    from bigjax import perf

    def described(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return perf.cpu_description(str(path))
    cpus = f"{perf._cpus()} cpus"
    zen4 = ("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\n"
            "flags\t\t: fpu avx avx2 avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: Other\n")
    assert described(zen4) == f"AMD EPYC, family 25 model 17, AVX-512, {cpus}"
    zen2 = zen4.replace(": 17", ": 49").replace(": 25", ": 23").replace(" avx512f avx512bw", "")
    assert described(zen2) == f"AMD EPYC, family 23 model 49, AVX2, {cpus}"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU implementer\t: 0x41\n"
    assert described(arm) == f"{platform.processor() or platform.machine()}, NEON, {cpus}"
    bare = f"{platform.processor() or platform.machine()}, {cpus}"
    assert described("") == bare and perf.cpu_description(str(tmp_path / "none")) == bare


def test_the_measured_peak_is_the_best_run_not_the_median(monkeypatch):
    from bigjax import perf
    durations = iter([0.3, 0.1, 0.3, 0.3])  # one quiet run among busy ones
    clock = {"now": 0.0, "started": False}

    def fake_clock():  # each timed run reads the clock twice: start, end
        if clock["started"]:
            clock["now"] += next(durations)
        clock["started"] = not clock["started"]
        return clock["now"]
    monkeypatch.setattr(perf.time, "perf_counter", fake_clock)
    flops = perf.measure_matmul_flops("float32", sizes=(64,), runs=4)
    assert flops == pytest.approx(2 * 64 ** 3 / 0.1)


def test_mfu_is_never_above_one():
    from bigjax.perf import mfu
    assert mfu(50.0, 100.0) == 0.5
    assert mfu(150.0, 100.0) == 1.0
    assert mfu(1.0, 0.0) == 0.0


def test_device_table_and_detection():
    from types import SimpleNamespace

    from bigjax.errors import ConfigError
    from bigjax.perf import detect_device_type, device_type
    assert device_type("h100").peak("bfloat16") == 989e12
    assert device_type("v5e").memory_bytes == 16 * 2 ** 30
    with pytest.raises(ConfigError, match="unknown device type 'x100'"):
        device_type("x100")
    kind = lambda k: SimpleNamespace(platform="gpu", device_kind=k)
    assert detect_device_type(kind("NVIDIA H100 80GB HBM3")) == "h100"
    assert detect_device_type(kind("TPU v5 lite")) == "v5e"
    assert detect_device_type(kind("TPU v5p")) == "v5p"
    assert detect_device_type(kind("TPU v6 lite")) == "v6e"
    assert detect_device_type(kind("Mystery 9000")) is None
