"""The few-step sweep: flow-map k-step sampling against the ODE on its own velocity, at equal NFE.

Flow-map methods are compared by sample quality against the number of network function
evaluations (NFE): a k-step flow map costs k evaluations (Boffi et al. 2406.07507, Sec. 2),
an ODE solver on the learned velocity b_t = v_{t,t} costs `samplers.ode_nfe(steps, method)`.
This module draws both families from the *same* noise (common random numbers, so differences
between samplers are not sampling noise of x0), and scores them

- on images by FID (Heusel et al. 2017, eq. 6) with the standard Inception network
  (`fmjax.evaluation.fid`), streaming: batches are generated over all devices, quantized to
  uint8 as a PNG would be, grayscale replicated to 3 channels, and only the 2048-d features
  are gathered across processes;
- on toy targets by energy distance and sliced Wasserstein distance to target samples
  (`toy_metrics`) and, where the target has an exact flow map (Gaussian, Gaussian mixture),
  by the RMSE against it: of each sampler's output against X*_{0,1}(x0) for the same x0, and
  of the learned one-jump map X_{s,t} against X*_{s,t} at several (s, t), with x ~ I_s.

`run_sweep` returns a JSON-able results dict; `write_outputs` writes `eval_<step>.json` or
`final_metrics.json`, the plot `fid_vs_nfe.png` (images) or `metric_vs_nfe.png` (toys), and
TensorBoard scalars. `check_fid_ready` fails early (before training) when the Inception weights
or the reference statistics are missing, with the commands that make them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import samplers
from fmjax import sharding
from fmjax.interpolants import expand

# (s, t) pairs at which the learned one-jump map is compared with the exact one; (0, 1) is the
# full noise-to-data jump.
DEFAULT_EXACT_PAIRS = ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.25, 0.75), (0.9, 1.0))
TOY_METRICS = ('energy_distance', 'sliced_wasserstein')


class MissingFIDAssetsError(FileNotFoundError):
  """The Inception weights or the FID reference statistics are missing (commands in the message)."""


# ----------------------------------------------------------------------------- the samplers


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One point of the sweep: a sampler family, its step count and its cost in NFE."""
  family: str          # 'flow_map' | 'ode'
  steps: int
  nfe: int             # network evaluations per sample (doubled under classifier-free guidance)
  method: str = ''     # ODE method ('' for the flow map)

  @property
  def key(self) -> str:
    """The results key: steps for the flow map (= NFE unguided), NFE for the ODE."""
    return str(self.steps if self.family == 'flow_map' else self.nfe)

  @property
  def label(self) -> str:
    if self.family == 'flow_map':
      return f'flow map, {self.steps} step' + ('s' if self.steps > 1 else '')
    return f'ODE {self.method}, {self.nfe} NFE'


def plan(flow_map_steps, ode_method: str, ode_nfe, guided: bool = False) -> list[SamplerSpec]:
  """Sweep points: the flow map at every k, the ODE at every NFE budget it can meet exactly.

  An NFE budget n is run with n // evals_per_step solver steps (Heun and midpoint take 2
  evaluations a step, RK4 4); budgets below one step, or not a multiple of a step, are
  dropped rather than reported under a wrong NFE.
  """
  if ode_method not in samplers.ODE_METHODS:
    raise ValueError(f'eval.ode_method = {ode_method!r}; choose one of {sorted(samplers.ODE_METHODS)}.')
  factor = 2 if guided else 1
  specs = [SamplerSpec('flow_map', int(k), factor * int(k)) for k in flow_map_steps]
  per_step = samplers.ODE_METHODS[ode_method]
  seen = set()
  for n in ode_nfe:
    steps = int(n) // per_step
    if steps < 1 or steps * per_step != int(n) or steps in seen:
      continue
    seen.add(steps)
    specs.append(SamplerSpec('ode', steps, factor * samplers.ode_nfe(steps, ode_method), ode_method))
  return specs


def plan_from_config(config) -> list[SamplerSpec]:
  guided = bool(config.data.num_classes) and config.eval.guidance_scale != 1.0
  return plan(config.eval.steps, config.eval.ode_method, config.eval.ode_nfe, guided)


