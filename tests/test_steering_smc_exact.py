"""fmjax.steering.smc and fmjax.steering.resampling against independent answers at temperatures
!= 1: the discrete chain's tilted Gaussian (closed form), the control and the weights of one
guided step computed by hand, the final resampling's ancestors found by brute force (each in its
own group), labels travelling with their rows, systematic resampling against a plain loop, the
ESS formula, the NFE against counted network calls, and non-finite rewards (-inf a hard
constraint, NaN one clear error)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fmjax import interpolants
from fmjax.data.toy import GaussianTarget
from fmjax.steering import resampling, rewards, smc

LINEAR = interpolants.linear()
MEAN, STD = np.array([0.5, -1.0]), np.array([0.7, 1.3])
TARGET = GaussianTarget(jnp.asarray(MEAN, jnp.float32), jnp.asarray(STD, jnp.float32))
CENTER, REWARD_STD = np.array([1.5, 0.5]), 1.2


def _sigma(t, std=STD):
  """std of p_t = N(t m, ((1 - t)^2 + t^2 s^2) I) for I_t = (1 - t) x0 + t x1."""
  return np.sqrt((1 - t) ** 2 + (t * std) ** 2)


def _fm(s, t, x, labels=None):
  return TARGET.flow_map(LINEAR, s, t, x)


def _vel(t, x, labels=None):
  return TARGET.velocity(LINEAR, t, x)


def chain_law(num_steps, noise, mean=MEAN, std=STD):
  """(mean, variance) per dimension of x_N of the UNGUIDED flow-map chain of smc.py on
  N(m, diag s^2), by the affine recursion of its steps: the exact jump keeps the offset from
  t m scaled by sigma_t' / sigma_t; the Langevin step y + h eps score(y) + sqrt(2 eps h) z at
  t' (eps = noise (1 - t')^2, score = -(y - t' m) / sigma_t'^2, none into t = 1) scales it by
  1 - a, a = h eps / sigma_t'^2, and adds 2 eps h of variance: the variance it leaves is
  sigma_t'^2 (1 + a^2) per step, not sigma_t'^2 (the chain's O(h^2) bias)."""
  grid = np.linspace(0.0, 1.0, num_steps + 1)
  var = np.ones_like(std)
  for t, t2 in zip(grid[:-1], grid[1:]):
    var = var * (_sigma(t2, std) / _sigma(t, std)) ** 2
    eps = noise * (1 - t2) ** 2
    if eps > 0 and t2 < 1:
      a = (t2 - t) * eps / _sigma(t2, std) ** 2
      var = (1 - a) ** 2 * var + 2 * eps * (t2 - t)
  return np.asarray(mean, np.float64), var


def tilt(mean, var, lam, center=CENTER, reward_std=REWARD_STD):
  """N(mean, var) tilted by exp(-|x - c|^2 / (2 sigma_r^2 lambda)), per dimension, and the
  normalizer E[exp(r / lambda)] (a Gaussian integral per dimension)."""
  tau = reward_std**2 * lam
  new_var = 1 / (1 / var + 1 / tau)
  new_mean = new_var * (mean / var + center / tau)
  z = np.prod(np.sqrt(tau / (var + tau)) * np.exp(-(mean - center) ** 2 / (2 * (var + tau))))
  return new_mean, new_var, z


def _run(reward, lam, num, particles, seed=0, labels=None, flow_map=_fm, velocity=_vel, **kw):
  run = jax.jit(lambda key, x0, y: smc.smc(key, x0, flow_map=flow_map, velocity=velocity,
                                           interpolant=LINEAR, reward=reward, temperature=lam,
                                           num_particles=particles, labels=y, **kw))
  x0 = jax.random.normal(jax.random.PRNGKey(seed), (num, 2))
  return run(jax.random.PRNGKey(seed + 1), x0, labels)


def _group_estimates(out, groups, particles, normalizer):
  """Per group: Z_g / Z and (Z_g / Z) sum_i W_gi f(x_gi) for f = x, x^2: unbiased for 1, E[x],
  E[x^2] under SMC's target (its normalizer estimate is unbiased); spread -> standard errors."""
  z = np.exp(np.asarray(out.log_normalizer, np.float64)) / normalizer
  w = np.exp(np.asarray(out.log_weights, np.float64)).reshape(groups, particles) * z[:, None]
  x = np.asarray(out.samples, np.float64).reshape(groups, particles, -1)
  return z, np.einsum('gp,gpd->gd', w, x), np.einsum('gp,gpd->gd', w, x**2)


def _within(estimates, truth, slack):
  estimates = np.asarray(estimates)
  se = estimates.std(0) / np.sqrt(estimates.shape[0])
  err = np.abs(estimates.mean(0) - truth)
  assert (err < 4 * se + slack).all(), (estimates.mean(0), truth, se)
  return se


def _self_normalized(out, groups, particles):
  """Per group: sum_i W_gi x_gi and sum_i W_gi x_gi^2 (bias O(1 / particles), small spread)."""
  w = np.exp(np.asarray(out.log_weights, np.float64)).reshape(groups, particles)
  x = np.asarray(out.samples, np.float64).reshape(groups, particles, -1)
  return np.einsum('gp,gpd->gd', w, x), np.einsum('gp,gpd->gd', w, x**2)


@pytest.mark.parametrize('lam', [0.37, 2.5])
def test_smc_targets_the_discrete_chains_tilted_gaussian(lam):
  """Guided SMC (3 steps, noise 1.0, resampling on, 512 groups of 256) at lambda != 1: the
  normalizer estimate averages to the chain's E[exp(r / lambda)] and the weighted first and
  second moments equal the closed-form tilt of the discrete chain's law (chain_law) to 4
  standard errors + 0.003 (self-normalized per group: bias O(1/256)); the true q's second
  moment is further off than that (the chain's bias, 4 % here: noise 1.0, 3 steps)."""
  groups, particles, steps, noise = 512, 256, 3, 1.0
  mean, var = chain_law(steps, noise)
  q_mean, q_var, normalizer = tilt(mean, var, lam)
  out = _run(rewards.quadratic(CENTER, REWARD_STD), lam, groups * particles, particles,
             num_steps=steps, noise=noise, final_resample=False)
  z, _, _ = _group_estimates(out, groups, particles, normalizer)
  _within(z, 1.0, 0.003)
  first, second = _self_normalized(out, groups, particles)
  _within(first, q_mean, 0.003)
  se = _within(second, q_mean**2 + q_var, 0.003)
  true_mean, true_var, _ = tilt(MEAN, STD**2, lam)
  assert np.max(np.abs(second.mean(0) - true_mean**2 - true_var) - 4 * se) > 0.003
  assert float(np.asarray(out.resampled).max()) > 0 or lam > 1
  np.testing.assert_array_equal(np.asarray(out.reward_check), [0, groups * particles, 0, groups])


def test_one_guided_step_by_hand():
  """Two steps (0 -> 1/2 -> 1), no resampling, lambda = 0.37, noise 0.8, three groups of five:
  the samples and the per-group normalized log-weights equal a numpy computation of the
  scheme: the control u = 2 eps grad_x r(X_{0,1}(x0)) / lambda (eps = noise alpha_{1/2}^2,
  Jacobian of X_{0,1} = diag(s)), capped so that h |u| <= control_clip sqrt(2 eps h), the
  Langevin step with the exact score at t = 1/2, the final jump X_{1/2,1}, and
  log w = r(x_1) / lambda - h^2 |u|^2 / (2 sigma^2) - h u.z / sigma (the twist telescopes).
  The noise z is read off an unguided run on the same key (guidance_scale 0)."""
  lam, noise, h, groups, particles = 0.37, 0.8, 0.5, 3, 5
  num = groups * particles
  reward = rewards.quadratic(CENTER, REWARD_STD)
  s05, eps = _sigma(0.5), noise * 0.25
  sigma = np.sqrt(2 * eps * h)
  x0 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (num, 2)), np.float64)
  common = dict(num_steps=2, noise=noise, ess_threshold=0.0, final_resample=False)
  plain = _run(reward, lam, num, particles, guidance_scale=0.0, **common)
  x1_plain = 0.5 * MEAN + (s05 / STD) * (np.asarray(plain.samples, np.float64) - MEAN)
  y = 0.5 * MEAN + s05 * x0                                   # X_{0,1/2}(x0)
  m = y - h * eps * (y - 0.5 * MEAN) / s05**2                 # + h eps score_{1/2}(y)
  z = (x1_plain - m) / sigma
  look = MEAN + STD * x0                                      # X_{0,1}(x0)
  u_free = 2 * eps * STD * (-(look - CENTER) / REWARD_STD**2) / lam
  for clip in (None, 0.3):
    u = u_free.copy()
    if clip is not None:
      size = h * np.linalg.norm(u, axis=1, keepdims=True)
      u = u * np.minimum(1.0, clip * sigma / size)
      assert (size > clip * sigma).mean() > 0.5              # the cap binds on most rows
    x1 = m + h * u + sigma * z
    x_final = MEAN + (STD / s05) * (x1 - 0.5 * MEAN)
    log_w = (-0.5 * np.sum((x_final - CENTER) ** 2, 1) / REWARD_STD**2 / lam
             - h**2 * np.sum(u**2, 1) / (2 * sigma**2) - h * np.sum(u * z, 1) / sigma)
    g = log_w.reshape(groups, particles)
    log_z = np.log(np.mean(np.exp(g), 1))
    normalized = (g - np.log(np.sum(np.exp(g), 1, keepdims=True))).reshape(-1)
    out = _run(reward, lam, num, particles, control_clip=clip, **common)
    # ESS trace: the initial twist r(X_{0,1}(x0)) / lambda, then the full weights (twice: the
    # last look-ahead IS the final sample, so the final reward adds nothing).
    def ess(log_w_rows):
      g = np.exp(log_w_rows.reshape(groups, particles) - log_w_rows.max())
      return np.mean(g.sum(1) ** 2 / (particles * np.sum(g**2, 1)))
    v0 = -0.5 * np.sum((look - CENTER) ** 2, 1) / REWARD_STD**2 / lam
    np.testing.assert_allclose(out.ess, [ess(v0), ess(log_w), ess(log_w)], rtol=1e-4)
    np.testing.assert_allclose(out.samples, x_final, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(out.log_weights, normalized, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(out.log_normalizer, log_z, rtol=1e-3, atol=2e-3)
    assert np.abs(x_final - np.asarray(plain.samples)).max() > 0.05   # the control moved them


def test_final_resampling_stays_within_each_group():
  """5 groups of 7, a different label on every row (10 x group + row), lambda = 0.37 (uneven
  weights), with mid-chain resampling (ess_threshold 0.5) and without (0): every row after the
  final resampling equals a row of the same run before it (same key) in ITS group, drawn floor
  or ceil of 7 w times, and carries that ancestor's label."""
  groups, particles = 5, 7
  num = groups * particles
  labels = jnp.arange(num) // particles * 10 + jnp.arange(num) % particles
  reward = rewards.quadratic(CENTER, 0.5)
  for threshold in (0.5, 0.0):
    kw = dict(num_steps=3, noise=0.5, labels=labels, ess_threshold=threshold)
    before = _run(reward, 0.37, num, particles, seed=5, final_resample=False, **kw)
    after = _run(reward, 0.37, num, particles, seed=5, final_resample=True, **kw)
    x_before, x_after = np.asarray(before.samples), np.asarray(after.samples)
    w = np.exp(np.asarray(before.log_weights, np.float64)).reshape(groups, particles)
    assert np.allclose(w.sum(1), 1, atol=1e-5)
    # Rows copied by a resampling at the last step stay equal (no noise into t = 1): an output
    # row's possible ancestors are all rows equal to it, and they must all be in its group.
    for i in range(num):
      match = np.flatnonzero(np.all(np.abs(x_before - x_after[i]) < 1e-5, axis=1))
      assert match.size >= 1 and np.all(match // particles == i // particles), (i, match)
      assert int(after.labels[i]) in np.asarray(before.labels)[match], (i, match)
    for g in range(groups):
      rows = x_before[g * particles:(g + 1) * particles]
      for first in np.unique(np.round(rows, 4), axis=0, return_index=True)[1]:
        same = np.all(np.abs(rows - rows[first]) < 1e-5, axis=1)     # one set of equal rows
        count = np.sum(np.all(np.abs(x_after[g * particles:(g + 1) * particles] - rows[first]) < 1e-5, 1))
        total = particles * w[g, same].sum()
        assert np.floor(total + 1e-6) <= count <= np.ceil(total - 1e-6)
    # Mid-chain resampling moved labels with their rows, only within each group.
    np.testing.assert_array_equal(np.asarray(before.labels) // 10, np.arange(num) // particles)
    np.testing.assert_array_equal(np.asarray(after.labels) // 10, np.arange(num) // particles)
    np.testing.assert_allclose(after.log_weights, -np.log(particles), rtol=1e-6)
    if threshold == 0.0:                       # distinct rows, uneven weights: the final step moves
      np.testing.assert_array_equal(before.labels, labels)
      assert w.max() > 0.3 and np.any(np.asarray(after.labels) != np.asarray(labels))


# A class-conditional Gaussian: p(x | y) = N(mu_y, diag s^2) with far-apart class means.
CLASS_MEANS = np.array([[-6.0, 0.0], [0.0, 4.0], [6.0, 0.0]])


def _class_map(s, t, x, labels):
  mu = jnp.asarray(CLASS_MEANS, jnp.float32)[labels]
  s, t = jnp.asarray(s)[..., None], jnp.asarray(t)[..., None]
  ratio = jnp.sqrt((1 - t) ** 2 + (t * STD) ** 2) / jnp.sqrt((1 - s) ** 2 + (s * STD) ** 2)
  return t * mu + ratio * (x - s * mu)


def _class_velocity(t, x, labels):
  mu = jnp.asarray(CLASS_MEANS, jnp.float32)[labels]
  t = jnp.asarray(t)[..., None]
  var = (1 - t) ** 2 + (t * STD) ** 2
  return mu + (-(1 - t) + t * STD**2) / var * (x - t * mu)


def test_class_map_is_the_exact_conditional_map():
  for y in range(3):
    target = GaussianTarget(jnp.asarray(CLASS_MEANS[y], jnp.float32), jnp.asarray(STD, jnp.float32))
    x = jax.random.normal(jax.random.PRNGKey(y), (4, 2))
    s, t = jnp.full((4,), 0.2), jnp.full((4,), 0.7)
    labels = jnp.full((4,), y)
    np.testing.assert_allclose(_class_map(s, t, x, labels), target.flow_map(LINEAR, s, t, x), rtol=1e-5)
    np.testing.assert_allclose(_class_velocity(t, x, labels), target.velocity(LINEAR, t, x),
                               rtol=1e-5, atol=1e-6)


def test_class_conditional_smc_moves_labels_with_their_rows():
  """Groups of 6 particles with mixed labels (0, 1, 2, 0, 1, 2), lambda = 0.37: resampling moves
  rows AND their labels, so (a) every returned sample sits at its returned label's class
  (classes 6 apart, std <= 1.3) and (b) the share of each label among the returned rows is
  the tilted class weight Z_y / sum_y' Z_y' (closed form, Z_y = E[exp(r / lambda) | y] of the
  chain's law): mass moves between classes."""
  groups, particles, lam, steps, noise = 400, 6, 0.37, 4, 0.5
  num = groups * particles
  labels = jnp.tile(jnp.arange(3), num // 3)
  center, reward_std = np.array([2.0, 2.0]), 3.0
  out = _run(rewards.quadratic(center, reward_std), lam, num, particles, seed=2, labels=labels,
             flow_map=_class_map, velocity=_class_velocity, num_steps=steps, noise=noise,
             ess_threshold=0.7)
  assert float(np.asarray(out.resampled).mean()) > 0.2           # resampled mid-chain too
  x, y = np.asarray(out.samples), np.asarray(out.labels)
  nearest = np.argmin(np.sum((x[:, None] - CLASS_MEANS[None]) ** 2, -1), 1)
  np.testing.assert_array_equal(nearest, y)
  zs = np.array([tilt(*chain_law(steps, noise, mean=CLASS_MEANS[k]), lam, center, reward_std)[2]
                 for k in range(3)])
  share = zs / zs.sum()
  assert share.max() > 0.6                                       # a strong move from 1/3 each
  counts = np.bincount(y, minlength=3) / num
  # Within a group the final shares are self-normalized (bias O(1/6)); measured |error| <= 0.02.
  assert np.all(np.abs(counts - share) < 0.04), (counts, share)


# ----------------------------------------------------------------- resampling and ESS


def _plain_systematic(u, w, num):
  """Index i once for every point (j + u) / num in [c_{i-1}, c_i), c the cumulative weights."""
  c = np.cumsum(np.asarray(w, np.float64))
  c /= c[-1]
  out = []
  for j in range(num):
    p = (u + j) / num
    out.append(int(np.flatnonzero(c > p)[0]))
  return np.array(out)


def test_systematic_resample_is_the_plain_loop():
  rng = np.random.default_rng(0)
  for trial, (n, num) in enumerate([(9, 9), (13, 40), (30, 7)]):
    log_w = rng.normal(size=n) * 1.5
    log_w[rng.integers(n)] = -np.inf                            # a zero weight is never drawn
    key = jax.random.PRNGKey(trial)
    got = np.asarray(resampling.systematic_resample(key, jnp.asarray(log_w, jnp.float32), num))
    u = float(jax.random.uniform(key))
    w = np.exp(log_w - log_w.max())
    np.testing.assert_array_equal(got, _plain_systematic(u, w / w.sum(), num))
    assert not np.isin(np.flatnonzero(w == 0), got).any()


def test_trailing_zero_weights_are_never_drawn():
  """Random weights with the last 40 of 300 zero (log-weight -inf): over 16 keys no zero-weight
  index is drawn and every count is floor or ceil of 300 w."""
  log_w = jax.random.normal(jax.random.PRNGKey(3), (300,)).at[260:].set(-jnp.inf)
  w = np.asarray(jax.nn.softmax(log_w), np.float64)
  idx = jax.jit(jax.vmap(lambda k: resampling.systematic_resample(k, log_w)))(
      jax.random.split(jax.random.PRNGKey(0), 16))
  counts = np.asarray(jax.vmap(lambda i: jnp.bincount(i, length=300))(idx))
  assert counts[:, 260:].sum() == 0
  assert (counts >= np.floor(300 * w) - 1e-6).all() and (counts <= np.ceil(300 * w) + 1e-6).all()


def test_ess_fraction_is_the_textbook_formula():
  rng = np.random.default_rng(1)
  log_w = rng.normal(size=(3, 7)) * 2 + 37.0                     # unnormalized, shifted
  log_w[1, 2] = -np.inf
  w = np.exp(log_w - log_w.max(1, keepdims=True))
  want = w.sum(1) ** 2 / (7 * np.sum(w**2, 1))
  np.testing.assert_allclose(resampling.ess_fraction(jnp.asarray(log_w, jnp.float32)), want, rtol=1e-5)
  assert float(resampling.ess_fraction(jnp.array([0.0, -jnp.inf, -jnp.inf]))) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ NFE


@pytest.mark.parametrize('options, want', [
    (dict(), 4 * 4 - 3),
    (dict(lookahead='denoiser'), 3 * 4 + 2),
    (dict(keep_jacobian=False), 3 * 3 + 1),
    (dict(guidance_stop=0.5), 2 * 4 + 3 + 1),
    (dict(lookahead='naive', transport='euler'), 4 * 1),
    (dict(transport='euler'), 4 * 3),
])
def test_nfe_is_the_counted_network_calls(options, want):
  """The per-particle NFE that smc reports (and smc_nfe predicts) equals the hand count in the
  parameter list and the forward calls counted while it runs (a host callback in each network
  call), plus one backward per guided step with the Jacobian kept."""
  calls = []

  def counted(fn):
    def wrapped(*args):
      jax.debug.callback(lambda: calls.append(1))
      return fn(*args)
    return wrapped

  out = _run(rewards.quadratic(CENTER, REWARD_STD), 0.37, 8, 4, flow_map=counted(_fm),
             velocity=counted(_vel), num_steps=4, noise=0.5, **options)
  jax.block_until_ready(out.samples)
  assert out.nfe == want == smc.smc_nfe(4, **options)
  keep = options.get('keep_jacobian', True) and options.get('lookahead') != 'naive'
  guided = sum(t < options.get('guidance_stop', 1.0) for t in (0.0, 0.25, 0.5))
  if options.get('transport') == 'euler':
    guided += 0.75 < options.get('guidance_stop', 1.0)          # Euler steps are noisy into t = 1
  if options.get('lookahead') == 'naive':
    guided = 0                                                  # no network in the look-ahead
  assert len(calls) == want - (guided if keep else 0)


# ------------------------------------------------------------------ non-finite rewards


INSIDE_CENTER = np.array([0.3, 0.5])


def _constrained(x, labels=None):
  """A quadratic reward with a hard constraint: -inf (probability zero) where x_0 < 0."""
  return jnp.where(x[:, 0] >= 0, rewards.quadratic(INSIDE_CENTER, REWARD_STD)(x, labels), -jnp.inf)


def test_hard_constraint_gives_the_truncated_tilted_law():
  """Reward -inf for x_0 < 0, lambda = 0.37, 256 groups of 256: rows that end outside get
  weight exactly zero (the look-ahead put many outside earlier: they were kept, with a finite
  twist); the weighted moments match the tilted chain law truncated to x_0 >= 0 (closed form:
  a truncated normal in x_0) to 4 standard errors + 0.003 (self-normalized per group); with the
  final resampling every sample has x_0 >= 0."""
  groups, particles, lam, steps, noise = 256, 256, 0.37, 4, 0.5
  mean, var = chain_law(steps, noise)
  q_mean, q_var, _ = tilt(mean, var, lam, INSIDE_CENTER)
  a = -q_mean[0] / np.sqrt(q_var[0])
  inside = stats.norm.sf(a)
  assert 0.1 < 1 - inside < 0.3                                 # the constraint binds
  t_mean, t_var = q_mean.copy(), q_var.copy()
  t_mean[0] = q_mean[0] + np.sqrt(q_var[0]) * stats.norm.pdf(a) / inside
  t_var[0] = q_var[0] * (1 + a * stats.norm.pdf(a) / inside - (stats.norm.pdf(a) / inside) ** 2)
  out = _run(_constrained, lam, groups * particles, particles, seed=4, num_steps=steps,
             noise=noise, final_resample=False)
  x, log_w = np.asarray(out.samples), np.asarray(out.log_weights)
  assert (x[:, 0] < 0).mean() > 0.01                              # some particles ended outside
  assert np.all(np.isneginf(log_w[x[:, 0] < 0])) and np.all(np.isfinite(log_w[x[:, 0] >= 0]))
  first, second = _self_normalized(out, groups, particles)
  _within(first, t_mean, 0.003)
  _within(second, t_mean**2 + t_var, 0.003)
  # The untruncated law is far from it (the constraint changes the answer).
  assert abs(q_mean[0] - t_mean[0]) > 0.1
  resampled = _run(_constrained, lam, groups * particles, particles, seed=4, num_steps=steps,
                   noise=noise)
  assert np.all(np.asarray(resampled.samples)[:, 0] >= 0)
  np.testing.assert_array_equal(np.asarray(resampled.reward_check)[[0, 2]], [0, 0])


def test_a_group_with_no_feasible_particle_is_an_error():
  kw = dict(flow_map=_fm, velocity=_vel, interpolant=LINEAR, temperature=0.37, num_particles=4)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
  # x_0 > 50 is (practically) never reached: both groups end with every reward -inf.
  never = lambda x, labels=None: jnp.where(x[:, 0] > 50, 0.0, -jnp.inf)
  # Under jit the counts come back with the result, and .check raises the error (outside
  # jit smc raises it itself: test_nan_rewards_are_one_clear_error).
  out = jax.jit(lambda k, x: smc.smc_sample(k, x, reward=never, num_steps=3, **kw))(
      jax.random.PRNGKey(1), x0)
  np.testing.assert_array_equal(np.asarray(out.reward_check), [0, 8, 2, 2])
  with pytest.raises(ValueError, match=r'smc: 2 of 2 groups have no sample with a finite reward'):
    out.check('smc')
  # One group of two feasible: no error, and both feasible rows fill that group.
  half = lambda x, labels=None: jnp.where(jnp.arange(8) < 2, 0.0, -jnp.inf)
  out = jax.jit(lambda k, x: smc.smc_sample(k, x, reward=half, num_steps=3, **kw))(
      jax.random.PRNGKey(1), x0)
  np.testing.assert_array_equal(np.asarray(out.reward_check), [0, 8, 1, 2])


def test_nan_rewards_are_one_clear_error():
  kw = dict(flow_map=_fm, velocity=_vel, interpolant=LINEAR, temperature=0.37, num_particles=4)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
  # NaN on exactly the first three rows of every reward call.
  nan_rows = lambda x, labels=None: jnp.where(jnp.arange(x.shape[0]) < 3, jnp.nan, 0.0) + x[:, 0]
  with pytest.raises(ValueError, match=r'smc: the reward \(or its gradient\) was NaN or \+inf '
                                       r'for 3 of 8 rows'):
    smc.smc_sample(jax.random.PRNGKey(1), x0, reward=nan_rows, num_steps=1, **kw)   # outside jit
  run = lambda reward: jax.jit(lambda k, x: smc.smc_sample(k, x, reward=reward, num_steps=3, **kw))(
      jax.random.PRNGKey(1), x0)
  out = run(nan_rows)
  np.testing.assert_array_equal(np.asarray(out.reward_check), [3, 8, 0, 2])
  with pytest.raises(ValueError, match='3 of 8 rows'):
    out.check('smc')
  # +inf is no hard constraint either; a finite reward whose gradient is NaN (sqrt at 0) on a
  # guided step is caught as well.
  plus_inf = lambda x, labels=None: jnp.where(jnp.arange(x.shape[0]) == 5, jnp.inf, 0.0)
  np.testing.assert_array_equal(np.asarray(run(plus_inf).reward_check), [1, 8, 0, 2])
  kink = lambda x, labels=None: -jnp.sqrt(jnp.sum(x**2, 1) * 0.0)
  assert int(run(kink).reward_check[0]) == 8
