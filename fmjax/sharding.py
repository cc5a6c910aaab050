"""Device mesh, parameter partitioning and host-local -> global batches (docs/training.md).

One `Mesh` over all devices of all processes with two axes:
  'data'  the batch is split over it (and over 'fsdp': every device sees a different shard)
  'fsdp'  parameters and optimizer state are split over it (ZeRO-3 / FSDP style), by a size
          rule: an array with at least `fsdp_min_size` elements is sharded along its largest
          dimension that the axis size divides; smaller arrays stay replicated.
XLA inserts the all-gathers and reduce-scatters; nothing here is hand-written communication.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA, FSDP = 'data', 'fsdp'
BATCH_AXES = (DATA, FSDP)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts JAX's multi-controller runtime when the job spans several processes.

  Explicit arguments (flags) win; otherwise FMJAX_COORDINATOR / FMJAX_NUM_PROCESSES /
  FMJAX_PROCESS_ID; otherwise JAX's own cluster auto-detection (TPU pod slices, SLURM with
  several tasks, Open MPI, Kubernetes). A single process on one machine starts nothing.
  Never called at import time.
  """
  coordinator = coordinator or os.environ.get('FMJAX_COORDINATOR') or None
  if num_processes is None and os.environ.get('FMJAX_NUM_PROCESSES'):
    num_processes = int(os.environ['FMJAX_NUM_PROCESSES'])
  if process_id is None and os.environ.get('FMJAX_PROCESS_ID'):
    process_id = int(os.environ['FMJAX_PROCESS_ID'])
  if coordinator or (num_processes or 1) > 1:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _auto_detectable_cluster():
    jax.distributed.initialize()
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def _auto_detectable_cluster() -> bool:
  """True on the multi-host launchers that jax.distributed.initialize() detects by itself."""
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1') or 1)
  mpi_size = int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1)
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return slurm_tasks > 1 or mpi_size > 1 or tpu_hosts.count(',') >= 1


def make_mesh(data: int = -1, fsdp: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all devices of all processes, axis types Auto."""
  n = jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'config.sharding.fsdp = {fsdp} must divide the {n} devices.')
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f'config.sharding.data x fsdp = {data} x {fsdp} = {data * fsdp}, but there are '
                     f'{n} devices; set --config.sharding.data=-1 to use them all.')
  return jax.make_mesh((data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def partition_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """The FSDP size rule: shard the largest dimension that fsdp_size divides, if big enough."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return P(*spec)
  return P()


def state_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh, min_size: int) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) by the FSDP size rule."""
  fsdp_size = mesh.shape[FSDP]
  return jax.tree.map(
      lambda a: NamedSharding(mesh, partition_spec(tuple(np.shape(a)), fsdp_size, min_size)),
      abstract_tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The leading (batch) dimension split over every device: data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def local_batch_size(global_batch: int) -> int:
  """This process's share of the global batch; the batch must split evenly over devices."""
  n = jax.device_count()
  if global_batch % n:
    raise ValueError(f'config.train.batch_size = {global_batch} must be a multiple of the {n} '
                     'devices (every device gets the same number of examples).')
  return global_batch // jax.process_count()


def local_mesh() -> jax.sharding.Mesh:
  """A one-axis ('batch') mesh over this process's devices: what `fmjax.load` samples on."""
  return jax.sharding.Mesh(np.array(jax.local_devices()), ('batch',))


def gather_to_host(x) -> np.ndarray:
  """A (possibly multi-process sharded) array as one full host array, on every process.

  A collective when the array spans processes: every process must call it.
  """
  if not getattr(x, 'is_fully_addressable', True):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def concat_across_processes(rows) -> np.ndarray:
  """Every process's host-local rows, concatenated in process order, on every process (a
  collective when there are several processes)."""
  if jax.process_count() == 1:
    return np.asarray(rows)
  return np.asarray(multihost_utils.process_allgather(rows, tiled=True))


def host_local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array (replicas along other axes dropped)."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  pieces = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    if start not in pieces:
      pieces[start] = np.asarray(shard.data)
  return np.concatenate([pieces[k] for k in sorted(pieces)])


def barrier(name: str) -> None:
  """Waits until every process gets here (a no-op in a single-process job)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def per_device_flags(flag: bool, mesh: jax.sharding.Mesh) -> jax.Array:
  """A global int32 [num_devices] array, sharded like a batch, holding each process's `flag` in
  the entries of its own devices (how one process's preemption notice reaches all of them
  inside a jitted step, without a collective of its own)."""
  local = np.full((jax.local_device_count(),), int(flag), np.int32)
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def to_global(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host-local numpy batches of every process -> one global jax.Array per leaf.

  Each process passes only its own rows (`local_batch_size` of them); the global batch is
  their concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
