"""The few-step sweep (fmjax.evaluation: plan, sweep, report, assets, evaluator): flow map vs ODE
at equal NFE on a toy model and on a tiny image set (with an injected feature function instead of
the 299x299 Inception network), exact-map errors that vanish on the exact map and equal the
perturbation otherwise, samplers that return NaN rows, the plot's axis when the energy distance
is negative, and the missing-weights / missing-statistics error raised before training."""

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import configs, flow_maps, interpolants, logging_utils, samplers, train
from fmjax.data import toy
from fmjax.evaluation import assets, evaluator, fid, report, resize, sweep, sweep_samplers


def _tiny_toy_config():
  c = configs.base_config()
  c.data.name = 'gmm'
  c.data.means = ((-2.0, 0.0), (2.0, 1.0), (0.0, -2.0))
  c.data.stds = (0.3, 0.3, 0.3)
  c.data.weights = (1.0, 1.0, 1.0)
  c.model.hidden, c.model.depth, c.model.time_dim = 16, 2, 8
  c.eval.num_samples = 128
  c.eval.steps = (1, 2)
  c.eval.ode_nfe = (1, 2, 4)
  c.eval.exact_pairs = ((0.0, 1.0), (0.5, 1.0))
  return c


def _evaluator(setup, flow_map=None, **kwargs):
  return evaluator.Evaluator(setup.config, setup.workdir, setup.mesh, setup.source,
                             setup.interpolant, flow_map or setup.flow_map, **kwargs)


def test_plan_reports_nfe_per_method():
  heun = sweep_samplers.specs((1, 2, 4), 'heun', (1, 2, 3, 4, 8))
  assert [(s.family, s.steps, s.nfe, s.key) for s in heun] == [
      ('flow_map', 1, 1, '1'), ('flow_map', 2, 2, '2'), ('flow_map', 4, 4, '4'),
      ('ode', 1, 2, '2'), ('ode', 2, 4, '4'), ('ode', 4, 8, '8')]   # 1 and 3 NFE: no Heun run
  assert all(s.nfe == samplers.ode_nfe(s.steps, 'heun') for s in heun if s.family == 'ode')
  guided = sweep_samplers.specs((1,), 'euler', (2,), guided=True)
  assert [s.nfe for s in guided] == [2, 4]    # classifier-free guidance doubles every NFE
  with pytest.raises(ValueError, match='ode_method'):
    sweep_samplers.specs((1,), 'leapfrog', (2,))


def test_toy_sweep_end_to_end_writes_json_plot_and_table(tmp_path):
  config = _tiny_toy_config()
  setup = train.Setup(config, str(tmp_path))
  state = setup.init_state()
  logger = logging_utils.MetricsLogger(str(tmp_path), 0, 0, jsonl=False)
  with jax.set_mesh(setup.mesh):
    results = _evaluator(setup)(state, 5, logger, final=False)
  logger.close()
  saved = json.loads((tmp_path / 'eval_5.json').read_text())
  assert saved == json.loads(json.dumps(results))
  assert set(saved['few_step']) == {'1', '2'} and set(saved['ode']) == {'1', '2', '4'}
  assert [saved['ode'][k]['nfe'] for k in ('1', '2', '4')] == [1, 2, 4]
  assert set(saved['flow_map_error']) == {'0->1', '0.5->1'}
  assert os.path.getsize(tmp_path / 'metric_vs_nfe.png') > 1000
  assert os.path.exists(tmp_path / 'plots' / 'metric_vs_nfe_5.png')
  # An untrained network (zero output layer) does not move x0: every sampler returns the noise,
  # so all metrics agree across samplers and RMSE* is the distance of x0 to the exact X_{0,1}(x0).
  rows = list(saved['few_step'].values()) + list(saved['ode'].values())
  for name in ('energy_distance', 'sliced_wasserstein', 'rmse_vs_exact'):
    np.testing.assert_allclose([r[name] for r in rows], rows[0][name], rtol=1e-5)
  error = saved['flow_map_error']['0->1']
  np.testing.assert_allclose(error['rmse'], error['rmse_identity'], rtol=1e-5)
  assert rows[0]['energy_distance'] > 10 * abs(saved['target_vs_target']['energy_distance'])
  table = report.format_table(results)
  assert 'flow map' in table and 'ODE euler' in table
  assert len([l for l in table.splitlines() if ' |  ' in l]) == 1 + 3   # header + NFE 1, 2, 4


