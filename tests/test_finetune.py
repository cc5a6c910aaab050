"""Reward fine-tuning (fmjax.steering.finetune) against closed forms.

- systematic resampling: each index appears floor(n w_i) or ceil(n w_i) times;
- the resampled base samples follow the exact tilted mixture (fmjax.steering.tilted);
- reward_distill: its gradient for a constant-velocity model is (2/D)(a - E_q[x1]) (the flow-
  matching minimizer over constants is q's mean), and at the exact tilted map the full rule's
  gradient vanishes while at the base map it does not (the fixed point);
- reward_backprop: its gradient matches the hand derivation for a constant-velocity map;
- the CLI end to end: fine-tuning starts at the base parameters and trains.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import configs, interpolants, losses
from fmjax.data import toy
from fmjax.steering import finetune, resampling, rewards, tilted

LINEAR = interpolants.get('linear')
# Two modes; the reward pulls toward (2, 1): mass moves between modes AND within the right one.
BASE = toy.GaussianMixtureTarget(np.array([[-2.0, 0.0], [2.0, 0.0]]), np.array([0.5, 0.5]),
                                 np.array([0.5, 0.5]), ode_steps=16)
CENTER, REWARD_STD, TEMPERATURE = np.array([2.0, 1.0]), 1.0, 2.0   # lambda != 1: r / lambda vs r * lambda differ
TILTED = tilted.tilt_gaussian_mixture(BASE, CENTER, REWARD_STD, TEMPERATURE)
REWARD = rewards.quadratic(CENTER, REWARD_STD)


def _base_model(target):
  return finetune.BaseModel(flow_map=lambda s, t, x, labels=None: target.flow_map(LINEAR, s, t, x),
                            velocity=lambda t, x, labels=None: target.velocity(LINEAR, t, x))


def _mixture_mean(target):
  return np.sum(np.asarray(target.weights)[:, None] * np.asarray(target.means), 0)


def test_systematic_resample_counts_are_floor_or_ceil_of_n_w():
  key = jax.random.PRNGKey(0)
  log_w = jax.random.normal(key, (37,)) * 2.0
  w = np.asarray(jax.nn.softmax(log_w))
  resample = jax.jit(resampling.systematic_resample, static_argnums=2)
  n = 113
  for i in range(5):
    idx = np.asarray(resample(jax.random.PRNGKey(i + 1), log_w, n))
    counts = np.bincount(idx, minlength=37)
    assert counts.sum() == n
    assert np.all(counts >= np.floor(n * w) - 1e-9) and np.all(counts <= np.ceil(n * w) + 1e-9)


def test_effective_sample_size():
  assert float(resampling.ess_fraction(jnp.zeros(10))) == pytest.approx(1.0)
  log_w = jnp.log(jnp.array([0.5, 0.5, 0.0, 0.0]) + 1e-30)
  assert float(resampling.ess_fraction(log_w)) == pytest.approx(0.5, rel=1e-5)


def test_resampled_base_samples_follow_the_tilted_mixture():
  n, m = 4000, 32000
  key_z, key_pick, key_ref = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.jit(lambda z: finetune.k_step_sample(_base_model(BASE).flow_map, z, 1))(
      jax.random.normal(key_z, (m, 2)))
  log_w = finetune.tilt_log_weights(REWARD(x), TEMPERATURE)
  rows = np.asarray(x[resampling.systematic_resample(key_pick, log_w, n)])
  masses = tilted.mode_masses(TILTED, rows)
  np.testing.assert_allclose(masses, TILTED.weights, atol=0.02)
  np.testing.assert_allclose(rows.mean(0), _mixture_mean(TILTED), atol=0.05)
  # The tilt is strong enough that the base itself is far from q (the test can fail).
  assert abs(float(np.asarray(TILTED.weights)[1]) - 0.5) > 0.3


@dataclasses.dataclass(frozen=True)
class ConstantVelocity:
  """X_{s,t}(x) = x + (t - s) a with params {'net': a [D]}: b_t = a."""

  def v(self, params, s, t, x, labels=None):
    return jnp.broadcast_to(params, x.shape)

  def X(self, params, s, t, x, labels=None):
    return x + (t - s)[:, None] * self.v(params, s, t, x)

  def velocity(self, params, t, x, labels=None):
    return self.v(params, t, t, x)


def _rule(name, flow_map, base_model, **options):
  common = {'diagonal_fraction': 1.0} if options.get('inner') == 'flow_matching' else {}
  ft = finetune.FinetuneOptions(REWARD, temperature=TEMPERATURE, **options)
  return losses.make(name, flow_map, LINEAR, teacher=base_model, finetune=ft, **common)


def test_reward_distill_gradient_is_the_flow_matching_gradient_under_q():
  # For b = a, E_q|a - (x1 - x0)|^2 / D has gradient (2 / D)(a - E_q x1) (E x0 = 0):
  # zero only at q's mean, not at p's.
  rule = _rule('reward_distill', ConstantVelocity(), _base_model(BASE), inner='flow_matching',
               candidates=8)
  batch = {'x1': jnp.zeros((8000, 2))}
  mean_q = _mixture_mean(TILTED)
  grad = jax.jit(jax.grad(lambda a, key: rule({'net': a}, batch, key)[0]))
  for a in (mean_q, _mixture_mean(BASE), np.array([0.0, -1.0])):
    grads = [grad(jnp.asarray(a, jnp.float32), jax.random.PRNGKey(k)) for k in range(2)]
    np.testing.assert_allclose(np.mean(grads, 0), (a - mean_q), atol=0.06)


@dataclasses.dataclass(frozen=True)
class PerturbedExact:
  """The exact flow map of `target` plus eps (t - s) sin(x + s + 2t) (velocity: eps sin(x + 3t))."""

  target: object

  def X(self, params, s, t, x, labels=None):
    s_, t_ = s[:, None], t[:, None]
    return self.target.flow_map(LINEAR, s, t, x) + params * (t_ - s_) * jnp.sin(x + s_ + 2 * t_)

  def v(self, params, s, t, x, labels=None):
    raise NotImplementedError

  def velocity(self, params, t, x, labels=None):
    return self.target.velocity(LINEAR, t, x) + params * jnp.sin(x + 3 * t[:, None])


def test_reward_distill_fixed_point_is_the_exact_tilted_map():
  # The full rule (LSD inner, with its diagonal): d loss / d eps at eps = 0 vanishes for the
  # exact map of q and not for the exact map of the base p. A Gaussian base keeps every map
  # closed-form (the mixture's mode masses are checked above).
  gauss = toy.GaussianTarget(np.array([0.0, 0.5]), np.array([1.0, 0.7]))
  gauss_q = tilted.tilt_gaussian(gauss, CENTER, REWARD_STD, TEMPERATURE)
  batch = {'x1': jnp.zeros((4000, 2))}
  keys = jax.random.split(jax.random.PRNGKey(0), 4)   # Monte Carlo noise of at_q: about 0.008

  def gradient(target):
    rule = _rule('reward_distill', PerturbedExact(target), _base_model(gauss), candidates=8)
    grad = jax.jit(jax.vmap(jax.grad(lambda e, key: rule({'net': e}, batch, key)[0]), (None, 0)))
    return float(np.mean(grad(0.0, keys)))

  at_q, at_p = gradient(gauss_q), gradient(gauss)
  assert abs(at_q) < 0.03, at_q
  assert abs(at_p) > 0.15 and abs(at_p) > 5 * abs(at_q), (at_p, at_q)


def test_reward_backprop_gradient_matches_the_hand_derivation():
  # x(z) = z + a after any number of steps, x_base = z + a_b:
  # L = mean |z + a - c|^2 / (2 sigma^2) + (lambda rho / 2)|a - a_b|^2,
  # dL/da = (mean z + a - c) / sigma^2 + lambda rho (a - a_b).
  a_b = jnp.array([0.3, -0.2])
  base_model = finetune.BaseModel(flow_map=lambda s, t, x, labels=None: ConstantVelocity().X(a_b, s, t, x),
                                  velocity=None)
  z = jax.random.normal(jax.random.PRNGKey(3), (64, 2))
  z_np, a_b_np = np.asarray(z, np.float64), np.asarray(a_b, np.float64)
  for steps, rho in ((1, 1.0), (3, 0.25)):
    rule = _rule('reward_backprop', ConstantVelocity(), base_model, steps=steps, regularization=rho)
    a = jnp.array([1.0, 0.5])
    (loss, metrics), grad = jax.value_and_grad(lambda p: rule(p, {'x1': z, 'x0': z}, None),
                                               has_aux=True)({'net': a})
    a_np = np.asarray(a, np.float64)
    expected = (z_np.mean(0) + a_np - CENTER) / REWARD_STD**2 + TEMPERATURE * rho * (a_np - a_b_np)
    np.testing.assert_allclose(grad['net'], expected, rtol=1e-4, atol=1e-5)
    value = (np.mean(np.sum((z_np + a_np - CENTER) ** 2, 1)) / (2 * REWARD_STD**2)
             + 0.5 * TEMPERATURE * rho * np.sum((a_np - a_b_np) ** 2))
    assert float(loss) == pytest.approx(value, rel=1e-5)
    assert float(metrics['distance_to_base']) == pytest.approx(np.sum((a_np - a_b_np) ** 2), rel=1e-4)


def test_bad_options_are_one_clear_error():
  with pytest.raises(ValueError, match='temperature'):
    finetune.FinetuneOptions(REWARD, temperature=0.0)
  with pytest.raises(ValueError, match='inner'):
    finetune.FinetuneOptions(REWARD, inner='lmd')
  c = configs.base_config()
  c.loss.name = 'reward_distill'
  c.teacher.workdir = '/nonexistent'
  c.finetune.center = (1.0, 2.0, 3.0)
  with pytest.raises(configs.ConfigError, match='finetune.center'):
    configs.resolve(c)
  c.finetune.center = 0.0
  c.finetune.temperature = -1.0
  with pytest.raises(configs.ConfigError, match='temperature'):
    configs.resolve(c)
  c.finetune.temperature = 1.0
  c.teacher.workdir = ''
  with pytest.raises(configs.ConfigError, match='fine-tunes a trained base model'):
    configs.resolve(c)
  c.teacher.workdir = '/nonexistent'
  c.loss.name = 'reward_backprop'
  c.finetune.reward = 'bright'
  with pytest.raises(configs.ConfigError, match='finetune.reward'):
    configs.resolve(c)


# ------------------------------------------------------------------------------ CLI end to end

TINY = {'train.batch_size': 64, 'train.log_every': 5, 'model.hidden': 16, 'model.depth': 2,
        'model.time_dim': 8, 'eval.at_end': False, 'optim.ema_decays': (0.5,),
        'optim.warmup_steps': 0, 'data.means': ((-2.0, 0.0), (2.0, 0.0)), 'data.stds': (0.5, 0.5),
        'data.weights': (1.0, 1.0)}


def _config(**overrides):
  c = configs.base_config()
  for key, value in {**TINY, **overrides}.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def test_cli_fine_tunes_from_the_base(tmp_path):
  from fmjax import main
  from train_testlib import read_metrics
  base_dir = str(tmp_path / 'base')
  main.run(_config(**{'train.num_steps': 10, 'loss.name': 'flow_matching', 'loss.diagonal_fraction': 1.0}),
           base_dir, 'train')
  finetuned = {}
  for rule in finetune.RULE_NAMES:
    workdir = str(tmp_path / rule)
    main.run(_config(**{'train.num_steps': 3, 'train.log_every': 1, 'loss.name': rule,
                        'teacher.workdir': base_dir, 'finetune.center': (2.0, 1.0),
                        'finetune.steps': 2, 'optim.learning_rate': 1e-2}), workdir, 'train')
    finetuned[rule] = read_metrics(workdir)
  backprop = finetuned['reward_backprop']
  # Step 1's loss is computed before any update: the model IS the base (distance exactly 0).
  assert backprop[1]['distance_to_base'] < 1e-12   # (XLA may fuse the two maps differently)
  assert backprop[3]['distance_to_base'] > 1e-8
  distill = finetuned['reward_distill']
  assert all(np.isfinite(row['loss']) and 0 < row['ess'] <= 1 for row in distill.values())
  assert distill[3]['reward_tilted'] > distill[3]['reward_base']
  # A network of another shape than the base: one clear error before training.
  bad = _config(**{'loss.name': 'reward_backprop', 'teacher.workdir': base_dir, 'model.hidden': 8})
  with pytest.raises(configs.ConfigError, match='another shape'):
    main.run(bad, str(tmp_path / 'bad'), 'train')