def _flow_map_k_step(flow_map, params, x0, num_steps, labels, null_label, guidance_scale):
  """The k-step flow map on the uniform grid t_i = i / k (`samplers.flow_map_sample`), with k a
  traced integer: one compilation serves every k."""
  v = samplers.guided(lambda s, t, x, y: flow_map.v(params, s, t, x, y), labels, null_label,
                      guidance_scale)
  k = jnp.asarray(num_steps, jnp.float32)
  batch = (x0.shape[0],)

  def body(i, x):
    s = jnp.full(batch, i / k, jnp.float32)
    t = jnp.full(batch, jnp.where(i + 1 == num_steps, 1.0, (i + 1) / k), jnp.float32)
    return x + expand(t - s, x) * v(s, t, x)

  return jax.lax.fori_loop(0, num_steps, body, x0)


def _ode(flow_map, params, x0, num_steps, labels, null_label, guidance_scale, method):
  """`samplers.ode_sample` on v_{t,t} from 0 to 1 with a traced number of uniform steps."""
  velocity = samplers.guided(lambda t, x, y: flow_map.velocity(params, t, x, y), labels,
                             null_label, guidance_scale)
  h = 1.0 / jnp.asarray(num_steps, jnp.float32)
  batch = (x0.shape[0],)

  def body(i, x):
    s = jnp.full(batch, i * h, jnp.float32)
    t = jnp.full(batch, jnp.where(i + 1 == num_steps, 1.0, (i + 1) * h), jnp.float32)
    return samplers.ode_step(velocity, x, s, t, method)

  return jax.lax.fori_loop(0, num_steps, body, x0)


def make_sample_fns(flow_map, specs, *, null_label=None, guidance_scale: float = 1.0
                    ) -> dict[SamplerSpec, Callable]:
  """{spec: sample(params, x0, labels) -> x}, jitted with the step count traced, so the whole
  sweep compiles once per family (flow map, ODE method) and batch shape, not once per point."""
  fm = jax.jit(functools.partial(_flow_map_k_step, flow_map, null_label=null_label,
                                 guidance_scale=guidance_scale))
  odes = {}
  fns = {}
  for spec in specs:
    if spec.family == 'flow_map':
      fns[spec] = functools.partial(lambda k, p, x0, y: fm(p, x0, k, y), spec.steps)
    else:
      if spec.method not in odes:
        odes[spec.method] = jax.jit(functools.partial(
            _ode, flow_map, null_label=null_label, guidance_scale=guidance_scale,
            method=spec.method))
      fns[spec] = functools.partial(lambda f, n, p, x0, y: f(p, x0, n, y), odes[spec.method],
                                    spec.steps)
  return fns


# ----------------------------------------------------------------------------- toy targets


def _rmse(a, b) -> float:
  """sqrt(E |a - b|^2), the Euclidean error per sample, root-mean-squared over samples."""
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
  the error of not moving at all, a scale to read rmse against.
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
    out[f'{s:g}->{t:g}'] = {'s': float(s), 't': float(t), 'rmse': _rmse(learned, exact),
                            'rmse_identity': _rmse(x, exact)}
  return out


def toy_sweep(sample_fns: dict, params, x0, labels, reference, *, reference_other=None,
              target=None, interpolant=None, flow_map=None, key=None, exact_pairs=None,
              keep_samples: bool = True) -> tuple[dict, dict]:
  """Toy metrics of every sampler. Returns (results, {spec: samples as host arrays}).

  x0 and reference are arrays of the same length (global arrays under a mesh are fine).
  `target` with an exact map (and `interpolant`, `flow_map`, `key`) adds the exact-map errors.
  """
  from fmjax.evaluation import toy_metrics
  exact = target is not None and has_exact_map(target) and interpolant is not None
  exact_x1 = None
  if exact:
    n = x0.shape[0]
    exact_x1 = jax.jit(lambda x: target.flow_map(interpolant, jnp.zeros((n,), jnp.float32),
                                                 jnp.ones((n,), jnp.float32), x))(x0)
  results = {'few_step': {}, 'ode': {}}
  kept = {}
  for spec, fn in sample_fns.items():
    x = fn(params, x0, labels)
    row = {'nfe': spec.nfe, 'steps': spec.steps}
    if spec.method:
      row['method'] = spec.method
    row['energy_distance'] = float(toy_metrics.energy_distance(x, reference))
    row['sliced_wasserstein'] = float(toy_metrics.sliced_wasserstein(x, reference))
    if exact:
      row['rmse_vs_exact'] = _rmse(sharding.gather_to_host(x), sharding.gather_to_host(exact_x1))
    results['few_step' if spec.family == 'flow_map' else 'ode'][spec.key] = row
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


