"""A small CNN digit classifier on mnist5k and its reward r(x, labels) = log p(y | x).

The classifier reward: steering a flow map toward a chosen digit judges the look-ahead
X_{t,1}(x_t) (or the denoiser E[x1 | x_t], or x_t itself) by log p(y | x), so the classifier sees
inputs in exactly the scale and shape the flow maps generate: float32 in [-1, 1] (uint8 / 127.5 - 1,
as fmjax.data.pipelines feeds mnist5k), shape [batch, 28, 28, 1], or flattened [batch, 784].

Choices (why):
  - SiLU and average pooling, no ReLU or max pooling: the reward is differentiated in x by the
    guided samplers, and a smooth network gives a smooth gradient field.
  - Noise augmentation: look-ahead estimates are near the data but not on it (a few-step map
    leaves blur and speckle, the naive look-ahead is x_t itself), so each training image gets
    Gaussian noise of a per-example std drawn uniformly from [0, noise_std] (default 0.3 on the
    [-1, 1] scale), plus a random shift of up to `max_shift` pixels (4,500 training digits are few).
  - Weight decay (AdamW) keeps the logits, hence the reward's gradient, moderate.

Train: `python -m fmjax.steering.train_classifier --workdir=DIR --data_dir=~/tensorflow_datasets`.
Layout of DIR: classifier/params (Orbax, the network's parameters) and classifier.json (the
architecture, the input scaling, training options, held-out accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
INFO_FILE = 'classifier.json'
PARAMS_DIR = os.path.join('classifier', 'params')
INPUT_SCALING = 'float32 in [-1, 1] = uint8 / 127.5 - 1 (fmjax.data.pipelines), shape [28, 28, 1] or [784]'
TRAIN_COMMAND = 'python -m fmjax.steering.train_classifier --workdir={workdir} --data_dir=~/tensorflow_datasets'


class ClassifierError(FileNotFoundError):
  """A classifier directory that is missing, incomplete or damaged; the message says what to do."""


class CNN(nnx.Module):
  """logits(x) for x of shape [batch, 28, 28, 1] in [-1, 1]: two 3x3 conv stages (SiLU, 2x2
  average pooling) of `channels` features, then a hidden dense layer and 10 logits."""

  def __init__(self, *, channels: tuple[int, int] = (32, 64), hidden: int = 128, rngs: nnx.Rngs):
    c1, c2 = channels
    self.conv1 = nnx.Conv(1, c1, (3, 3), padding='SAME', rngs=rngs)
    self.conv2 = nnx.Conv(c1, c1, (3, 3), padding='SAME', rngs=rngs)
    self.conv3 = nnx.Conv(c1, c2, (3, 3), padding='SAME', rngs=rngs)
    self.conv4 = nnx.Conv(c2, c2, (3, 3), padding='SAME', rngs=rngs)
    self.dense = nnx.Linear(7 * 7 * c2, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = as_images(x)
    pool = lambda h: nnx.avg_pool(h, (2, 2), strides=(2, 2))
    h = pool(nnx.silu(self.conv2(nnx.silu(self.conv1(x)))))     # 14 x 14
    h = pool(nnx.silu(self.conv4(nnx.silu(self.conv3(h)))))     # 7 x 7
    h = nnx.silu(self.dense(h.reshape(h.shape[0], -1)))
    return self.out(h)


def as_images(x) -> jax.Array:
  """[batch, 28, 28, 1] or [batch, 784] -> float32 [batch, 28, 28, 1]; one clear error otherwise."""
  x = jnp.asarray(x)
  if x.ndim == 2 and x.shape[1] == 784:
    x = x.reshape(x.shape[0], *IMAGE_SHAPE)
  elif x.ndim == 3 and x.shape[1:] == (28, 28):
    x = x[..., None]
  if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f'the MNIST classifier takes images of shape [batch, 28, 28, 1] (or flat [batch, 784]) '
                     f'in [-1, 1], got shape {tuple(x.shape)}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'the MNIST classifier takes float images in [-1, 1] (uint8 / 127.5 - 1), got dtype {x.dtype}.')
  return x.astype(jnp.float32)


# ----------------------------------------------------------------------------- data


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]: the scaling of fmjax.data.pipelines._normalize_images."""
  return images.astype(np.float32) / 127.5 - 1.0


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, 28, 28, 1] in [-1, 1], labels int32 [N]) of the prepared mnist5k split;
  DatasetNotFoundError (with the offline command that prepares it) when it is not there."""
  import tensorflow_datasets as tfds
  from fmjax.data import pipelines
  path = pipelines.find_prepared('mnist5k', data_dir)
  source = tfds.builder_from_directory(path).as_data_source(split=split)
  examples = [source[i] for i in range(len(source))]
  images = np.stack([e['image'] for e in examples])
  labels = np.asarray([e['label'] for e in examples], np.int32)
  return to_unit_range(images), labels


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  steps: int = 2000
  batch_size: int = 128
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  noise_std: float = 0.3      # per-example noise std ~ U[0, noise_std] on the [-1, 1] scale
  max_shift: int = 2          # random translation in pixels
  seed: int = 0
  channels: tuple[int, int] = (32, 64)
  hidden: int = 128

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f'steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}.')
    if self.noise_std < 0 or self.max_shift < 0:
      raise ValueError(f'noise_std and max_shift must be >= 0, got {self.noise_std} and {self.max_shift}.')


def augment(key, x, *, noise_std: float, max_shift: int):
  """Random shifts of up to max_shift pixels (zero = background -1 padding) and Gaussian noise
  with a per-example std ~ U[0, noise_std]."""
  k_shift, k_std, k_noise = jax.random.split(key, 3)
  n = x.shape[0]
  if max_shift:
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     constant_values=-1.0)
    offsets = jax.random.randint(k_shift, (n, 2), 0, 2 * max_shift + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), IMAGE_SHAPE))(padded, offsets)
  std = noise_std * jax.random.uniform(k_std, (n, 1, 1, 1))
  return x + std * jax.random.normal(k_noise, x.shape)


def cross_entropy(model: CNN, x, labels) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def make_model(options: TrainOptions) -> CNN:
  return CNN(channels=tuple(options.channels), hidden=options.hidden, rngs=nnx.Rngs(options.seed))


def train(images: np.ndarray, labels: np.ndarray, options: TrainOptions = TrainOptions(), *,
          log: Callable[[int, float], None] | None = None, log_every: int = 200) -> tuple[CNN, list[float]]:
  """Trains a CNN on (images in [-1, 1], integer labels) with AdamW (cosine decay, no warmup) and
  the augmentation above; returns the model and the training loss at every step."""
  if images.shape[1:] != IMAGE_SHAPE or len(images) != len(labels):
    raise ValueError(f'train takes images [N, 28, 28, 1] and labels [N], got {images.shape} and {labels.shape}.')
  model = make_model(options)
  schedule = optax.cosine_decay_schedule(options.learning_rate, options.steps)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=options.weight_decay), wrt=nnx.Param)
  images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  key = jax.random.PRNGKey(options.seed + 1)

  @nnx.jit
  def step(model, optimizer, key):
    k_batch, k_aug = jax.random.split(key)
    idx = jax.random.randint(k_batch, (options.batch_size,), 0, images.shape[0])
    x = augment(k_aug, images[idx], noise_std=options.noise_std, max_shift=options.max_shift)
    loss, grads = nnx.value_and_grad(cross_entropy)(model, x, labels[idx])
    optimizer.update(model, grads)
    return loss

  losses = []
  for i in range(options.steps):
    losses.append(float(step(model, optimizer, jax.random.fold_in(key, i))))
    if log is not None and (i + 1) % log_every == 0:
      log(i + 1, float(np.mean(losses[-log_every:])))
  return model, losses


def accuracy(model: CNN, images, labels, batch_size: int = 500) -> float:
  """Share of images whose argmax logit is the label."""
  logits_fn = nnx.jit(lambda m, x: m(x))
  correct = 0
  for i in range(0, len(images), batch_size):
    pred = np.asarray(jnp.argmax(logits_fn(model, jnp.asarray(images[i:i + batch_size])), -1))
    correct += int((pred == np.asarray(labels[i:i + batch_size])).sum())
  return correct / len(images)


# ----------------------------------------------------------------------------- checkpoint


def save(workdir: str, model: CNN, options: TrainOptions, metrics: dict) -> str:
  """Writes DIR/classifier/params (Orbax) and DIR/classifier.json; returns the JSON's path."""
  import orbax.checkpoint as ocp
  workdir = os.path.abspath(os.path.expanduser(workdir))
  params_dir = os.path.join(workdir, PARAMS_DIR)
  os.makedirs(os.path.dirname(params_dir), exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, nnx.state(model, nnx.Param), force=True)
  info = {'architecture': {'name': 'cnn', 'channels': list(options.channels), 'hidden': options.hidden},
          'input_scaling': INPUT_SCALING, 'num_classes': NUM_CLASSES,
          'train_options': dataclasses.asdict(options), **metrics}
  info['train_options']['channels'] = list(options.channels)
  path = os.path.join(workdir, INFO_FILE)
  with open(path + '.part', 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(path + '.part', path)    # the JSON appears only once the parameters are written
  return path


def load(workdir: str) -> tuple[CNN, dict]:
  """(model, info) of a classifier saved by `save`; ClassifierError saying what to do otherwise."""
  import orbax.checkpoint as ocp
  workdir = os.path.abspath(os.path.expanduser(workdir))
  info_path, params_dir = os.path.join(workdir, INFO_FILE), os.path.join(workdir, PARAMS_DIR)
  retrain = f'retrain it with:\n  {TRAIN_COMMAND.format(workdir=workdir)}'
  if not os.path.exists(info_path) or not os.path.isdir(params_dir):
    raise ClassifierError(f'No trained classifier in {workdir} (expected {INFO_FILE} and {PARAMS_DIR}/); train '
                          f'one with:\n  {TRAIN_COMMAND.format(workdir=workdir)}')
  try:
    with open(info_path) as f:
      info = json.load(f)
    arch = info['architecture']
    options = TrainOptions(channels=tuple(arch['channels']), hidden=int(arch['hidden']))
  except (ValueError, KeyError, TypeError) as e:
    raise ClassifierError(f'{info_path} is damaged ({type(e).__name__}: {e}). Delete {workdir} and '
                          + retrain) from None
  model = nnx.eval_shape(lambda: make_model(options))
  graphdef, abstract = nnx.split(model, nnx.Param)
  # Restored onto this process's devices, whatever the saving ones were (a classifier trained on
  # a CPU judges samples on a GPU): without a target sharding Orbax refuses another topology.
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.local_devices()), ('devices',)),
                                          jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(params_dir, abstract)
  except Exception as e:   # Orbax raises whatever its storage layer does
    reason = (str(e).strip().splitlines() or [''])[0][:300]
    raise ClassifierError(f'The classifier parameters in {params_dir} cannot be read '
                          f'({type(e).__name__}: {reason}). Delete {workdir} and ' + retrain) from None
  return nnx.merge(graphdef, params), info


