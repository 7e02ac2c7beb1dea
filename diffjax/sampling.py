"""Generating images from a denoiser: seeds → latents → sampler, sharded over every device.

Image k depends only on seed k (its latents and its churn noise come from `seed_keys`), so a
sample is reproducible whatever the batch size or the number of devices. `sample_run` (sample.py)
is resumable: finished batches are kept as shards in its output folder, and a rerun after a kill
samples only what is missing, bitwise as an uninterrupted run would.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import zipfile
import zlib
from typing import Callable, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import build, parallel, runs
from diffjax import images as images_lib
from diffjax import samplers as samplers_lib
from diffjax.precond import Denoiser
from diffjax.runs import files
from diffjax.runs import shards as shards_lib

log = logging.getLogger(__name__)


def parse_seeds(text: str) -> list[int]:
  """Parses '0-63', '5', '0,3,10-12' into a list of non-negative seeds (ranges inclusive).

  Raises:
    ValueError: one sentence on the expected format.
  """
  seeds = []
  for part in str(text).split(','):
    part = part.strip()
    m = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
    if not m:
      raise ValueError(f'Cannot read seeds {text!r}; write them like 0-63 or 0,5,10-19.')
    lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if hi < lo:
      raise ValueError(f'Seed range {part!r} runs backwards; write it as {hi}-{lo}.')
    if hi >= 1 << 32:  # a seed is one uint32 word (`seed_keys`): larger ones would repeat others
      raise ValueError(f'Seed {hi} is out of range; seeds go from 0 to {(1 << 32) - 1}.')
    seeds.extend(range(lo, hi + 1))
  return seeds


def _check_guidance(network, num_classes: int, guidance: float, guided_by: bool = False) -> bool:
  """Raises for guidance a model cannot take; True for a w-conditioned network.

  Classifier-free guidance needs the model's unconditional branch D(x; σ, ∅), which only label
  dropout in training teaches it (Ho & Salimans 2022): on a class-conditional network trained with
  label_dropout = 0 the all-zero label is an input it never saw, and "guidance" extrapolates
  towards nonsense. Autoguidance (`guided_by`: a guide run) needs neither labels nor dropout.
  """
  w_network = bool(getattr(network, 'guidance_embedding', False))
  if guided_by:
    if w_network:
      raise ValueError('This run is a w-conditioned student (guided distillation): it takes the '
                       'guidance weight as an input, so it cannot be autoguided; drop '
                       '--guide_workdir.')
    return False
  if guidance and not num_classes and not w_network:
    raise ValueError('Guidance needs a class-conditional model; this one is unconditional, so '
                     'drop --guidance (or train with conditional labels and label dropout), or '
                     'guide it with a weaker run of the same task: --guide_workdir=RUN.')
  if guidance and not w_network and getattr(network, 'label_dropout', None) == 0:
    raise ValueError('Classifier-free guidance needs a model trained with label dropout (its '
                     'unconditional branch); this run had label_dropout=0, so drop --guidance, '
                     'retrain with --config.model.kwargs.label_dropout=0.1, or guide it with a '
                     'weaker run of the same task: --guide_workdir=RUN.')
  return w_network


def _check_interval(guidance_interval, guidance: float, w_network: bool):
  """The guidance interval as (σ_lo, σ_hi) or None; raises if there is no guidance to limit."""
  interval = samplers_lib.guidance.check_interval(guidance_interval)
  if interval is not None and (w_network or not guidance):
    raise ValueError('A guidance interval needs guidance to limit: pass --guidance=w > 0 (on a '
                     'model with label dropout, or with --guide_workdir); a w-conditioned '
                     'student takes w as an input and has no interval.')
  return interval


def check_guide(main_spec, main_classes: int, guide_spec, guide_classes: int,
                guide_workdir: str = 'the guide') -> None:
  """Raises one sentence unless the guide run can guide the main one (autoguidance).

  The guide must denoise the same images: resolution and channels equal; and be called with the
  same labels: the same number of classes, or none (an unconditional guide, as EDM2's CFG uses a
  separate unconditional network).
  """
  main = (main_spec.resolution, main_spec.channels)
  guide = (guide_spec.resolution, guide_spec.channels)
  if main != guide:
    raise ValueError(f'{guide_workdir} makes {guide[0]}x{guide[0]}x{guide[1]} images and this run '
                     f'{main[0]}x{main[0]}x{main[1]}; pass a guide run of the same task.')
  if guide_classes and guide_classes != main_classes:
    raise ValueError(f'{guide_workdir} has {guide_classes} classes and this run {main_classes}; '
                     'pass a guide run with the same labels (or an unconditional one).')


def make_sample_fn(denoiser: Denoiser, sampler: Callable, shape: Sequence[int],
                   num_classes: int = 0, guidance: float = 0.0, *,
                   guidance_interval: Optional[Tuple[float, float]] = None,
                   guide: Optional[Denoiser] = None, guide_classes: int = 0) -> Callable:
  """A pure `sample(params, keys [B], class_labels int [B] | None) -> images [B, *shape]`.

  Args:
    denoiser: the preconditioned network.
    sampler: (denoise_fn, latents, keys) -> images, e.g. from `build.sampler_fn`.
    shape: (H, W, C) of one image.
    num_classes: > 0 for a class-conditional network.
    guidance: classifier-free guidance weight w: (1 + w)·D(x|c) − w·D(x|∅) with ∅ the all-zero
      label the network saw under label dropout. A w-conditioned network (a guided-distillation
      student, `guidance_embedding=True`) takes w as an input instead: one evaluation per step.
    guidance_interval: (σ_lo, σ_hi): guide only for σ_lo < σ ≤ σ_hi, the conditional model
      elsewhere (Kynkäänniemi et al. 2024; `samplers.guidance`).
    guide: autoguidance (Karras et al. 2024): the guide run's denoiser, a weaker model of the same
      task, in place of the unconditional branch: (1 + w)·D_main − w·D_guide, i.e. their
      D_guide + g·(D_main − D_guide) with g = 1 + w. Then `params` is the pair (main params, guide
      params).
    guide_classes: the guide's number of classes (0: it is called without labels).
  """
  w_network = _check_guidance(denoiser.network, num_classes, guidance, guide is not None)
  interval = _check_interval(guidance_interval, guidance, w_network)

  def sample(params, keys, class_labels=None):
    latents = samplers_lib.latents(keys, tuple(shape))
    one_hot = None
    if num_classes:
      one_hot = jax.nn.one_hot(class_labels, num_classes, dtype=jnp.float32)
    if guide is not None:
      main_params, guide_params = params
      denoise_fn = samplers_lib.guided(
          denoiser.bind(main_params, one_hot),
          guide.bind(guide_params, one_hot if guide_classes else None), guidance,
          sigma_interval=interval)
    elif w_network:
      denoise_fn = denoiser.bind(params, one_hot, guidance=jnp.float32(guidance))
    elif guidance:
      denoise_fn = samplers_lib.guided_batched(
          lambda x, sigma, labels: denoiser(params, x, sigma, labels), one_hot, guidance,
          sigma_interval=interval)
    else:
      denoise_fn = denoiser.bind(params, one_hot)
    return sampler(denoise_fn, latents, keys)

  return sample


def _batches(positions: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Positions in the seed list grouped by the batch (window of `batch_size` positions) they are
  in: every position keeps the batch it has in a run over all seeds, so a run that resumes with
  some batches done samples each remaining one exactly as an uninterrupted run does."""
  if not len(positions):
    return []
  windows = positions // batch_size
  cuts = np.flatnonzero(np.diff(windows)) + 1
  return np.split(positions, cuts)


