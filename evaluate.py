"""Evaluates trained runs and image sets: FID / IS / KID with Inception, FD_DINOv2, reference statistics,
digits.

  # Inception reference statistics of a dataset split, in NVlabs/edm's .npz format (mu, sigma), with
  # --metrics=fid,fd_dinov2 also DINOv2's (dinov2_mu, dinov2_sigma):
  python evaluate.py ref --dataset=cifar10 [--split=train --data_dir=... --out=refs/cifar10-train.npz
                         --max_images=N --features --metrics=fid,fd_dinov2]

  # FID of a run's samples (N images from seeds, sharded over every device); results to
  # WORKDIR/eval/fid_<step>_<settings>.json with a PNG of the first 100 samples beside it, and the
  # feature statistics of every finished shard of seeds in WORKDIR/eval/fid_<...>/shards/: the same
  # command rerun after a kill skips those and gives the uninterrupted result:
  python evaluate.py fid --workdir=runs/cifar10 --ref=refs/cifar10-train.npz [--num=50000
                         --seeds=0-49999 --first_seed=0 --protocol=edm3 --metrics=fid,is,kid,fd_dinov2
                         --sampler=heun --steps=18 --churn=40 --s_tmin=0.05 --s_tmax=50
                         --s_noise=1.003 --guidance=0 --step=N --batch=128 --out=result.json
                         --shard_size=5120]

  # The same on images: an .npz with uint8 `images` [N, H, W, C], or a folder of PNG/JPEG files:
  python evaluate.py fid --images=samples.npz --ref=refs/cifar10-train.npz [--out=result.json]

  # The CPU-scale digits evaluator (classifier Fréchet distance and accuracy); results to
  # WORKDIR/eval/digits_<step>_<sampler><steps>[_w<guidance>...].json with a PNG beside it:
  python evaluate.py digits --workdir=runs/digits [--num=1000 --sampler=heun --steps=18]

  # bits/dim of a discrete (DDPM/iDDPM) run: the full VLB over all t on a split (test by default):
  python evaluate.py bpd_vlb --workdir=runs/iddpm_digits [--split=test --num=N --batch=256]

  # bits/dim of a continuous-time (score SDE) run: the probability-flow ODE likelihood with uniform
  # dequantization and a Hutchinson–Skilling trace, mean ± standard error over a split (test default);
  # a run whose preconditioning carries no SDE (EDM's 'edm') names the one whose ODE to integrate:
  python evaluate.py bpd --workdir=runs/sde_digits [--split=test --num=N --batch=128 --repeats=1
                         --probe=rademacher|gaussian|exact --sde=vp|subvp|ve]

--ref may be statistics (.npz with mu/sigma, ours or EDM's), images (.npz with `images` or a folder)
or a dataset name (`cifar10`, `digits:test`). KID needs reference features: images, a dataset, or
statistics written by `ref --features`. --protocol=edm3 is EDM's: FID of three seed sets (0 to N−1,
N to 2N−1, 2N to 3N−1), each reported, the minimum on top. Greyscale images go to Inception with
the grey channel repeated to RGB.

Inception weights: --inception=PATH, else $DIFFJAX_INCEPTION_WEIGHTS, ~/.cache/diffjax/ or torch.hub's
cache (the error says where to put the file when none is found). FD_DINOv2 (EDM2's metric: the Fréchet
distance of DINOv2 ViT-L/14 features of the images resized to 224) reads dinov2_vitl14_pretrain.pth the
same way: --dinov2=PATH, $DIFFJAX_DINOV2_WEIGHTS, ~/.cache/diffjax/ or torch.hub's cache.
"""

import json

from absl import app, flags

from diffjax import cli, evaluation, runs
from diffjax.evaluation import bpd

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a train.py run.')
_IMAGES = flags.DEFINE_string('images', None, 'fid: an .npz with uint8 `images` or a folder of PNGs, '
                              'instead of --workdir.')
_REF = flags.DEFINE_string('ref', None, 'fid: reference statistics .npz, images (.npz or folder) or a '
                           'dataset name[:split].')
_DATASET = flags.DEFINE_string('dataset', None, 'ref: the dataset name.')
_SPLIT = flags.DEFINE_string('split', 'train', 'ref: the split (also for a --ref dataset name).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory (default $TFDS_DATA_DIR).')
_OUT = flags.DEFINE_string('out', None, 'ref: the .npz to write (default refs/DATASET-SPLIT.npz); '
                           'fid: the JSON to write (default WORKDIR/eval/fid_*.json).')
