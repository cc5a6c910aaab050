import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.losses import times


def test_pairs_are_ordered_and_follow_their_distribution():
  dist = times.TimeDistribution('logit_normal', mean=0.4, std=1.0)
  s, t = times.sample_pairs(jax.random.PRNGKey(0), 50_000, dist)
  assert bool(jnp.all(s <= t)) and bool(jnp.all((s > 0) & (t < 1)))
  logits = jnp.log(jnp.concatenate([s, t])) - jnp.log1p(-jnp.concatenate([s, t]))
  np.testing.assert_allclose([logits.mean(), logits.std()], [0.4, 1.0], atol=0.02)
  # The order statistics of two uniforms: E[s] = 1/3, E[t] = 2/3.
  s, t = times.sample_pairs(jax.random.PRNGKey(1), 50_000, times.TimeDistribution())
  np.testing.assert_allclose([s.mean(), t.mean()], [1 / 3, 2 / 3], atol=0.01)


def test_meanflow_translation_of_the_logit_normal():
  """MeanFlow's logit-normal(-0.4, 1) on its noise-at-1 time is logit-normal(+0.4, 1) in ours."""
  theirs = times.TimeDistribution('logit_normal', mean=-0.4).sample(jax.random.PRNGKey(2), 50_000)
  ours = times.TimeDistribution('logit_normal', mean=0.4).sample(jax.random.PRNGKey(3), 50_000)
  np.testing.assert_allclose(np.quantile(1 - theirs, [0.1, 0.5, 0.9]), np.quantile(ours, [0.1, 0.5, 0.9]),
                             atol=0.01)


def test_dyadic_steps_lie_on_their_grid():
  s, t = times.sample_dyadic_steps(jax.random.PRNGKey(4), 20_000, num_levels=7)
  h = t - s
  levels = -jnp.log2(h)
  np.testing.assert_allclose(levels, jnp.round(levels), atol=1e-5)
  assert set(np.unique(np.round(np.asarray(levels)).astype(int))) == set(range(7))
  np.testing.assert_allclose(s / h, jnp.round(s / h), atol=1e-4)
  assert bool(jnp.all(t <= 1.0 + 1e-6)) and bool(jnp.all(s >= 0))


def test_unknown_distribution_fails_clearly():
  with pytest.raises(ValueError, match='logit_normal'):
    times.TimeDistribution('beta')