def _gmm():
  return toy.make_target('gmm', means=np.array([[-2.0, 0.0], [2.0, 1.0]]),
                         stds=np.array([0.4, 0.3]), weights=np.array([1.0, 2.0]))


@pytest.mark.parametrize('target', [_gmm(), toy.make_target('gaussian', mean=np.array([1.0, -0.5]),
                                                             std=np.array([0.5, 2.0]))],
                         ids=['gmm', 'gaussian'])
def test_exact_map_scores_zero_and_a_perturbed_map_scores_the_perturbation(target):
  interp = interpolants.get('linear')
  key, n = jax.random.PRNGKey(1), 256
  pairs = ((0.0, 1.0), (0.25, 0.75))
  exact = sweep.flow_map_error(toy.ExactFlowMap(target, interp), None, target, interp, key, n, pairs)
  for row in exact.values():
    assert row['rmse'] < 1e-5 and row['rmse_identity'] > 0.3
  eps = 0.1
  bumped = sweep.flow_map_error(toy.ExactFlowMap(target, interp, perturbation=eps), None, target,
                                interp, key, n, pairs)
  # The perturbation adds eps (t - s) sin(x + s + 2t): its RMSE, on the same x ~ I_s, by hand.
  k0, k1 = jax.random.split(key)
  x0, x1 = jax.random.normal(k0, (n, 2)), target.sample(k1, n)
  for s, t in pairs:
    x = np.asarray(interp.sample(jnp.full((n,), s), x0, x1), np.float64)
    expected = np.sqrt(np.mean(np.sum((eps * (t - s) * np.sin(x + s + 2 * t)) ** 2, axis=1)))
    np.testing.assert_allclose(bumped[f'{s:g}->{t:g}']['rmse'], expected, rtol=1e-3)
    assert bumped[f'{s:g}->{t:g}']['rmse'] > 0.01


def test_exact_map_samplers_against_the_exact_jump():
  target, interp = _gmm(), interpolants.get('linear')
  flow_map = toy.ExactFlowMap(target, interp)
  specs = sweep_samplers.specs((1, 2), 'euler', (1, 4, 32))
  fns = sweep_samplers.make_sample_fns(flow_map, specs)
  n = 512
  x0 = jax.random.normal(jax.random.PRNGKey(2), (n, 2))
  reference = target.sample(jax.random.PRNGKey(3), n)
  other = target.sample(jax.random.PRNGKey(4), n)
  results, _ = sweep.toy_sweep(fns, None, x0, None, reference, reference_other=other, target=target,
                               interpolant=interp, flow_map=flow_map, exact_pairs=((0.0, 1.0),))
  # Composing exact jumps is the exact jump; the ODE's Euler error shrinks with NFE.
  for k in ('1', '2'):
    assert results['few_step'][k]['rmse_vs_exact'] < 1e-3
  ode = [results['ode'][k]['rmse_vs_exact'] for k in ('1', '4', '32')]
  assert ode[0] > ode[1] > ode[2] > 1e-3
  # Exact samples are as close to the target as a second draw of it.
  floor = results['target_vs_target']['energy_distance']
  assert abs(results['few_step']['1']['energy_distance'] - floor) < 0.02
  assert results['ode']['1']['energy_distance'] > 0.1


@dataclasses.dataclass(frozen=True)
class _NaNOnFirstStep:
  """A flow map that returns NaN on the rows with x[:, 0] > threshold when it starts at time 0.

  Every sampler's first step starts at 0 from x0 (the flow map's jump and the Euler step alike),
  so every sampler loses exactly the rows with x0[:, 0] > threshold."""
  inner: Any
  threshold: float

  def _poison(self, s, x, out):
    bad = (s == 0.0) & (x[:, 0] > self.threshold)
    return jnp.where(interpolants.expand(bad, out), jnp.nan, out)

  def v(self, params, s, t, x, labels=None):
    return self._poison(s, x, self.inner.v(params, s, t, x, labels))

  def X(self, params, s, t, x, labels=None):
    return self._poison(s, x, self.inner.X(params, s, t, x, labels))

  def velocity(self, params, t, x, labels=None):
    return self._poison(t, x, self.inner.velocity(params, t, x, labels))


