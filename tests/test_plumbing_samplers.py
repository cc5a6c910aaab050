"""Samplers, the sweep's plan and its noise, against plain numpy loops on a closed-form field.

Gaussian data x1 ~ N(m, diag(d^2)) under the linear interpolant I_t = (1 - t) x0 + t x1 has, per
dimension, the marginal N(t m, sigma_t^2), sigma_t^2 = (1 - t)^2 + t^2 d^2, the exact velocity
b_t(x) = m + (sigma_t' / sigma_t)(x - t m), sigma_t' / sigma_t = (t d^2 - (1 - t)) / sigma_t^2, and
the exact flow map X_{s,t}(x) = t m + (sigma_t / sigma_s)(x - s m). The class-conditional
networks below add a per-class shift a[y] (row `num_classes` is the null label), so the guided
field f_null + w (f_y - f_null) is known in closed form too; every guided check uses w != 1 and
an odd batch with every class present.
"""

import ml_collections
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import conditioning, samplers
from fmjax.evaluation import sweep, sweep_samplers

M = np.array([1.5, -0.5])
D = np.array([0.4, 2.0])
NUM_CLASSES = 3
SHIFT = np.array([[0.3, -0.2], [-0.5, 0.1], [0.2, 0.6], [0.05, -0.05]])   # a[y]; row 3 = null


def sigma(t):
  return np.sqrt((1 - t) ** 2 + t**2 * D**2)


def exact_map(s, t, x):
  s, t = np.asarray(s, np.float64)[..., None], np.asarray(t, np.float64)[..., None]
  return t * M + sigma(t) / sigma(s) * (x - s * M)


def exact_velocity(t, x):
  t = np.asarray(t, np.float64)[..., None]
  return M + (t * D**2 - (1 - t)) / sigma(t) ** 2 * (x - t * M)


class ShiftedMap:
  """A class-conditional 'network': the exact map's average velocity plus (1 + s) a[y] (in jnp),
  with velocity v_{t,t} = b_t + (1 + t) a[y]. Counts the rows it evaluates (NFE = rows / batch)."""

  def __init__(self):
    self.rows = 0
    self.guidance = []

  def _shift(self, s, labels, n):
    labels, guidance = conditioning.split(labels)
    if guidance is not None:
      self.guidance.append(guidance)
    if labels is None:
      return jnp.zeros((n, 2))
    return (1.0 + s)[:, None] * jnp.asarray(SHIFT, jnp.float32)[labels]

  def v(self, params, s, t, x, labels=None):
    self.rows += x.shape[0]
    sb, tb = s[:, None], t[:, None]
    sig = lambda u: jnp.sqrt((1 - u) ** 2 + u**2 * jnp.asarray(D**2, jnp.float32))
    X = tb * M + sig(tb) / sig(sb) * (x - sb * M)
    return (X - x) / (tb - sb) + self._shift(s, labels, x.shape[0])

  def velocity(self, params, t, x, labels=None):
    self.rows += x.shape[0]
    tb = t[:, None]
    b = M + (tb * D**2 - (1 - tb)) / ((1 - tb) ** 2 + tb**2 * D**2) * (x - tb * M)
    return b.astype(jnp.float32) + self._shift(t, labels, x.shape[0])


def guided_numpy(f_of_label, labels, w):
  """f_null + w (f_y - f_null) by hand."""
  null = f_of_label(np.full_like(labels, NUM_CLASSES))
  return null + w * (f_of_label(labels) - null)


def _noise(n=7, seed=0):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, 2)), np.float64)


def test_the_exact_map_sampled_over_any_grid_is_the_one_jump_map():
  x0 = _noise(9)
  want = exact_map(np.zeros(9), np.ones(9), x0)
  fm = ShiftedMap()
  for grid in ([0.0, 1.0], [0.0, 0.15, 0.4, 0.9, 1.0], [0.0, 1 / 3, 2 / 3, 1.0]):
    got = samplers.flow_map_sample(fm, None, jnp.asarray(x0, jnp.float32), jnp.asarray(grid))
    np.testing.assert_allclose(got, want, atol=2e-5)
  # The traced uniform grid of k steps, and the guided k-step sampler by a plain loop.
  labels = np.arange(9) % NUM_CLASSES
  w = 2.5
  for k in (1, 2, 3):
    x = x0.copy()
    for i in range(k):
      s, t = np.full(9, i / k), np.full(9, (i + 1) / k)
      v = lambda y: (exact_map(s, t, x) - x) / (1 / k) + (1 + s)[:, None] * SHIFT[y]
      x = x + (1 / k) * guided_numpy(v, labels, w)
    got = samplers.flow_map_sample(fm, None, jnp.asarray(x0, jnp.float32), None, jnp.asarray(labels),
                                   num_steps=k, null_label=NUM_CLASSES, guidance_scale=w)
    np.testing.assert_allclose(got, x, atol=5e-5)


