r"""Trains the mnist5k digit classifier behind the classifier reward (fmjax.steering.classifier).

  python -m fmjax.data.mnist5k --data_dir=~/tensorflow_datasets        # once, offline
  python -m fmjax.steering.train_classifier --workdir=runs/classifier --data_dir=~/tensorflow_datasets

Trains on the 4,500-digit 'train' split, reports accuracy on the 500 held-out 'test' digits (clean
and with the augmentation's noise), and writes WORKDIR/classifier/params (Orbax) and
WORKDIR/classifier.json. Then `fmjax.steering.classifier.load_reward(WORKDIR, target_class=3)`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from fmjax.steering import classifier


def noisy_accuracy(model, images, labels, std: float, seed: int = 0) -> float:
  """Accuracy on images with Gaussian noise of a fixed std (how the reward fares off the data)."""
  noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), images.shape))
  return classifier.accuracy(model, images + std * noise, labels)


def main(argv=None) -> dict:
  defaults = classifier.TrainOptions()
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='where the classifier is written')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'),
                      help='the folder holding the prepared mnist5k (python -m fmjax.data.mnist5k)')
  parser.add_argument('--steps', type=int, default=defaults.steps)
  parser.add_argument('--batch_size', type=int, default=defaults.batch_size)
  parser.add_argument('--learning_rate', type=float, default=defaults.learning_rate)
  parser.add_argument('--noise_std', type=float, default=defaults.noise_std,
                      help='augmentation: per-example noise std ~ U[0, noise_std] on the [-1, 1] scale')
  parser.add_argument('--max_shift', type=int, default=defaults.max_shift)
  parser.add_argument('--seed', type=int, default=defaults.seed)
  args = parser.parse_args(argv)
  options = classifier.TrainOptions(steps=args.steps, batch_size=args.batch_size,
                                    learning_rate=args.learning_rate, noise_std=args.noise_std,
                                    max_shift=args.max_shift, seed=args.seed)
  # Both splits are read before any training, so a missing dataset fails at once.
  train_x, train_y = classifier.load_split(args.data_dir, 'train')
  test_x, test_y = classifier.load_split(args.data_dir, 'test')
  start = time.time()
  model, losses = classifier.train(
      train_x, train_y, options,
      log=lambda step, loss: print(f'step {step:6d}/{options.steps}  loss {loss:.4f}', flush=True))
  metrics = {
      'steps': options.steps,
      'train_seconds': round(time.time() - start, 1),
      'final_train_loss': float(np.mean(losses[-100:])),
      'test_accuracy': classifier.accuracy(model, test_x, test_y),
      'test_accuracy_noise_0.2': noisy_accuracy(model, test_x, test_y, 0.2),
      'test_accuracy_noise_0.5': noisy_accuracy(model, test_x, test_y, 0.5),
      'num_test': int(len(test_y)),
  }
  path = classifier.save(args.workdir, model, options, metrics)
  print(json.dumps(metrics, indent=2))
  print(f'classifier written to {os.path.dirname(path)}; reward: '
        f'fmjax.steering.classifier.load_reward({os.path.dirname(path)!r}, target_class=DIGIT)')
  return metrics


if __name__ == '__main__':
  main()
