import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import interpolants
from fmjax.data import toy


def _log_density(gmm, interp, t, x):
  """log p_t(x) of the mixture's marginal under I_t = alpha x0 + beta x1 (one sample x)."""
  a, b = interp.alpha(t), interp.beta(t)
  var = a**2 + b**2 * jnp.asarray(gmm.stds)**2
  sq = jnp.sum((x[None] - b * jnp.asarray(gmm.means))**2, -1)
  return jax.nn.logsumexp(jnp.log(jnp.asarray(gmm.weights)) - 0.5 * sq / var
                          - 0.5 * gmm.dim * jnp.log(2 * jnp.pi * var))


@pytest.mark.parametrize('interp_name', ['linear', 'trigonometric'])
def test_mixture_velocity_matches_the_score_identity(interp_name):
  """b_t(x) = (beta'/beta) x - alpha (alpha' - beta' alpha / beta) grad log p_t(x), an identity of
  Gaussian noise (Tweedie) that shares no code with the posterior-weighted formula."""
  interp = interpolants.get(interp_name)
  gmm = toy.random_gmm(seed=3, num_components=5, dim=3, std=0.4)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 3)) * 2
  for t in (0.2, 0.5, 0.9):
    tt = jnp.full((16,), t)
    score = jax.vmap(jax.grad(lambda xi: _log_density(gmm, interp, t, xi)))(x)
    a, b, ad, bd = (float(c) for c in interp.coefficients(t))
    expected = (bd / b) * x - a * (ad - bd * a / b) * score
    np.testing.assert_allclose(gmm.velocity(interp, tt, x), expected, rtol=1e-4, atol=1e-4)


def test_single_component_mixture_is_the_gaussian():
  interp = interpolants.trigonometric()
  gmm = toy.GaussianMixtureTarget([[1.0, -1.0]], [0.7], [1.0])
  gauss = toy.GaussianTarget(jnp.array([1.0, -1.0]), jnp.array([0.7, 0.7]))
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
  t = jnp.linspace(0.0, 1.0, 32)
  np.testing.assert_allclose(gmm.velocity(interp, t, x), gauss.velocity(interp, t, x), atol=1e-5)
  np.testing.assert_allclose(gmm.flow_map(interp, 0.1, 0.9, x), gauss.flow_map(interp, 0.1, 0.9, x),
                             atol=1e-5)


def test_gaussian_flow_map_solves_its_ode_and_is_a_semigroup():
  interp = interpolants.linear()
  target = toy.GaussianTarget(jnp.array([3.0, 0.0]), jnp.array([0.2, 2.0]))
  x = jax.random.normal(jax.random.PRNGKey(2), (32, 2))
  s, u, t = jnp.full((32,), 0.1), jnp.full((32,), 0.45), jnp.full((32,), 0.95)
  direct = target.flow_map(interp, s, t, x)
  np.testing.assert_allclose(target.flow_map(interp, u, t, target.flow_map(interp, s, u, x)), direct,
                             atol=1e-5)
  dX = jax.jvp(lambda tt: target.flow_map(interp, s, tt, x), (t,), (jnp.ones_like(t),))[1]
  np.testing.assert_allclose(dX, target.velocity(interp, t, direct), rtol=1e-5, atol=1e-5)


def test_mixture_flow_map_is_converged_a_semigroup_and_transports_noise_to_the_mixture():
  interp = interpolants.linear()
  gmm = toy.GaussianMixtureTarget([[-3.0, 0.0], [3.0, 1.0]], [0.5, 0.5], [0.25, 0.75])
  x = jax.random.normal(jax.random.PRNGKey(3), (4096, 2))
  coarse = gmm.flow_map(interp, 0.0, 1.0, x)   # the default 256 RK4 steps
  fine = gmm.flow_map(interp, 0.0, 1.0, x, num_steps=1024)
  # Converged to float32 rounding, except for the few paths near the separatrix between the
  # modes, which amplify rounding (and any error) the most.
  def check(a, b):
    err = jnp.abs(a - b).max(axis=1)
    assert float(jnp.quantile(err, 0.99)) < 2e-5 and float(err.max()) < 1e-3
  check(coarse, fine)
  check(gmm.flow_map(interp, 0.5, 1.0, gmm.flow_map(interp, 0.0, 0.5, x)), fine)
  right = float(jnp.mean(fine[:, 0] > 0))
  assert abs(right - 0.75) < 0.03
  np.testing.assert_allclose(fine.mean(0), [1.5, 0.75], atol=0.15)


def test_picture_targets_sample_where_they_should():
  key = jax.random.PRNGKey(4)
  board = toy.make_target('checkerboard').sample(key, 4000)
  cells = jnp.floor((board + 4.0) / 2.0).astype(int)
  assert bool(jnp.all((cells[:, 0] + cells[:, 1]) % 2 == 0))
  assert bool(jnp.all(jnp.abs(board) <= 4.0))
  assert len(np.unique(np.asarray(cells), axis=0)) == 8
  rings = toy.make_target('rings').sample(key, 4000)
  radius = jnp.linalg.norm(rings, axis=1) / 1.3
  assert float(jnp.abs(radius - jnp.round(radius)).mean()) < 0.1


def test_mixture_configs_are_checked():
  with pytest.raises(ValueError, match='K x D'):
    toy.GaussianMixtureTarget([1.0, 2.0], [1.0], [1.0])
  with pytest.raises(ValueError, match='match means'):
    toy.GaussianMixtureTarget([[1.0, 2.0]], [1.0, 2.0], [1.0])
  layout = toy.make_target('gmm', seed=7, num_components=4, dim=5, means=None)
  assert layout.means.shape == (4, 5) and layout.dim == 5
  with pytest.raises(ValueError, match='Unknown toy target'):
    toy.make_target('moons')