def test_nonfinite_samples_are_counted_scored_on_the_finite_rows_and_plotted(tmp_path):
  from fmjax.evaluation import toy_metrics
  config = _tiny_toy_config()
  setup = train.Setup(config, str(tmp_path))
  logger = logging_utils.MetricsLogger(str(tmp_path), 0, 0, jsonl=False)
  with jax.set_mesh(setup.mesh):
    results = _evaluator(setup, _NaNOnFirstStep(setup.flow_map, 1.0))(
        setup.init_state(), 3, logger, final=False)
  logger.close()
  # The sweep's noise and target draws, by hand; the untrained network returns x0 unchanged.
  n = config.eval.num_samples - config.eval.num_samples % jax.device_count()
  x0 = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1),
                                    (n, 2)))
  reference = np.asarray(setup.source.reference_samples(jax.random.PRNGKey(0xBEEF), n))
  good = x0[:, 0] <= 1.0
  count = int(good.sum())
  assert 0 < count < n
  exact = np.asarray(setup.source.target.flow_map(setup.interpolant, jnp.zeros(n), jnp.ones(n), x0))
  want = {'energy_distance': float(toy_metrics.energy_distance(x0[good], reference)),
          'sliced_wasserstein': float(toy_metrics.sliced_wasserstein(x0[good], reference[:count])),
          'rmse_vs_exact': float(np.sqrt(np.mean(np.sum((x0[good] - exact[good]) ** 2, 1))))}
  rows = list(results['few_step'].values()) + list(results['ode'].values())
  assert len(rows) == 5
  for row in rows:
    assert row['nonfinite'] == n - count and row['num_samples'] == count
    for name, value in want.items():
      np.testing.assert_allclose(row[name], value, rtol=1e-4)
  # The one-jump error at s = 0 loses the same rows; at s = 0.5 nothing is poisoned.
  assert results['flow_map_error']['0->1']['nonfinite'] == n - count
  assert results['flow_map_error']['0.5->1']['nonfinite'] == 0
  assert math.isfinite(results['flow_map_error']['0->1']['rmse'])
  assert 'one-jump map 0->1: ' in report.format_table(results)
  saved = json.loads((tmp_path / 'eval_3.json').read_text())
  assert saved['few_step']['2']['nonfinite'] == n - count
  assert os.path.getsize(tmp_path / 'metric_vs_nfe.png') > 1000
  assert os.path.getsize(tmp_path / 'samples' / 'step_3.png') > 1000
  table = report.format_table(results)
  assert f'flow map, 2 steps: {n - count} of {n} samples are non-finite' in table
  assert f'its metrics use the {count} finite ones' in table


def _results(floor, nan_row=True):
  """Sweep results by hand: 100 samples a row; flow map 2 steps all NaN when nan_row."""
  def row(k, energy, sw, nonfinite=0):
    return {'nfe': k, 'steps': k, 'energy_distance': energy, 'sliced_wasserstein': sw,
            'num_samples': 100 - nonfinite, 'nonfinite': nonfinite}

  ode = lambda k, energy, sw: dict(row(k, energy, sw), method='euler')
  nan = float('nan')
  return {'step': 7,
          'few_step': {'1': row(1, 0.5, 0.3),
                       '2': row(2, nan, nan, 100) if nan_row else row(2, 0.1, 0.1),
                       '4': row(4, 0.01, 0.05)},
          'ode': {'1': ode(1, 0.9, 0.6), '4': ode(4, 0.2, 0.2)},
          'target_vs_target': {'energy_distance': floor, 'sliced_wasserstein': 0.02}}