_MAX_IMAGES = flags.DEFINE_integer('max_images', None, 'ref: use only the first N images.')
_FEATURES = flags.DEFINE_bool('features', False, 'ref: also store the pool3 features (for KID).')
_NUM = flags.DEFINE_integer('num', None, 'Images to generate (per seed set): fid 50000, digits 1000.')
_SEEDS = flags.DEFINE_string('seeds', None, 'fid: explicit seeds, e.g. 0-49999 (overrides --num).')
_FIRST_SEED = flags.DEFINE_integer('first_seed', 0, 'Seed of the first image.')
_PROTOCOL = flags.DEFINE_string('protocol', None, 'fid: edm3 = min FID over three seed sets.')
_METRICS = flags.DEFINE_string('metrics', 'fid', 'fid: comma-separated subset of fid,is,kid,'
                               'fd_dinov2; ref: fid,fd_dinov2 also stores DINOv2 statistics.')
_SAMPLING = cli.define_sampler_flags()
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
_BATCH = flags.DEFINE_integer('batch', None, 'Images per batch over all devices (fid/ref 128, '
                              'digits 500).')
_INCEPTION = flags.DEFINE_string('inception', None, 'Path of the FID Inception weights (.pth).')
_DINOV2 = flags.DEFINE_string('dinov2', None, 'Path of the DINOv2 ViT-L/14 weights for fd_dinov2 '
                              '(dinov2_vitl14_pretrain.pth).')
_NO_PROGRESS = cli.define_no_progress()
_DEBUG = cli.define_debug()
_REPEATS = flags.DEFINE_integer('repeats', 1, 'bpd: passes over the split (fresh dequantization and '
                                'probes; score_sde uses 5 on the test split).')
_SHARD_SIZE = flags.DEFINE_integer('shard_size', None, 'fid: seeds per resumable shard (default '
                                   '5120): rerun after a kill, the same command loses at most the '
                                   'shard in progress.')
_SDE = flags.DEFINE_string('sde', None, 'bpd: the SDE whose probability-flow ODE scores the model '
                           '(vp, subvp or ve; default: the run\'s, which EDM-style runs must name).')
_PROBE = flags.DEFINE_string('probe', 'rademacher', 'bpd: Hutchinson probe rademacher or gaussian, '
                             'or exact for the exact divergence (small images only).')

MODES = ('ref', 'fid', 'digits', 'bpd_vlb', 'bpd')


def _feature_weights(ev, networks) -> dict:
  """The weights of the feature networks `networks` needs (read only then: they take seconds)."""
  return dict(
    inception_variables=ev.load_inception(_INCEPTION.value) if 'inception' in networks else None,
    dinov2_variables=ev.load_dinov2(_DINOV2.value) if 'dinov2' in networks else None)


def _ref(ev) -> dict:
  if not _DATASET.value:
    raise ValueError('Pass --dataset=NAME for `evaluate.py ref`.')
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.
  data.get_dataset_spec(_DATASET.value)  # unknown names fail before the weights are read
  out = _OUT.value or f'refs/{_DATASET.value}-{_SPLIT.value}.npz'
  networks = ev.feature_networks(ev.parse_metrics(_METRICS.value))
  stats = ev.reference_statistics(
    _DATASET.value, split=_SPLIT.value, data_dir=_DATA_DIR.value, out=out,
    max_images=_MAX_IMAGES.value, keep_features=_FEATURES.value, batch_size=_BATCH.value or 128,
    progress=not _NO_PROGRESS.value, networks=networks, **_feature_weights(ev, networks))
  return {'out': out, 'dataset': _DATASET.value, 'split': _SPLIT.value, 'num_images': stats.n}


