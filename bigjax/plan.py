"""`bigjax plan`: sizes, FLOPs, per-device memory and training time of a config on N devices of a
type, from abstract shapes only: nothing is initialised, no device is needed, and N may exceed
this machine's device count.

Memory per device, in bytes:
- params, opt_state: each array of the abstract train state, divided by the mesh axes its sharding
  splits it over (the shardings the run would use, on an abstract mesh of N devices);
- grads: float32 like the parameters and sharded like them: the gradient, the running sum with
  `train.grad_accum` > 1, and the scan's stacked gradient with `model.scan_layers`;
- activations: a per-layer model of what the backward pass keeps (`activation_bytes`), plus under
  FSDP the weights gathered whole for the forward pass (all layers' kept for the backward pass
  without remat, one layer's with it) and the whole gradients before their reduce-scatter (one
  layer's; on CPU all layers' at once unless scanned).
The total is their sum: what `compiled.memory_analysis()` reports as argument + temp bytes for the
train step (the state is donated, so outputs reuse the arguments' buffers). tests/test_plan.py
holds it to within 20% of that on simulated CPU devices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh

from bigjax import mesh as mesh_lib
from bigjax import perf
from bigjax.config import Config, compute_dtype
from bigjax.errors import ConfigError
from bigjax.mesh import MESH_AXES
from bigjax.models import attention
from bigjax.models.lm_head import chunk_size
from bigjax.optim import make_optimizer, param_rules, subtree
from bigjax.state import TrainState, count_params, model_spec, state_shardings
from bigjax.tasks import num_predictions

FIT_FRACTION = 0.9  # of a device's memory: the rest for XLA's workspace and fragmentation
DEFAULT_MFU = 0.4  # assumed when --mfu is not given (well-tuned large runs reach 0.4-0.6)


def check_sizes(cfg: Config) -> None:
    """Plan and bench run without data: a size the tokenizer or the labels would fill must be
    given. One line naming the key."""
    if getattr(cfg.model, "vocab_size", 1) == 0:
        raise ConfigError("model.vocab_size is 0 (a run takes it from the tokenizer); "
                          "set model.vocab_size=N")
    if cfg.task.name == "classification" and getattr(cfg.task, "num_labels", 2) == 0:
        raise ConfigError("task.num_labels is 0 (a run counts the labels in the data); "
                          "set task.num_labels=N")


def random_batch(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """A global batch of the configured shape with random tokens, as the task's data builder lays
    it out (no data needed): causal_lm, masked_lm, classification and image_classification."""
    rng = np.random.default_rng(seed)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    V = max(getattr(cfg.model, "vocab_size", 2), 2)
    tokens = lambda *shape: rng.integers(0, V, shape, dtype=np.int32)
    ones = lambda *shape: np.ones(shape, np.float32)
    name = cfg.task.name
    if name == "causal_lm":
        return {"inputs": tokens(B, T), "targets": tokens(B, T), "weights": ones(B, T),
                "segment_ids": np.zeros((B, T), np.int32),
                "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    encoder = {"input_ids": tokens(B, T), "attention_mask": np.ones((B, T), np.int32),
               "token_type_ids": np.zeros((B, T), np.int32)}
    if name == "masked_lm":
        P = num_predictions(T, getattr(cfg.task, "mlm_probability", 0.15))
        positions = np.sort(np.stack([rng.choice(T, P, replace=False) for _ in range(B)]), 1)
        return {**encoder, "masked_positions": positions.astype(np.int32),
                "targets": tokens(B, P), "weights": ones(B, P)}
    if name == "classification" and cfg.data.examples_per_row > 1:
        # packed rows (bigjax/data/pack_cls.py): K texts of T // K tokens each, the rest padding
        K = cfg.data.examples_per_row
        n = T // K
        segment = np.where(np.arange(T) < n * K, np.arange(T) // max(n, 1) + 1, 0)
        position = np.where(segment > 0, np.arange(T) - (segment - 1) * n, 0)
        rows = lambda a: np.tile(a.astype(np.int32), (B, 1))
        labels = rng.integers(0, max(cfg.task.num_labels, 1), (B, K), dtype=np.int32)
        return {**encoder, "segment_ids": rows(segment), "position_ids": rows(position),
                "example_starts": rows(np.arange(K) * n), "labels": labels, "weights": ones(B, K)}
    if name == "classification":
        labels = rng.integers(0, max(cfg.task.num_labels, 1), B, dtype=np.int32)
        return {**encoder, "labels": labels, "weights": ones(B)}
    if name == "image_classification":  # the model's image shape (image configs give it)
        m = cfg.model
        images = rng.normal(size=(B, m.image_height, m.image_width, m.image_channels))
        labels = rng.integers(0, max(cfg.task.num_labels, 1), B, dtype=np.int32)
        return {"images": images.astype(np.float32), "labels": labels, "weights": ones(B)}
    raise ConfigError(f"plan and bench make random batches for causal_lm, masked_lm, "
                      f"classification and image_classification, not for task.name={name}")


def abstract_mesh(shape: tuple[int, int, int]) -> AbstractMesh:
    return AbstractMesh(tuple(shape), MESH_AXES,
                        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def bytes_per_device(abstract: Any, shardings: Any) -> int:
    """Sum over arrays of their bytes divided by the product of the mesh axes each is split over."""
    return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def micro_batch_per_device(cfg: Config, mesh_shape: dict[str, int]) -> float:
    """Examples per device in one micro-batch: the batch is split over its sharded mesh axes."""
    spec = mesh_lib.logical_to_spec(("batch",), cfg.sharding.rules, abstract_mesh(
        tuple(mesh_shape[a] for a in MESH_AXES)))
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    return cfg.train.batch_size / cfg.train.grad_accum / math.prod(mesh_shape[a] for a in axes)


def _head_share(cfg: Config) -> float:
    """Positions per token at which the output layer computes logits over the vocabulary."""
    T = cfg.train.seq_len
    if cfg.task.name == "masked_lm":
        return num_predictions(T, getattr(cfg.task, "mlm_probability", 0.15)) / T
    if cfg.task.name == "classification":
        return 0.0  # a few labels at one position
    return 1.0


def _backend(device_type: str) -> str:
    return "cpu" if device_type == "cpu" else "tpu" if device_type.startswith("v") else "gpu"


def _keeps_scores(cfg: Config, mesh_shape: dict[str, int], device_type: str) -> bool:
    m, T = cfg.model, cfg.train.seq_len
    N = max(1, m.n_heads // mesh_shape["tensor"])
    B = max(1, int(micro_batch_per_device(cfg, mesh_shape)))
    needs = attention.Needs(causal=cfg.task.name == "causal_lm",
                            segments=cfg.task.name == "causal_lm",
                            dropout=getattr(m, "attention_rate", 0) > 0,
                            dtype=getattr(m, "dtype", "float32"),
                            head_dim=getattr(m, "head_dim", 0) or m.d_model // m.n_heads,
                            long=T * T >= attention._LONG)
    return attention.keeps_scores(getattr(m, "attention", "xla"), _backend(device_type), needs,
                                  B, T, T, N)


def activation_bytes(cfg: Config, mesh_shape: dict[str, int],
                     device_type: str = "cpu") -> float | None:
    """Bytes per device that the train step keeps for the backward pass of one micro-batch, with
    its working set, for Transformer families (None for a model without d_model, n_layers, ...).

    Per token and layer (s bytes per value in the compute dtype): the residual stream (2 D values),
    two norms (each a float32 output, 4 D bytes, and its s-byte cast when s < 4), queries, keys,
    values and the attention output, the attention probabilities (float32, plus the cast: 8 bytes
    per head and key position), and the MLP's hidden activations (SwiGLU 3 F: up, gate, product;
    GELU and ReLU 2 F). `model.remat=full` keeps each layer's input only (D); `dots` also the
    outputs of the weight matmuls; both add one layer's full set, recomputed in the backward pass.
    The output layer adds the float32 logits at the positions a head reads, or of one chunk of
    them (`model.loss_chunk`, see `_logits_bytes`). Heads, MLP and vocabulary are split over the tensor axis (though XLA
    keeps about half of them whole), the residual stream is not. The coefficients were fitted to
    XLA's buffer assignment (tests/test_plan.py).
    """
    m = cfg.model
    needed = ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size")
    if not all(hasattr(m, k) for k in needed):
        return None
    # split over the tensor axis, XLA keeps about half of these activations whole (measured at
    # tensor=2: 1.5x the evenly split bytes for the MLP's and the logits' terms)
    t = 2 / (1 + 1 / mesh_shape["tensor"])
    s = 2 if getattr(m, "dtype", "float32") == "bfloat16" else 4
    D, F, L, N, V, T = m.d_model, m.d_ff, m.n_layers, m.n_heads, m.vocab_size, cfg.train.seq_len
    H = getattr(m, "head_dim", 0) or D // N
    K = getattr(m, "n_kv_heads", 0) or N
    kind = getattr(m, "mlp", "gelu")
    cast = s if s < 4 else 0
    norm = 4 * D + D * cast
    # probabilities per head and key (float32 and the cast), or a flash kernel's log-sum-exp
    scores = N * T * (8 + cast) / t if _keeps_scores(cfg, mesh_shape, device_type) else 4 * N / t
    hidden = (3 if kind == "swiglu" else 2) * F / t
    layer = s * 2 * D + 2 * norm + s * (2 * N * H + 2 * K * H) / t + scores + s * hidden
    remat = getattr(m, "remat", "none")
    if remat == "full":
        kept = s * D
    elif remat == "dots":
        ups = 2 if kind == "swiglu" else 1
        kept = s * (3 * D + (N * H + 2 * K * H) / t + ups * F / t)
    else:
        kept = layer
    per_token = L * kept + (layer if remat != "none" else 0)
    per_token += norm + s * D
    micro = micro_batch_per_device(cfg, mesh_shape)
    return micro * (per_token * T + _logits_bytes(cfg, cast) * V / t)


def _logits_bytes(cfg: Config, cast: int) -> float:
    """Bytes per vocabulary entry of one sequence's logits that exist at once. All at once: float32
    at every position a head reads, their gradient taking their place. In chunks of
    `model.loss_chunk` positions (models/lm_head.py): one chunk's float32 logits and their
    gradient in the compute dtype, computed before the next chunk's logits."""
    T, chunk = cfg.train.seq_len, getattr(cfg.model, "loss_chunk", 0)
    if cfg.task.name == "causal_lm" and 0 < chunk < T:
        return chunk_size(T, chunk)[0] * (4 + cast)
    return _head_share(cfg) * T * 4


