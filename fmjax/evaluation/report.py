"""Reporting the few-step sweep: the console table, the metric-vs-NFE plot, TensorBoard scalars
and the JSON file (`eval_<step>.json` or `final_metrics.json`).

Non-finite values (a sampler without one finite sample scores NaN) are shown as `nan` in the
table, left out of the plot, and written as JSON `null` (strict JSON, readable by any parser).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

METRICS = ('fid', 'precision', 'recall', 'confident_share', 'class_tv', 'energy_distance',
           'sliced_wasserstein', 'rmse_vs_exact')
_LINEAR_AXIS = ('fid', 'precision', 'recall', 'confident_share', 'class_tv')
TOY_METRICS = ('energy_distance', 'sliced_wasserstein')
_SHORT = {'fid': 'FID', 'precision': 'precision', 'recall': 'recall', 'confident_share': 'p>=conf',
          'class_tv': 'class TV', 'energy_distance': 'energy', 'sliced_wasserstein': 'SW',
          'rmse_vs_exact': 'RMSE*'}


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
  return [m for m in METRICS if m in rows[0]]


def _ode_method(results: dict) -> str:
  return next((r.get('method') for r in results.get('ode', {}).values()), 'ode')


def _label(row: dict) -> str:
  if 'method' in row:
    return f"ODE {row['method']}, {row['nfe']} NFE"
  return f"flow map, {row['steps']} step" + ('s' if row['steps'] > 1 else '')


def nonfinite_lines(results: dict) -> list[str]:
  """One line per sampler that produced NaN/inf samples: how many, and what its metrics use."""
  lines = []
  for family in ('few_step', 'ode'):
    for row in results.get(family, {}).values():
      bad = row.get('nonfinite', 0)
      if bad:
        total = bad + row['num_samples']
        lines.append(f'    {_label(row)}: {bad} of {total} samples are non-finite (NaN/inf); '
                     + (f"its metrics use the {row['num_samples']} finite ones."
                        if row['num_samples'] else 'its metrics are NaN.'))
  for pair, row in results.get('flow_map_error', {}).items():
    if row.get('nonfinite', 0):
      lines.append(f"    one-jump map {pair}: {row['nonfinite']} non-finite outputs; its RMSE "
                   + ('is NaN.' if math.isnan(row['rmse']) else 'uses the finite ones.'))
  return lines


def format_table(results: dict) -> str:
  """The console table: per NFE, the flow map's and the ODE's metrics side by side."""
  names = metric_names(results)
  title = f"few-step evaluation at step {results['step']}"
  if not names:
    return title + ': samples written to the workdir.'
  lines = [title + (f" (FID on {results.get('fid_num_samples')} samples)" if 'fid' in names else '')]
  if results.get('target'):
    lines.append(f"  scored against the {results['target']}")
  head = '  '.join(f'{_SHORT[n]:>9}' for n in names)
  lines.append(f"  {'NFE':>4}  {'flow map':<10}  {head}   |  {'ODE ' + _ode_method(results):<12}  {head}")
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
                 + ', '.join(f'{_SHORT[n]} {ref[n]:.4g}' for n in TOY_METRICS if n in ref))
  if 'flow_map_error' in results:
    lines.append('  one-jump map vs exact X*_{s,t}, x ~ I_s:  '
                 + ', '.join(f"{k}: RMSE {v['rmse']:.4g} (identity {v['rmse_identity']:.3g})"
                             for k, v in results['flow_map_error'].items()))
  if 'rmse_vs_exact' in names:
    lines.append('  RMSE* = sqrt(E ||sample - X*_{0,1}(x0)||^2), the same x0 for every sampler')
  bad = nonfinite_lines(results)
  if bad:
    lines += ['  WARNING: non-finite samples (not scored, not plotted):'] + bad
  return '\n'.join(lines)


def symlog_ticks(values, max_ticks: int = 7) -> tuple[float, list[float]]:
  """(linthresh, major ticks) of a symlog axis showing `values` (some <= 0).

  linthresh is the power of ten at or below the smallest nonzero magnitude, so the linear part
  [-linthresh, linthresh] holds only the tick 0 and each half of it takes one decade of height
  (linscale 1). The other ticks are decades +-10^k, k from log10(linthresh) up to the decade at
  or above the largest magnitude of that sign, thinned to every n-th decade (counted from the
  largest) so that at most about `max_ticks` remain. Adjacent ticks are then at least one decade
  of axis height apart, where matplotlib's default symlog ticks put +-10^k inside the linear
  part next to 0 and their labels overlap.
  """
  nonzero = [abs(v) for v in values if v != 0 and math.isfinite(v)]
  if not nonzero:
    return 1.0, [-1.0, 0.0, 1.0]
  low = math.floor(math.log10(min(nonzero)))
  tops = {}
  for sign in (1, -1):
    magnitudes = [abs(v) for v in values if v * sign > 0 and math.isfinite(v)]
    if magnitudes:
      tops[sign] = max(low, math.ceil(math.log10(max(magnitudes))))
  count = 1 + sum(top - low + 1 for top in tops.values())
  stride = max(1, math.ceil(count / max_ticks))
  ticks = [0.0]
  for sign, top in tops.items():
    ticks += [sign * 10.0**k for k in range(low, top + 1) if (top - k) % stride == 0]
  return 10.0**low, sorted(ticks)


def figure(results: dict):
  """The matplotlib figure of `plot`: metric against NFE (log2 axis), one panel per metric.

  Only finite values are drawn. FID is on a linear axis; the distances on a log axis, or a
  symlog one when a value shown is <= 0 (the unbiased energy distance, the target-vs-target
  floor especially, can be negative, and a log axis would silently drop it).
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = metric_names(results)
  fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.4), squeeze=False)
  method = _ode_method(results)
  for ax, name in zip(axes[0], names):
    shown = []
    for family, label, style in (('few_step', 'flow map (k steps)', 'o-'),
                                 ('ode', f'ODE ({method}) on v_tt', 's--')):
      rows = sorted(results.get(family, {}).values(), key=lambda r: r['nfe'])
      points = [(r['nfe'], r[name]) for r in rows if math.isfinite(r[name])]
      if points:
        ax.plot(*zip(*points), style, label=label)
        shown += [y for _, y in points]
    floor = results.get('target_vs_target', {}).get(name)
    if floor is not None and math.isfinite(floor):
      ax.axhline(floor, color='gray', lw=0.8, label='target vs target')
      shown.append(floor)
    ax.set_xscale('log', base=2)
    ax.set_xlabel('NFE')
    ax.set_ylabel(name)
    if name not in _LINEAR_AXIS and shown:
      if min(shown) > 0:
        ax.set_yscale('log')
      else:
        # Linear within the smallest decade shown, logarithmic beyond it; the ticks are chosen
        # here so that their labels cannot overlap (`symlog_ticks`).
        from matplotlib import ticker
        linthresh, ticks = symlog_ticks(shown)
        ax.set_yscale('symlog', linthresh=linthresh, linscale=1.0)
        ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.grid(alpha=0.3)
    if shown:
      ax.legend(fontsize=7)
  fig.suptitle(f"step {results['step']}", fontsize=9)
  fig.tight_layout()
  return fig