def to_rgb_uint8(images, value_range=(-1.0, 1.0)) -> np.ndarray:
  """Generated images in value_range -> uint8 NHWC RGB, as a PNG would store them.

  Grayscale (1 channel, e.g. MNIST) is replicated to 3 channels, as the reference statistics
  of grayscale sets are (`reference_stats._as_rgb_uint8`). The resize to 299x299 happens inside
  the feature function (`inception.features`).
  """
  from fmjax.evaluation import resize
  x = np.asarray(resize.to_uint8(images, value_range))
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
                provenance: dict | None = None, log: Callable[[str], None] | None = None
                ) -> tuple[dict, dict]:
  """FID of every sampler against `reference` (`fid.Statistics`), streaming over batches.

  Args:
    sample_fns: {SamplerSpec: sample(params, x0, labels)} from `make_sample_fns`.
    noise: a function returning a fresh `noise_batches` iterator (the same noise per sampler).
    feature_fn: host-local uint8 RGB images [n, H, W, 3] -> features of all processes' images
      (a `fid.FeatureExtractor`, whose local batch must hold a process's share of a batch).
    reference: `fid.Statistics` of the training set.
    keep: how many samples of each sampler to return (for sample grids).
    log: called with one line per finished sampler (FID runs can take hours on a CPU).
  Returns (results, {spec: first `keep` samples}).
  """
  from fmjax.evaluation import fid
  results = {'few_step': {}, 'ode': {}}
  kept = {}
  for spec, fn in sample_fns.items():
    acc, grid, started = None, [], time.time()
    for x0, labels, valid in noise():
      x = fn(params, x0, labels)
      local = sharding.host_local_rows(x)
      # Padding rows of the last batch: drop them on the process that holds them.
      start = _process_row_offset(x)
      local = local[:max(0, min(len(local), valid - start))]
      if keep and sum(len(g) for g in grid) < keep:
        grid.append(local[:keep])   # process 0 holds the first rows of every batch
      features = np.asarray(feature_fn(to_rgb_uint8(local, value_range)))
      acc = acc or fid.FeatureStats(features.shape[1])
      acc.update(features)
    stats = fid.statistics(acc, **(provenance or {}))
    row = {'nfe': spec.nfe, 'steps': spec.steps,
           'fid': fid.fid(stats, reference), 'num_samples': acc.count}
    if spec.method:
      row['method'] = spec.method
    results['few_step' if spec.family == 'flow_map' else 'ode'][spec.key] = row
    if keep:
      kept[spec] = np.concatenate(grid)[:keep]
    if log is not None:
      log(f'  {spec.label}: FID {row["fid"]:.4g} ({acc.count} samples, {time.time() - started:.0f} s)')
  results['fid_reference'] = dict(reference.provenance)
  results['fid_num_samples'] = int(num_samples)
  return results, kept


def _process_row_offset(x) -> int:
  """The global index of this process's first row of a batch-sharded array."""
  if getattr(x, 'is_fully_addressable', True):
    return 0
  return min(shard.index[0].start or 0 for shard in x.addressable_shards)


# ----------------------------------------------------------------------------- FID assets


def default_reference_path(dataset: str, split: str) -> str:
  from fmjax.evaluation import inception
  root = os.path.dirname(inception.default_cache_dir())
  return os.path.join(root, 'fid_stats', f'{dataset}_{split}.npz')


def reference_path(config) -> str:
  return config.eval.fid_reference or default_reference_path(config.data.name, config.data.split)


def weights_path(config) -> str:
  from fmjax.evaluation import inception
  return config.eval.inception_weights or os.path.join(inception.default_cache_dir(),
                                                       inception.CHECKPOINT_NAME)