@dataclass
class Memory:
    """Bytes per device."""

    params: float
    grads: float
    opt_state: float
    activations: float
    total: float = 0.0

    def __post_init__(self):
        self.total = self.params + self.grads + self.opt_state + self.activations


@dataclass
class Planner:
    """The parts of a plan that do not depend on the mesh, computed once."""

    cfg: Config
    device_type: str = ""  # "cpu": XLA:CPU's combining of reduce-scatters (see memory)
    n_params: int = 0
    n_embedding: int = 0
    spec: Any = None
    tx: Any = None
    abstract: TrainState | None = None
    trainable: tuple[str, ...] = ()

    def __post_init__(self):
        self.tx, _ = make_optimizer(self.cfg.optimizer, self.cfg.train.steps)
        self.spec = model_spec(self.cfg)
        self.n_params = count_params(self.spec.abstract_params)
        flat = jax.tree_util.tree_flatten_with_path(self.spec.abstract_params)[0]
        self.n_embedding = sum(int(x.size) for p, x in flat
                               if mesh_lib.path_str(p).endswith("embedding"))
        self.trainable = param_rules(self.cfg, self.spec.abstract_params).trainable

    def _params_bytes(self, mesh_shape: dict[str, int]):
        mesh = abstract_mesh(tuple(mesh_shape[a] for a in MESH_AXES))
        abstract, sh = state_shardings(self.cfg, self.spec, self.tx, mesh, abstract=self.abstract)
        self.abstract = abstract
        return abstract, sh, bytes_per_device(abstract.params, sh.params)

    def memory(self, mesh_shape: dict[str, int]) -> Memory:
        """Raises ConfigError when a parameter or the batch does not split over the mesh."""
        cfg = self.cfg
        mesh_lib.check_batch(cfg.train, cfg.sharding.rules,
                             abstract_mesh(tuple(mesh_shape[a] for a in MESH_AXES)))
        abstract, sh, params = self._params_bytes(mesh_shape)
        opt = bytes_per_device(abstract.opt_state, sh.opt_state) + 4  # + the step counter
        remat = getattr(cfg.model, "remat", "none")
        scan = bool(getattr(cfg.model, "scan_layers", False))
        # gradient buffers: the gradient, the running sum of micro-batches, and with scanned
        # layers the stacked gradient that the scan's backward loop fills beside the final one
        copies = 1 + (cfg.train.grad_accum > 1) + scan
        act = activation_bytes(cfg, mesh_shape, self.device_type or "cpu")
        act = 0.0 if act is None else act
        if mesh_shape["fsdp"] > 1:
            # FSDP gathers each weight whole (over fsdp) for its matmuls and computes its gradient
            # whole before reduce-scattering it. XLA keeps the gathered weights of the forward
            # pass for the backward pass, or with remat gathers one layer's again. GPU and TPU
            # combine reduce-scatters only up to a threshold (tens of MB): about one layer's whole
            # gradients are live; XLA:CPU combines them all, unless the layers are scanned.
            gathered = dict(mesh_shape, data=mesh_shape["data"] * mesh_shape["fsdp"], fsdp=1)
            whole = self._params_bytes(gathered)[2] - params
            n_layers = max(getattr(cfg.model, "n_layers", 1), 1)
            act += whole if remat == "none" else whole / n_layers
            if self.device_type == "cpu":
                act += 0 if scan else whole
            else:
                act += whole / n_layers
        m = cfg.model
        if cfg.task.name == "causal_lm" and hasattr(m, "vocab_size") and hasattr(m, "d_model"):
            # the loss accumulates the output weight's float32 gradient apart from the parameter
            # gradient that it then joins (models/lm_head.py), sharded like the weight
            act += params * m.vocab_size * m.d_model / max(self.n_params, 1)
        model_state = bytes_per_device(abstract.model_state, sh.model_state)
        # the step differentiates the trainable subtree only (frozen rules, LoRA's base)
        grads = bytes_per_device(subtree(abstract.params, self.trainable),
                                 subtree(sh.params, self.trainable))
        return Memory(params + model_state, grads * copies, opt, act)