def plot(results: dict, path: str) -> np.ndarray:
  """Writes `figure(results)` to path; returns the picture as HWC uint8."""
  import matplotlib.pyplot as plt
  fig = figure(results)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=100)
  fig.canvas.draw()
  picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return picture


def scalars(results: dict) -> dict[str, float]:
  """TensorBoard scalars: eval/flow_map/<metric>/nfe_<n> and eval/ode/<metric>/nfe_<n>.

  Non-finite values are left out (the table and the JSON report them)."""
  out = {}
  for family, tag in (('few_step', 'flow_map'), ('ode', 'ode')):
    for row in results.get(family, {}).values():
      for name in metric_names(results):
        out[f"eval/{tag}/{name}/nfe_{row['nfe']}"] = float(row[name])
  for pair, row in results.get('flow_map_error', {}).items():
    out[f'eval/exact_map_rmse/{pair}'] = row['rmse']
  return {k: v for k, v in out.items() if math.isfinite(v)}


def _strict_json(value):
  """NaN and inf -> None, everywhere in a JSON-able tree (JSON has no NaN)."""
  if isinstance(value, dict):
    return {k: _strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict_json(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_outputs(results: dict, workdir: str, *, final: bool, logger=None) -> dict[str, str]:
  """JSON (final_metrics.json or eval_<step>.json), the NFE plot (latest at the workdir root, and
  plots/<name>_<step>.png), TensorBoard scalars and the plot image. Call on process 0."""
  step = results['step']
  paths = {'json': os.path.join(workdir, 'final_metrics.json' if final else f'eval_{step}.json')}
  os.makedirs(workdir, exist_ok=True)
  with open(paths['json'], 'w') as f:
    json.dump(_strict_json(results), f, indent=2, allow_nan=False)
  names = metric_names(results)
  if names:
    name = 'fid_vs_nfe' if 'fid' in names else 'metric_vs_nfe'
    paths['plot'] = os.path.join(workdir, f'{name}.png')
    picture = plot(results, paths['plot'])
    os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
    shutil.copyfile(paths['plot'], os.path.join(workdir, 'plots', f'{name}_{step}.png'))
    if logger is not None:
      logger.image(step, f'eval/{name}', picture)
  if logger is not None:
    logger.scalars(step, scalars(results))
  return paths
