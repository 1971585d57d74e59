"""Device mesh from the config, logical-axis rules, and shardings for parameters and batches.

Models only name logical axes (vocab, embed, heads, mlp, ...); this module alone maps them to
mesh axes, so FSDP and tensor parallelism are configuration.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigjax.config import MeshConfig
from bigjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve `data: -1` and check the product against the device count."""
    fixed = cfg.fsdp * cfg.tensor * cfg.dcn_data
    data = cfg.data
    if data == -1:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh: fsdp*tensor*dcn_data = {fixed} does not divide the {n_devices} devices"
            )
        data = n_devices // fixed * cfg.dcn_data  # the data axis spans all hosts/slices
    else:  # mesh.data counts the data parallelism inside one host or slice
        data *= cfg.dcn_data
    if data * cfg.fsdp * cfg.tensor != n_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {data}*{cfg.fsdp}*{cfg.tensor} = "
            f"{data * cfg.fsdp * cfg.tensor}, but there are {n_devices} devices "
            "(set mesh.data=-1 to use the rest)"
        )
    return data, cfg.fsdp, cfg.tensor


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    try:
        shape = mesh_shape(cfg, len(devices))
    except ConfigError as e:
        if devices[0].platform != "cpu":
            raise
        need = cfg.fsdp * cfg.tensor * cfg.dcn_data * max(cfg.data, 1)
        raise ConfigError(f"{e}; on CPU, simulate {need} devices by starting with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={need}") from None
    auto = (jax.sharding.AxisType.Auto,) * 3
    if cfg.dcn_data > 1 and len({d.process_index for d in devices}) > 1:
        return Mesh(_hybrid_grid(cfg, shape, devices), MESH_AXES, axis_types=auto)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _hybrid_grid(cfg: MeshConfig, shape: tuple[int, int, int], devices: list) -> np.ndarray:
    """Devices laid out so that only the data axis crosses hosts (or slices): `mesh.dcn_data`
    blocks along it, each block one slice or one host, holding every fsdp and tensor group whole.
    Gradients then cross the slow network once per step, in the data-axis reduction."""
    from jax.experimental import mesh_utils

    slices = {getattr(d, "slice_index", 0) for d in devices}
    processes = {d.process_index for d in devices}
    if len(slices) == cfg.dcn_data:
        by_process = False  # multi-slice TPU: a slice is the unit behind the slow network
    elif len(processes) == cfg.dcn_data:
        by_process = True
    else:
        raise ConfigError(
            f"mesh.dcn_data={cfg.dcn_data} must equal the number of slices ({len(slices)}) or of "
            f"processes ({len(processes)}); set mesh.dcn_data=1 to ignore host boundaries")
    per_block = (shape[0] // cfg.dcn_data, shape[1], shape[2])
    return mesh_utils.create_hybrid_device_mesh(per_block, (cfg.dcn_data, 1, 1), devices,
                                                process_is_granule=by_process)


def _as_tuple(mesh_axes: Any) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def logical_to_spec(
    logical: Sequence[str | None], rules: Sequence[Sequence[Any]], mesh: Mesh
) -> P:
    """Map logical axis names to a PartitionSpec: the first rule whose mesh axes are unused."""
    used: set[str] = set()
    out = []
    for name in logical:
        chosen: tuple[str, ...] = ()
        if name is not None:
            for rule_name, mesh_axes in rules:
                if rule_name != name:
                    continue
                axes = tuple(a for a in _as_tuple(mesh_axes) if mesh.shape.get(a, 1) > 1)
                if any(a in used for a in axes):
                    continue
                chosen = axes
                break
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return P(*out)


def check_divisible(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    for dim, axes in zip(shape, spec):
        size = int(np.prod([mesh.shape[a] for a in _as_tuple(axes)])) if axes else 1
        if dim % size:
            raise ConfigError(
                f"parameter '{path}' dimension {dim} is not divisible by mesh axes "
                f"{_as_tuple(axes)} of size {size}; change the model size or the mesh/sharding.rules"
            )


def path_str(path) -> str:
    """`layer_0/attn/query/kernel` from a jax key path (dict keys, attributes, indices): the one
    spelling of parameter paths that rules, decay masks, checkpoints and init-from share."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_specs(abstract_params: Any, logical_axes: Any, rules, mesh: Mesh) -> Any:
    """PartitionSpecs for a params tree, given a same-shaped tree of logical-axis tuples."""

    def one(path, x, logical):
        spec = logical_to_spec(logical or (None,) * len(x.shape), rules, mesh)
        check_divisible(path_str(path), x.shape, spec, mesh)
        return spec

    return jax.tree_util.tree_map_with_path(
        one, abstract_params, logical_axes, is_leaf=lambda x: isinstance(x, tuple)
    )


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(rules, mesh: Mesh, ndim: int) -> P:
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)


def batch_divisor(rules, mesh: Mesh) -> int:
    spec = batch_spec(rules, mesh, 1)
    return int(np.prod([mesh.shape[a] for a in _as_tuple(spec[0])])) if spec[0] else 1


def to_sharding(mesh: Mesh, rules) -> Callable[[Sequence[str | None]], NamedSharding]:
    """logical names -> NamedSharding on this mesh: what the step binds for the models'
    activation constraints (`bigjax.models.axes.constraints`)."""
    return lambda logical: NamedSharding(mesh, logical_to_spec(logical, rules, mesh))


def check_batch(train, rules, mesh: Mesh) -> None:
    """The (micro-)batch must split evenly over the batch-sharded mesh axes."""
    div = batch_divisor(rules, mesh)
    micro = train.batch_size // train.grad_accum
    if micro % div:
        raise ConfigError(
            f"train.batch_size={train.batch_size} (micro-batch {micro} with "
            f"grad_accum={train.grad_accum}) is not divisible by the batch-sharded mesh axes "
            f"data*fsdp={div}")