def mesh_for(cfg: Config, n_devices: int) -> dict[str, int]:
    """The configured mesh on `n_devices` (mesh.data=-1 takes the rest); ConfigError if it does not
    divide."""
    d, f, t = mesh_lib.mesh_shape(cfg.mesh, n_devices)
    return {"data": d, "fsdp": f, "tensor": t}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def smallest_fitting_mesh(planner: Planner, max_devices: int, capacity: float,
                          shared: bool = False) -> tuple[dict[str, int], Memory] | None:
    """The fewest devices (1, 2, 4, ... up to `max_devices`) on which some data x fsdp x tensor
    mesh fits `capacity` bytes per device; among those, the least model parallelism (tensor, then
    fsdp: they communicate more than data parallelism). `shared`: the devices share one memory
    (simulated CPU devices), so all of them together must fit."""
    counts = sorted({2 ** k for k in range(int(math.log2(max_devices)) + 1)} | {max_devices})
    for n in counts:
        for t in _divisors(n):
            for f in _divisors(n // t):
                shape = {"data": n // t // f, "fsdp": f, "tensor": t}
                try:
                    mem = planner.memory(shape)
                except ConfigError:
                    continue
                if (mem.total * n if shared else mem.total) <= capacity:
                    return shape, mem
    return None


def parse_tokens(text: str) -> float:
    """`1e9`, `300B`, `2.5T`, `500M`, `20k` -> a number of tokens."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    s = text.strip().lower().replace("_", "").replace(",", "")
    try:
        return float(s[:-1]) * scale[s[-1]] if s and s[-1] in scale else float(s)
    except ValueError:
        raise ConfigError(f"--tokens {text!r} is not a number of tokens (e.g. 1e9, 300B, 2.5T)") \
            from None


@dataclass
class Plan:
    model: str
    params: int
    params_embedding: int
    params_non_embedding: int
    flops_per_token: float
    tokens: float
    total_flops: float
    device_type: str
    devices: int
    mesh: dict[str, int]
    dtype: str
    remat: str
    scan_layers: bool
    micro_batch_per_device: float
    memory_bytes_per_device: dict[str, float]
    device_memory_bytes: float
    fits: bool
    peak_flops_per_device: float
    mfu: float
    time_s: float
    smallest_mesh: dict[str, Any] | None
    activations_modelled: bool = True
    compiled: dict[str, float] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(cfg: Config, devices: int, device_type: str, tokens: float | None = None,
              mfu: float = DEFAULT_MFU, compile: bool = False) -> Plan:
    """`compile`: also compile the step here on abstract inputs and report XLA's figures."""
    check_sizes(cfg)
    if devices < 1:
        raise ConfigError(f"--devices must be at least 1, got {devices}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    dtype = compute_dtype(cfg)
    dev = perf.device_type(device_type, dtype)
    shape = mesh_for(cfg, devices)
    planner = Planner(cfg, device_type)
    mem = planner.memory(shape)
    shared = device_type == "cpu"  # simulated devices share the host's memory
    capacity = dev.memory_bytes * FIT_FRACTION
    fits = (mem.total * devices if shared else mem.total) <= capacity
    flops_tok = perf.flops_per_token(cfg, planner.n_params)
    tokens = float(tokens if tokens is not None else
                   cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len)
    total = flops_tok * tokens
    per_device = dev.peak(dtype) / (devices if shared else 1)
    smallest = smallest_fitting_mesh(planner, devices, capacity, shared)
    return Plan(
        model=cfg.model.name, params=planner.n_params, params_embedding=planner.n_embedding,
        params_non_embedding=planner.n_params - planner.n_embedding,
        flops_per_token=flops_tok, tokens=tokens, total_flops=total, device_type=device_type,
        devices=devices, mesh=shape, dtype=dtype, remat=getattr(cfg.model, "remat", "none"),
        scan_layers=bool(getattr(cfg.model, "scan_layers", False)),
        micro_batch_per_device=micro_batch_per_device(cfg, shape),
        memory_bytes_per_device=asdict(mem), device_memory_bytes=dev.memory_bytes, fits=fits,
        peak_flops_per_device=per_device, mfu=mfu,
        time_s=total / (per_device * devices * mfu),
        smallest_mesh=None if smallest is None else {**smallest[0], "devices": math.prod(
            smallest[0].values()), "total_bytes": smallest[1].total},
        activations_modelled=activation_bytes(cfg, shape) is not None,
        compiled=compile_memory_here(cfg, devices) if compile else None)


def memory_aware_options() -> dict[str, str]:
    """Compiler options for a memory-aware schedule, as GPU and TPU schedules are: XLA:CPU's
    default runs independent work early and keeps recomputed activations alive longer."""
    if jax.devices()[0].platform == "cpu":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return {}


def compiled_memory(compiled) -> dict[str, float]:
    """Per-device bytes of a compiled step (XLA's memory analysis)."""
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return {k: float(v) for k, v in out.items()}


def compile_memory_here(cfg: Config, devices: int, memory_aware: bool = True
                        ) -> dict[str, float]:
    """The train step compiled on abstract inputs for the first `devices` local devices (nothing
    is initialised or run), under a memory-aware schedule unless told otherwise (XLA:CPU's
    default is what a CPU run gets): XLA's per-device memory analysis."""
    from bigjax.build import build
    from bigjax.mesh import make_mesh
    have = jax.local_devices()
    if devices > len(have):
        raise ConfigError(f"--compile needs {devices} devices here, this machine has {len(have)}"
                          + (f"; on CPU simulate them with XLA_FLAGS=--xla_force_host_platform_"
                             f"device_count={devices}" if have[0].platform == "cpu" else ""))
    parts = build(cfg, make_mesh(cfg.mesh, devices=have[:devices]))
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         parts.abstract, parts.shardings)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parts.batch_sharding)
             for k, v in random_batch(cfg).items()}
    options = memory_aware_options() if memory_aware else {}
    return compiled_memory(parts.train_step.lower(state, batch).compile(options))


