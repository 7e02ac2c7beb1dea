"""Data parallelism over every device and host with one `jax.sharding.Mesh`.

The mesh has a single `data` axis over all devices of all processes. Batches are sharded on it,
the train state is replicated, and `jax.jit` with these shardings makes XLA insert the gradient
all-reduce. The same code runs on one CPU, 8 TPU cores or many hosts: on several hosts call
`initialize_distributed()` first (the entry points do), and give each process its own slice of the
global batch (the input pipeline's `process_index`/`process_count`).
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import os
import re
import socket
import time
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'

# How long a process waits for the others (and for the coordinator) to join, in seconds: jax's
# own default, or $DIFFJAX_JOIN_TIMEOUT.
JOIN_TIMEOUT_S = 300

_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')
_OMPI_URI = 'OMPI_MCA_orte_hnp_uri'
_GOOGLE_PCI_VENDOR = '0x1ae0'
_PCI_ACCELERATOR_CLASS = '0x12'  # PCI base class "processing accelerator" (TPU chips; not gVNIC)


class ClusterJoinError(ConnectionError):
  """This process could not join its multi-host run (coordinator unreachable, bad settings)."""


def _int(text, default: int = 0) -> int:
  try:
    return int(str(text).strip())
  except ValueError:
    return default


def _has_libtpu() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def _cloud_tpu_pod(env: Mapping[str, str]) -> bool:
  """A Cloud TPU VM (GCE) or TPU node pool (GKE) with libtpu, where jax.distributed finds its
  hosts itself.

  GKE names the hosts in the environment (a pod of several hosts is a cluster). A GCE TPU VM keeps
  its worker list in the metadata server, so it is recognized by TPU chips on the PCI bus (Google's
  vendor id with the accelerator class: Google's network card is not one); jax then reads the
  worker list (a single-host TPU VM joins a run of one process).
  """
  if not _has_libtpu():
    return False
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
  if hosts:
    return len(hosts.split(',')) > 1 or _int(env.get('MEGASCALE_NUM_SLICES'), 1) > 1
  if env.get('TPU_SKIP_MDS_QUERY'):
    return False
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), 'class')) as f:
        if f.read().strip().startswith(_PCI_ACCELERATOR_CLASS):
          return True
    except OSError:
      continue
  return False


def detect_cluster(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
  """The multi-process cluster this process was launched in, as jax.distributed detects it.

  In jax.distributed's own order: Open MPI (`mpirun` of several processes:
  OMPI_MCA_orte_hnp_uri), SLURM (`srun` of several tasks: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID,
  SLURM_LOCALID), Cloud TPU / GKE. A launch of one process is not a cluster.

  Args:
    environ: the environment (default: os.environ).

  Returns:
    'Open MPI', 'SLURM', 'Cloud TPU' or None.

  Raises:
    ClusterJoinError: an Open MPI launch of several processes that jax.distributed cannot join
      (Open MPI 5 has no OMPI_MCA_orte_hnp_uri): each process would otherwise train alone.
  """
  env = os.environ if environ is None else environ
  world = _int(env.get('OMPI_COMM_WORLD_SIZE'), 1)
  if _OMPI_URI in env:  # jax.distributed looks at Open MPI first, also inside a SLURM job
    return 'Open MPI' if world > 1 else None
  if all(k in env for k in _SLURM_VARS) and _int(env['SLURM_NTASKS'], 1) > 1:
    return 'SLURM'
  if world > 1:
    raise ClusterJoinError(
        f'This is an Open MPI launch of {world} processes that jax.distributed cannot join by '
        f'itself ({_OMPI_URI} is not set, as in Open MPI 5); set DIFFJAX_COORDINATOR=HOST:PORT, '
        'DIFFJAX_NUM_PROCESSES and DIFFJAX_PROCESS_ID (from OMPI_COMM_WORLD_RANK) for every '
        'process.')
  if _cloud_tpu_pod(env):
    return 'Cloud TPU'
  return None


def _slurm_coordinator(env: Mapping[str, str]) -> str:
  """The address jax.distributed's SLURM detection uses: the job's first node, a port from the
  job id (or $JAX_COORDINATOR_PORT)."""
  port = env.get('JAX_COORDINATOR_PORT') or str(_int(env['SLURM_JOB_ID']) % 4096 + 61440)
  nodes = env['SLURM_STEP_NODELIST']
  cut = next((i for i, ch in enumerate(nodes) if ch in ',['), len(nodes))
  host = nodes[:cut]
  if cut < len(nodes) and nodes[cut] == '[':  # 'node[001-015],x': the first of the range
    rest = nodes[cut + 1:]
    host += rest[:next((i for i, ch in enumerate(rest) if ch in ',-]'), len(rest))]
  return f'{host}:{port}'


def _ompi_coordinator(env: Mapping[str, str]) -> Optional[str]:
  """The address jax.distributed's Open MPI detection uses (the launcher's host), if readable."""
  uri = env[_OMPI_URI]
  m = re.search(r'tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]', uri)
  if m is None:
    return None
  port = env.get('JAX_COORDINATOR_PORT') or str(
      (_int(uri.split('.', 1)[0]) // 4096) % 4096 + 61440)
  host = next(g for g in m.groups() if g is not None)
  return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def _wait_for_coordinator(address: str, timeout_s: float) -> bool:
  """Whether the coordinator at HOST:PORT accepts connections within `timeout_s`.

  jax.distributed aborts the whole process (a fatal C++ check, no Python exception) when it cannot
  reach the coordinator in time, so the other processes check first and can say so in a sentence.
  """
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return True
    except (OSError, ValueError):
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.2)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-host run (a no-op for one process), then prints one line per process.

  The arguments, or else the variables DIFFJAX_COORDINATOR (HOST:PORT), DIFFJAX_NUM_PROCESSES and
  DIFFJAX_PROCESS_ID, come first (DIFFJAX_NUM_PROCESSES=1 runs alone, whatever the cluster).
  Without them, a launch by SLURM (`srun`), Open MPI (`mpirun`) or on Cloud TPU / GKE (`detect_cluster`)
  is joined through `jax.distributed.initialize()`'s own detection. Every process then prints
  `process i of n (<cluster>): <local> local of <global> devices (<platform>)`.
  $DIFFJAX_JOIN_TIMEOUT (seconds, default 300) bounds the wait for the coordinator.

  Raises:
    ClusterJoinError: one sentence, when the coordinator cannot be reached in time, cannot start,
      or the settings are incomplete.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get('DIFFJAX_COORDINATOR')
  if num_processes is None and 'DIFFJAX_NUM_PROCESSES' in env:
    num_processes = _int(env['DIFFJAX_NUM_PROCESSES'], -1)
  if process_id is None and 'DIFFJAX_PROCESS_ID' in env:
    process_id = _int(env['DIFFJAX_PROCESS_ID'], -1)
  timeout = max(1, _int(env.get('DIFFJAX_JOIN_TIMEOUT'), JOIN_TIMEOUT_S))
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if explicit:
    if num_processes == 1:
      return
    if coordinator_address is None or num_processes is None or process_id is None or not (
        0 <= process_id < num_processes):
      raise ClusterJoinError(
          'Set DIFFJAX_COORDINATOR=HOST:PORT, DIFFJAX_NUM_PROCESSES=N and DIFFJAX_PROCESS_ID=i '
          f'(0 <= i < N) together (got {coordinator_address}, {num_processes}, {process_id}), '
          'or none of them to let a SLURM, Open MPI or Cloud TPU launch be detected.')
    cluster, address, index, count = ('DIFFJAX_COORDINATOR', coordinator_address, process_id,
                                       num_processes)
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  else:
    cluster = detect_cluster(env)
    if cluster is None:
      return
    address = env.get('JAX_COORDINATOR_ADDRESS')
    if cluster == 'SLURM':
      address = address or _slurm_coordinator(env)
      index, count = _int(env['SLURM_PROCID'], -1), _int(env['SLURM_NTASKS'])
    elif cluster == 'Open MPI':
      address = address or _ompi_coordinator(env)
      index, count = _int(env.get('OMPI_COMM_WORLD_RANK'), -1), _int(env['OMPI_COMM_WORLD_SIZE'])
    else:  # Cloud TPU: jax reads the hosts (and waits for the coordinator) itself.
      index, count = None, None
    kwargs = {}  # jax.distributed's own cluster detection
  run = f'the {cluster} run' + (f' as process {index} of {count}' if index is not None else '')
  if address and index not in (None, 0) and not _wait_for_coordinator(address, timeout):
    raise ClusterJoinError(
        f'Could not join {run}: its coordinator {address} did not answer within {timeout} s; '
        'start every process of the run (e.g. with srun or mpirun), check that the host and port '
        'are reachable, or set DIFFJAX_JOIN_TIMEOUT to wait longer.')
  try:
    jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
  except Exception as e:  # noqa: BLE001 - jax reports these as several types; all mean "not joined".
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip('.')
    raise ClusterJoinError(
        f'Could not join {run} (coordinator {address or "unknown"}: {text}); if its port is '
        'taken, set JAX_COORDINATOR_PORT to a free one, and start every process of the run the '
        'same way.') from e
  print(f'process {jax.process_index()} of {jax.process_count()} ({cluster}): '
        f'{jax.local_device_count()} local of {jax.device_count()} devices '
        f'({jax.default_backend()})', flush=True)


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


_share_ids = itertools.count()  # every process makes the same sequence of calls


def share_from_main(text: Optional[str], timeout_s: float = 30 * 60) -> str:
  """Process 0's `text`, on every process (through the key-value store; `text` for one process).

  Every process must call it at the same point; the others wait up to `timeout_s` for process 0.

  Args:
    text: process 0's value (ignored elsewhere).
  """
  if jax.process_count() == 1:
    return text
  key = f'diffjax_share_{next(_share_ids)}'
  client = distributed_client()
  if is_main_process():
    client.key_value_set(key, text)
    return text
  return client.blocking_key_value_get(key, int(timeout_s * 1000))


def on_main(fn: Callable[[], Any], errors: Tuple[type, ...] = (ValueError, OSError)) -> Any:
  """Runs `fn` on process 0 only; returns its (JSON-able) result, or raises its error, everywhere.

  For what only process 0 may do (write the run's files) or decide (from files only it reads): a
  refusal there must stop every process, not leave the others waiting at the next collective.

  Args:
    fn: () -> a JSON-able value.
    errors: the exception classes raised again, with the same message, on the other processes
      (the first that matches; any other error becomes a RuntimeError there).
  """
  if jax.process_count() == 1:
    return fn()
  if is_main_process():
    try:
      result = fn()
    except BaseException as e:
      kind = next((i for i, cls in enumerate(errors) if isinstance(e, cls)), -1)
      share_from_main(json.dumps({'error': kind, 'message': str(e)}))
      raise
    share_from_main(json.dumps({'result': result}))
    return result
  shared = json.loads(share_from_main(None))
  if 'error' in shared:
    cls = errors[shared['error']] if shared['error'] >= 0 else RuntimeError
    raise cls(shared['message'])
  return shared['result']


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


def release_host_memory() -> bool:
  """Returns the C heap's free pages to the system (glibc's `malloc_trim(0)`); False elsewhere.

  XLA:CPU allocates its buffers, and the compiler its working memory, with the C library's
  malloc, which keeps freed memory for reuse instead of returning it. After a compile or a first
  step most of that is never reused, and on a host that also runs the data pipeline it is memory
  the process holds for nothing: the train loop calls this after building (or restoring) the
  state and after compiling the step, before its first call (benchmarks/memory.py measures what
  it saves; trimming after the first step saved nothing).
  Device memory (GPU/TPU) is not touched. Costs a few milliseconds; safe at any time.
  """
  try:
    import ctypes
    libc = ctypes.CDLL('libc.so.6')
    trim = libc.malloc_trim
  except (OSError, AttributeError):  # Not Linux with glibc (macOS, musl): nothing to do.
    return False
  trim.argtypes = [ctypes.c_size_t]
  return bool(trim(0))
