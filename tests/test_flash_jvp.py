"""The fused jvp attention kernel (Pallas, interpret mode on CPU) against float64 naive attention:
output, logsumexp, tangent, the gradient of a loss on the tangent, plain reverse mode, and one DiT
loss-and-gradient per jvp rule with the kernel selected."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import flow_maps, interpolants, losses
from fmjax.models import attention, build_for_benchmark, flash_jvp


def _inputs(b, n, h, d, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 6)
  return [jax.random.normal(k, (b, n, h, d), dtype) for k in keys]


def _naive64(q, k, v, dq, dk, dv):
  """Output, tangent and logsumexp in float64 numpy, written out (no jvp): the formulas of
  the kernel's docstring applied to full matrices."""
  q, k, v, dq, dk, dv = (np.asarray(x, np.float64) for x in (q, k, v, dq, dk, dv))
  c = 1 / np.sqrt(q.shape[-1])
  s = np.einsum('bqhd,bkhd->bhqk', q, k) * c
  ds = (np.einsum('bqhd,bkhd->bhqk', dq, k) + np.einsum('bqhd,bkhd->bhqk', q, dk)) * c
  lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  p = np.exp(s - lse[..., None])
  o = np.einsum('bhqk,bkhd->bqhd', p, v)
  dp = p * (ds - np.sum(p * ds, -1, keepdims=True))
  do = np.einsum('bhqk,bkhd->bqhd', dp, v) + np.einsum('bhqk,bkhd->bqhd', p, dv)
  return o, do, lse


@pytest.mark.parametrize('shape,blocks', [((2, 64, 2, 16), (32, 32)), ((1, 100, 3, 24), (32, 16)),
                                          ((1, 130, 1, 72), (64, 32)), ((1, 16, 2, 128), (16, 16))])
def test_kernel_matches_float64_naive(shape, blocks):
  """Sequence lengths that are and are not multiples of the blocks, head dims 16..128 (72:
  DiT-XL/2's, padded to 128)."""
  args = _inputs(*shape)
  o, do, lse = flash_jvp.attention_and_tangent(*args, block_q=blocks[0], block_k=blocks[1],
                                               interpret=True)
  ro, rdo, rlse = _naive64(*args)
  np.testing.assert_allclose(o, ro, atol=2e-6)
  np.testing.assert_allclose(do, rdo, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, rlse, atol=2e-6)


def test_kernel_in_bfloat16_accumulates_in_float32():
  args = _inputs(1, 96, 2, 32, dtype=jnp.bfloat16)
  o, do, _ = flash_jvp.attention_and_tangent(*args, block_q=32, block_k=32, interpret=True)
  ro, rdo, _ = _naive64(*args)
  assert o.dtype == jnp.bfloat16 and do.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(o, np.float32), ro, atol=3e-2)
  np.testing.assert_allclose(np.asarray(do, np.float32), rdo, atol=6e-2, rtol=3e-2)


FLASH = functools.partial(attention.flash_attention, interpret=True, block_q=16, block_k=16)


def test_default_interprets_off_gpu():
  """interpret=None (the default) runs the kernel in the interpreter on a CPU: the same
  output and tangent as naive attention, where interpret=False has no CPU lowering."""
  q, k, v, dq, dk, dv = _inputs(1, 24, 2, 16, seed=5)
  out, tangent = jax.jvp(functools.partial(attention.flash_attention, block_q=16, block_k=16),
                         (q, k, v), (dq, dk, dv))
  ref_out, ref_tangent = jax.jvp(attention.naive_attention, (q, k, v), (dq, dk, dv))
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(tangent, ref_tangent, atol=1e-4, rtol=1e-4)
  if jax.default_backend() != 'gpu':
    with pytest.raises(Exception, match='interpret'):
      jax.jvp(functools.partial(attention.flash_attention, interpret=False), (q, k, v), (dq, dk, dv))