@pytest.mark.parametrize('method', ['euler', 'midpoint', 'heun', 'rk4'])
def test_ode_steps_by_a_plain_loop_on_the_exact_velocity(method):
  """integrate() from s = 0.2 to t = 0.9 in 3 steps equals the textbook Runge-Kutta tableau."""
  x0 = _noise(5, 1)
  s0, t1, k = 0.2, 0.9, 3
  b = lambda t, x: exact_velocity(np.full(5, t), x)
  x = x0.copy()
  for i in range(k):
    a, h = s0 + i * (t1 - s0) / k, (t1 - s0) / k
    if method == 'euler':
      x = x + h * b(a, x)
    elif method == 'midpoint':
      x = x + h * b(a + h / 2, x + h / 2 * b(a, x))
    elif method == 'heun':
      k1 = b(a, x)
      x = x + h / 2 * (k1 + b(a + h, x + h * k1))
    else:
      k1 = b(a, x)
      k2 = b(a + h / 2, x + h / 2 * k1)
      k3 = b(a + h / 2, x + h / 2 * k2)
      k4 = b(a + h, x + h * k3)
      x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  fm = ShiftedMap()
  velocity = lambda t, x: fm.velocity(None, t, x)
  got = samplers.integrate(velocity, jnp.asarray(x0, jnp.float32), s0, t1, k, method)
  np.testing.assert_allclose(got, x, atol=5e-5)
  with pytest.raises(ValueError, match='Unknown ODE method'):
    samplers.ode_step(velocity, jnp.zeros((2, 2)), jnp.zeros(2), jnp.ones(2), 'rk45')


def test_cfg_in_the_ode_sampler_with_guidance_by_a_plain_heun_loop():
  """flow_map_ode_sample and make_ode_sampler with w = 1.8 on labels of every class: Heun on
  b_null + w (b_y - b_null), b_y = b_t + (1 + t) a[y]; w = 1 is the conditional field."""
  n, k = 7, 4
  x0 = _noise(n, 2)
  labels = np.arange(n) % NUM_CLASSES
  for w in (1.8, 1.0):
    b = lambda t, x: guided_numpy(lambda y: exact_velocity(np.full(n, t), x)
                                  + (1 + t) * SHIFT[y], labels, w)
    x = x0.copy()
    for i in range(k):
      a, h = i / k, 1 / k
      k1 = b(a, x)
      x = x + h / 2 * (k1 + b(a + h, x + h * k1))
    fm = ShiftedMap()
    got = samplers.flow_map_ode_sample(fm, None, jnp.asarray(x0, jnp.float32), k, 'heun',
                                       jnp.asarray(labels), null_label=NUM_CLASSES, guidance_scale=w)
    np.testing.assert_allclose(got, x, atol=5e-5)
    jitted = samplers.make_ode_sampler(fm, k, 'heun', null_label=NUM_CLASSES)
    np.testing.assert_allclose(jitted(None, jnp.asarray(x0, jnp.float32), jnp.asarray(labels), w), x,
                               atol=5e-5)


def test_networks_conditioned_on_the_guidance_get_the_scale_and_interval_as_inputs():
  fm = ShiftedMap()
  x0 = jnp.asarray(_noise(5, 3), jnp.float32)
  labels = jnp.arange(5) % NUM_CLASSES
  with jax.disable_jit():   # concrete inputs, every evaluation a Python call
    samplers.flow_map_sample(fm, None, x0, None, labels, num_steps=2, null_label=NUM_CLASSES,
                             guidance_scale=3.0, guidance_input=True, guidance_interval=(0.2, 0.8))
  assert len(fm.guidance) == 2
  g = fm.guidance[-1]
  np.testing.assert_array_equal(g.labels, labels)
  np.testing.assert_allclose([g.omega, g.start, g.end], np.broadcast_to([[3.0], [0.2], [0.8]], (3, 5)))
  assert fm.rows == 2 * 5   # one evaluation of the batch per step, no null pass


# ------------------------------------------------------------------------- NFE accounting


def _config(num_classes, guidance_scale, guidance_conditioning):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({'num_classes': num_classes})
  c.model = ml_collections.ConfigDict({'guidance_conditioning': guidance_conditioning})
  c.eval = ml_collections.ConfigDict({'guidance_scale': guidance_scale, 'steps': (1, 2, 3),
                                      'ode_method': 'heun', 'ode_nfe': (4, 5, 1, 8, 4)})
  return c


# Hand count: flow map k steps = k NFE; Heun 2 per step, budgets 5 (odd) and 1 (< one step)
# dropped, the repeated 4 once; classifier-free guidance doubles every point.
HAND_NFE = {'plain': [1, 2, 3, 4, 8], 'guidance_input': [1, 2, 3, 4, 8], 'cfg': [2, 4, 6, 8, 16]}


@pytest.mark.parametrize('kind, config', [
    ('plain', _config(0, 2.0, False)),
    ('plain', _config(NUM_CLASSES, 1.0, False)),
    ('guidance_input', _config(NUM_CLASSES, 2.0, True)),
    ('cfg', _config(NUM_CLASSES, 2.0, False))])
