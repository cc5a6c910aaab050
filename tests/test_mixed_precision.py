"""bfloat16 compute under jvp: a small DiT's loss and gradient against the same step in float32,
and QK-normalization (fmjax.models.dit, `qk_norm`).

Same float32 parameters, same batch and key; only the compute dtype differs. Tolerances
(stated, measured on this CPU at these sizes): loss within 1e-3 relative (measured <= 2e-5),
gradient within 3e-2 relative in global norm (measured ~1e-2: bfloat16 keeps 8 bits of
mantissa, 2^-8 = 0.4 %, and the errors of a few layers add up).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import flow_maps, interpolants, losses, models

KW = dict(image_size=8, in_channels=4, patch_size=2, hidden=32, depth=1, num_heads=2, num_classes=10,
          time_conditioning='t_gap', time_frequency_dim=32)
BATCH = 16
LOSS_RTOL, GRAD_RTOL = 1e-3, 3e-2


@functools.lru_cache(maxsize=None)
def _cached(qk_norm):
  return _params(qk_norm=qk_norm, **KW)


def _params(**kw):
  graphdef, state = nnx.split(models.build('dit', **kw))
  params = state.to_pure_dict()
  # adaLN-Zero and the zero final layer would make most gradients vanish: move off zero.
  params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)).astype(p.dtype),
                        params)
  return graphdef, params


def _loss_and_grad(graphdef, params, rule, parameterization):
  apply = lambda p, s, t, x, labels=None: nnx.merge(graphdef, p)(s, t, x, labels)
  interp = interpolants.linear()
  loss = losses.make(rule, flow_maps.make(parameterization, apply, interp), interp,
                     **({} if rule == 'flow_matching' else {'diagonal_fraction': 0.25}))
  batch = {'x1': jax.random.normal(jax.random.PRNGKey(1), (BATCH, 8, 8, 4)),
           'labels': jnp.arange(BATCH) % 10}
  rule_params = loss.init(params, jax.random.PRNGKey(0))
  fn = jax.jit(jax.value_and_grad(lambda p: loss(p, batch, jax.random.PRNGKey(3))[0]),
               compiler_options=models.FAST_COMPILE)
  return fn(rule_params)


def _relative(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return (num / den) ** 0.5


@pytest.mark.parametrize('rule,parameterization,qk_norm', [
    ('flow_matching', 'displacement', False), ('lsd', 'displacement', False),
    ('meanflow', 'meanflow', False), ('meanflow', 'meanflow', True)])
def test_bfloat16_step_close_to_float32(rule, parameterization, qk_norm):
  graphdef32, params = _cached(qk_norm)
  graphdef16, _ = nnx.split(models.abstract('dit', dtype=jnp.bfloat16, qk_norm=qk_norm, **KW))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  loss32, grad32 = _loss_and_grad(graphdef32, params, rule, parameterization)
  loss16, grad16 = _loss_and_grad(graphdef16, params, rule, parameterization)
  assert loss16.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad16))
  assert abs(float(loss16) / float(loss32) - 1) < LOSS_RTOL, (float(loss16), float(loss32))
  rel = _relative(grad16, grad32)
  assert 0 < rel < GRAD_RTOL, rel    # 0 would mean bfloat16 never ran


def test_qk_norm_off_keeps_the_parameters():
  plain = nnx.state(models.abstract('dit', **KW), nnx.Param).flat_state()
  with_norm = nnx.state(models.abstract('dit', qk_norm=True, **KW), nnx.Param).flat_state()
  paths = lambda flat: {tuple(str(k) for k in path) for path, _ in flat}
  assert not any('q_norm' in p or 'k_norm' in p for p in paths(plain))
  extra = paths(with_norm) - paths(plain)
  assert extra == {('blocks', str(i), n, 'scale') for i in range(KW['depth']) for n in ('q_norm', 'k_norm')}


@pytest.mark.parametrize('qk_norm', [False, True])
def test_qk_norm_makes_attention_invariant_to_query_key_scale(qk_norm):
  """Scaling the query and key projections by 10 changes the logits 100-fold without QK-norm
  and leaves the output unchanged with it (RMSNorm removes the scale)."""
  graphdef, params = _cached(qk_norm)
  apply = jax.jit(lambda p: nnx.merge(graphdef, p)(jnp.full((4,), 0.2), jnp.full((4,), 0.7),
                                          jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 4)),
                                          jnp.arange(4)), compiler_options=models.FAST_COMPILE)
  scaled = jax.tree.map(lambda x: x, params)   # a new tree of the same arrays
  factor = jnp.concatenate([jnp.full((2 * KW['hidden'],), 10.0), jnp.ones((KW['hidden'],))])
  for i in range(KW['depth']):
    qkv = scaled['blocks'][i]['qkv']
    qkv['kernel'], qkv['bias'] = qkv['kernel'] * factor, qkv['bias'] * factor
  out, out_scaled = np.asarray(apply(params)), np.asarray(apply(scaled))
  close = np.allclose(out, out_scaled, rtol=1e-4, atol=1e-5)
  assert close == qk_norm