def test_plot_keeps_a_negative_floor_and_leaves_out_nan():
  import matplotlib.pyplot as plt
  fig = report.figure(_results(-0.002))
  energy, sw = fig.axes
  assert energy.get_yscale() == 'symlog' and sw.get_yscale() == 'log'
  floors = [l for l in energy.get_lines() if l.get_label() == 'target vs target']
  assert len(floors) == 1 and list(floors[0].get_ydata()) == [-0.002, -0.002]
  assert energy.get_ylim()[0] <= -0.002 < energy.get_ylim()[1]
  flow_map = next(l for l in energy.get_lines() if l.get_label().startswith('flow map'))
  assert list(flow_map.get_xdata()) == [1, 4] and list(flow_map.get_ydata()) == [0.5, 0.01]
  plt.close(fig)
  fig = report.figure(_results(0.002, nan_row=False))   # every value positive: a log axis
  assert fig.axes[0].get_yscale() == 'log'
  assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2, 4]
  plt.close(fig)


def test_outputs_of_a_sampler_without_finite_samples(tmp_path):
  results = _results(0.001)
  paths = report.write_outputs(results, str(tmp_path), final=True)
  text = open(paths['json']).read()
  assert 'NaN' not in text                        # strict JSON: NaN is written as null
  saved = json.loads(text)
  assert saved['few_step']['2']['energy_distance'] is None
  assert saved['few_step']['1'] == results['few_step']['1']
  assert os.path.getsize(paths['plot']) > 1000
  table = report.format_table(results)
  assert 'flow map, 2 steps: 100 of 100 samples are non-finite (NaN/inf); its metrics are NaN.' in table
  assert report.nonfinite_lines(_results(0.001, nan_row=False)) == []
  tags = report.scalars(results)
  assert tags['eval/flow_map/energy_distance/nfe_4'] == 0.01 and len(tags) == 8   # NaN left out


def test_the_sweep_compiles_once_per_family_for_every_step_count():
  from fmjax import from_config
  traces = []
  config = _tiny_toy_config()
  init, apply = from_config.build_network(config, (2,), 0)

  def counted(*args, **kwargs):
    traces.append(1)
    return apply(*args, **kwargs)

  flow_map = flow_maps.make('displacement', counted, interpolants.get('linear'))
  params = init(jax.random.PRNGKey(0))
  fns = sweep_samplers.make_sample_fns(flow_map, sweep_samplers.specs((1, 2, 4, 8), 'euler', (1, 2, 4, 8)))
  x0 = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
  for fn in fns.values():
    fn(params, x0, None)
  assert len(fns) == 8 and len(traces) == 2     # one trace of the loop body per family


# ----------------------------------------------------------------------------- images


def _fake_features(params, images):
  """A cheap stand-in for Inception: a fixed projection of the uint8 pixels to 8 features."""
  x = jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1) / 255.0
  return x @ params['w']


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  from fmjax.data import mnist5k
  path = tmp_path_factory.mktemp('tfds')
  mnist5k.build(str(path))
  return str(path)


def _image_config(data_dir, tmp_path):
  c = configs.base_config()
  c.data.name = 'mnist5k'
  c.data.data_dir = data_dir
  c.data.num_classes = 10
  c.model.hidden, c.model.depth, c.model.time_dim = 16, 2, 8
  c.train.batch_size = 8
  c.eval.steps = (1, 2)
  c.eval.ode_nfe = (2, 4)
  c.eval.ode_method = 'heun'
  c.eval.grid_size = 2
  c.eval.fid_num_samples = 30       # two batches of 16, the last one padded
  c.eval.fid_batch_size = 16
  c.eval.fid_reference = str(tmp_path / 'ref.npz')
  c.eval.inception_weights = str(tmp_path / 'no_weights.npz')
  return c


