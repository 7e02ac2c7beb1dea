"""Data parallelism over every device and host with one `jax.sharding.Mesh`.

The mesh has a single `data` axis over all devices of all processes. Batches are sharded on it,
the train state is replicated, and `jax.jit` with these shardings makes XLA insert the gradient
all-reduce. The same code runs on one CPU, 8 TPU cores or many hosts: on several hosts call
`initialize_distributed()` first (it wraps `jax.distributed.initialize`), and give each process its
own slice of the global batch (the input pipeline's `process_index`/`process_count`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-host run (no-op for one process).

  On Cloud TPU the arguments are discovered automatically; elsewhere pass them or set
  DIFFJAX_COORDINATOR, DIFFJAX_NUM_PROCESSES and DIFFJAX_PROCESS_ID.
  """
  coordinator_address = coordinator_address or os.environ.get('DIFFJAX_COORDINATOR')
  if num_processes is None and 'DIFFJAX_NUM_PROCESSES' in os.environ:
    num_processes = int(os.environ['DIFFJAX_NUM_PROCESSES'])
  if process_id is None and 'DIFFJAX_PROCESS_ID' in os.environ:
    process_id = int(os.environ['DIFFJAX_PROCESS_ID'])
  if coordinator_address is None and num_processes in (None, 1):
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def distributed_client():
  """The jax.distributed key-value store client of a multi-host run (None for one process).

  Multi-host checkpoint agreement and barriers go through this store, which waits as long as
  asked, instead of device collectives, which give up after ~30 s on CPU (gloo). JAX has no public
  accessor for the client (`jax.experimental.multihost_utils.sync_global_devices` is a device
  collective, and its key-value helpers are not exported in 0.10), so this one function reads it
  from jax._src; it is the only private JAX import in diffjax (pyproject's import contract).
  """
  from jax._src import distributed  # private: isolated here (see above)
  return distributed.global_state.client


def is_main_process() -> bool:
  """Process 0 writes the run's files; every process computes the same results."""
  return jax.process_index() == 0


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices with axis `data`."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full array on every device."""
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises one clear sentence if the global batch can't be split evenly over devices/hosts."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch_size % n_dev or global_batch_size % n_proc:
    raise ValueError(
        f'The global batch size {global_batch_size} must be divisible by the {n_dev} devices '
        f'({n_proc} processes); set --config.train.batch_size to a multiple of {n_dev}.')


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Turns this process's slice of the global batch (numpy) into globally sharded jax Arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