def generate_batches(sample_fn: Callable, params, seeds: Sequence[int], class_labels=None, *,
                     batch_size: int = 64, mesh=None, progress: bool = False,
                     positions: Optional[Sequence[int]] = None
                     ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Runs `sample_fn` over the seeds in sharded batches, yielding each batch as it finishes.

  Args:
    sample_fn: from `make_sample_fn`.
    params: the network's parameters.
    seeds: the seeds [N].
    class_labels: int [N] or None.
    batch_size: images per batch (rounded down to a multiple of the device count, at least one
      per device).
    mesh: the device mesh (default: every device).
    progress: show a progress bar.
    positions: which of the seeds (indices into `seeds`, increasing) to sample; default all.
      Each keeps the batch it has among all seeds.

  Yields:
    (positions [B], float32 images [B, H, W, C]) per batch.
  """
  mesh = mesh or parallel.make_mesh()
  n_dev = mesh.devices.size
  batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
  seeds = np.asarray(list(seeds), np.int64)
  labels = None if class_labels is None else np.asarray(class_labels, np.int32)
  positions = (np.arange(len(seeds)) if positions is None else
               np.asarray(positions, np.int64).reshape(-1))
  batches = _batches(positions, batch_size)
  if not batches:
    return
  shard = parallel.batch_sharding(mesh)
  rep = parallel.replicated(mesh)
  # Multi-host: every process holds all seeds and labels and builds the global arrays from them
  # (device_put cannot place host data on other processes' devices; keys are made on device from
  # the seeds' uint32 words, as `seed_keys` does), and every process gets all images back.
  multihost = jax.process_count() > 1

  def put(x):
    return jax.make_array_from_callback(x.shape, shard, lambda index: x[index])

  def sample_seeds(params, words, class_labels):
    return sample_fn(params, jax.vmap(jax.random.key)(words), class_labels)

  jitted = jax.jit(sample_seeds, in_shardings=(rep, shard, shard),
                   out_shardings=rep if multihost else shard)
  if not multihost:
    params = jax.device_put(params, rep)
  if progress:
    from tqdm import tqdm
    batches = tqdm(batches, desc='sampling', unit='batch')
  for batch in batches:
    chunk = seeds[batch]
    # Padded to a multiple of the device count with copies of the last seed (dropped after).
    pad = (-len(chunk)) % n_dev
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad)])
    words = put((padded % (1 << 32)).astype(np.uint32))
    lab = None
    if labels is not None:
      lab_chunk = labels[batch]
      lab = put(np.concatenate([lab_chunk, np.repeat(lab_chunk[-1:], pad)]))
    images = np.asarray(jitted(params, words, lab))  # waits for the batch (bounded queue)
    yield batch, images[:len(chunk)]


def generate(sample_fn: Callable, params, seeds: Sequence[int], class_labels=None, *,
             batch_size: int = 64, mesh=None, progress: bool = False) -> np.ndarray:
  """Runs `sample_fn` over all seeds in sharded batches; returns float32 images [N, H, W, C].

  Batches are padded to a multiple of the device count (padding images are dropped), so any
  number of seeds works on any number of devices.
  """
  return np.concatenate([images for _, images in generate_batches(
      sample_fn, params, seeds, class_labels, batch_size=batch_size, mesh=mesh,
      progress=progress)], axis=0)


def default_labels(seeds: Sequence[int], num_classes: int, class_label: Optional[int] = None):
  """Class labels for seeds: a fixed class, or classes cycling with the seed (k mod classes)."""
  if not num_classes:
    return None
  if class_label is not None:
    if not 0 <= int(class_label) < num_classes:
      raise ValueError(f'Class {class_label} is out of range; this model has classes 0..'
                       f'{num_classes - 1}.')
    return np.full(len(seeds), int(class_label), np.int32)
  return np.asarray(seeds, np.int64) % num_classes


SHARD_DIR = 'shards'         # OUT/shards/: finished batches of a sample_run, for resuming
SETTINGS_FILE = shards_lib.SETTINGS_FILE
GRID_MAX = 1024              # grid.png shows the first this many samples
_SHARD_FORMAT = 1
# Where they live now (`runs.shards`, `runs.files`); kept here for callers of the old names.
canonical_settings, open_shard_dir = shards_lib.canonical_settings, shards_lib.open_shard_dir
write_whole = files.write_whole


class _Shards:
  """OUT/shards/: one .npz per finished batch (images, seeds, labels) and the settings they were
  sampled with. Process 0 only. OUT is local or a URL (`runs.files`)."""

  def __init__(self, out: files.PathLike, settings: dict):
    self.out = files.path(out)
    self.dir = self.out / SHARD_DIR
    self.settings = canonical_settings(settings)
    self.index: dict[int, Tuple[os.PathLike, int]] = {}  # seed -> (shard file, row)

  def open(self) -> None:
    """Checks the settings of earlier shards, then indexes them (removing half-written ones)."""
    open_shard_dir(self.dir, self.settings, 'samples')
    for name in shards_lib.shard_names(self.dir):
      shard = self.dir / name
      try:
        with files.read_npz(shard) as z:
          shard_seeds = z['seeds']
      except Exception as e:  # noqa: BLE001 - an unreadable shard is sampled again.
        log.warning('Ignoring the unreadable sample shard %s (%s); its seeds are sampled again.',
                    shard, e)
        continue
      for row, seed in enumerate(shard_seeds.tolist()):
        self.index.setdefault(int(seed), (shard, row))

  def write(self, seeds: np.ndarray, labels: Optional[np.ndarray], images: np.ndarray) -> None:
    seeds = np.asarray(seeds, np.int64)
    name = f'shard-{int(seeds[0]):010d}-{len(seeds):05d}-{zlib.crc32(seeds.tobytes()):08x}.npz'
    path = self.dir / name
    write_whole(path, lambda f: np.savez(
        f, images=images, seeds=seeds,
        labels=np.asarray(labels if labels is not None else [], np.int32)))
    for row, seed in enumerate(seeds.tolist()):
      self.index[int(seed)] = (path, row)

  def assemble(self, seeds: np.ndarray, labels, shape, keep: bool) -> Optional[np.ndarray]:
    """Writes OUT/samples.npz (streamed shard by shard: memory stays bounded) and OUT/grid.png.

    Returns:
      All images (uint8 [N, H, W, C]) if `keep`, else None.
    """
    cache: collections.OrderedDict = collections.OrderedDict()  # a few shards' images

    def image(seed: int) -> np.ndarray:
      path, row = self.index[int(seed)]
      if path not in cache:
        with files.read_npz(path) as z:
          cache[path] = z['images']
        while len(cache) > 4:
          cache.popitem(last=False)
      return cache[path][row]

    kept, grid = [], []

    def write_images(zf, name: str, first: bool) -> None:
      with zf.open(f'{name}.npy', 'w', force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {
            'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False,
            'shape': (len(seeds), *shape)})
        for lo in range(0, len(seeds), 256):
          chunk = np.stack([image(s) for s in seeds[lo:lo + 256]]).astype(np.uint8)
          member.write(chunk.tobytes())
          if first and keep:
            kept.append(chunk)
          if first and sum(map(len, grid)) < GRID_MAX:
            grid.append(chunk[:GRID_MAX - sum(map(len, grid))])

    def write_npz(f) -> None:
      with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        # `images` for diffjax; `arr_0` (and `arr_1`, the labels) as openai's evaluator
        # (guided-diffusion's evaluations/evaluator.py) reads a sample batch.
        write_images(zf, 'images', first=True)
        write_images(zf, 'arr_0', first=False)
        arrays = [('seeds', np.asarray(seeds)),
                  ('labels', np.asarray(labels if labels is not None else []))]
        if labels is not None:
          arrays.append(('arr_1', np.asarray(labels)))
        for name, value in arrays:
          with zf.open(f'{name}.npy', 'w', force_zip64=True) as member:
            np.lib.format.write_array(member, value)

    write_whole(self.out / 'samples.npz', write_npz)
    png = images_lib.make_grid(np.concatenate(grid))

    def write_png(f) -> None:
      from PIL import Image
      Image.fromarray(png).save(f, format='PNG')

    write_whole(self.out / 'grid.png', write_png)
    return np.concatenate(kept) if keep else None


def _check_out(out: files.PathLike) -> None:
  """Raises one sentence, before any sampling, if OUT is a file or cannot be written (nothing is
  created yet: a call that fails later, e.g. on a missing checkpoint, leaves no empty folder)."""
  files.check_writable_dir(out, '--out', f'grid.png, samples.npz and {SHARD_DIR}/')


def _check_settings(batch_size, options: dict) -> None:
  """Raises one sentence for an out-of-range --batch or EDM stochasticity option (Alg. 2)."""
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f'--batch must be a positive number of images per batch, got {batch_size}; '
                     'pass e.g. --batch=64 (it is rounded down to a multiple of the devices).')
  for name, flag in (('s_churn', '--churn'), ('s_tmin', '--s_tmin'), ('s_tmax', '--s_tmax'),
                     ('s_noise', '--s_noise')):
    value = options.get(name)
    if value is not None and not value >= 0:  # `not >=`: NaN is refused too
      raise ValueError(f'{flag} must be >= 0 (EDM Alg. 2), got {value}; pass a non-negative '
                       f'value or leave {flag} out.')
  if options.get('s_tmin') is not None and options.get('s_tmax') is not None and (
      options['s_tmin'] > options['s_tmax']):
    raise ValueError(f'--s_tmin={options["s_tmin"]} is above --s_tmax={options["s_tmax"]}, so no '
                     'step would get churn; pass s_tmin <= s_tmax.')


def _ranges(positions: Sequence[int]) -> list[list[int]]:
  """Increasing positions as [start, stop) ranges (compact to share between processes)."""
  out = []
  for p in positions:
    if out and out[-1][1] == p:
      out[-1][1] += 1
    else:
      out.append([int(p), int(p) + 1])
  return out


def sample_run(workdir: str, seeds, *, out: Optional[str] = None, sampler: Optional[str] = None,
               num_steps: Optional[int] = None, class_label: Optional[int] = None,
               guidance: float = 0.0, batch_size: int = 64, progress: bool = False,
               step: Optional[int] = None, return_images: bool = True,
               guidance_interval: Optional[Tuple[float, float]] = None,
               guide_workdir: Optional[str] = None, guide_step: Optional[int] = None,
               **sampler_kwargs) -> dict:
  """Samples a trained run and writes OUT/grid.png and OUT/samples.npz — resumably.

  Each finished batch is written to OUT/shards/ as it completes (whole, then renamed). Rerunning
  the same call after a kill skips the seeds already there (it says how many it found) and samples
  the rest in the batches an uninterrupted run uses, so the final samples are bitwise the same (with
  the same batch size and devices; with others they are the same samples up to float rounding).
  OUT/samples.npz (all samples, in the order of `seeds`) and OUT/grid.png (the first GRID_MAX) are
  assembled at the end. Shards made with other settings (model, checkpoint step, sampler, options,
  guidance, class) are never mixed in: the call refuses. Multi-host: every process samples its
  part of each batch; only process 0 reads and writes OUT.

  Args:
    workdir: a train.py run.
    seeds: list of ints or text like '0-63'.
    out: output directory (default WORKDIR/samples/cli).
    sampler, num_steps, sampler_kwargs: override config.sample.
    class_label: one class for every image (default: seed mod num_classes).
    guidance: classifier-free guidance weight.
    batch_size: images per batch.
    progress: show a progress bar.
    step: checkpoint step (default: newest).
    return_images: return the images (all in memory); sample.py passes False.
    guidance_interval: (σ_lo, σ_hi): guidance only for σ_lo < σ ≤ σ_hi (`make_sample_fn`).
    guide_workdir: autoguidance: another run of the same task (e.g. a smaller or shorter-trained
      one, or a converted one) guides this one in place of its unconditional branch.
    guide_step: the guide's checkpoint step (default: newest).

  Returns:
    {'images': uint8 [N,H,W,C] (None if not `return_images`, and on processes other than 0),
    'seeds': [N], 'labels': [N] or None, 'grid': path, 'npz': path, 'found': how many samples
    were already done}.
  """
  seeds = parse_seeds(seeds) if isinstance(seeds, str) else [int(s) for s in seeds]
  if not seeds:
    raise ValueError('No seeds to sample; pass some, e.g. --seeds=0-63.')
  _check_settings(batch_size, sampler_kwargs)
  # Options are checked against the run's config, and OUT for writing, before weights are read.
  config = runs.read_config(workdir)
  runs.run.check_run_config(config, workdir)  # e.g. a distillation root: name its stages
  spec = build.dataset_spec(config)
  build.sampler_fn(config, build.build_precond(config), sampler, num_steps, **sampler_kwargs)
  w_network = _check_guidance(build.build_network(config, spec), build.num_classes(config, spec),
                              guidance, guide_workdir is not None)
  _check_interval(guidance_interval, guidance, w_network)
  if guide_workdir is None and guide_step is not None:
    raise ValueError('--guide_step needs --guide_workdir, the run it picks a checkpoint of.')
  if guide_workdir is not None:
    guide_config = runs.read_config(guide_workdir)
    guide_spec = build.dataset_spec(guide_config)
    check_guide(spec, build.num_classes(config, spec), guide_spec,
                build.num_classes(guide_config, guide_spec), guide_workdir)
  if class_label is not None and not build.num_classes(config, spec):
    raise ValueError('--class needs a class-conditional model; this one is unconditional.')
  default_labels(seeds, build.num_classes(config, spec), class_label)
  out = files.path(out) if out else files.path(workdir) / 'samples' / 'cli'
  parallel.on_main(lambda: _check_out(out))
  run = runs.load(workdir, step)
  labels = default_labels(seeds, run.num_classes, class_label)
  fn = build.sampler_fn(run.config, run.denoiser.precond, sampler, num_steps, **sampler_kwargs)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  guide = None if guide_workdir is None else runs.load(guide_workdir, guide_step)
  sample_fn = make_sample_fn(
      run.denoiser, fn, shape, run.num_classes, guidance, guidance_interval=guidance_interval,
      guide=None if guide is None else guide.denoiser,
      guide_classes=0 if guide is None else guide.num_classes)
  params = run.ema_params if guide is None else (run.ema_params, guide.ema_params)
  seeds_array = np.asarray(seeds, np.int64)

  # What the samples depend on (with the config, which holds the sampler's defaults); batch size
  # and device count are left out: image k depends on seed k only.
  shards = _Shards(out, {
      'format': _SHARD_FORMAT, 'config': run.config.to_dict(), 'step': int(run.step),
      'sampler': sampler or run.config.sample.sampler, 'options': sampler_kwargs,
      'num_steps': int(run.config.sample.num_steps if num_steps is None else num_steps),
      'guidance': float(guidance), 'class_label': class_label, 'shape': list(shape),
      # Only when given, so shards written before these options existed still match.
      **({'guidance_interval': [float(v) for v in guidance_interval]}
         if guidance_interval is not None else {}),
      **({'guide': {'config': guide.config.to_dict(), 'step': int(guide.step)}}
         if guide is not None else {})})

  def open_shards() -> list:
    try:
      shards.open()
    except OSError as e:
      raise OSError(f'Cannot write samples to {out} ({e.strerror or e}); pass an --out on a '
                    'writable disk with free space.') from e
    return _ranges([p for p, seed in enumerate(seeds) if seed not in shards.index])

  todo = np.asarray([p for a, b in parallel.on_main(open_shards) for p in range(a, b)], np.int64)
  found = len(seeds) - len(todo)
  if found and parallel.is_main_process():
    print(f'Found {found} of {len(seeds)} samples already done in {shards.dir}; sampling the '
          f'other {len(todo)}.', flush=True)

  def unwritable(e: OSError) -> OSError:
    return OSError(f'Cannot write samples to {out} ({e.strerror or e}); free disk space or fix '
                   f'the permissions, then rerun the same command: the {len(shards.index)} '
                   f'samples in {shards.dir} are kept.')

  def write(positions, x) -> None:
    try:
      shards.write(seeds_array[positions], None if labels is None else labels[positions],
                   images_lib.to_uint8(x))
    except OSError as e:
      raise unwritable(e) from e

  for positions, x in generate_batches(sample_fn, params, seeds, labels,
                                       batch_size=batch_size, positions=todo,
                                       progress=progress and parallel.is_main_process()):
    # Through on_main: a failed write stops every process at once, not at the next collective.
    parallel.on_main(lambda positions=positions, x=x: write(positions, x))
  assembled = {}

  def assemble() -> None:
    try:
      assembled['images'] = shards.assemble(seeds_array, labels, shape, return_images)
    except OSError as e:
      raise unwritable(e) from e

  parallel.on_main(assemble)  # every process waits: OUT is complete when any returns
  return {'images': assembled.get('images'), 'seeds': seeds_array, 'labels': labels,
          'grid': os.fspath(out / 'grid.png'), 'npz': os.fspath(out / 'samples.npz'),
          'found': found}
