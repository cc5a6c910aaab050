"""Best-of-N and look-ahead guidance (fmjax.steering.reward_guidance) against closed forms, and the
steering interfaces (--mode=steer, fmjax.load(dir).steer, config.steer validation)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import configs, interpolants
from fmjax.data.toy import ExactFlowMap, GaussianMixtureTarget, GaussianTarget
from fmjax.steering import lookahead, reward_guidance, rewards, selection, tilted

from train_testlib import ROOT, env_with_devices

LINEAR = interpolants.linear()
GAUSS = GaussianTarget(jnp.array([1.0, -0.5]), jnp.array([0.7, 1.3]))
# Two separated modes; the tilt toward c = (3, 0) moves mass between them (0.5/0.5 -> ~0.9/0.1).
GMM = GaussianMixtureTarget(np.array([[-2.0, 0.0], [2.0, 0.0]]), np.array([0.5, 0.5]),
                            np.array([0.5, 0.5]), ode_steps=16)


def _closures(target):
  fm = ExactFlowMap(target, LINEAR)
  return (lambda s, t, x, labels=None: fm.X(None, s, t, x),
          lambda t, x, labels=None: fm.velocity(None, t, x))


def _affine_law(out_fn):
  """(mean, diagonal std) of the law of an affine map of x0 ~ N(0, I) in 2-D, from its values at
  0, e1, e2 (the guided ODE of a Gaussian with a linear or quadratic reward is affine in x0)."""
  y = np.asarray(out_fn(jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)])))
  a = y[1:] - y[0]
  return y[0], np.sqrt(np.diag(a.T @ a))


def test_lookahead_gradient_matches_finite_differences():
  flow_map, _ = _closures(GMM)
  reward = rewards.quadratic(jnp.array([3.0, 0.5]), 1.5)
  look = jax.jit(lookahead.make_lookahead('flow_map', flow_map=flow_map))   # RK4 inside: compile once
  x = jnp.array([[0.3, -0.2], [-0.8, 0.6]])
  t = jnp.full((2,), 0.4)
  values, grad = lookahead.value_and_grad(look, reward, t, x, keep_jacobian=True)
  h = 1e-2
  fd = np.stack([(reward(look(t, x + h * e), None) - reward(look(t, x - h * e), None)) / (2 * h)
                 for e in jnp.eye(2)], axis=1)
  np.testing.assert_allclose(values, reward(look(t, x), None), rtol=1e-6)
  np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=2e-3)
  # Dropping the Jacobian: grad r at X_{t,1}(x), which here is far from the exact gradient.
  _, dropped = lookahead.value_and_grad(look, reward, t, x, keep_jacobian=False)
  np.testing.assert_allclose(dropped, -(look(t, x) - jnp.array([3.0, 0.5])) / 1.5**2, rtol=1e-5)
  assert np.max(np.abs(dropped - grad)) > 0.1


def test_keep_vs_drop_jacobian_on_a_gaussian():
  # X_{t,1} of N(m, s^2) is affine with slope s / std_t: keep = (s / std_t) * drop, exactly.
  flow_map, _ = _closures(GAUSS)
  reward = rewards.quadratic(jnp.array([2.0, 1.0]), 1.0)
  look = lookahead.make_lookahead('flow_map', flow_map=flow_map)
  x = jnp.array([[0.3, -0.2], [-0.8, 0.6], [1.0, 2.0]])
  t = 0.3
  _, keep = lookahead.value_and_grad(look, reward, jnp.full((3,), t), x, keep_jacobian=True)
  _, drop = lookahead.value_and_grad(look, reward, jnp.full((3,), t), x, keep_jacobian=False)
  std = np.array([0.7, 1.3])
  std_t = np.sqrt((1 - t) ** 2 + (t * std) ** 2)
  np.testing.assert_allclose(keep, drop * std / std_t, rtol=1e-5)


def _guided(target, reward, temperature, k, **options):
  flow_map, velocity = _closures(target)
  return lambda x0: reward_guidance.guided_sample(
      x0, flow_map=flow_map, velocity=velocity, interpolant=LINEAR, reward=reward,
      temperature=temperature, times=np.linspace(0.0, 1.0, k + 1), **options).samples


def test_guidance_is_exact_for_a_linear_reward_with_the_denoiser_lookahead():
  # Gaussian p, r = a.x: q = N(m + s^2 a / lambda, s^2) and grad log h_t = grad r(E[x1|x_t]) / lambda,
  # so the guided ODE is exact; the splitting is first order in the step.
  a, lam = jnp.array([0.8, -0.4]), 0.5
  reward = lambda x, labels=None: x @ a
  want_mean = np.array([1.0, -0.5]) + np.array([0.7, 1.3]) ** 2 * np.asarray(a) / lam
  errors = []
  for k in (16, 64):
    mean, std = _affine_law(_guided(GAUSS, reward, lam, k, lookahead='denoiser'))
    np.testing.assert_allclose(std, [0.7, 1.3], rtol=1e-4)   # the tilt only shifts a Gaussian
    errors.append(np.max(np.abs(mean - want_mean)))
  assert errors[0] < 0.06 and errors[1] < 0.015, errors           # measured 0.056, 0.014
  assert 3.0 < errors[0] / errors[1] < 5.0, errors                # first order: ~4x per 4x steps


def test_guidance_with_a_quadratic_reward_on_a_gaussian():
  # q = N(m', s'^2) in closed form; the look-ahead approximation log h ≈ r(L(x)) / lambda is not
  # exact here: the denoiser over-tilts (lambda sigma^2 stands in for lambda sigma^2 + Var[x1|x_t]),
  # the flow-map look-ahead over-guides toward the reward's maximum (sum of gains ~ log K).
  center, lam = np.array([2.0, 1.0]), 0.5
  reward = rewards.quadratic(center, 1.0)
  q = tilted.tilt_gaussian(GAUSS, center, 1.0, lam)
  base = np.array([1.0, -0.5])
  mean, std = _affine_law(_guided(GAUSS, reward, lam, 64, lookahead='denoiser'))
  assert np.all(np.sign(mean - base) == np.sign(np.asarray(q.mean) - base))
  np.testing.assert_allclose(mean, [1.714, 1.379], atol=0.01)     # exact: [1.495, 0.658]
  np.testing.assert_allclose(std, [0.428, 0.232], atol=0.01)      # exact: [0.497, 0.621]
  mean_fm, std_fm = _affine_law(_guided(GAUSS, reward, lam, 16, lookahead='flow_map'))
  np.testing.assert_allclose(mean_fm, center, atol=0.01)
  assert np.all(std_fm < 0.01)
  # Unguided (guidance_scale 0): the base law exactly.
  mean0, std0 = _affine_law(_guided(GAUSS, reward, lam, 4, guidance_scale=0.0))
  np.testing.assert_allclose(mean0, base, atol=1e-5)
  np.testing.assert_allclose(std0, [0.7, 1.3], rtol=1e-5)


def test_guidance_stop_and_schedule_reduce_the_shift():
  # A linear reward: each guided step adds a shift in the same direction, so less guidance moves less.
  lam, a = 0.5, jnp.array([0.8, -0.4])
  reward = lambda x, labels=None: x @ a
  full = _affine_law(_guided(GAUSS, reward, lam, 16, lookahead='denoiser'))[0]
  half = _affine_law(_guided(GAUSS, reward, lam, 16, lookahead='denoiser', guidance_stop=0.5))[0]
  lin = _affine_law(_guided(GAUSS, reward, lam, 16, lookahead='denoiser', schedule='linear'))[0]
  base = np.array([1.0, -0.5])
  for partial in (half, lin):
    assert np.all(np.abs(partial - base) < np.abs(full - base))
    assert np.all(np.abs(partial - base) > 0.05)
  # The discrete scheme by hand: the step into t adds h w(t) k_t grad_x a.E[x1 | x_t] / lambda
  # = h w(t) ((1 - t) / t) (t s^2 / std_t^2) a / lambda, carried to t = 1 by the slope s / std_t.
  s_ = np.array([0.7, 1.3])
  for mean, w in [(full, lambda t: 1.0), (half, lambda t: float(t < 0.5)), (lin, lambda t: 1 - t)]:
    shift = 0.0
    for t in np.linspace(0, 1, 17)[1:]:
      std_t = np.sqrt((1 - t) ** 2 + (t * s_) ** 2)
      shift += (1 / 16) * w(t) * (1 - t) * s_**3 / std_t**3 * np.asarray(a) / lam
    np.testing.assert_allclose(mean, base + shift, rtol=1e-4, atol=1e-5)


def test_nfe_is_the_number_of_network_calls():
  calls = {'map': 0, 'velocity': 0}
  flow_map, velocity = _closures(GAUSS)

  def counted_map(*args):
    calls['map'] += 1
    return flow_map(*args)

  def counted_velocity(*args):
    calls['velocity'] += 1
    return velocity(*args)

  reward = rewards.quadratic(0.0, 1.0)
  x0 = jnp.zeros((3, 2))
  for look, keep, stop, want in [('flow_map', True, 1.0, 8 + 2 * 7), ('flow_map', False, 1.0, 8 + 7),
                                 ('denoiser', True, 0.5, 8 + 2 * 3), ('naive', True, 1.0, 8)]:
    calls.update(map=0, velocity=0)
    out = reward_guidance.guided_sample(x0, flow_map=counted_map, velocity=counted_velocity,
                                 interpolant=LINEAR, reward=reward, temperature=1.0,
                                 times=np.linspace(0, 1, 9), lookahead=look, keep_jacobian=keep,
                                 guidance_stop=stop)
    guided = (want - 8) // (2 if keep and look != 'naive' else 1)
    # Forward calls: the 8 jumps plus one look-ahead per guided step (a vjp adds its backward).
    assert calls['map'] + calls['velocity'] == 8 + (0 if look == 'naive' else guided)
    assert out.nfe == want == reward_guidance.guided_nfe(np.linspace(0, 1, 9), LINEAR, lookahead=look,
                                                  keep_jacobian=keep, guidance_stop=stop)
  assert selection.best_of_n(jax.random.PRNGKey(0), lambda k, n, y: GAUSS.sample(k, n), reward, 4, 6,
                            temperature=1.0, base_nfe=3).nfe == 18


def test_guided_sample_jits_with_static_options():
  flow_map, velocity = _closures(GAUSS)
  reward = rewards.quadratic(jnp.array([2.0, 1.0]), 1.0)
  fn = jax.jit(lambda x0: reward_guidance.guided_sample(
      x0, flow_map=flow_map, velocity=velocity, interpolant=LINEAR, reward=reward,
      temperature=0.5, times=(0.0, 0.5, 1.0)).samples)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (5, 2))
  eager = reward_guidance.guided_sample(x0, flow_map=flow_map, velocity=velocity, interpolant=LINEAR,
                                 reward=reward, temperature=0.5, times=(0.0, 0.5, 1.0)).samples
  np.testing.assert_allclose(fn(x0), eager, rtol=1e-5, atol=1e-5)


def test_best_of_n_importance_resampling_tends_to_the_tilted_mixture():
  center, lam = np.array([3.0, 0.0]), 1.0
  reward = rewards.quadratic(center, 2.0)
  q = tilted.tilt_gaussian_mixture(GMM, center, 2.0, lam)
  sample_fn = lambda key, n, labels: GMM.sample(key, n)
  key = jax.random.PRNGKey(1)
  errors = {}
  run = lambda n, select: jax.jit(lambda k: selection.best_of_n(   # jitted: eager ops compile one by one
      k, sample_fn, reward, 2000, n, temperature=lam, select=select))(key)
  for n in (1, 4, 32):
    out = run(n, 'importance')
    errors[n] = np.max(np.abs(tilted.mode_masses(q, out.samples) - q.weights))
  # n = 1: the base masses (0.5), off by |0.5 - w'|; the error shrinks as n grows.
  np.testing.assert_allclose(errors[1], abs(0.5 - q.weights[0]), atol=0.03)
  assert errors[32] < 0.02 < errors[4] < errors[1], errors   # measured 0.006, 0.06, 0.45
  best = run(32, 'argmax')
  assert float(jnp.mean(reward(best.samples, None))) > float(jnp.mean(reward(out.samples, None)))
  assert 0.0 < float(out.ess[0]) < 1.0


def test_bad_options_give_one_clear_error():
  flow_map, velocity = _closures(GAUSS)
  kw = dict(flow_map=flow_map, velocity=velocity, interpolant=LINEAR,
            reward=rewards.quadratic(0.0, 1.0), times=(0.0, 1.0))
  with pytest.raises(ValueError, match='temperature must be a positive'):
    reward_guidance.guided_sample(jnp.zeros((2, 2)), temperature=0.0, **kw)
  with pytest.raises(ValueError, match='unknown look-ahead'):
    reward_guidance.guided_sample(jnp.zeros((2, 2)), temperature=1.0, lookahead='x', **kw)
  with pytest.raises(ValueError, match='unknown guidance schedule'):
    reward_guidance.guided_sample(jnp.zeros((2, 2)), temperature=1.0, schedule='cos', **kw)


@pytest.mark.parametrize('key, value, message', [
    ('method', 'beam', "config.steer.method = 'beam'"),
    ('temperature', 0.0, 'config.steer.temperature = 0.0 must be > 0'),
    ('center', (1.0, 2.0, 3.0), 'the data are 2-D'),
    ('lookahead', 'tweedie', "config.steer.lookahead = 'tweedie'"),
    ('reward', 'classifier', 'classifier_dir is empty'),
])
def test_bad_steer_config_stops_before_any_work(tmp_path, key, value, message):
  from fmjax import main
  config = configs.base_config()
  config.steer[key] = value
  with pytest.raises(configs.ConfigError) as err:
    main.run(config, str(tmp_path), 'steer')
  assert message in str(err.value)
  assert not os.path.exists(tmp_path / 'steer')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  from fmjax import main
  sys.path.insert(0, str(ROOT))
  from experiments import toy_gmm
  config = toy_gmm.get_config('flow_matching')
  config.train.num_steps, config.train.batch_size, config.train.log_every = 8, 32, 4
  config.train.checkpoint_every = 8
  config.model_defaults.mlp.hidden, config.model_defaults.mlp.depth = 16, 2
  config.model_defaults.mlp.time_dim = 8
  config.eval.at_end = False
  config.optim.ema_decays = (0.5,)
  workdir = tmp_path_factory.mktemp('steer')
  main.run(config, str(workdir), 'train')
  return workdir


def test_steer_mode_end_to_end(trained):
  result = subprocess.run(
      [sys.executable, '-m', 'fmjax.main', '--config=experiments/toy_gmm.py:flow_matching',
       f'--workdir={trained}', '--mode=steer', '--config.model_defaults.mlp.hidden=16',
       '--config.model_defaults.mlp.depth=2', '--config.model_defaults.mlp.time_dim=8',
       '--config.steer.method=best_of_n', '--config.steer.num_samples=200',
       '--config.steer.steps=2', '--config.steer.num_particles=4', '--config.steer.center=(4.0,0.0)',
       '--config.steer.std=1.0'], cwd=ROOT, env=env_with_devices(1), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  folders = sorted((trained / 'steer').iterdir())   # one folder per run, named by its options
  assert len(folders) == 1, folders
  x = np.load(folders[0] / 'samples.npy')
  assert x.shape == (200, 2) and os.path.exists(folders[0] / 'samples.png')
  metrics = json.loads((folders[0] / 'metrics.json').read_text())
  assert metrics['method'] == 'best_of_n' and metrics['nfe'] == 8
  np.testing.assert_allclose(metrics['mean_reward'],
                             np.mean(-0.5 * np.sum((x - [4.0, 0.0]) ** 2, -1)), rtol=1e-4)
  assert len(metrics['mode_mass']) == 8 and 0 <= metrics['mode_mass_error'] <= 1
  assert metrics['energy_distance'] > 0 and 'ess_mean' in metrics


def test_load_steer(trained):
  import fmjax
  model = fmjax.load(str(trained))
  key = jax.random.PRNGKey(0)
  reward = rewards.quadratic(jnp.array([4.0, 0.0]), 1.0)
  plain = model.steer(key, 64, reward, method='guidance', temperature=1.0, steps=2,
                      guidance_scale=0.0)
  # No guidance: the plain 2-step flow-map samples of the same noise.
  np.testing.assert_allclose(plain.samples, model.sample(jax.random.split(key)[0], 64, steps=2),
                             rtol=1e-5, atol=1e-5)
  assert plain.nfe == 2
  guided = model.steer(key, 64, reward, method='guidance', temperature=1.0, steps=2,
                       lookahead='denoiser')
  assert guided.nfe == 2 + 2
  assert float(jnp.mean(reward(guided.samples, None))) > float(jnp.mean(reward(plain.samples, None)))
  with pytest.raises(ValueError, match="takes no option"):
    model.steer(key, 64, reward, method='guidance', num_particles=4)
  with pytest.raises(ValueError, match='one value per row'):
    model.steer(key, 64, lambda x, labels=None: x, method='guidance')
  with pytest.raises(ValueError, match='multiple of num_particles'):
    model.steer(key, 10, reward, method='smc', num_particles=4)
