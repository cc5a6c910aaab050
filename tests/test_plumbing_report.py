"""The metric-vs-NFE plot's symlog axis: the intended ticks, and tick labels that do not overlap."""

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt   # noqa: E402
import numpy as np   # noqa: E402
import pytest   # noqa: E402

from fmjax.evaluation import report   # noqa: E402


@pytest.mark.parametrize('values, linthresh, ticks', [
    # Smallest magnitude 4e-5 -> linthresh 1e-5; decades -5..0 up, -5..-4 down: 9 > 7, every 2nd.
    ([0.05, 0.01, 0.003, 0.0007, 0.2, 0.02, 0.0012, -4e-5], 1e-5, [-1e-4, 0.0, 1e-4, 1e-2, 1.0]),
    # Decades -3..0 up and -3..-2 down, 7 ticks: all kept.
    ([0.5, -0.002, 0.01], 1e-3, [-1e-2, -1e-3, 0.0, 1e-3, 1e-2, 1e-1, 1.0]),
    # Only non-positive values: 0 and the negative decades.
    ([-0.3, -0.03, 0.0], 1e-2, [-1.0, -1e-1, -1e-2, 0.0]),
    ([0.0, float('nan')], 1.0, [-1.0, 0.0, 1.0]),
])
def test_symlog_ticks_are_decades_outside_the_linear_part_and_zero(values, linthresh, ticks):
  got_linthresh, got = report.symlog_ticks(values)
  assert got_linthresh == pytest.approx(linthresh)
  np.testing.assert_allclose(got, ticks, rtol=1e-12)


def _results(few, ode, floor):
  row = lambda k, v, **kw: {'nfe': k, 'steps': k, 'energy_distance': v, 'sliced_wasserstein': 0.1,
                            'num_samples': 100, 'nonfinite': 0, **kw}
  return {'step': 1,
          'few_step': {str(k): row(k, v) for k, v in few.items()},
          'ode': {str(k): row(k, v, method='heun') for k, v in ode.items()},
          'target_vs_target': {'energy_distance': floor, 'sliced_wasserstein': 0.01}}


@pytest.mark.parametrize('few, ode, floor', [
    ({1: 0.05, 2: 0.01, 4: 0.003, 8: 0.0007}, {2: 0.2, 4: 0.02, 8: 0.0012}, -4e-5),
    ({1: 3.0, 2: 0.4, 4: 1e-6}, {2: 9.0, 4: 2.0}, -2e-7),
    ({1: 0.5, 2: -0.002}, {2: 0.9, 4: 0.3}, 0.0),
])
def test_symlog_tick_labels_do_not_overlap(few, ode, floor):
  """Rendered at the report's size: the drawn y tick labels of the symlog panel are disjoint, and
  adjacent ticks are at least one decade of the symlog scale apart."""
  fig = report.figure(_results(few, ode, floor))
  ax = fig.axes[0]
  assert ax.get_yscale() == 'symlog'
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  low, high = ax.get_ylim()
  boxes = sorted(label.get_window_extent(renderer).bounds[1:4:2]
                 for tick, label in zip(ax.get_yticks(), ax.get_yticklabels())
                 if low <= tick <= high and label.get_text())
  assert len(boxes) >= 3
  for (y0, h0), (y1, _) in zip(boxes, boxes[1:]):
    assert y0 + h0 <= y1, boxes
  transform = ax.yaxis.get_transform()
  # matplotlib's symlog coordinate divided by linthresh: one unit per decade beyond linthresh.
  scaled = np.sort(transform.transform(np.asarray(ax.get_yticks(), float))) / transform.linthresh
  assert np.min(np.diff(scaled)) >= 1.0 - 1e-9   # one decade, or one linear half (>= 1 decade)
  plt.close(fig)


def test_table_rows_scalars_and_strict_json_by_hand():
  results = _results({1: 0.5, 2: float('nan'), 4: 0.01}, {2: 0.2, 8: 0.05}, -0.001)
  results['target'] = 'tilted q, closed form'
  pairs = [(n, fm and fm['steps'], ode and ode['nfe']) for n, fm, ode in report.rows_by_nfe(results)]
  assert pairs == [(1, 1, None), (2, 2, 2), (4, 4, None), (8, None, 8)]
  tags = report.scalars(results)
  assert tags == {'eval/flow_map/energy_distance/nfe_1': 0.5, 'eval/flow_map/energy_distance/nfe_4': 0.01,
                  'eval/ode/energy_distance/nfe_2': 0.2, 'eval/ode/energy_distance/nfe_8': 0.05,
                  **{f'eval/{f}/sliced_wasserstein/nfe_{k}': 0.1
                     for f, ks in (('flow_map', (1, 2, 4)), ('ode', (2, 8))) for k in ks}}
  assert report._strict_json({'a': [1.0, float('inf'), {'b': float('nan')}]}) == {'a': [1.0, None, {'b': None}]}
  table = report.format_table(results)
  assert 'scored against the tilted q, closed form' in table.splitlines()[1]
  assert len([l for l in table.splitlines() if ' |  ' in l]) == 1 + 4
