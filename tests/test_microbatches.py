"""Gradient accumulation (config.train.microbatches; fmjax.train_state.microbatch_gradients).

An update over k microbatches must be the full batch's update when the loss is a mean over
examples that does not depend on the key (the only difference a split may make is the noise
draws), with Adam, so that the optimizer sees the same gradient; every microbatch must get its
own key and its own rows; the step number reaches every microbatch whole; and only one
microbatch's activations are alive at a time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax import benchmarking, configs, train_state

B, D = 12, 3


class _MeanRule:
  """A mean over examples of a nonlinear per-example loss (key-independent), which also checks
  that the step number arrives as a scalar."""

  def init(self, net_params, key=None):
    return {'net': net_params}

  def __call__(self, params, batch, key):
    assert jnp.ndim(batch['step']) == 0
    w = params['net']['w']
    per_example = jnp.tanh(batch['x1'] @ w) ** 2 + 0.1 * batch['labels'] * jnp.sum(w ** 2)
    loss = jnp.mean(per_example)
    return loss, {'mean_x': jnp.mean(batch['x1'])}


def _batch():
  x1 = jax.random.normal(jax.random.PRNGKey(1), (B, D))
  return {'x1': x1, 'labels': jnp.arange(B, dtype=jnp.float32) % 4}


@pytest.mark.parametrize('k', [2, 3])
def test_accumulated_update_is_the_full_batch_update(k):
  tx = optax.adam(0.05)
  rule = _MeanRule()
  init = lambda key: {'w': jnp.linspace(-0.5, 0.7, D)}
  state = train_state.init_state(rule, init, tx, (0.9,), jax.random.PRNGKey(0))
  stop = jnp.zeros((1,), jnp.int32)
  full = jax.jit(train_state.make_train_step(rule, tx, (0.9,)))
  split = jax.jit(train_state.make_train_step(rule, tx, (0.9,), microbatches=k))
  a, b = state, state
  for _ in range(3):   # Adam's moments carry the gradients on: three updates must agree
    a, metrics_a = full(a, _batch(), stop)
    b, metrics_b = split(b, _batch(), stop)
  np.testing.assert_allclose(b['params']['net']['w'], a['params']['net']['w'], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(b['ema'][0]['w'], a['ema'][0]['w'], rtol=1e-5, atol=1e-7)
  for name in ('loss', 'grad_norm', 'mean_x'):
    np.testing.assert_allclose(float(metrics_b[name]), float(metrics_a[name]), rtol=1e-5)


def test_each_microbatch_gets_its_rows_and_its_key():
  k = 3
  x = jnp.arange(B, dtype=jnp.float32)[:, None]

  def loss_and_grad(params, batch, key):
    # A loss that depends on the key: the microbatch's mean row index times a uniform draw.
    u = jax.random.uniform(key)
    loss = params * jnp.mean(batch['x1']) * u
    return (loss, {'u': u}), jnp.mean(batch['x1']) * u

  key = jax.random.PRNGKey(7)
  (loss, metrics), grad = train_state.microbatch_gradients(loss_and_grad, jnp.float32(2.0), {'x1': x},
                                                           key, k)
  draws = [float(jax.random.uniform(kk)) for kk in jax.random.split(key, k)]
  rows = [np.arange(B)[j::k].mean() for j in range(k)]   # microbatch j: rows j, j + k, ...
  np.testing.assert_allclose(float(grad), np.mean([r * u for r, u in zip(rows, draws)]), rtol=1e-6)
  np.testing.assert_allclose(float(loss), 2.0 * np.mean([r * u for r, u in zip(rows, draws)]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['u']), np.mean(draws), rtol=1e-6)


def test_only_one_microbatch_is_alive():
  # Two tanh layers per example: their activations dominate the step's temporaries.
  tx = optax.sgd(0.1)
  width, batch = 256, 4096

  class Wide(_MeanRule):
    def __call__(self, params, b, key):
      h = jnp.tanh(b['x1'] @ params['net']['w'])          # [batch, width]
      h = jnp.tanh(h @ params['net']['v'])                 # [batch, width]
      return jnp.mean(h ** 2), {}

  init = lambda key: {'w': jnp.ones((D, width)) / D, 'v': jnp.eye(width)}
  state = train_state.init_state(Wide(), init, tx, (), jax.random.PRNGKey(0))
  data = {'x1': jnp.ones((batch, D)), 'labels': jnp.zeros((batch,))}
  stop = jnp.zeros((1,), jnp.int32)
  temp = {}
  for k in (1, 8):
    step = jax.jit(train_state.make_train_step(Wide(), tx, (), microbatches=k))
    temp[k] = benchmarking.temp_bytes(step.lower(state, data, stop).compile())
  assert temp[8] < 0.25 * temp[1], temp   # measured 1.9 MB against 12.6 MB


def test_bad_microbatch_counts_are_named():
  config = configs.base_config()
  config.train.batch_size, config.train.microbatches = 256, 3
  with pytest.raises(configs.ConfigError, match=r'config.train.microbatches = 3 must be >= 1 and divide '
                                                r'config.train.batch_size = 256'):
    configs.resolve(config)
  config.train.microbatches = 0
  with pytest.raises(configs.ConfigError, match='config.train.microbatches = 0'):
    configs.resolve(config)
  with pytest.raises(ValueError, match='does not split into 5 microbatches'):
    train_state.microbatch_gradients(None, {}, {'x1': jnp.ones((12, 2))}, jax.random.PRNGKey(0), 5)