def fmt_bytes(x: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def fmt_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _duration(s: float) -> str:
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if s >= scale:
            return f"{s / scale:.1f} {unit}"
    return f"{s * 1e3:.1f} ms"


def format_plan(p: Plan) -> str:
    mem = p.memory_bytes_per_device
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [
        f"model: {p.model}, {fmt_count(p.params)} parameters ({fmt_count(p.params_embedding)} "
        f"embedding, {fmt_count(p.params_non_embedding)} non-embedding)",
        f"training FLOPs: {fmt_count(p.flops_per_token)} per token, {p.total_flops:.3g} for "
        f"{fmt_count(p.tokens)} tokens",
        f"mesh: {mesh} on {p.devices} x {p.device_type} ({fmt_bytes(p.device_memory_bytes)} each); "
        f"dtype {p.dtype}, remat {p.remat}, scan_layers {str(p.scan_layers).lower()}, "
        f"{p.micro_batch_per_device:g} examples per device per micro-batch",
        "memory per device: " + ", ".join(f"{k} {fmt_bytes(mem[k])}" for k in
                                          ("params", "grads", "opt_state", "activations"))
        + f"; total {fmt_bytes(mem['total'])}"
        + ("" if p.activations_modelled else " (activations not modelled for this family)")
        + (f" (x {p.devices} simulated devices on one host)" if p.device_type == "cpu" else "")
        + (": fits" if p.fits else f": does NOT fit in {FIT_FRACTION:.0%} of "
           f"{fmt_bytes(p.device_memory_bytes)}"),
        f"time for {fmt_count(p.tokens)} tokens: {_duration(p.time_s)} at MFU {p.mfu:g} of "
        f"{p.peak_flops_per_device / 1e12:.3g} TFLOP/s {p.dtype} per device",
    ]
    if p.smallest_mesh is None:
        lines.append(f"smallest mesh that fits: none of up to {p.devices} devices")
    else:
        s = p.smallest_mesh
        lines.append(f"smallest mesh that fits: {s['devices']} device(s), data={s['data']} "
                     f"fsdp={s['fsdp']} tensor={s['tensor']} ({fmt_bytes(s['total_bytes'])} "
                     "per device)")
    if p.compiled:
        c = p.compiled
        lines.append(f"compiled here (XLA memory analysis): argument "
                     f"{fmt_bytes(c['argument'])}, temp {fmt_bytes(c['temp'])}; total "
                     f"{fmt_bytes(c['total'])}")
    return "\n".join(lines)