# ----------------------------------------------------------------------------- reward


def logits_fn(model: CNN) -> Callable[[jax.Array], jax.Array]:
  """A pure function x -> logits [batch, 10] (the parameters closed over as arrays)."""
  graphdef, state = nnx.split(model)
  return lambda x: nnx.merge(graphdef, state)(x)


def reward_from_model(model: CNN, target_class: int | None = None):
  """reward(x, labels) = log p(y | x) [batch], y = target_class if given, else labels."""
  if target_class is not None and not 0 <= int(target_class) < NUM_CLASSES:
    raise ValueError(f'target_class must be a digit 0-9, got {target_class!r}.')
  apply = logits_fn(model)

  def reward(x, labels=None):
    log_p = jax.nn.log_softmax(apply(x), axis=-1)
    if target_class is not None:
      return log_p[:, int(target_class)]
    if labels is None:
      raise ValueError('this classifier reward has no target_class, so it needs labels (one digit per row); '
                       'pass labels or build it with load_reward(dir, target_class=DIGIT).')
    labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (log_p.shape[0],))
    return jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  return reward


def load_reward(workdir: str, target_class: int | None = None):
  """reward(x, labels) = log p(y | x) of the classifier trained into `workdir`, with
  y = target_class (a digit) or, when None, the labels passed to the reward. Pure, jittable and
  differentiable in x; x in the flow maps' scale and shape ([batch, 28, 28, 1] in [-1, 1])."""
  model, _ = load(workdir)
  return reward_from_model(model, target_class)
