"""Running the few-step sweep: every planned sampler (`sweep_samplers.py`) on the same noise, scored.

All samplers draw from the *same* noise (common random numbers, so differences between
samplers are not sampling noise of x0), and are scored

- on images by FID (Heusel et al. 2017, eq. 6) with the standard Inception network
  (`fmjax.evaluation.fid`), streaming: batches are generated over all devices, quantized to
  uint8 as a PNG would be, grayscale replicated to 3 channels, and only the 2048-d features
  are gathered across processes;
- on toy targets by energy distance and sliced Wasserstein distance to target samples
  (`toy_metrics`) and, where the target has an exact flow map (Gaussian, Gaussian mixture),
  by the RMSE against it: of each sampler's output against X*_{0,1}(x0) for the same x0, and
  of the learned one-jump map X_{s,t} against X*_{s,t} at several (s, t), with x ~ I_s.

Samples with a NaN or inf entry are not scored: every row says how many there were
(`nonfinite`) and how many samples its metrics use (`num_samples`); a sampler without one
finite sample scores NaN. `report.py` turns the results into tables, plots and JSON.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import logging_utils
from fmjax import sharding
from fmjax.evaluation import fid
from fmjax.evaluation import resize
from fmjax.evaluation import toy_metrics

# (s, t) pairs at which the learned one-jump map is compared with the exact one; (0, 1) is the
# full noise-to-data jump.
DEFAULT_EXACT_PAIRS = ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.25, 0.75), (0.9, 1.0))


def finite_rows(x) -> np.ndarray:
  """Host bool mask [n]: rows of x (any shape [n, ...]) without NaN or inf, on every process."""
  return np.asarray(sharding.gather_to_host(_finite_rows(x)))


@jax.jit
def _finite_rows(x):
  return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def _family(spec) -> str:
  return 'few_step' if spec.family == 'flow_map' else 'ode'


def _row(spec, **metrics) -> dict:
  row = {'nfe': spec.nfe, 'steps': spec.steps}
  if spec.method:
    row['method'] = spec.method
  row.update(metrics)
  return row


# ----------------------------------------------------------------------------- toy targets


def _rmse(a, b) -> float:
  """sqrt(E |a - b|^2), the Euclidean error per sample, root-mean-squared over samples."""
  if not len(a):
    return float('nan')
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))


def has_exact_map(target) -> bool:
  return hasattr(target, 'flow_map') and hasattr(target, 'velocity')


def flow_map_error(flow_map, params, target, interpolant, key, n: int,
                   pairs=DEFAULT_EXACT_PAIRS) -> dict[str, dict]:
  """RMSE of the learned X_{s,t} against the target's exact map, x ~ I_s (the path's marginal).

  For each (s, t): x0 ~ N(0, I), x1 ~ target, x = I_s = alpha_s x0 + beta_s x1, and
  rmse = sqrt(E |X_{s,t}(x) - X*_{s,t}(x)|^2); `rmse_identity` = sqrt(E |x - X*_{s,t}(x)|^2) is
  the error of not moving at all, a scale to read rmse against. rmse uses the rows where the
  learned map is finite (`nonfinite` counts the others; NaN if there are none).
  """
  k0, k1 = jax.random.split(key)
  x0 = jax.random.normal(k0, (n, target.dim))
  x1 = target.sample(k1, n)

  @jax.jit   # one compilation for all pairs: the times are traced
  def compare(params, s, t):
    s_b, t_b = jnp.full((n,), s, jnp.float32), jnp.full((n,), t, jnp.float32)
    x = interpolant.sample(s_b, x0, x1)
    return x, target.flow_map(interpolant, s_b, t_b, x), flow_map.X(params, s_b, t_b, x, None)

  out = {}
  for s, t in pairs:
    x, exact, learned = jax.device_get(compare(params, s, t))
    finite = np.all(np.isfinite(learned.reshape(n, -1)), axis=1)
    out[f'{s:g}->{t:g}'] = {'s': float(s), 't': float(t),
                            'rmse': _rmse(learned[finite], exact[finite]),
                            'rmse_identity': _rmse(x, exact),
                            'nonfinite': int(n - finite.sum())}
  return out


def _toy_metrics(x, reference, exact_x1) -> dict[str, float]:
  """Distances of the samples x to the target, and the RMSE against the exact jump when given.

  The sliced Wasserstein distance needs equal counts: with fewer samples than target rows (the
  finite rows of a sampler) it uses the first len(x) target rows."""
  same = reference if x.shape[0] == reference.shape[0] else reference[:x.shape[0]]
  out = {'energy_distance': float(toy_metrics.energy_distance(x, reference)),
         'sliced_wasserstein': float(toy_metrics.sliced_wasserstein(x, same))}
  if exact_x1 is not None:
    out['rmse_vs_exact'] = _rmse(sharding.gather_to_host(x), sharding.gather_to_host(exact_x1))
  return out


def toy_sweep(sample_fns: dict, params, x0, labels, reference, *, reference_other=None,
              target=None, interpolant=None, flow_map=None, key=None, exact_pairs=None,
              keep_samples: bool = True) -> tuple[dict, dict]:
  """Toy metrics of every sampler. Returns (results, {spec: samples}).

  x0 and reference are arrays of the same length (global arrays under a mesh are fine).
  `target` with an exact map (and `interpolant`, `flow_map`, `key`) adds the exact-map errors.
  A sampler with non-finite rows is scored on its finite rows (`_toy_metrics`).
  """
  exact = target is not None and has_exact_map(target) and interpolant is not None
  exact_x1 = None
  if exact:
    n = x0.shape[0]
    exact_x1 = jax.jit(lambda x: target.flow_map(interpolant, jnp.zeros((n,), jnp.float32),
                                                 jnp.ones((n,), jnp.float32), x))(x0)
  results = {'few_step': {}, 'ode': {}}
  kept = {}
  names = ('energy_distance', 'sliced_wasserstein') + (('rmse_vs_exact',) if exact else ())
  for spec, fn in sample_fns.items():
    x = fn(params, x0, labels)
    finite = finite_rows(x)      # a collective: every process computes the same metrics below
    count = int(finite.sum())
    if count == len(finite):
      metrics = _toy_metrics(x, reference, exact_x1)
    elif count:
      host = sharding.gather_to_host
      metrics = _toy_metrics(host(x)[finite], host(reference),
                             None if exact_x1 is None else host(exact_x1)[finite])
    else:
      metrics = {name: float('nan') for name in names}
    results[_family(spec)][spec.key] = _row(spec, **metrics, num_samples=count,
                                            nonfinite=len(finite) - count)
    if keep_samples:
      kept[spec] = x
  if reference_other is not None:
    # The floor: two independent draws of the target (what a perfect sampler would score).
    results['target_vs_target'] = {
        'energy_distance': float(toy_metrics.energy_distance(reference_other, reference)),
        'sliced_wasserstein': float(toy_metrics.sliced_wasserstein(reference_other, reference))}
  if exact and flow_map is not None:
    results['flow_map_error'] = flow_map_error(
        flow_map, params, target, interpolant,
        jax.random.PRNGKey(0) if key is None else key, int(x0.shape[0]),
        DEFAULT_EXACT_PAIRS if exact_pairs is None else exact_pairs)
  return results, kept


# ----------------------------------------------------------------------------- images (FID)


def to_rgb_uint8(images, value_range=(-1.0, 1.0), rounding: str = 'round') -> np.ndarray:
  """Generated images in value_range -> uint8 NHWC RGB, quantized by `resize.to_uint8`.

  Grayscale (1 channel, e.g. MNIST) is replicated to 3 channels, as the reference statistics
  of grayscale sets are (`reference_stats._as_rgb_uint8`). The resize to 299x299 happens inside
  the feature function (`inception.features`).
  """
  x = np.asarray(resize.to_uint8(images, value_range, rounding))
  if x.ndim == 3:
    x = x[..., None]
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f'FID needs RGB or grayscale images, got {x.shape[-1]} channels '
                     '(latents must be decoded first).')
  return x


def noise_batches(key, shape, num_samples: int, batch_size: int, *, num_classes: int = 0,
                  sharding=None) -> Iterator[tuple[Any, Any, int]]:
  """(x0, labels, valid) global batches: x0 ~ N(0, I) from fold_in(key, i), balanced labels.

  Every batch has `batch_size` rows (one compilation); the last one's rows past `valid` are
  padding and are dropped. The stream depends on (key, batch_size) only, so every sampler
  sees the same noise.
  """
  make_x0 = jax.jit(lambda k: jax.random.normal(k, (batch_size,) + tuple(shape)),
                    out_shardings=sharding)
  make_labels = jax.jit(lambda i: ((jnp.arange(batch_size, dtype=jnp.int32) + i * batch_size)
                                   % max(num_classes, 1)), out_shardings=sharding)
  for i, start in enumerate(range(0, num_samples, batch_size)):
    labels = make_labels(i) if num_classes else None
    yield make_x0(jax.random.fold_in(key, i)), labels, min(batch_size, num_samples - start)


def image_sweep(sample_fns: dict, params, noise: Callable[[], Iterator], feature_fn: Callable,
                reference, num_samples: int, *, value_range=(-1.0, 1.0), keep: int = 0,
                provenance: dict | None = None, log: Callable[[str], None] | None = None,
                reference_features: np.ndarray | None = None,
                precision_recall_samples: int = 0, class_probs: Callable | None = None,
                confidence: float = 0.9, progress: Callable[[str], None] | None = None,
                progress_every: float = 30.0,
                image_sink: Callable[[Any, np.ndarray, np.ndarray | None], None] | None = None
                ) -> tuple[dict, dict]:
  """FID of every sampler against `reference` (`fid.Statistics`), streaming over batches.

  Args:
    sample_fns: {SamplerSpec: sample(params, x0, labels)} from `sweep_samplers.make_sample_fns` (for a
      latent model: followed by the decoder, so they return images).
    noise: a function returning a fresh `noise_batches` iterator (the same noise per sampler).
    feature_fn: host-local uint8 RGB images [n, H, W, 3] -> features of all processes' images
      (a `fid.FeatureExtractor`, whose local batch must hold a process's share of a batch).
    reference: `fid.Statistics` of the training set.
    keep: how many samples of each sampler to return (for sample grids).
    log: called with one line per finished sampler (FID runs can take hours on a CPU).
    reference_features, precision_recall_samples: with the features of reference images (an
      ADM reference batch), each row also gets the improved precision and recall (Kynkaanniemi
      et al. 2019, k = 3, as the ADM evaluator) of its first `precision_recall_samples` finite
      samples' features.
    class_probs, confidence: for class-conditional samples, a classifier (host-local images ->
      class probabilities [n, C]); each row then also gets `confident_share`, the share of
      samples classified with probability >= `confidence` as their requested label, and
      `class_tv`, the total-variation distance between the histogram of the classifier's
      predicted classes and that of the requested labels (both over the finite samples).
    progress, progress_every: called on the main process only, at most every `progress_every`
      seconds and after a sampler's last batch, with a line saying how many samples of the
      sampler are done and at how many images per second (a long FID run shows it is alive).
    image_sink: called per batch with (spec, the host-local finite samples as the uint8 RGB
      images the feature function would see, their requested labels or None); with
      `feature_fn=None` it is the only consumer (deferred FID: `reference_batches` computes
      the features later) and the rows carry no 'fid'.
  Returns (results, {spec: first `keep` samples}). Non-finite images get no features: FID is of
  the finite ones (`num_samples` of them), NaN with fewer than two.
  """
  from fmjax.evaluation import precision_recall   # pylint: disable=import-outside-toplevel
  with_pr = feature_fn is not None and reference_features is not None and precision_recall_samples > 0
  results = {'few_step': {}, 'ode': {}}
  kept = {}
  for spec, fn in sample_fns.items():
    acc, count, grid, started, kept_features = None, 0, [], time.time(), []
    judged = {'confident': 0, 'predicted': None, 'requested': None}
    done, last_line = 0, started
    for x0, labels, valid in noise():
      x = fn(params, x0, labels)
      local = sharding.host_local_rows(x)
      # Padding rows of the last batch: drop them on the process that holds them.
      start = _process_row_offset(x)
      local = local[:max(0, min(len(local), valid - start))]
      if keep and sum(len(g) for g in grid) < keep:
        grid.append(local[:keep])   # process 0 holds the first rows of every batch
      finite = np.all(np.isfinite(local.reshape(len(local), -1)), axis=1)
      images = to_rgb_uint8(local[finite], value_range)
      requested = (None if labels is None
                   else np.asarray(sharding.host_local_rows(labels))[:len(local)][finite])
      if image_sink is not None:
        image_sink(spec, images, requested)
      if feature_fn is None:
        count += len(images)   # this process's rows; summed over processes after the loop
      else:
        features = np.asarray(feature_fn(images))
        acc = acc or fid.FeatureStats(features.shape[1])
        acc.update(features)
        count = acc.count
      if with_pr and sum(len(f) for f in kept_features) < precision_recall_samples:
        kept_features.append(features)
      if class_probs is not None and requested is not None:
        count_classes(judged, np.asarray(class_probs(local[finite])), requested, confidence)
      done += valid
      now = time.time()
      if (progress is not None and logging_utils.is_main_process()
          and (now - last_line >= progress_every or done >= num_samples)):
        last_line = now
        progress(progress_line(spec.label, done, int(num_samples), now - started))
    if feature_fn is None:
      count = int(sharding.concat_across_processes(np.array([count])).sum())
      row = _row(spec, num_samples=count, nonfinite=int(num_samples) - count)
    else:
      score = (fid.fid(fid.statistics(acc, **(provenance or {})), reference)
               if acc is not None and acc.count >= 2 else float('nan'))
      row = _row(spec, fid=score, num_samples=count, nonfinite=int(num_samples) - count)
    if with_pr:
      sample_features = np.concatenate(kept_features)[:precision_recall_samples]
      pr = (precision_recall.precision_recall(reference_features, sample_features)
            if len(sample_features) > precision_recall.DEFAULT_K else
            {'precision': float('nan'), 'recall': float('nan')})
      row.update(precision=float(pr['precision']), recall=float(pr['recall']),
                 precision_recall_samples=int(len(sample_features)))
    if judged['predicted'] is not None:
      row.update(class_metrics(judged))
    results[_family(spec)][spec.key] = row
    if keep:
      kept[spec] = np.concatenate(grid)[:keep]
    if log is not None:
      log(f'  {spec.label}: ' + (f'FID {row["fid"]:.4g} ' if 'fid' in row else 'images kept, FID deferred ')
          + f'({count} samples'
          + (f', {row["nonfinite"]} non-finite left out' if row['nonfinite'] else '')
          + (f', precision {row["precision"]:.3f}, recall {row["recall"]:.3f}' if with_pr else '')
          + (f', {100 * row["confident_share"]:.1f} % confidently the requested class, class TV '
             f'{row["class_tv"]:.3f}' if 'class_tv' in row else '')
          + f', {time.time() - started:.0f} s)')
  if reference is not None:
    results['fid_reference'] = dict(reference.provenance)
  results['fid_num_samples'] = int(num_samples)
  return results, kept


def progress_line(label: str, done: int, total: int, seconds: float) -> str:
  """'  <sampler>: <done>/<total> samples (<pct> %), <rate> images/s'."""
  rate = done / seconds if seconds > 0 else float('inf')
  return f'  {label}: {done}/{total} samples ({100.0 * done / max(total, 1):.0f} %), {rate:.1f} images/s'


def count_classes(judged: dict, probs: np.ndarray, requested: np.ndarray, confidence: float) -> None:
  """Adds one host-local batch's counts: confidently-right samples, predicted and requested
  class histograms."""
  num_classes = probs.shape[1]
  predicted = probs.argmax(axis=1)
  right = probs[np.arange(len(probs)), np.clip(requested, 0, num_classes - 1)] >= confidence
  judged['confident'] += int(np.sum(right & (requested < num_classes)))
  for name, classes in (('predicted', predicted), ('requested', requested)):
    counts = np.bincount(np.clip(classes, 0, num_classes), minlength=num_classes + 1)[:num_classes]
    judged[name] = counts if judged[name] is None else judged[name] + counts


def class_metrics(judged: dict) -> dict:
  """Totals over processes -> confident_share and class_tv (0.5 sum |p_pred - p_requested|)."""
  confident = int(sharding.concat_across_processes(np.array([judged['confident']])).sum())
  predicted = sharding.concat_across_processes(judged['predicted'][None]).sum(0)
  requested = sharding.concat_across_processes(judged['requested'][None]).sum(0)
  total = max(int(requested.sum()), 1)
  return {'confident_share': confident / total,
          'class_tv': float(0.5 * np.abs(predicted / total - requested / total).sum())}


def _process_row_offset(x) -> int:
  """The global index of this process's first row of a batch-sharded array."""
  if getattr(x, 'is_fully_addressable', True):
    return 0
  return min(shard.index[0].start or 0 for shard in x.addressable_shards)
