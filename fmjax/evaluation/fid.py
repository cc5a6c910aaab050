"""Fréchet Inception Distance: streaming feature statistics, a robust Fréchet distance, provenance.

FID (Heusel et al. 2017, arXiv 1706.08500, eq. 6) is the Fréchet (2-Wasserstein) distance between
Gaussians fitted to Inception pool3 features of two image sets:

  d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2}).

`frechet_distance` evaluates the trace term as tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}) = sum_i
sqrt(lambda_i), with lambda_i the eigenvalues of the symmetric PSD matrix S_1^{1/2} S_2 S_1^{1/2}
(similar to S_1 S_2 when S_1 is invertible, same nonzero spectrum otherwise). Both square roots
come from `eigh` of symmetric matrices with negative round-off eigenvalues clipped to 0, so the
result is always a real float, also for singular covariances (fewer samples than 2048 features),
where `scipy.linalg.sqrtm(S_1 @ S_2)` returns complex values and needs ad-hoc fixes.

The standard numbers: features from `inception.features` (TF 2015 graph, TF1 resize), 50,000
generated samples against statistics of the full training set. Statistics carry provenance
(dataset, split, count, resize mode, feature-extractor digest) and `fid` refuses to compare
statistics made with different extractors or resizes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import sharding
from fmjax.evaluation import inception, resize

NUM_SAMPLES_REPORTED = 50_000
PROVENANCE_FIELDS = ('dataset', 'split', 'count', 'resize', 'feature_extractor')
# Fields that, when both sets of statistics record them, must agree for an FID to mean anything:
# the feature network, its resize, the image crop (e.g. ADM's 256 center crop) and, for samples
# of a latent model or reconstructions, the autoencoder that decoded them.
COMPARABLE_FIELDS = ('feature_extractor', 'resize', 'crop', 'autoencoder')


def extractor_id() -> str:
  """Names the standard feature extractor in provenance: network and digest of its weights."""
  return f'inception_fid_tf2015:sha256={inception.PARAMS_SHA256}'


# Statistics that TensorFlow computed with the 2015 graph itself (ADM reference batches, TTUR
# files): the network fmjax ports. Treated as the same extractor as `extractor_id()`.
TF_GRAPH_EXTRACTOR_ID = 'inception_fid_tf2015:tf_graph_def'


def _same_network(a: str, b: str) -> bool:
  if a == b:
    return True
  return {a, b} == {extractor_id(), TF_GRAPH_EXTRACTOR_ID}


# ---------------------------------------------------------------------------------------------
# Statistics.


class FeatureStats:
  """Streaming mean and covariance of feature vectors, accumulated in float64 on the host.

  Sums are taken of features minus a fixed shift (the first batch's mean), which keeps the
  one-pass covariance sum(x x^T)/n - mu mu^T accurate when |mean| >> spread.
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self._shift = None
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def update(self, features) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f'expected features [n, {self.dim}], got {x.shape}')
    if not np.all(np.isfinite(x)):
      raise ValueError('non-finite features: check the images (NaN/inf from the sampler?)')
    if x.shape[0] == 0:
      return
    if self._shift is None:
      self._shift = x.mean(0)
    x = x - self._shift
    self.count += x.shape[0]
    self._sum += x.sum(0)
    self._outer += x.T @ x

  @property
  def mean(self) -> np.ndarray:
    return self._shift + self._sum / self.count

  @property
  def cov(self) -> np.ndarray:
    """Unbiased (ddof=1) covariance, as np.cov and the reference FID code use."""
    if self.count < 2:
      raise ValueError(f'need at least 2 samples for a covariance, have {self.count}')
    centered_sum = self._sum / self.count
    return (self._outer - self.count * np.outer(centered_sum, centered_sum)) / (self.count - 1)


@dataclasses.dataclass
class Statistics:
  """Gaussian fit of a feature set, with where it came from."""
  mu: np.ndarray
  sigma: np.ndarray
  provenance: dict[str, Any]

  @property
  def count(self) -> int:
    return int(self.provenance['count'])


