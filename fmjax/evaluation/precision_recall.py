"""Improved precision and recall (Kynkäänniemi et al. 2019, arXiv 1904.06991, Sec. 3, eqs. 1-2).

Each set's manifold is the union of balls around its feature vectors, the radius of a ball being
the distance to the k-th nearest *other* vector of the same set (k = 3, as in the paper's
experiments and in the ADM evaluator, Dhariwal & Nichol 2021, arXiv 2105.05233). Then

  precision = fraction of generated vectors inside the real manifold  (eq. 2 with the real set)
  recall    = fraction of real vectors inside the generated manifold,

"inside" meaning d(x, y) <= radius(y) for some y (a closed ball). The features are the same
2048-d pool3 vectors as FID (`inception.features`).

Conventions, matching the ADM evaluator's `ManifoldEstimator` (read from its source):
- distances are Euclidean (the ADM code compares *squared* distances with squared radii, the
  same test); the k-th neighbour is taken from the sorted row of distances *including* the
  point itself at distance 0, so index k is the k-th other point (ties, e.g. duplicate images,
  count as neighbours);
- no clamping of large radii (its `clamp_to_percentile=None`).
One difference, kept on purpose: ADM computes the distance matrix in float16 (falling back to
float32 when it overflows); fmjax uses float64 for the squared norms and dot products
(`dtype`), which removes that rounding from the radius tests. Points near a ball's border may
therefore count differently from ADM's numbers; not measured.

Cost: four n x n x d distance products (two radii, two coverage tests), ~1.7e12 flops in float64
for 10k vs 10k at d = 2048, in blocks of `block` rows (O(block * n) memory).
"""

from __future__ import annotations

import numpy as np

DEFAULT_K = 3


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """|a_i - b_j|^2 as |a|^2 - 2 a.b + |b|^2, clipped at 0 (round-off), like the ADM code."""
  d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
  return np.maximum(d, 0.0)


def _as_features(x, dtype, name) -> np.ndarray:
  x = np.asarray(x, dtype)
  if x.ndim != 2:
    raise ValueError(f'{name}: expected features [n, d], got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name}: non-finite features (drop the non-finite samples first)')
  return x


def manifold_radii(features, k: int = DEFAULT_K, *, block: int = 1024,
                   dtype=np.float64) -> np.ndarray:
  """Distance from each vector to its k-th nearest other vector of the same set, [n]."""
  x = _as_features(features, dtype, 'features')
  n = x.shape[0]
  if not 1 <= k < n:
    raise ValueError(f'k = {k} needs 1 <= k < n = {n} feature vectors')
  radii = np.empty(n, np.float64)
  for start in range(0, n, block):
    d2 = _squared_distances(x[start:start + block], x)
    # Column k of the sorted row: index 0 is the point itself (distance 0).
    radii[start:start + block] = np.partition(d2, k, axis=1)[:, k]
  return np.sqrt(radii)


def coverage_fraction(points, centers, radii, *, block: int = 1024, dtype=np.float64) -> float:
  """Fraction of `points` within distance radii[j] of some centers[j] (closed balls)."""
  p = _as_features(points, dtype, 'points')
  c = _as_features(centers, dtype, 'centers')
  r2 = np.square(np.asarray(radii, np.float64))
  if p.shape[1] != c.shape[1] or r2.shape != (c.shape[0],):
    raise ValueError(f'shape mismatch: points {p.shape}, centers {c.shape}, radii {r2.shape}')
  inside = 0
  for start in range(0, p.shape[0], block):
    inside += int(np.any(_squared_distances(p[start:start + block], c) <= r2[None, :], 1).sum())
  return inside / p.shape[0]


def precision_recall(real_features, fake_features, k: int = DEFAULT_K, *, block: int = 1024,
                     dtype=np.float64) -> dict[str, float]:
  """{'precision', 'recall'} of generated features against real ones (eq. 1-2 of 1904.06991).

  The paper and ADM use equally many real and generated vectors (e.g. 10k vs 10k for ADM's
  ImageNet numbers, 50k vs 50k in the paper); the metrics depend on both counts through k-NN
  radii, so report them with the counts.
  """
  real = _as_features(real_features, dtype, 'real_features')
  fake = _as_features(fake_features, dtype, 'fake_features')
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f'feature dims differ: real {real.shape[1]}, fake {fake.shape[1]}')
  real_radii = manifold_radii(real, k, block=block, dtype=dtype)
  fake_radii = manifold_radii(fake, k, block=block, dtype=dtype)
  return {'precision': coverage_fraction(fake, real, real_radii, block=block, dtype=dtype),
          'recall': coverage_fraction(real, fake, fake_radii, block=block, dtype=dtype),
          'k': k, 'num_real': int(real.shape[0]), 'num_fake': int(fake.shape[0])}
