"""Device mesh, the logical-axis rules table, and the shardings of parameters and batches.

Mesh axes: `data` (pure data parallel: parameters replicated), `fsdp` (data parallel with parameters and
optimizer state sharded, gathered per layer by XLA) and `tensor` (Megatron-style split of heads and MLP).
The batch is split over `data` x `fsdp`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# One table maps every logical axis name (see clip_jax.models.layers) to mesh axes.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("positions", None),
    ("patch", None),
    ("channels", "fsdp"),  # a convolution's output channels (ResNet towers)
    ("channels_in", None),
    ("proj", None),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a {axis: size} dict (one size may be -1: all remaining devices) into a shape over MESH_AXES."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    fills = [i for i, s in enumerate(shape) if s == -1]
    if len(fills) > 1:  # (the last keeps the rest: an FSDP recipe's fsdp, say)
        raise ValueError(f"mesh {sizes}: at most one axis may be -1; give the others a size, e.g. "
                         + " ".join(f"--config.mesh.{MESH_AXES[i]}=1" for i in fills[:-1]))
    known = math.prod(s for s in shape if s != -1)
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh {sizes}: sizes must be positive or -1")
    if fills:
        if num_devices % known:  # (the example keeps the axis that takes the rest, as the run chose it)
            fixed = " ".join(f"--config.mesh.{a}=1" for i, a in enumerate(MESH_AXES) if i != fills[0])
            raise ValueError(f"mesh {sizes}: {num_devices} devices do not divide by the fixed axes' product {known}; "
                             f"set the fixed sizes so they multiply to a divisor of {num_devices}, e.g. {fixed} with "
                             f"--config.mesh.{MESH_AXES[fills[0]]}=-1")
        shape[fills[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        # The example lets the largest axis take the devices the others leave: a mesh of FSDP stays one.
        largest = MESH_AXES[max(range(len(shape)), key=lambda i: shape[i])]
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices but "
            f"{num_devices} are available; set config.mesh so the sizes multiply to {num_devices}, e.g. "
            f"--config.mesh.{largest}=-1 (-1: all the devices the other axes leave)"
        )
    return tuple(shape)


# The mesh of a command that only reads a workdir (eval, encode, export, stretch) when the recorded one does not fit
# its devices: parameters sharded over all of them (the least memory per device), the batch too.
READER_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


def reader_mesh(recorded: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a workdir was trained on when it fits these devices, else `READER_MESH`: a model trained on a pod
    is evaluated, encoded and exported on a workstation. The checkpoint is read into the new shardings."""
    devices = list(devices if devices is not None else jax.devices())
    try:
        mesh_shape(recorded, len(devices))
    except ValueError:
        return make_mesh(READER_MESH, devices)
    return make_mesh(recorded, devices)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A global-view mesh (Auto axes: XLA propagates shardings, our code states them at the boundaries)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes, len(devices))
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU); its default axis type is now
    # Explicit, so ask for Auto explicitly.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def tensor_across_processes(devices: np.ndarray, axis_names: Sequence[str]) -> str | None:
    """What to tell a mesh (its device array and axis names) whose `tensor` groups span processes (hosts): tensor
    parallelism all-reduces activations in every layer, across the network between hosts instead of the links within
    one (NVLink, a TPU host's ICI), far slower; None where each group stays in one process."""
    tensor = devices.shape[list(axis_names).index("tensor")]
    groups = np.moveaxis(devices, list(axis_names).index("tensor"), -1).reshape(-1, tensor)
    spans = max(len({d.process_index for d in group}) for group in groups)
    if spans == 1:
        return None
    local = sum(d.process_index == devices.flat[0].process_index for d in devices.flat)
    return (f"mesh.tensor {tensor} spans {spans} processes (hosts of {local} devices): its all-reduces in every "
            "layer cross the network between hosts; keep mesh.tensor within one host's devices and give the rest to "
            "mesh.fsdp or mesh.data")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES
                    ) -> PartitionSpec:
    """PartitionSpec of an array from its logical axis names. A mesh axis that does not divide the dimension is
    dropped (the dimension stays replicated over it) instead of failing: small tensors (e.g. a 3-wide qkv axis or a
    width that is not a multiple of the fsdp size) then still work on any mesh."""
    rules = dict(rules)
    spec, used = [], set()
    for name, dim in zip(names, shape, strict=True):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in axes:
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in kept) * size):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*spec)


def param_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree whose leaves are `nn.LogicallyPartitioned` boxes (or plain arrays: replicated),
    e.g. the output of `jax.eval_shape(model.init, ...)`."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays on the mesh from this process's slice of the batch (each host feeds its own rows)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# --- regex rules over parameter paths (sharding, freezing, weight decay) ---------------------------------------------
def param_paths(params: Any) -> Any:
    """A tree like `params` whose leaves are '/'-joined key paths, e.g. 'visual/ln_pre/scale'."""

    def path_str(path, _):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    return jax.tree_util.tree_map_with_path(path_str, params)


def match_any(patterns: Sequence[str], path: str) -> bool:
    return any(re.search(p, path) for p in patterns)