def test_the_sweep_reports_the_nfe_it_spends(kind, config):
  """The NFE of every planned point is the hand count, and running the point (jit disabled, so
  every evaluation is a Python call) evaluates exactly NFE x batch rows."""
  specs = sweep_samplers.specs_from_config(config)
  assert [s.nfe for s in specs] == HAND_NFE[kind]
  assert [(s.family, s.steps) for s in specs] == [('flow_map', 1), ('flow_map', 2), ('flow_map', 3),
                                                  ('ode', 2), ('ode', 4)]
  assert [s.key for s in specs] == ['1', '2', '3', str(HAND_NFE[kind][3]), str(HAND_NFE[kind][4])]
  fm = ShiftedMap()
  conditional = bool(config.data.num_classes)
  fns = sweep_samplers.make_sample_fns(fm, specs, null_label=NUM_CLASSES if conditional else None,
                             guidance_scale=config.eval.guidance_scale,
                             guidance_input=bool(config.model.guidance_conditioning))
  n = 5
  x0 = jnp.asarray(_noise(n, 4), jnp.float32)
  labels = jnp.arange(n) % NUM_CLASSES if conditional else None
  with jax.disable_jit():
    for spec in specs:
      fm.rows = 0
      fns[spec](None, x0, labels)
      assert fm.rows == spec.nfe * n, (spec, fm.rows)


def test_plan_refuses_an_unknown_ode_method():
  with pytest.raises(ValueError, match='rk4'):
    sweep_samplers.specs((1,), 'rk45', (4,))


# ------------------------------------------------------------------------- the sweep's noise


@pytest.mark.parametrize('num_samples, batch, num_classes', [(23, 5, 7), (31, 9, 4), (10, 10, 3)])
def test_sweep_noise_has_balanced_labels_across_batches(num_samples, batch, num_classes):
  """Global row r (over all batches) gets label r mod C: over the valid rows every class appears
  floor(N / C) or ceil(N / C) times; x0 of batch i is N(0, I) from fold_in(key, i)."""
  key = jax.random.PRNGKey(9)
  out = list(sweep.noise_batches(key, (2,), num_samples, batch, num_classes=num_classes))
  valid = [v for _, _, v in out]
  assert valid == [min(batch, num_samples - start) for start in range(0, num_samples, batch)]
  labels = np.concatenate([np.asarray(y)[:v] for _, y, v in out])
  np.testing.assert_array_equal(labels, np.arange(num_samples) % num_classes)
  counts = np.bincount(labels, minlength=num_classes)
  assert counts.max() - counts.min() <= 1 and counts.sum() == num_samples
  for i, (x0, y, _) in enumerate(out):
    assert x0.shape == (batch, 2) and y.shape == (batch,) and y.dtype == jnp.int32
    np.testing.assert_array_equal(x0, jax.random.normal(jax.random.fold_in(key, i), (batch, 2)))
  assert all(y is None for _, y, _ in sweep.noise_batches(key, (2,), 7, 3))


def test_finite_rows_and_rmse_by_hand():
  x = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, np.inf], [0.0, 0.0]], np.float32)
  np.testing.assert_array_equal(sweep.finite_rows(jnp.asarray(x)), [True, False, False, True])
  a, b = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]]), np.zeros((3, 2))
  assert sweep._rmse(a, b) == pytest.approx(np.sqrt((0 + 25 + 2) / 3))


def test_toy_distances_by_plain_loops():
  """Energy distance with U-statistics (diagonals left out) and sliced W1 on the same directions,
  by double loops and sorted projections in float64."""
  from fmjax.evaluation import toy_metrics
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(9, 2)), rng.normal(size=(11, 2)) * 1.5 + 0.3
  dist = lambda a, b: np.sqrt(np.sum((a - b) ** 2))
  cross = np.mean([dist(a, b) for a in x for b in y])
  within = lambda z: sum(dist(a, b) for i, a in enumerate(z) for j, b in enumerate(z) if i != j) / (
      len(z) * (len(z) - 1))
  want = cross - 0.5 * within(x) - 0.5 * within(y)
  assert float(toy_metrics.energy_distance(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(want, rel=1e-5)
  y = y[:9]
  key = jax.random.PRNGKey(3)
  directions = np.asarray(jax.random.normal(key, (2, 16)), np.float64)
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  want = np.mean([np.mean(np.abs(np.sort(x @ d) - np.sort(y @ d))) for d in directions.T])
  got = toy_metrics.sliced_wasserstein(jnp.asarray(x), jnp.asarray(y), key, num_projections=16)
  assert float(got) == pytest.approx(want, rel=1e-5)
  with pytest.raises(ValueError, match='equal sample counts'):
    toy_metrics.sliced_wasserstein(jnp.asarray(x), jnp.asarray(y[:5]))
