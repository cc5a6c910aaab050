"""The fused backward of attention's tangent (Pallas, interpret mode on CPU): its six gradients
against float64 formulas written out from full matrices, those formulas against jax.grad of a
float64 attention's jvp, grad through flash_attention's tangent against the blockwise path and
naive attention, and no [seq, seq] array in the compiled gradient."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import attention, flash_jvp, flash_jvp_backward


def _inputs(b, nq, nk, h, d, seed=0, dtype=jnp.float32):
  """(q, k, v, dq, dk, dv, g): g is the cotangent of dO."""
  keys = jax.random.split(jax.random.key(seed), 7)
  query_side = [jax.random.normal(keys[i], (b, nq, h, d), dtype) for i in (0, 3, 6)]
  key_side = [jax.random.normal(keys[i], (b, nk, h, d), dtype) for i in (1, 2, 4, 5)]
  (q, dq, g), (k, v, dk, dv) = query_side, key_side
  return q, k, v, dq, dk, dv, g


def _formulas64(q, k, v, dq, dk, dv, g):
  """The six gradients of sum(g * dO) in float64 numpy from full [Nq, Nk] matrices (the
  formulas of flash_jvp_backward's docstring, written out again here)."""
  q, k, v, dq, dk, dv, g = (np.asarray(x, np.float64) for x in (q, k, v, dq, dk, dv, g))
  c = 1 / np.sqrt(q.shape[-1])
  qk = functools.partial(np.einsum, 'bqhd,bkhd->bhqk')
  pk = functools.partial(np.einsum, 'bhqk,bkhd->bqhd')    # [q, k] @ key side
  pq = functools.partial(np.einsum, 'bhqk,bqhd->bkhd')    # [q, k]^T @ query side
  s, ds = qk(q, k) * c, (qk(dq, k) + qk(q, dk)) * c
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  mu = np.sum(p * ds, -1, keepdims=True)
  dp = p * (ds - mu)
  o, do = pk(p, v), pk(dp, v) + pk(p, dv)
  a, b = qk(g, v), qk(g, dv)
  alpha = np.einsum('bqhd,bqhd->bhq', g, o)[..., None]
  delta = np.einsum('bqhd,bqhd->bhq', g, do)[..., None]
  e = p * (a - alpha)
  h = p * ((ds - mu) * (a - alpha) + b - delta)
  return (c * pk(h, k) + c * pk(e, dk), c * pq(h, q) + c * pq(e, dq), pq(dp, g),
          c * pk(e, k), c * pq(e, q), pq(p, g))


def _kernel_grads(args, blocks):
  q, k, v, dq, dk, dv, g = args
  o, do, lse, mu = flash_jvp.attention_tangent_and_statistics(
      q, k, v, dq, dk, dv, block_q=blocks[0], block_k=blocks[1], interpret=True)
  return flash_jvp_backward.tangent_vjp(q, k, v, dq, dk, dv, o, do, lse, mu, g,
                                        block_q=blocks[0], block_k=blocks[1], interpret=True)


NAMES = ('q', 'k', 'v', 'dq', 'dk', 'dv')


@pytest.mark.parametrize('shape,blocks', [((2, 20, 36, 2, 16), (16, 16)),
                                          ((1, 32, 32, 1, 72), (16, 16))])
def test_six_gradients_match_float64_formulas(shape, blocks):
  """Batch 2 and two heads with Nq != Nk, neither a multiple of the blocks (padded queries and
  masked keys); then whole blocks and head dim 72 (DiT-XL/2's, padded to 128)."""
  args = _inputs(*shape)
  for name, got, want in zip(NAMES, _kernel_grads(args, blocks), _formulas64(*args)):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=f'grad {name}')


def _attention64(q, k, v):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)


def test_formulas_are_the_gradient_of_the_tangent():
  """The written-out formulas equal jax.grad of sum(g * jvp(attention)) in float64, so the
  kernel test above checks the true derivative, not only a transcription."""
  args = _inputs(2, 5, 7, 2, 4, seed=3)
  with jax.enable_x64(True):
    q, k, v, dq, dk, dv, g = (jnp.asarray(np.asarray(x), jnp.float64) for x in args)
    loss = lambda *a: jnp.sum(g * jax.jvp(_attention64, a[:3], a[3:])[1])
    grads = jax.grad(loss, argnums=tuple(range(6)))(q, k, v, dq, dk, dv)
    for name, got, want in zip(NAMES, grads, _formulas64(*args)):
      np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-10, err_msg=f'grad {name}')