def test_image_sweep_fid_with_injected_features(mnist_dir, tmp_path, capsys):
  config = _image_config(mnist_dir, tmp_path)
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (28 * 28 * 3, 8))) / 28
  extractor = fid.FeatureExtractor({'w': w}, batch_size=16, feature_fn=_fake_features)
  # Reference statistics of 200 training images, the way reference_stats makes them.
  from fmjax.evaluation import reference_stats
  import tensorflow_datasets as tfds
  source = tfds.data_source('mnist5k', split='train', data_dir=mnist_dir)
  batches = reference_stats.source_batches(source, 200, extractor.local_batch)
  fid.save_statistics(config.eval.fid_reference, fid.compute_statistics(
      extractor, batches, 200, dataset='mnist5k', split='train', resize='none',
      feature_extractor='fake'))
  setup = train.Setup(config, str(tmp_path / 'run'))
  logger = logging_utils.MetricsLogger(setup.workdir, 0, 0, jsonl=False)
  with jax.set_mesh(setup.mesh):
    results = _evaluator(setup, feature_fn=extractor)(setup.init_state(), 0, logger, final=True)
  logger.close()
  saved = json.loads((tmp_path / 'run' / 'final_metrics.json').read_text())
  assert set(saved['few_step']) == {'1', '2'} and set(saved['ode']) == {'2', '4'}
  assert [saved['ode'][k]['steps'] for k in ('2', '4')] == [1, 2]
  assert saved['fid_reference']['count'] == 200 and saved['fid_num_samples'] == 30
  assert os.path.getsize(tmp_path / 'run' / 'fid_vs_nfe.png') > 1000
  assert os.path.exists(tmp_path / 'run' / 'samples' / 'step_0_ode_heun_4nfe.png')
  # Untrained network = identity map: every sampler returns its noise, so every FID equals the
  # FID of the 30 noise images themselves (padding rows of the last batch dropped), by hand.
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
  noise = np.concatenate([np.asarray(x0)[:valid] for x0, _, valid in
                          sweep.noise_batches(key, (28, 28, 1), 30, 16, num_classes=10)])
  by_hand = fid.fid(fid.statistics(_fake_features({'w': w}, sweep.to_rgb_uint8(noise))),
                    fid.load_statistics(config.eval.fid_reference))
  for row in list(saved['few_step'].values()) + list(saved['ode'].values()):
    assert row['num_samples'] == 30
    np.testing.assert_allclose(row['fid'], by_hand, rtol=1e-6)
  assert by_hand > 1.0
  assert 'FID' in report.format_table(results)
  # The progress line of a long FID run: each sampler's last batch at least, with its rate.
  out = capsys.readouterr().out
  for label in ('flow map, 1 step', 'flow map, 2 steps', 'ODE heun, 2 NFE', 'ODE heun, 4 NFE'):
    assert f'  {label}: 30/30 samples (100 %), ' in out, out


