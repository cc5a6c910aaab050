"""The end-of-run evaluation of reward fine-tuning runs scores against the tilted target.

q(x) ∝ p(x) exp(r(x) / lambda). For p = N(m, s^2) per dimension and the quadratic reward
r = -|x - c|^2 / (2 sigma^2), completing the square gives q = N(m', s'^2) with
1 / s'^2 = 1 / s^2 + 1 / (lambda sigma^2) and m' = s'^2 (m / s^2 + c / (lambda sigma^2)); for
the one-sided reward r = -x_0^2 1[x_0 < 0], P_q(x_0 > 0) = 1 / (1 + sqrt(v / s^2)) with
1 / v = 1 / s^2 + 2 / lambda (the half-line integrals of the two Gaussians). Both are written
here by hand, apart from fmjax.steering.tilted.
"""

import math

import jax
import numpy as np
import pytest

from fmjax import configs, interpolants, logging_utils, sharding
from fmjax.data import pipelines, toy
from fmjax.evaluation import evaluator, report

SCALE, CENTER, STD, TEMPERATURE = 1.5, (1.0, -0.5), 0.7, 0.5


def _config(reward='quadratic', loss='reward_distill', name='gaussian'):
  c = configs.base_config()
  c.data.name = name
  c.data.dim = 2
  c.data.scale = SCALE
  c.loss.name = loss
  c.finetune.reward = reward
  c.finetune.center = CENTER
  c.finetune.std = STD
  c.finetune.temperature = TEMPERATURE
  c.eval.num_samples = 512
  c.eval.steps = (1,)
  c.eval.ode_nfe = (8,)
  c.eval.ode_method = 'rk4'
  c.eval.exact_pairs = ((0.0, 1.0),)
  c.eval.ema_index = -1
  c.train.batch_size = 8
  return c


def _tilted_by_hand():
  var = SCALE**2
  tau = STD**2 * TEMPERATURE
  new_var = 1 / (1 / var + 1 / tau)
  return new_var * np.asarray(CENTER) / tau, np.full(2, math.sqrt(new_var))


def _evaluate(config, flow_map, tmp_path):
  mesh = sharding.make_mesh()
  source = pipelines.ToySource(config, mesh)
  ev = evaluator.Evaluator(config, str(tmp_path), mesh, source, interpolants.linear(), flow_map)
  logger = logging_utils.MetricsLogger(str(tmp_path), 0, 0, jsonl=False)
  with jax.set_mesh(mesh):
    results = ev({'params': {'net': None}, 'ema': []}, 3, logger, final=True)
  logger.close()
  return ev, results


@pytest.mark.parametrize('loss', ['reward_distill', 'reward_backprop'])
def test_a_fine_tuned_gaussian_is_scored_against_the_closed_form_tilt(loss, tmp_path):
  """The exact map of the tilted Gaussian scores RMSE* ~ 0 and the floor's energy distance; the
  base model's exact map (what a run that did nothing would be) scores far off."""
  mean, std = _tilted_by_hand()
  interp = interpolants.linear()
  tilted = toy.GaussianTarget(mean.astype(np.float32), std.astype(np.float32))
  ev, results = _evaluate(_config(loss=loss), toy.ExactFlowMap(tilted, interp), tmp_path / 'tilted')
  np.testing.assert_allclose(ev.target.mean, mean, rtol=1e-5)
  np.testing.assert_allclose(ev.target.std, std, rtol=1e-5)
  assert 'tilted' in results['target'] and 'closed form' in results['target']
  assert 'scored against the tilted' in report.format_table(results)
  row = results['few_step']['1']
  assert row['rmse_vs_exact'] < 1e-4 and results['flow_map_error']['0->1']['rmse'] < 1e-4
  floor = results['target_vs_target']['energy_distance']
  assert abs(row['energy_distance'] - floor) < 0.02
  base = toy.GaussianTarget(np.zeros(2, np.float32), np.full(2, SCALE, np.float32))
  _, untilted = _evaluate(_config(loss=loss), toy.ExactFlowMap(base, interp), tmp_path / 'base')
  assert untilted['few_step']['1']['rmse_vs_exact'] > 0.5
  assert untilted['few_step']['1']['energy_distance'] > 0.1