def fid_enabled(config) -> bool:
  """FID applies to pixel datasets with config.eval.fid on (latents would need the decoder)."""
  from fmjax import configs
  return (bool(config.eval.fid) and config.data.name in configs.IMAGE_DATASETS
          and config.data.name != 'imagenet256_latents')


def reference_command(config, out: str | None = None) -> str:
  data_dir = config.data.data_dir or '~/tensorflow_datasets'
  count = (f' --num_samples {config.eval.fid_reference_samples}'
           if config.eval.fid_reference_samples else '')
  return (f'python -m fmjax.evaluation.reference_stats --dataset {config.data.name} '
          f'--split {config.data.split} --data_dir {data_dir}{count} '
          f'--out {out or reference_path(config)}')


def check_fid_ready(config) -> None:
  """Raises MissingFIDAssetsError before any training when FID is on and an input is missing."""
  if not fid_enabled(config):
    return
  missing = []
  weights = weights_path(config)
  if not os.path.exists(weights):
    missing.append(f'the Inception weights ({weights}); make them with\n'
                   f'  python -m fmjax.evaluation.prepare_inception'
                   + (f' --cache_dir {os.path.dirname(weights)}'
                      if config.eval.inception_weights else ''))
  reference = reference_path(config)
  if not os.path.exists(reference):
    missing.append(f'the reference statistics ({reference}); compute them (after the weights) with\n'
                   f'  {reference_command(config, reference)}')
  if missing:
    raise MissingFIDAssetsError(
        f'FID evaluation of {config.data.name} needs ' + '\n and '.join(missing) +
        '\nor pass --config.eval.fid_reference=PATH for statistics made elsewhere, or disable '
        'FID with --config.eval.fid=False.')


def load_reference(config):
  from fmjax.evaluation import fid
  return fid.load_statistics(reference_path(config))


# ----------------------------------------------------------------------------- outputs


def rows_by_nfe(results: dict) -> list[tuple[int, dict | None, dict | None]]:
  """[(nfe, flow-map row or None, ODE row or None)] sorted by NFE, for the side-by-side table."""
  by_nfe: dict[int, list] = {}
  for family, index in (('few_step', 0), ('ode', 1)):
    for row in results.get(family, {}).values():
      by_nfe.setdefault(int(row['nfe']), [None, None])[index] = row
  return [(n, *by_nfe[n]) for n in sorted(by_nfe)]


def metric_names(results: dict) -> list[str]:
  rows = list(results.get('few_step', {}).values()) + list(results.get('ode', {}).values())
  if not rows:
    return []
  return [m for m in ('fid', 'energy_distance', 'sliced_wasserstein', 'rmse_vs_exact') if m in rows[0]]


def format_table(results: dict) -> str:
  """The console table: per NFE, the flow map's and the ODE's metrics side by side."""
  names = metric_names(results)
  title = f"few-step evaluation at step {results['step']}"
  if not names:
    return title + ': samples written to the workdir.'
  method = next((r.get('method') for r in results.get('ode', {}).values()), 'ode')
  short = {'fid': 'FID', 'energy_distance': 'energy', 'sliced_wasserstein': 'SW',
           'rmse_vs_exact': 'RMSE*'}
  lines = [title + (f" (FID on {results.get('fid_num_samples')} samples)" if 'fid' in names else '')]
  head = '  '.join(f'{short[n]:>9}' for n in names)
  lines.append(f"  {'NFE':>4}  {'flow map':<10}  {head}   |  {'ODE ' + method:<12}  {head}")
  blank = '  '.join(f'{"-":>9}' for _ in names)

  def cells(row, width):
    if row is None:
      return f"{'':<{width}}  {blank}"
    steps = f"{row['steps']} step" + ('s' if row['steps'] > 1 else '')
    return f'{steps:<{width}}  ' + '  '.join(f'{row[n]:>9.4g}' for n in names)

  for nfe, fm, ode in rows_by_nfe(results):
    lines.append(f'  {nfe:>4}  {cells(fm, 10)}   |  {cells(ode, 12)}')
  if 'target_vs_target' in results:
    ref = results['target_vs_target']
    lines.append('  floor (two draws of the target): '
                 + ', '.join(f'{short[n]} {ref[n]:.4g}' for n in TOY_METRICS if n in ref))
  if 'flow_map_error' in results:
    lines.append('  one-jump map vs exact X*_{s,t}, x ~ I_s:  '
                 + ', '.join(f"{k}: RMSE {v['rmse']:.4g} (identity {v['rmse_identity']:.3g})"
                             for k, v in results['flow_map_error'].items()))
  if 'rmse_vs_exact' in names:
    lines.append('  RMSE* = sqrt(E ||sample - X*_{0,1}(x0)||^2), the same x0 for every sampler')
  return '\n'.join(lines)