def test_padded_keys_stay_masked_when_every_score_is_far_below_zero():
  """All real scores near -100: an unmasked padded key (score 0) would get P = exp(0 - lse),
  about e^100, which overflows float32 and turns the gradients into inf/nan."""
  q, k, v, dq, dk, dv, g = _inputs(1, 16, 20, 1, 16, seed=4)
  q = 0.1 * q - 5.0
  k = 0.1 * k + 5.0     # c q.k about -(1/4) 16 * 25 = -100
  args = (q, k, v, dq, dk, dv, g)
  for name, got, want in zip(NAMES, _kernel_grads(args, (16, 16)), _formulas64(*args)):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4, err_msg=f'grad {name}')


def test_bfloat16_inputs_accumulate_in_float32():
  args = _inputs(1, 40, 40, 2, 32, seed=5, dtype=jnp.bfloat16)
  for name, got, want in zip(NAMES, _kernel_grads(args, (16, 16)), _formulas64(*args)):
    assert got.dtype == jnp.bfloat16
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2 * scale,
                               err_msg=f'grad {name}')


FLASH = functools.partial(attention.flash_attention, interpret=True, block_q=16, block_k=16,
                          block_size=16, backward_block=16)


def _grad_through_tangent(attend, args):
  q, k, v, dq, dk, dv, u = args

  def loss(*a):
    o, do = jax.jvp(attend, a[:3], a[3:])
    return jnp.sum(jnp.cos(o) * do) + jnp.sum(u * do) + jnp.sum(do**2)
  return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, k, v, dq, dk, dv)


def test_flash_attention_gradient_through_the_tangent_kernel_equals_naive():
  """(The blockwise backward, flash_attention's default, is checked against naive attention in
  tests/test_flash_jvp.py.)"""
  args = _inputs(1, 24, 24, 2, 16, seed=6)
  kernel = _grad_through_tangent(functools.partial(FLASH, tangent_backward='kernel'), args)
  naive = _grad_through_tangent(attention.naive_attention, args)
  for name, a, c in zip(NAMES, kernel, naive):
    np.testing.assert_allclose(a, c, atol=2e-5, rtol=2e-5, err_msg=f'grad {name} vs naive')


def test_the_backward_kernels_keep_their_own_blocks(monkeypatch):
  """The forward's blocks (given, or tuned for the forward kernel) do not reach the backward
  kernels: 128 x 64 there asked an H100 for more shared memory than it has."""
  seen = {}
  real = flash_jvp_backward.tangent_vjp

  def spy(*args, **kwargs):
    seen.update(block_q=kwargs['block_q'], block_k=kwargs['block_k'])
    return real(*args, **kwargs)
  monkeypatch.setattr(flash_jvp_backward, 'tangent_vjp', spy)
  args = _inputs(1, 32, 32, 1, 16, seed=8)
  attend = functools.partial(FLASH, tangent_backward='kernel', block_q=32, block_k=16, backward_block=8)
  got = _grad_through_tangent(attend, args)
  assert seen == {'block_q': 8, 'block_k': 8}
  naive = _grad_through_tangent(attention.naive_attention, args)
  for name, a, c in zip(NAMES, got, naive):
    np.testing.assert_allclose(a, c, atol=2e-5, rtol=2e-5, err_msg=f'grad {name} vs naive')


def test_compiled_gradient_has_no_seq_by_seq_array():
  """grad of a loss on dO alone (O is unused, so the XLA primal drops out): the kernel path
  compiles to no array with a [64, 64] (seq x seq) tail; naive attention's does (the check bites)."""
  n = 64
  q, k, v, dq, dk, dv, u = _inputs(1, n, n, 1, 16, seed=7)

  def hlo(attend):
    loss = lambda *a: jnp.sum(u * jax.jvp(attend, a[:3], a[3:])[1])
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    return grad.lower(q, k, v, dq, dk, dv).compile().as_text()
  square = re.compile(rf'\[(?:\d+,)*{n},{n}\]')
  assert square.search(hlo(attention.naive_attention))
  assert not square.search(hlo(functools.partial(FLASH, tangent_backward='kernel')))


def test_bad_options_and_shapes_are_rejected():
  q, k, v, dq, dk, dv, g = _inputs(1, 8, 8, 1, 8)
  with pytest.raises(ValueError, match="tangent_backward must be 'kernel'"):
    attention.flash_attention(q, k, v, tangent_backward='fused')
  lse = jnp.zeros((1, 1, 8))
  with pytest.raises(ValueError, match='lse .* and mu'):
    flash_jvp_backward.tangent_vjp(q, k, v, dq, dk, dv, q, q, lse[..., :4], lse, g, interpret=True)
