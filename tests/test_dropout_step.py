"""The train step drops units only when the config asks for dropout, with a per-step key."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax import flow_maps, interpolants, losses, train_state


def _apply(params, s, t, x, labels=None, key=None):
  h = x * params['w']
  if key is not None:   # inverted dropout, as the U-Net does it
    h = jnp.where(jax.random.bernoulli(key, 0.5, h.shape), 2.0 * h, 0.0)
  return h + t[:, None]


def _rule(apply):
  interp = interpolants.linear()
  return losses.make('flow_matching', flow_maps.make('displacement', apply, interp), interp)


def test_dropout_key_changes_with_the_step_and_is_off_without_dropout():
  tx = optax.sgd(0.0)   # keep params fixed, compare losses only
  net_init = lambda key: {'w': jnp.ones((2,))}
  rule = _rule(_apply)
  state = train_state.init_state(rule, net_init, tx, (), jax.random.PRNGKey(0))
  batch = {'x1': jnp.arange(16.0).reshape(8, 2)}
  plain = jax.jit(train_state.make_train_step(rule, tx, ()))
  dropping = jax.jit(train_state.make_train_step(
      rule, tx, (), lambda key: _rule(functools.partial(_apply, key=key))))
  def losses_of(step_fn):
    s, out = state, []
    for _ in range(3):
      s, metrics = step_fn(s, batch, jnp.zeros((1,), jnp.int32))
      out.append(float(metrics['loss']))
    return out
  assert losses_of(plain) != losses_of(dropping)
  # Deterministic given the state: the same steps drop the same units again.
  np.testing.assert_array_equal(losses_of(dropping), losses_of(dropping))
  # Without dropout the network is the plain one: same loss as calling the rule directly.
  key0 = jax.random.fold_in(state['rng'], 0)
  direct = float(rule(state['params'], dict(batch, step=state['step']), key0)[0])
  np.testing.assert_allclose(losses_of(plain)[0], direct, rtol=1e-6)