def test_deferred_fid_writes_the_images_that_score_like_the_inline_fid(mnist_dir, tmp_path):
  """config.eval.fid_features='deferred': no feature network, no reference at sampling time;
  each sampler's uint8 images and requested labels land in an ADM sample batch, and
  reference_batches scores it to the inline sweep's FID (same stand-in features)."""
  from fmjax.evaluation import reference_batches, sample_batches
  config = _image_config(mnist_dir, tmp_path)
  config.eval.fid_features = 'deferred'
  setup = train.Setup(config, str(tmp_path / 'run'))
  evaluate = _evaluator(setup)
  evaluate.check_ready()   # neither the weights nor the reference exist: fine when deferred
  logger = logging_utils.MetricsLogger(setup.workdir, 0, 0, jsonl=False)
  with jax.set_mesh(setup.mesh):
    results = evaluate(setup.init_state(), 7, logger, final=True)
  logger.close()
  folder = tmp_path / 'run' / 'eval_images' / 'step_7'
  assert results['fid_deferred'] == str(folder)
  names = sorted(os.listdir(folder))
  assert names == ['flow_map_1_steps.npz', 'flow_map_2_steps.npz', 'ode_heun_2_nfe.npz',
                   'ode_heun_4_nfe.npz']
  for row in list(results['few_step'].values()) + list(results['ode'].values()):
    assert 'fid' not in row and row['num_samples'] == 30
  # The untrained network returns its noise: the files hold the noise as uint8 images, in the
  # sweep's order, with the balanced labels it asked for (padding rows dropped).
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
  batches = list(sweep.noise_batches(key, (28, 28, 1), 30, 16, num_classes=10))
  noise = np.concatenate([np.asarray(x0)[:valid] for x0, _, valid in batches])
  labels = np.concatenate([np.asarray(y)[:valid] for _, y, valid in batches])
  with np.load(folder / 'ode_heun_4_nfe.npz') as data:
    np.testing.assert_array_equal(data['arr_0'], sweep.to_rgb_uint8(noise))
    np.testing.assert_array_equal(data['arr_1'], labels)
  info = sample_batches.read_info(str(folder / 'ode_heun_4_nfe.npz'))
  assert (info['nfe'], info['steps'], info['method']) == (4, 2, 'heun')
  assert info['provenance']['dataset'] == 'mnist5k (generated)'
  # Scored later against statistics only (no reference images: FID, no precision/recall).
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (28 * 28 * 3, 8))) / 28
  extractor = fid.FeatureExtractor({'w': w}, batch_size=16, feature_fn=_fake_features)
  rng = np.random.default_rng(5)
  real = rng.normal(size=(50, 8)) + 0.3
  same = {'resize': resize.RESIZE_MODE, 'feature_extractor': fid.extractor_id()}
  fid.save_statistics(str(tmp_path / 'ref.npz'),
                      fid.statistics(real, dataset='mnist5k', split='train', **same))
  row = reference_batches.evaluate_batches(str(tmp_path / 'ref.npz'), str(folder / 'flow_map_2_steps.npz'),
                                           extractor, batch_size=16)
  by_hand = fid.fid(fid.statistics(_fake_features({'w': w}, sweep.to_rgb_uint8(noise))),
                    fid.statistics(real))
  np.testing.assert_allclose(row['fid'], by_hand, rtol=1e-6)
  assert row['num_samples'] == 30 and row['nfe'] == 2 and 'precision' not in row
  # The recorded provenance is checked: a reference of another autoencoder is refused.
  writer = sample_batches.SampleBatchWriter(str(tmp_path / 'other'), {'autoencoder': 'vae-a'})
  writer(sweep_samplers.SamplerSpec('flow_map', 1, 1), sweep.to_rgb_uint8(noise[:8]), labels[:8])
  writer.close()
  fid.save_statistics(str(tmp_path / 'ref_b.npz'), fid.statistics(
      real, dataset='mnist5k', split='train', autoencoder='vae-b', **same))
  with pytest.raises(ValueError, match='autoencoder'):
    reference_batches.evaluate_batches(str(tmp_path / 'ref_b.npz'), writer.paths[0], extractor,
                                       batch_size=16)


def test_a_bad_fid_features_value_says_what_to_choose(mnist_dir, tmp_path):
  config = _image_config(mnist_dir, tmp_path)
  config.eval.fid_features = 'later'
  with pytest.raises(configs.ConfigError, match="choose 'inception'.*'deferred'"):
    configs.validate(config)