def statistics(features_or_stats, **provenance) -> Statistics:
  """`Statistics` from a feature array [n, d] or a `FeatureStats`; provenance fields as kwargs."""
  acc = features_or_stats
  if not isinstance(acc, FeatureStats):
    features = np.asarray(acc)
    acc = FeatureStats(features.shape[1])
    acc.update(features)
  provenance.setdefault('count', acc.count)
  return Statistics(acc.mean, acc.cov, provenance)


def save_statistics(path: str, stats: Statistics) -> None:
  """Writes mu, sigma and provenance (as JSON text) to an .npz; needs every PROVENANCE_FIELD."""
  missing = [f for f in PROVENANCE_FIELDS if f not in stats.provenance]
  if missing:
    raise ValueError(f'statistics provenance lacks {missing}: reference statistics must say '
                     f'what they were computed from ({", ".join(PROVENANCE_FIELDS)})')
  with open(path, 'wb') as f:
    np.savez(f, mu=stats.mu, sigma=stats.sigma,
             provenance=np.array(json.dumps(stats.provenance, sort_keys=True)))


def load_statistics(path: str, allow_missing_provenance: bool = False) -> Statistics:
  """Reads `save_statistics` output. Files without provenance (e.g. the TTUR code's published
  `fid_stats_*.npz`, same `mu`/`sigma` keys) load only with `allow_missing_provenance=True`."""
  with np.load(path, allow_pickle=False) as data:
    if 'provenance' in data.files:
      return Statistics(data['mu'], data['sigma'], json.loads(str(data['provenance'])))
    if not allow_missing_provenance:
      raise ValueError(f'{path} has no provenance: recompute the statistics with '
                       'python -m fmjax.evaluation.reference_stats, or pass '
                       'allow_missing_provenance=True if you know how it was made')
    return Statistics(data['mu'], data['sigma'], {'source': path, 'count': -1})