def test_runs_that_are_not_fine_tuned_keep_the_data_target(tmp_path):
  config = _config(loss='lsd')
  base = pipelines.make_toy_target(config.data)
  target, note = evaluator.evaluation_target(config, base)
  assert target is base and note is None


def test_a_fine_tuned_mixture_gets_its_closed_form_tilt():
  """Gaussian mixture: component k keeps its tilted mean, variance and the weight
  w_k N(c; mu_k, (s_k^2 + lambda sigma^2) I) (by hand, normalized)."""
  config = _config(name='gmm')
  config.data.means = ((-2.0, 0.0), (2.0, 1.0))
  config.data.stds = (0.4, 0.8)
  config.data.weights = (1.0, 3.0)
  target, note = evaluator.evaluation_target(config, pipelines.make_toy_target(config.data))
  assert 'closed form' in note
  tau = STD**2 * TEMPERATURE
  c = np.asarray(CENTER)
  means, var, w = np.array([[-2.0, 0.0], [2.0, 1.0]]), np.array([0.16, 0.64]), np.array([0.25, 0.75])
  new_var = 1 / (1 / var + 1 / tau)
  spread = var + tau
  new_w = w * np.exp(-np.sum((c - means) ** 2, 1) / (2 * spread)) / (2 * np.pi * spread)
  np.testing.assert_allclose(target.stds, np.sqrt(new_var), rtol=1e-5)
  np.testing.assert_allclose(target.means, new_var[:, None] * (means / var[:, None] + c / tau), rtol=1e-5)
  np.testing.assert_allclose(target.weights, new_w / new_w.sum(), rtol=1e-4)


def test_the_one_sided_reward_is_scored_against_exact_rejection_samples(tmp_path):
  """No closed form: exact samples by rejection. P(x_0 > 0) matches the half-line integrals
  (binomial bound, 5 sigma); x_1 keeps the base law; no exact-map columns."""
  config = _config(reward='one_sided')
  base = pipelines.make_toy_target(config.data)
  target, note = evaluator.evaluation_target(config, base)
  assert isinstance(target, evaluator.RejectionTilted) and 'rejection' in note
  n = 20_000
  x = np.asarray(target.sample(jax.random.PRNGKey(4), n))
  assert x.shape == (n, 2)
  v = 1 / (1 / SCALE**2 + 2 / TEMPERATURE)
  p = 1 / (1 + math.sqrt(v / SCALE**2))
  assert abs(np.mean(x[:, 0] > 0) - p) < 5 * math.sqrt(p * (1 - p) / n)
  assert abs(x[:, 1].std() - SCALE) < 5 * SCALE / math.sqrt(2 * n)
  negative = x[x[:, 0] < 0, 0]   # the kept negative half is the half-normal of variance v
  assert abs(np.mean(negative**2) - v) < 5 * v * math.sqrt(2 / len(negative))
  interp = interpolants.linear()
  _, results = _evaluate(config, toy.ExactFlowMap(base, interp), tmp_path)
  assert 'rmse_vs_exact' not in results['few_step']['1'] and 'flow_map_error' not in results
  assert 'rejection' in results['target']
  # The untilted base puts half its mass at x_0 < 0, q only 1 - p: visibly off the floor.
  assert results['few_step']['1']['energy_distance'] > 5 * abs(results['target_vs_target']['energy_distance'])


def test_a_reward_without_a_tilted_target_is_scored_against_the_data_and_says_so():
  config = _config()
  config.finetune.reward = 'brightness'
  base = pipelines.make_toy_target(config.data)
  target, note = evaluator.evaluation_target(config, base)
  assert target is base and 'untilted' in note and 'brightness' in note