def test_an_adm_reference_batch_gives_fid_and_precision_recall_of_the_first_samples(mnist_dir, tmp_path):
  """A reference file holding images (ADM layout, no mu/sigma): FID against its images' features
  and precision/recall of each sampler's first `precision_recall_samples` samples, by hand."""
  from fmjax.evaluation import precision_recall
  config = _image_config(mnist_dir, tmp_path)
  config.eval.precision_recall_samples = 20     # of 30: the first batch and 4 rows of the second
  rng = np.random.default_rng(3)
  reference_images = rng.integers(0, 256, (40, 28, 28, 3), dtype=np.uint8)
  np.savez(config.eval.fid_reference, arr_0=reference_images)
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (28 * 28 * 3, 8))) / 28
  extractor = fid.FeatureExtractor({'w': w}, batch_size=16, feature_fn=_fake_features)
  setup = train.Setup(config, str(tmp_path / 'run'))
  logger = logging_utils.MetricsLogger(setup.workdir, 0, 0, jsonl=False)
  with jax.set_mesh(setup.mesh):
    results = _evaluator(setup, feature_fn=extractor)(setup.init_state(), 0, logger, final=True)
  logger.close()
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
  noise = np.concatenate([np.asarray(x0)[:valid] for x0, _, valid in
                          sweep.noise_batches(key, (28, 28, 1), 30, 16, num_classes=10)])
  sample_features = np.asarray(_fake_features({'w': w}, sweep.to_rgb_uint8(noise)), np.float64)
  real_features = np.asarray(_fake_features({'w': w}, reference_images), np.float64)
  fid_by_hand = fid.fid(fid.statistics(sample_features), fid.statistics(real_features))
  pr = precision_recall.precision_recall(real_features, sample_features[:20])
  assert 0 < pr['precision'] < 1 or 0 < pr['recall'] < 1   # a comparison that could tell 20 from 30
  assert precision_recall.precision_recall(real_features, sample_features) != pr
  for row in list(results['few_step'].values()) + list(results['ode'].values()):
    np.testing.assert_allclose(row['fid'], fid_by_hand, rtol=1e-5)
    assert row['precision_recall_samples'] == 20
    assert (row['precision'], row['recall']) == pytest.approx((pr['precision'], pr['recall']))
  assert 'precision' in report.format_table(results)


def test_classifier_share_and_class_histogram_distance_by_a_plain_loop():
  """confident_share and class_tv of class-conditional samples against a count by hand, with a
  stand-in classifier, odd batch sizes (a padded last batch) and non-finite rows left out."""
  num_classes, num, batch = 4, 23, 8
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6 * 6 * 3, 8))) / 6
  features = fid.FeatureExtractor({'w': w}, batch_size=batch, feature_fn=_fake_features)
  reference = fid.statistics(np.asarray(jax.random.normal(jax.random.PRNGKey(1), (64, 8))))
  proj = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (36, num_classes)))

  def class_probs(images):   # a softmax of a fixed projection of the pixels, sharp enough to vary
    logits = 3.0 * np.asarray(images, np.float64).reshape(len(images), -1) @ proj
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  noise = lambda: sweep.noise_batches(jax.random.PRNGKey(2), (6, 6, 1), num, batch,
                                      num_classes=num_classes)
  poison = lambda x0: jnp.where(x0[:, :1, :1, :] > 1.2, jnp.nan, x0)
  spec = sweep_samplers.specs((1,), 'euler', ())[0]
  results, _ = sweep.image_sweep({spec: lambda params, x0, labels: poison(x0)}, None, noise,
                                 features, reference, num, class_probs=class_probs, confidence=0.7)
  confident, predicted, requested = 0, np.zeros(num_classes), np.zeros(num_classes)
  for x0, labels, valid in noise():
    for image, label in zip(np.asarray(x0)[:valid], np.asarray(labels)[:valid]):
      if image[0, 0, 0] > 1.2:
        continue
      p = class_probs(image[None])[0]
      confident += p[label] >= 0.7
      predicted[p.argmax()] += 1
      requested[label] += 1
  total = requested.sum()
  assert 0 < total < num and 0 < confident < total
  row = results['few_step']['1']
  assert row['confident_share'] == pytest.approx(confident / total)
  assert row['class_tv'] == pytest.approx(0.5 * np.abs(predicted - requested).sum() / total)
  assert row['class_tv'] > 0


