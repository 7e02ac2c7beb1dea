"""Trains the digits evaluator's classifier and writes `diffjax/evaluation/assets/digits_classifier.npz`.

  python scripts/train_digits_classifier.py            # ~10-20 s on 2 CPU cores

The asset holds the weights and the feature statistics of the train and test splits (so reference
statistics always match the weights), plus the test accuracy and the FD(test, train) floor. Training is
reproducible for a given seed up to float round-off (XLA:CPU reductions are not bit-exact across runs). Augmentation: random shifts by up to one pixel (the
images are padded with 0, the background value), so the classifier does not depend on exact centring,
which generated samples need not share.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from diffjax.evaluation import digits_classifier as dc  # noqa: E402
from diffjax.evaluation.fid import fid_from_statistics, statistics_from_features  # noqa: E402


def shift_augment(key: jax.Array, x: jax.Array) -> jax.Array:
  """Shifts each [8, 8, 1] image by dy, dx in {-1, 0, 1}, filling with background 0 (uint8)."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  offsets = jax.random.randint(key, (x.shape[0], 2), 0, 3)
  return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (8, 8, 1)))(
    padded, offsets
  )


def train(seed: int, epochs: int, batch_size: int, lr: float, feature_dim: int):
  images, labels = dc.load_digits_split('train')
  model = dc.DigitsClassifier(feature_dim=feature_dim)
  key = jax.random.key(seed)
  variables = jax.jit(model.init)(key, jnp.zeros((1, 8, 8, 1)))
  steps_per_epoch = len(images) // batch_size
  schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
  opt = optax.adamw(schedule, weight_decay=1e-4)
  params = variables['params']
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y, key):
    aug_key, drop_key = jax.random.split(key)
    x = dc._to_input(shift_augment(aug_key, x))

    def loss_fn(p):
      _, logits = model.apply({'params': p}, x, train=True, rngs={'dropout': drop_key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(images))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size : (i + 1) * batch_size]
      params, opt_state, loss = step(
        params,
        opt_state,
        images[idx],
        labels[idx],
        jax.random.fold_in(key, epoch * steps_per_epoch + i),
      )
      losses.append(float(loss))  # blocks every step: cheap here, and keeps dispatch bounded
    if epoch % 10 == 0 or epoch == epochs - 1:
      print(f'epoch {epoch:3d} loss {np.mean(losses):.4f}')
  return {'params': params}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=dc.DIGITS_CLASSIFIER_PATH)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--epochs', type=int, default=60)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--lr', type=float, default=2e-3)
  parser.add_argument('--feature_dim', type=int, default=64)
  args = parser.parse_args()

  start = time.time()
  variables = jax.device_get(
    train(args.seed, args.epochs, args.batch_size, args.lr, args.feature_dim)
  )
  extra = {}
  stats = {}
  for split in ('train', 'test'):
    images, labels = dc.load_digits_split(split)
    features, logits = dc._run(images, variables)
    accuracy = float(np.mean(np.argmax(logits, 1) == labels))
    stats[split] = statistics_from_features(features)
    extra[f'stats/{split}/mu'] = stats[split].mu
    extra[f'stats/{split}/sigma'] = stats[split].sigma
    extra[f'stats/{split}/n'] = np.int64(stats[split].n)
    extra[f'meta/{split}_accuracy'] = np.float64(accuracy)
    print(f'{split}: accuracy {accuracy:.4f} ({len(labels)} images)')
  floor = fid_from_statistics(stats['test'], stats['train'])
  noise = np.random.default_rng(1).integers(0, 256, (360, 8, 8, 1), dtype=np.uint8)
  noise_fd = fid_from_statistics(
    statistics_from_features(dc._run(noise, variables)[0]), stats['train']
  )
  extra['meta/fd_test_vs_train'] = np.float64(floor)
  extra['meta/seed'] = np.int64(args.seed)
  extra['meta/split_seed'] = np.int64(dc.SPLIT_SEED)
  dc.save_digits_classifier(args.out, variables, extra)
  print(f'FD(test, train) = {floor:.4f}; FD(uniform noise, train) = {noise_fd:.2f}')
  dead = int(np.sum(np.all(dc._run(dc.load_digits_split('train')[0], variables)[0] == 0, axis=0)))
  print(f'dead feature units on train: {dead}/{args.feature_dim}')
  print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes) in {time.time() - start:.1f} s')


if __name__ == '__main__':
  main()
