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

from laga_jax import xla_options

DATA_AXIS = "data"
PARALLEL_MODES = ("shard_map", "pmap")


def initialize_distributed(train_cfg) -> bool:
  """Join the multi-process job of `config.train` (`distributed`, `coordinator_address`, `num_processes`,
  `process_id`; empty or -1 = auto-detected by `jax.distributed.initialize`: SLURM, Cloud TPU, Open MPI,
  Kubernetes). Idempotent; must run before JAX first touches a device. True when the job is multi-process.

  On CPU the processes talk through JAX's gloo collectives, one device each (the loopback recipe of
  docs/distributed.md); on GPU/TPU through NCCL / the TPU interconnect.
  """
  if not train_cfg.get("distributed", False):
    return False
  if not jax.distributed.is_initialized():
    kwargs = {}
    if train_cfg.get("coordinator_address", ""):
      kwargs["coordinator_address"] = train_cfg.coordinator_address
    if train_cfg.get("num_processes", -1) > 0:
      kwargs["num_processes"] = train_cfg.num_processes
    if train_cfg.get("process_id", -1) >= 0:
      kwargs["process_id"] = train_cfg.process_id
    jax.distributed.initialize(**kwargs, initialization_timeout=train_cfg.get("initialization_timeout", 300))
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0 writes what the job shares (results.json, figures, TensorBoard, the config)."""
  return jax.process_index() == 0


def local_devices(num_devices: int = -1) -> list:
  """The devices of the run: the first `num_devices` of this process (-1: all of them), and in a
  multi-process job the same number from every process (the mesh spans the job), process 0's first."""
  devices = jax.local_devices()
  if num_devices != -1 and not 1 <= num_devices <= len(devices):
    raise ValueError(f"config.train.num_devices={num_devices}: this process has {len(devices)} "
                     f"device(s) ({devices[0].platform}); use -1 for all of them")
  count = len(devices) if num_devices == -1 else num_devices
  if jax.process_count() == 1:
    return devices[:count]
  by_process: dict = {}
  for device in jax.devices():
    by_process.setdefault(device.process_index, []).append(device)
  return [d for p in sorted(by_process) for d in by_process[p][:count]]


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
    return jax.jit(mapped, donate_argnums=donate,
                   compiler_options=xla_options.compiler_options(self.devices[0].platform))

  def _pmap_across_processes(self) -> bool:
    return self.mode == "pmap" and jax.process_count() > 1

  def replicate(self, tree: Any) -> Any:
    """Place `tree` on every device: the state's home between steps.

    Across processes, pmap returns its replicated outputs as each process's own copy (on its local
    devices); the state is placed the same way from the start, so that the step compiles once.
    """
    if self._pmap_across_processes():
      local = [d for d in self.devices if d.process_index == jax.process_index()]
      # A job-wide replicated array (a restored checkpoint) holds the whole value on every device: take this
      # process's copy rather than transfer across hosts.
      tree = jax.tree_util.tree_map(
          lambda x: x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x, tree)
      return jax.device_put(tree, NamedSharding(make_mesh(local), P()))
    return self.replicate_global(tree)

  def replicate_global(self, tree: Any) -> Any:
    """`tree` as arrays replicated over the whole mesh (what orbax saves and restores collectively)."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def to_global(self, tree: Any) -> Any:
    """The state between steps (`replicate`) as arrays over the whole mesh, for a checkpoint; no copy."""
    if self._pmap_across_processes():
      from jax.experimental import multihost_utils
      return multihost_utils.host_local_array_to_global_array(tree, self.mesh, P())
    return tree

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