def plot(results: dict, path: str) -> np.ndarray:
  """Metric against NFE (log2 axis), flow map and ODE curves; one panel per metric. HWC uint8."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = metric_names(results)
  fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.4), squeeze=False)
  method = next((r.get('method') for r in results.get('ode', {}).values()), 'ode')
  for ax, name in zip(axes[0], names):
    for family, label, style in (('few_step', 'flow map (k steps)', 'o-'),
                                 ('ode', f'ODE ({method}) on v_tt', 's--')):
      rows = sorted(results.get(family, {}).values(), key=lambda r: r['nfe'])
      if rows:
        ax.plot([r['nfe'] for r in rows], [r[name] for r in rows], style, label=label)
    if name in results.get('target_vs_target', {}):
      ax.axhline(results['target_vs_target'][name], color='gray', lw=0.8, label='target vs target')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('NFE')
    ax.set_ylabel(name)
    if name != 'fid':
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"step {results['step']}", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=100)
  fig.canvas.draw()
  picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return picture


def scalars(results: dict) -> dict[str, float]:
  """TensorBoard scalars: eval/flow_map/<metric>/nfe_<n> and eval/ode/<metric>/nfe_<n>."""
  out = {}
  for family, tag in (('few_step', 'flow_map'), ('ode', 'ode')):
    for row in results.get(family, {}).values():
      for name in metric_names(results):
        out[f"eval/{tag}/{name}/nfe_{row['nfe']}"] = float(row[name])
  for pair, row in results.get('flow_map_error', {}).items():
    out[f'eval/exact_map_rmse/{pair}'] = row['rmse']
  return out


def write_outputs(results: dict, workdir: str, *, final: bool, logger=None) -> dict[str, str]:
  """JSON (final_metrics.json or eval_<step>.json), the NFE plot (latest at the workdir root, and
  plots/<name>_<step>.png), TensorBoard scalars and the plot image. Call on process 0."""
  step = results['step']
  paths = {'json': os.path.join(workdir, 'final_metrics.json' if final else f'eval_{step}.json')}
  os.makedirs(workdir, exist_ok=True)
  with open(paths['json'], 'w') as f:
    json.dump(results, f, indent=2)
  if metric_names(results):
    name = 'fid_vs_nfe' if 'fid' in metric_names(results) else 'metric_vs_nfe'
    paths['plot'] = os.path.join(workdir, f'{name}.png')
    picture = plot(results, paths['plot'])
    os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
    shutil.copyfile(paths['plot'], os.path.join(workdir, 'plots', f'{name}_{step}.png'))
    if logger is not None:
      logger.image(step, f'eval/{name}', picture)
  if logger is not None:
    logger.scalars(step, scalars(results))
  return paths


def markdown_table(results: dict) -> str:
  """The sweep as a Markdown table (one row per NFE, flow map and ODE side by side), for reports:
  python -c "import json,sys; from fmjax.evaluation import sweep; print(sweep.markdown_table(json.load(open(sys.argv[1]))))" WORKDIR/final_metrics.json
  """
  names = metric_names(results)
  method = next((r.get('method') for r in results.get('ode', {}).values()), 'ode')
  short = {'fid': 'FID', 'energy_distance': 'energy dist.', 'sliced_wasserstein': 'sliced W1',
           'rmse_vs_exact': 'RMSE vs exact X_{0,1}'}
  head = ['NFE'] + [f'flow map {short[n]}' for n in names] + [f'ODE ({method}) {short[n]}' for n in names]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for nfe, fm, ode in rows_by_nfe(results):
    cells = [str(nfe)] + [f'{fm[n]:.4g}' if fm else '' for n in names] + [
        f'{ode[n]:.4g}' if ode else '' for n in names]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
