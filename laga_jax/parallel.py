"""Data parallelism: one per-device step function, run by `jax.pmap` or by `jax.jit` + `jax.shard_map`.

The step functions of `laga_jax.train` are written per device with collectives over the named axis
`DATA_AXIS`; this module only decides how they are mapped over devices and how a host batch is placed.
Both runners are jitted, donate the train state and compile once (the batch shape never changes).
"""

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
PARALLEL_MODES = ("shard_map", "pmap")


def local_devices(num_devices: int = -1) -> list:
  """The first `num_devices` local devices (-1: all), with a clear error when too many are asked for."""
  if num_devices == -1:
    # Multi-host (jax.distributed): the mesh spans every process's devices; each feeds its own rows.
    return jax.devices() if jax.process_count() > 1 else jax.local_devices()
  devices = jax.local_devices()
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"config.train.num_devices={num_devices}: this process has {len(devices)} "
                     f"device(s) ({devices[0].platform}); use -1 for all of them")
  return devices[:num_devices]


def make_mesh(devices: Sequence[Any]) -> Mesh:
  """A 1-D mesh over `devices` whose only axis is the data-parallel axis."""
  return Mesh(np.asarray(devices), (DATA_AXIS,))


class DataParallel:
  """Runs a per-device `fn(replicated, batch)` over devices, by "pmap" or "shard_map".

  `fn` must return outputs that are identical on every device (it reduces over `DATA_AXIS` itself),
  so the results come back unreplicated in both modes: the caller never sees a device axis.
  """

  def __init__(self, mode: str, devices: Sequence[Any]):
    if mode not in PARALLEL_MODES:
      raise ValueError(f"config.train.parallel={mode!r}: expected one of {PARALLEL_MODES}")
    self.mode = mode
    self.devices = list(devices)
    self.mesh = make_mesh(self.devices)
    self.num_devices = len(self.devices)

  def compile(self, fn: Callable[..., Any], *, donate_state: bool = True) -> Callable[..., Any]:
    """Map `fn(state, batch)` over the devices; the state is replicated, the batch split on axis 0."""
    donate = (0,) if donate_state else ()
    if self.mode == "pmap":
      return jax.pmap(fn, axis_name=DATA_AXIS, in_axes=(None, 0), out_axes=None,
                      devices=self.devices, donate_argnums=donate)
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())
    return jax.jit(mapped, donate_argnums=donate)

  def replicate(self, tree: Any) -> Any:
    """Place `tree` on every device (the state's home between steps)."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def shard_batch(self, batch: dict) -> dict:
    """This process's rows of the batch -> device arrays split over the data axis."""
    local_devices = self.num_devices // jax.process_count()
    for key, value in batch.items():
      if value.shape[0] % local_devices:
        raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows, not divisible by the "
                         f"{local_devices} devices; choose data.p * data.k divisible by the device count")
    if self.mode == "pmap":
      # pmap maps over a leading device axis; the split of rows matches shard_map's P("data").
      batch = {k: v.reshape((local_devices, -1) + v.shape[1:]) for k, v in batch.items()}
      if jax.process_count() > 1:
        return batch  # multi-host pmap takes each process's (local devices, rows, ...) host arrays
    sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    if jax.process_count() > 1:
      return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    return jax.device_put(batch, sharding)


def prefetch_to_device(batches: Iterable[dict], place: Callable[[dict], dict],
                       size: int = 2) -> Iterator[dict]:
  """Keep `size` batches in flight on the devices so host→device copies overlap the step."""
  queue = collections.deque()
  iterator = iter(batches)
  for batch in itertools.islice(iterator, size):
    queue.append(place(batch))
  while queue:
    yield queue.popleft()
    for batch in itertools.islice(iterator, 1):
      queue.append(place(batch))