def _fid(ev) -> dict:
  if bool(_WORKDIR.value) == bool(_IMAGES.value):
    raise ValueError('Pass either --workdir=DIR (sample a run) or --images=NPZ_OR_FOLDER, not both.')
  metrics = ev.parse_metrics(_METRICS.value)
  # Everything cheap to check is checked before the Inception weights are read or anything sampled.
  networks = ev.feature_networks(metrics)
  ev.check_reference(_REF.value, need_features='kid' in metrics, split=_SPLIT.value,
                     need_dinov2='dinov2' in networks, need_inception='inception' in networks)
  common = dict(metrics=metrics, split=_SPLIT.value, data_dir=_DATA_DIR.value, out=_OUT.value,
                batch_size=_BATCH.value or 128, progress=not _NO_PROGRESS.value)
  if _IMAGES.value:
    if _PROTOCOL.value or _SEEDS.value:
      raise ValueError('--protocol and --seeds choose what to sample; they need --workdir, '
                       'not --images.')
    ev.file_source(_IMAGES.value)
    return ev.evaluate_images(_IMAGES.value, _REF.value, **_feature_weights(ev, networks), **common)
  num = 50_000 if _NUM.value is None else _NUM.value
  # Not a run (or a distillation root, whose runs are its stage folders): say so before reading
  # weights.
  runs.run.check_run_config(runs.read_config(_WORKDIR.value), _WORKDIR.value)
  if _SHARD_SIZE.value is not None:
    common['shard_size'] = _SHARD_SIZE.value
  ev.seed_sets(num, seeds=_SEEDS.value, first_seed=_FIRST_SEED.value, protocol=_PROTOCOL.value)
  weights = _feature_weights(ev, networks)
  return ev.evaluate_fid(
    _WORKDIR.value, _REF.value, num_images=num, seeds=_SEEDS.value, first_seed=_FIRST_SEED.value,
    protocol=_PROTOCOL.value, sampler=_SAMPLING.sampler.value, num_steps=_SAMPLING.steps.value,
    guidance=_SAMPLING.guidance.value, step=_STEP.value, **weights, **common,
    **_SAMPLING.options())


def _digits(ev) -> dict:
  if not _WORKDIR.value:
    raise ValueError('Pass --workdir=DIR of a train.py run.')
  return ev.evaluate_digits(
    _WORKDIR.value, num_images=1000 if _NUM.value is None else _NUM.value,
    first_seed=_FIRST_SEED.value, sampler=_SAMPLING.sampler.value, num_steps=_SAMPLING.steps.value,
    guidance=_SAMPLING.guidance.value, batch_size=_BATCH.value or 500, step=_STEP.value,
    progress=not _NO_PROGRESS.value, **_SAMPLING.options())


def _bpd_vlb(ev) -> dict:
  del ev  # the VLB needs no Inception
  if not _WORKDIR.value:
    raise ValueError('Pass --workdir=DIR of a train.py run with a discrete (ddpm) model.')
  split = _SPLIT.value if flags.FLAGS['split'].present else 'test'
  return bpd.evaluate_bpd_vlb(
    _WORKDIR.value, split=split, num_images=_NUM.value, batch_size=_BATCH.value or 256,
    step=_STEP.value, progress=not _NO_PROGRESS.value, out=_OUT.value)


def _bpd(ev) -> dict:
  del ev  # the likelihood needs no Inception
  if not _WORKDIR.value:
    raise ValueError('Pass --workdir=DIR of a train.py run with a continuous-time (sde_*) model.')
  split = _SPLIT.value if flags.FLAGS['split'].present else 'test'
  exact = _PROBE.value == 'exact'
  return bpd.evaluate_bpd(
    _WORKDIR.value, split=split, num_examples=_NUM.value, repeats=_REPEATS.value,
    batch_size=_BATCH.value or 128, divergence='exact' if exact else 'hutchinson',
    probe='rademacher' if exact else _PROBE.value, step=_STEP.value, data_dir=_DATA_DIR.value,
    out=_OUT.value, progress=not _NO_PROGRESS.value, sde=_SDE.value)


def main(argv):

  def run():
    mode = argv[1] if len(argv) > 1 else None
    if mode not in MODES or len(argv) > 2:
      given = f'Unknown mode {" ".join(argv[1:])!r}' if mode else 'No mode given'
      raise ValueError(f'{given}; name one of {", ".join(MODES)} first, e.g. '
                       '`evaluate.py fid --workdir=runs/cifar10 --ref=refs/cifar10-train.npz`.')
    result = {'ref': _ref, 'fid': _fid, 'digits': _digits, 'bpd_vlb': _bpd_vlb,
              'bpd': _bpd}[mode](evaluation)
    print(json.dumps(result, indent=2), flush=True)

  cli.main(run, _DEBUG)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