def test_flash_attention_every_mode_matches_naive():
  """jvp, grad of the output, grad of a loss on the primal and on the tangent (LSD-type), and
  grad with the tangent stop-gradiented (MeanFlow-type): equal to naive attention's."""
  q, k, v, dq, dk, dv = _inputs(1, 48, 1, 16, seed=1)
  ro, rdo, _ = _naive64(q, k, v, dq, dk, dv)
  o, do = jax.jit(lambda *a: jax.jvp(FLASH, a[:3], a[3:]))(q, k, v, dq, dk, dv)
  np.testing.assert_allclose(o, ro, atol=2e-6)
  np.testing.assert_allclose(do, rdo, atol=1e-5)

  def on_output(attend):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v))), argnums=(0, 1, 2)))(q, k, v)

  def through_tangent(attend, stop):
    def loss(*a):
      o, do = jax.jvp(attend, a[:3], a[3:])
      do = jax.lax.stop_gradient(do) if stop else do
      return jnp.sum(jnp.cos(o) * do) + jnp.sum(do**2)
    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, k, v, dq, dk, dv)

  blockwise = functools.partial(FLASH, tangent_backward='blockwise')   # the default is the kernel
  for got, want in ((on_output(FLASH), on_output(attention.naive_attention)),
                    (through_tangent(FLASH, False), through_tangent(attention.naive_attention, False)),
                    (through_tangent(blockwise, False), through_tangent(attention.naive_attention, False)),
                    (through_tangent(FLASH, True), through_tangent(attention.naive_attention, True))):
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_gradient_of_the_tangent_is_exact_or_declared_zero():
  """'exact' follows the tangent's true derivative (checked against float64 finite differences
  of the written-out formula); 'zero' drops it, and agrees when the loss stops it anyway."""
  q, k, v, dq, dk, dv = _inputs(1, 24, 1, 16, seed=2)
  u = jax.random.normal(jax.random.key(9), q.shape)

  def loss(attend, q):
    return jnp.sum(u * jax.jvp(attend, (q, k, v), (dq, dk, dv))[1])
  grad = jax.jit(jax.grad(functools.partial(loss, FLASH)))(q)
  eps, e = 1e-4, np.zeros(q.shape)
  e[0, 3, 0, 5] = 1
  fd = (np.sum(np.asarray(u, np.float64) * _naive64(q + eps * e, k, v, dq, dk, dv)[1])
        - np.sum(np.asarray(u, np.float64) * _naive64(q - eps * e, k, v, dq, dk, dv)[1])) / (2 * eps)
  np.testing.assert_allclose(grad[0, 3, 0, 5], fd, rtol=1e-3)
  zero = functools.partial(FLASH, tangent_gradient='zero')
  np.testing.assert_array_equal(jax.grad(functools.partial(loss, zero))(q), 0.0)


def test_stopped_tangent_costs_nothing_extra():
  """With the tangent stop-gradiented, 'exact' compiles to the same FLOPs as 'zero': the
  blockwise derivative of the tangent is dead code (MeanFlow/iMF/sCT pay nothing for it)."""
  args = _inputs(1, 32, 1, 16, seed=3)

  def grad_fn(mode):
    attend = functools.partial(FLASH, tangent_gradient=mode)
    def loss(*a):
      o, do = jax.jvp(attend, a[:3], a[3:])
      return jnp.sum((o - jax.lax.stop_gradient(do)) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  def flops(mode):
    cost = grad_fn(mode).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  assert flops('exact') == flops('zero')


def test_auto_attention_is_naive_off_gpu_and_names_are_checked():
  q, k, v = _inputs(1, 8, 1, 8)[:3]
  np.testing.assert_array_equal(attention.attention_fn('auto', min_flash_tokens=4)(q, k, v),
                                attention.naive_attention(q, k, v))
  with pytest.raises(ValueError, match='tangent_gradient'):
    attention.flash_attention(q, k, v, tangent_gradient='none')
  with pytest.raises(ValueError, match='primal'):
    attention.flash_attention(q, k, v, primal='triton')


# MeanFlow is left out: iMF's loss takes MeanFlow's jvp through the same parameterization; ESD
# and sCT too: like iMF they stop the gradient of the tangent, the path iMF covers (and CI time
# is short).
@pytest.mark.parametrize('rule,options', [('lsd', {}), ('imf', {})])
def test_dit_loss_and_gradient_with_the_kernel(rule, options):
  """One DiT loss and parameter gradient per jvp rule: the kernel (interpret mode) selected
  equals naive attention. (The distillation rules lmd/emd share LSD's/ESD's jvp paths, MeanFlow iMF's.)"""
  interp = interpolants.linear()
  results = []
  for name, opts in (('flash', {'interpret': True, 'block_q': 16, 'block_k': 16}), ('naive', None)):
    apply, params, x = build_for_benchmark('dit', 'tiny', batch=4, depth=1, attention=name,
                                           attention_options=opts)
    parameterization = 'meanflow' if rule in ('meanflow', 'imf') else 'displacement'
    fm = flow_maps.make(parameterization, apply, interp)
    loss = losses.make(rule, fm, interp, **options)
    batch = {'x1': x, 'step': jnp.zeros((), jnp.int32)}
    (value, _), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        loss.init(params), batch, jax.random.key(0))
    results.append((value, grad))
  (v1, g1), (v2, g2) = results
  np.testing.assert_allclose(v1, v2, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