def test_image_sweep_leaves_out_nonfinite_images():
  """FID of the finite images only, by hand; the NaN ones counted; NaN when none is finite."""
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (8 * 8 * 3, 8))) / 8
  features = fid.FeatureExtractor({'w': w}, batch_size=16, feature_fn=_fake_features)
  reference = fid.statistics(np.asarray(jax.random.normal(jax.random.PRNGKey(1), (64, 8))))
  noise = lambda: sweep.noise_batches(jax.random.PRNGKey(2), (8, 8, 1), 40, 16)
  poison = lambda x0, threshold: jnp.where(x0[:, :1, :1, :] > threshold, jnp.nan, x0)
  fns = {spec: (lambda params, x0, labels, threshold=threshold: poison(x0, threshold))
         for spec, threshold in zip(sweep_samplers.specs((1, 2), 'euler', ()), (1.0, -jnp.inf))}
  results, kept = sweep.image_sweep(fns, None, noise, features, reference, 40, keep=4)
  x0 = np.concatenate([np.asarray(x)[:valid] for x, _, valid in noise()])
  good = x0[:, 0, 0, 0] <= 1.0
  assert 0 < good.sum() < 40
  by_hand = fid.fid(fid.statistics(_fake_features({'w': w}, sweep.to_rgb_uint8(x0[good]))),
                    reference)
  row = results['few_step']['1']
  assert row['nonfinite'] == 40 - good.sum() and row['num_samples'] == good.sum()
  np.testing.assert_allclose(row['fid'], by_hand, rtol=1e-6)
  none = results['few_step']['2']
  assert none['nonfinite'] == 40 and none['num_samples'] == 0 and math.isnan(none['fid'])
  assert kept[sweep_samplers.specs((2,), 'euler', ())[0]].shape == (4, 8, 8, 1)


def test_missing_weights_and_statistics_stop_before_training(mnist_dir, tmp_path):
  config = _image_config(mnist_dir, tmp_path)
  with pytest.raises(assets.MissingFIDAssetsError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert 'python -m fmjax.evaluation.prepare_inception' in message
  assert ('python -m fmjax.evaluation.reference_stats --dataset mnist5k --split train '
          f'--data_dir {mnist_dir} --out {config.eval.fid_reference}') in message
  assert '--config.eval.fid=False' in message
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')     # nothing trained
  config.eval.fid = False
  assets.check_fid_ready(config)                                  # FID off: nothing needed


def test_traced_step_samplers_equal_the_library_samplers():
  """One compilation per family must not change the numbers: equal to fmjax.samplers."""
  from fmjax import from_config
  config = _tiny_toy_config()
  config.data.num_classes = 3
  init, apply = from_config.build_network(config, (2,), 3)
  params = jax.tree.map(lambda p: p + 0.1, init(jax.random.PRNGKey(0)))   # a non-trivial map
  flow_map = from_config.build_flow_map(config, apply, interpolants.get('linear'))
  x0 = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  labels = jnp.arange(16) % 3
  specs = sweep_samplers.specs((3,), 'heun', (6,))
  fns = sweep_samplers.make_sample_fns(flow_map, specs, null_label=3, guidance_scale=1.5)
  for spec in specs:
    got = fns[spec](params, x0, labels)
    if spec.family == 'flow_map':
      want = samplers.flow_map_sample(flow_map, params, x0, samplers.uniform_grid(spec.steps),
                                      labels, null_label=3, guidance_scale=1.5)
    else:
      want = samplers.make_ode_sampler(flow_map, spec.steps, 'heun', null_label=3)(
          params, x0, labels, guidance_scale=1.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got - x0).max()) > 0.01


def test_two_processes_run_the_sweep_together(tmp_path):
  """2 JAX processes x 2 CPU devices: sharded samples, gathered metrics, one writer, no hang."""
  import subprocess
  from train_testlib import env_with_devices, free_port, worker_command
  overrides = {'data.on_device': False, 'train.batch_size': 16, 'train.num_steps': 2,
               'train.checkpoint_every': 0, 'loss.name': 'flow_matching', 'eval.ode_nfe': [1, 2]}
  port = free_port()
  procs = [subprocess.Popen(worker_command(tmp_path, overrides, '--eval', '--coordinator',
                                           f'127.0.0.1:{port}', '--num_processes', 2,
                                           '--process_id', i),
                            env=env_with_devices(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, f'{out[-2000:]}\n{err[-4000:]}'
    results.append(json.loads(out.split('RESULTS ', 1)[1].splitlines()[0]))
  assert results[0] == results[1]          # every process holds the same metrics
  assert set(results[0]['few_step']) == {'1', '2'} and set(results[0]['ode']) == {'1', '2'}
  saved = json.loads((tmp_path / 'final_metrics.json').read_text())
  assert saved == results[0]
  assert os.path.exists(tmp_path / 'samples' / 'step_2.png')