# ---------------------------------------------------------------------------------------------
# Distance.


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((sym + sym.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr((S_1 S_2)^{1/2}) for symmetric PSD S_1, S_2, via eigenvalues of S_1^{1/2} S_2 S_1^{1/2}."""
  root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
  middle = root1 @ np.asarray(sigma2, np.float64) @ root1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID, eq. 6); real, >= ~0."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'shape mismatch: mu {mu1.shape} vs {mu2.shape}, '
                     f'sigma {sigma1.shape} vs {sigma2.shape}')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid(stats_a: Statistics, stats_b: Statistics, check_provenance: bool = True) -> float:
  """FID between two `Statistics`, refusing mixes of feature extractors, resizes, crops or
  autoencoders (each checked when both statistics record it)."""
  if check_provenance:
    for field in COMPARABLE_FIELDS:
      a, b = stats_a.provenance.get(field), stats_b.provenance.get(field)
      same = _same_network(a, b) if field == 'feature_extractor' else a == b
      if a is not None and b is not None and not same:
        raise ValueError(f'statistics differ in {field}: {a!r} vs {b!r}; FIDs from different '
                         'pipelines are not comparable (recompute the reference statistics)')
  return frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)


# ---------------------------------------------------------------------------------------------
# Features over devices and hosts.


class FeatureExtractor:
  """Jitted features of host-local image batches, gathered to every host as numpy.

  Each process passes its own images (`[n_local, H, W, 3]` uint8 NHWC, n_local <= local batch);
  they are padded to a fixed local batch (one compilation), laid out over the mesh's data axis,
  pushed through `feature_fn`, and the *features* (not the images) of the valid rows of all
  processes are gathered with `process_allgather`, in process order.

  Args:
    params: feature-network parameters; default `inception.load_params()`.
    batch_size: global batch (a multiple of the process count and of the data-axis size).
    mesh: optional `jax.sharding.Mesh`; images are sharded over `data_axis`, params replicated.
    data_axis: mesh axis name (or tuple of names) for the batch.
    feature_fn: `feature_fn(params, images) -> [n, d]`; default `inception.features`.
  """

  def __init__(self, params=None, *, batch_size: int = 200, mesh=None,
               data_axis: str | tuple[str, ...] = 'data',
               feature_fn: Callable[[Any, Any], Any] | None = None):
    nproc = jax.process_count()
    if batch_size % nproc:
      raise ValueError(f'batch_size {batch_size} is not a multiple of the {nproc} processes')
    self.batch_size = batch_size
    self.local_batch = batch_size // nproc
    self.mesh = mesh
    self.feature_fn = feature_fn or inception.features
    if params is None:
      params = inception.load_params()
    self.num_traces = 0

    def run(p, images):
      self.num_traces += 1  # counts compilations (tests check it stays at 1)
      return self.feature_fn(p, images)

    if mesh is None:
      self._sharding = None
      self.params = jax.device_put(params)
      self._fn = jax.jit(run)
    else:
      axis_size = int(np.prod([mesh.shape[a] for a in np.atleast_1d(data_axis)]))
      if batch_size % axis_size:
        raise ValueError(f'batch_size {batch_size} is not a multiple of the data axis size '
                         f'{axis_size}')
      self._sharding = NamedSharding(mesh, P(data_axis))
      replicated = NamedSharding(mesh, P())
      self.params = jax.device_put(params, replicated)
      self._fn = jax.jit(run, in_shardings=(replicated, self._sharding),
                         out_shardings=self._sharding)

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images)
    n = images.shape[0]
    if n > self.local_batch:
      raise ValueError(f'{n} images > local batch {self.local_batch}; split the batch')
    padded = np.zeros((self.local_batch,) + images.shape[1:], images.dtype)
    padded[:n] = images
    valid = np.arange(self.local_batch) < n
    if self._sharding is None:
      features = self._fn(self.params, padded)
    else:
      features = self._fn(self.params,
                          jax.make_array_from_process_local_data(self._sharding, padded))
      valid = jax.make_array_from_process_local_data(self._sharding, valid)
    features, valid = gather_features(features), gather_features(valid)
    return features[valid]


def gather_features(features) -> np.ndarray:
  """All rows of `features` on every host, as numpy.

  A global (multi-host sharded) jax.Array comes back whole; a host-local array is concatenated
  across processes in process order. Single-process: just a copy to host.
  """
  return sharding.concat_across_processes(features)


def compute_statistics(extractor: FeatureExtractor, batches: Iterable, num_samples: int | None,
                       *, image_key: str = 'image', value_range: tuple[float, float] | None = None,
                       rounding: str = 'round', **provenance) -> Statistics:
  """Statistics of the first `num_samples` images of `batches` (gathered over all processes).

  Args:
    extractor: a `FeatureExtractor`.
    batches: iterable of host-local image batches (arrays, or dicts holding `image_key`); uint8
      NHWC, or floats in `value_range` (then quantized with `resize.to_uint8(..., rounding)`).
      With several processes, every process must yield the same number of batches of the same size
      (possibly empty; `reference_stats.source_batches` does this), since each batch is a
      collective gather.
    num_samples: images to use in total (over all processes); 50,000 for reported numbers.
      None: every image the batches hold (e.g. a folder whose unreadable images were left out).
    **provenance: at least `dataset` and `split` for reference statistics; `count`, `resize` and
      `feature_extractor` are filled in.
  """
  acc = None
  limit = float('inf') if num_samples is None else num_samples
  for batch in batches:
    images = batch[image_key] if isinstance(batch, dict) else batch
    if value_range is not None:
      images = resize.to_uint8(images, value_range, rounding)
    # An empty local batch still makes the call: every process must join each gather.
    for start in range(0, max(len(images), 1), extractor.local_batch):
      features = extractor(images[start:start + extractor.local_batch])
      acc = acc or FeatureStats(features.shape[1])
      acc.update(features[:limit - acc.count] if num_samples is not None else features)
      if acc.count >= limit:
        break
    if acc is not None and acc.count >= limit:
      break
  if acc is None or (num_samples is not None and acc.count < num_samples) or acc.count < 2:
    raise ValueError(f'the batches ran out after {0 if acc is None else acc.count} images, '
                     f'{num_samples} requested (use a repeating iterator or fewer samples)')
  provenance.setdefault('resize', resize.RESIZE_MODE)
  if extractor.feature_fn is inception.features:
    provenance.setdefault('feature_extractor', extractor_id())
  return statistics(acc, **provenance)
