"""Which devices to use, the 1-D mesh over them, and the two shardings everything uses.

Parameters are replicated (`P()`): `jax.device_put` with that sharding copies each host array to
every device directly, never stacking n copies on one device first. Batches are split along the
mesh's single `data` axis (`P('data')`), so image `i` of a chunk lives on device `i // per_device`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import SDMagicError

DATA_AXIS = "data"


@dataclass(frozen=True)
class DevicePlan:
    devices: tuple
    mesh: Mesh
    backend: str

    @property
    def count(self) -> int:
        return len(self.devices)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharded(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def describe(self) -> str:
        """E.g. '8 x TPU v2' or '1 x NVIDIA H200' or '8 x cpu'."""
        kinds = Counter(getattr(d, "device_kind", d.platform) for d in self.devices)
        return ", ".join(f"{n} x {kind}" for kind, n in kinds.items())


def find_devices(devices: Sequence[Any] | int | None = None) -> DevicePlan:
    """All devices of JAX's default backend, the first `devices` of them (int), or those given."""
    available = jax.devices()
    if devices is None:
        chosen = list(available)
    elif isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise SDMagicError(f"asked for {devices} devices but {len(available)} are available")
        chosen = list(available[:devices])
    else:
        chosen = list(devices)
        if not chosen:
            raise SDMagicError("the device list is empty: leave devices out to use them all")
    mesh = Mesh(np.array(chosen), (DATA_AXIS,))
    return DevicePlan(devices=tuple(chosen), mesh=mesh, backend=chosen[0].platform)


def place_replicated(tree: Any, plan: DevicePlan) -> Any:
    """Put a pytree of host arrays on every device of the plan, once each."""
    return jax.device_put(tree, plan.replicated)


def place_batch(array: np.ndarray, plan: DevicePlan) -> jax.Array:
    """Split a host batch along its first axis over the plan's devices."""
    return jax.device_put(array, plan.batch_sharded)
