"""Data: the TFDS input pipeline, the built-in digits dataset and EDM's non-leaking augmentation.

`specs` (what a config can name), `sources` (reading a split), `pipeline` (the exactly resumable
batch order and iterator), `digits` (the offline TFDS builder), `augment` (EDM's augmentation).

    spec = diffjax.data.get_dataset_spec('digits')          # resolution, channels, num_classes, ...
    it = diffjax.data.make_iterator('digits', global_batch_size=128, seed=0, start_step=0)
    batch = next(it)   # {'image': float32 [B_local, H, W, C] in [-1, 1], 'label': int32 [B_local]}
    images, labels = diffjax.data.load_split_as_array('digits', 'test')     # uint8, int32
    images_aug, aug_labels = diffjax.data.augment.augment(key, images, p=0.12)   # jittable

`diffjax.data.augment` is the augmentation *module* (so `from diffjax.data import augment` gives the
module and `from diffjax.data.augment import augment` the function); exporting the function under the
module's name would shadow the module.

Importing this package registers the datasets (kind 'dataset' in `diffjax.registry`) and the 'digits'
TFDS builder; it does not import TensorFlow.
"""

from diffjax.data import augment
from diffjax.data.augment import AugmentConfig
from diffjax.data.pipeline import BatchIterator, make_iterator
from diffjax.data.sources import load_split_as_array, preprocess_image
from diffjax.data.specs import (
  DatasetNotPreparedError,
  DatasetSpec,
  get_dataset_spec,
  list_datasets,
  register_dataset,
  register_image_folder,
  resolve_data_dir,
)

__all__ = [
  'AugmentConfig',
  'BatchIterator',
  'DatasetNotPreparedError',
  'DatasetSpec',
  'augment',
  'get_dataset_spec',
  'list_datasets',
  'load_split_as_array',
  'make_iterator',
  'preprocess_image',
  'register_dataset',
  'register_image_folder',
  'resolve_data_dir',
]
