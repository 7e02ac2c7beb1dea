"""Evaluation: FID / KID / IS with the standard Inception-v3, FD_DINOv2, reference statistics, the digits
evaluator.

Maths in `fid` (moments, Fréchet distance, IS, KID), `inception` and `dinov2` (the networks; their weights
in `inception_weights`, `dinov2_weights`); run-level work in
`sources` (image sources), `features` (streamed, sharded Inception features), `references` (what a
FID is measured against, and the metrics), `protocols` (FID of a run, of image sets, the digits
evaluator), `bpd` (bits/dim of runs) and `distill` (distilled students).
"""

from diffjax.evaluation.digits_classifier import (
  DIGITS_CLASSIFIER_PATH,
  digits_features,
  digits_logits,
  digits_metrics,
  digits_reference_statistics,
  load_digits_classifier,
  load_digits_split,
)
from diffjax.evaluation.dinov2 import DINOv2, DINOv2Config
from diffjax.evaluation.dinov2_weights import (
  dinov2_params_from_state_dict,
  dinov2_state_dict_layout,
  download_dinov2,
  find_dinov2_weights,
  load_dinov2_params,
  make_dinov2_fn,
)
from diffjax.evaluation.features import (
  Features,
  generated_features,
  load_dinov2,
  load_inception,
  source_features,
)
from diffjax.evaluation.fid import (
  Statistics,
  StreamingStats,
  batch_moments,
  fid_from_statistics,
  frechet_distance,
  inception_score,
  kernel_inception_distance,
  load_statistics,
  quantize_images,
  save_statistics,
  statistics_from_features,
)
from diffjax.evaluation.inception import InceptionV3, resize_bilinear_tf1
from diffjax.evaluation.inception_weights import (
  download_inception,
  find_inception_weights,
  inception_params_from_state_dict,
  inception_state_dict_layout,
  load_inception_params,
  make_inception_fn,
)
from diffjax.evaluation.protocols import evaluate_digits, evaluate_fid, evaluate_images, seed_sets
from diffjax.evaluation.references import (
  METRICS,
  Reference,
  check_reference,
  compute_metrics,
  feature_networks,
  load_reference,
  parse_metrics,
  reference_statistics,
  save_reference,
)
from diffjax.evaluation.sources import ImageSource, array_source, dataset_source, file_source
from diffjax.pth import load_pth

__all__ = [
  'DIGITS_CLASSIFIER_PATH',
  'DINOv2',
  'DINOv2Config',
  'Features',
  'ImageSource',
  'InceptionV3',
  'METRICS',
  'Reference',
  'Statistics',
  'StreamingStats',
  'array_source',
  'batch_moments',
  'check_reference',
  'compute_metrics',
  'dataset_source',
  'digits_features',
  'digits_logits',
  'digits_metrics',
  'digits_reference_statistics',
  'dinov2_params_from_state_dict',
  'dinov2_state_dict_layout',
  'download_dinov2',
  'download_inception',
  'evaluate_digits',
  'evaluate_fid',
  'evaluate_images',
  'fid_from_statistics',
  'feature_networks',
  'file_source',
  'find_dinov2_weights',
  'find_inception_weights',
  'frechet_distance',
  'generated_features',
  'inception_params_from_state_dict',
  'inception_score',
  'inception_state_dict_layout',
  'kernel_inception_distance',
  'load_digits_classifier',
  'load_digits_split',
  'load_dinov2',
  'load_dinov2_params',
  'load_inception',
  'load_inception_params',
  'load_pth',
  'load_reference',
  'load_statistics',
  'make_dinov2_fn',
  'make_inception_fn',
  'parse_metrics',
  'quantize_images',
  'reference_statistics',
  'resize_bilinear_tf1',
  'save_reference',
  'save_statistics',
  'seed_sets',
  'source_features',
  'statistics_from_features',
]
