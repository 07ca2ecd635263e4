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
        if jax.process_count() > 1:
            raise SDMagicError(
                f"devices={devices} picks devices of one process, but {jax.process_count()} processes run together:"
                " leave it out, and every process's devices are used"
            )
        if not 1 <= devices <= len(available):
            raise SDMagicError(f"asked for {devices} devices but {len(available)} are available")
        chosen = list(available[:devices])
    else:
        chosen = list(devices)
        if not chosen:
            raise SDMagicError("the device list is empty: leave devices out to use them all")
    mesh = Mesh(np.array(chosen), (DATA_AXIS,))
    return DevicePlan(devices=tuple(chosen), mesh=mesh, backend=chosen[0].platform)


def _put_global(array: Any, sharding: NamedSharding) -> jax.Array:
    """One global array from a host value every process holds alike (a multi-process run): each
    process fills only its own devices' parts, from its own copy."""
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_replicated(tree: Any, plan: DevicePlan) -> Any:
    """Put a pytree of host arrays on every device of the plan, once each."""
    if jax.process_count() > 1:
        return jax.tree_util.tree_map(lambda x: _put_global(x, plan.replicated), tree)
    return jax.device_put(tree, plan.replicated)


def place_batch(array: np.ndarray, plan: DevicePlan) -> jax.Array:
    """Split a host batch along its first axis over the plan's devices."""
    if jax.process_count() > 1:
        return _put_global(array, plan.batch_sharded)
    return jax.device_put(array, plan.batch_sharded)


def default_per_device_batch(plan: DevicePlan) -> int:
    """Images per device per call that keep a device busy without running out of memory.

    CPU: 1 (more only queues work on the same cores). TPU: 1 per core on v2/v3 (8-16 GiB of HBM
    each, as in the original notebooks), 2 on later chips. GPU: by memory, since one GPU has to be
    kept busy by batch alone: 8 images with 40 GiB or more (A100, H100, H200), 4 with 20 GiB,
    2 with 10 GiB, else 1. Sized for SD 1.x/2.x at their native sizes in bfloat16.
    """
    # This process's first device: another process's cannot be asked for its memory, and every
    # process must pick the same batch (hosts of one run have the same accelerators).
    device = next((d for d in plan.devices if getattr(d, "process_index", 0) == jax.process_index()), plan.devices[0])
    if plan.backend == "tpu":
        kind = getattr(device, "device_kind", "").lower()
        return 1 if ("v2" in kind or "v3" in kind) else 2
    if plan.backend in ("gpu", "cuda", "rocm"):
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit", 0)
        except Exception:  # some runtimes do not report memory
            limit = 0
        gib = limit / 2**30
        for need, images in ((40, 8), (20, 4), (10, 2)):
            if gib >= need:
                return images
        return 1 if limit else 4
    return 1
