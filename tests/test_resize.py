"""The legacy TF1 bilinear resize and the [-1, 1) scaling of the standard FID preprocessing."""

import os

import jax
import numpy as np
import pytest

from fmjax.evaluation import resize

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'inception_golden.npz')


def half_pixel_reference(images, size):
  """torch F.interpolate(bilinear, align_corners=False, antialias=False), written out in numpy:
  source coordinate (i + 0.5) * in / out - 0.5, clamped below at 0."""
  def axis(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo
  y0, y1, wy = axis(images.shape[1], size[0])
  x0, x1, wx = axis(images.shape[2], size[1])
  rows = images[:, y0] * (1 - wy)[:, None, None] + images[:, y1] * wy[:, None, None]
  return rows[:, :, x0] * (1 - wx)[:, None] + rows[:, :, x1] * wx[:, None]


def test_hand_computed_upsample():
  # 2 -> 4: source coordinates 0, 0.5, 1, 1.5 (the last clamps to pixel 1).
  row = np.array([10.0, 30.0]).reshape(1, 1, 2, 1)
  out = np.asarray(resize.resize_bilinear_tf1(row, (1, 4)))
  np.testing.assert_allclose(out.ravel(), [10, 20, 30, 30])
  # 3 -> 2 (shrinking): coordinates 0 and 1.5, no antialiasing.
  col = np.array([0.0, 90.0, 30.0]).reshape(1, 3, 1, 1)
  out = np.asarray(resize.resize_bilinear_tf1(col, (2, 1)))
  np.testing.assert_allclose(out.ravel(), [0, 60])


@pytest.mark.parametrize('shape,size', [((1, 32, 24, 3), (299, 97)),
                                        ((1, 64, 40, 3), (29, 57))])
def test_matches_loop_reference(shape, size):
  images = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
  out = np.asarray(jax.jit(resize.resize_bilinear_tf1, static_argnums=1)(images, size))
  ref = resize.resize_bilinear_tf1_reference(images, size)
  assert out.shape == ref.shape
  # float32 (TF's arithmetic) vs float64: < 1e-3 of a grey level.
  assert np.abs(out - ref).max() < 1e-3


def test_matches_torch_grid_sample_and_explains_interpolate():
  g = np.load(GOLDEN)
  src = g['resize_src']
  ours = np.asarray(resize.resize_bilinear_tf1(src, (11, 4)))
  # NVIDIA / fid_helper 'nv_bilinear' (affine_grid + grid_sample) is the same TF1 rule.
  assert np.abs(ours - g['resize_nv']).max() < 1e-3
  # torch's F.interpolate(align_corners=False) is the half-pixel rule instead: far from TF1 ...
  assert np.abs(ours - g['resize_interp']).max() > 20.0
  # ... and exactly the half-pixel formula.
  assert np.abs(half_pixel_reference(src.astype(np.float64), (11, 4)) - g['resize_interp']).max() < 1e-3
  # jax.image.resize also uses half-pixel centers (and antialiases when shrinking): not TF1.
  jax_resized = np.asarray(jax.image.resize(src, (2, 11, 4, 3), 'bilinear'))
  assert np.abs(jax_resized - ours).max() > 20.0


def test_identity_at_target_size_and_scaling():
  images = np.random.default_rng(1).integers(0, 256, (1, 299, 299, 3)).astype(np.uint8)
  x = np.asarray(resize.preprocess(images))
  np.testing.assert_array_equal(x, (images.astype(np.float32) - 128) / 128)
  corners = np.asarray(resize.scale_for_inception(np.array([0, 128, 255], np.uint8)))
  np.testing.assert_array_equal(corners, [-1.0, 0.0, 127 / 128])


def test_preprocess_rejects_bad_layout():
  with pytest.raises(ValueError, match='NHWC'):
    resize.preprocess(np.zeros((2, 3, 32, 32), np.uint8))


def test_to_uint8():
  x = np.array([-1.0, -0.5, 0.0, 1.0, 1.5])
  np.testing.assert_array_equal(np.asarray(resize.to_uint8(x)), [0, 64, 128, 255, 255])
