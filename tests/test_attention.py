"""Blockwise attention against naive attention: output, jvp, gradients of a loss on the jvp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import attention

B, N, H, D = 2, 50, 2, 8
BLOCK, QBLOCK = 16, 12       # neither divides N: exercises padding and masking


def _inputs(dtype, n_q=N, n_k=N, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  shapes = [(B, n_q, H, D), (B, n_k, H, D), (B, n_k, H, D)] * 2
  # Scale 2 makes the softmax peaked enough for the running max to matter.
  return [(2.0 * jax.random.normal(k, s)).astype(dtype) for k, s in zip(ks, shapes)]


def _blockwise(q, k, v):
  return attention.blockwise_attention(q, k, v, BLOCK, QBLOCK)


# Everything below runs jitted: eager op-by-op dispatch of scans and their derivatives is
# what would make these tests slow, not the arithmetic.
_jvp = jax.jit(jax.jvp, static_argnums=0)


# bf16 tolerances are relative to the largest entry: both sides round inputs/products to bf16.
TOLS = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_output_and_jvp_match_naive(dtype):
  q, k, v, dq, dk, dv = _inputs(dtype)
  out, tangent = _jvp(_blockwise, (q, k, v), (dq, dk, dv))
  ref_out, ref_tangent = _jvp(attention.naive_attention, (q, k, v), (dq, dk, dv))
  assert out.dtype == tangent.dtype == dtype and out.shape == (B, N, H, D)
  _close(out, ref_out, TOLS[dtype])
  _close(tangent, ref_tangent, TOLS[dtype])


def test_forward_and_jvp_match_finite_differences():
  q, k, v, dq, dk, dv = _inputs(jnp.float32)
  f = jax.jit(_blockwise)
  out, tangent = _jvp(_blockwise, (q, k, v), (dq, dk, dv))
  _close(f(q, k, v), out, 1e-6)    # the primal path (no jvp) agrees with the jvp rule's primal
  eps = 2e-3
  plus = f(q + eps * dq, k + eps * dk, v + eps * dv)
  minus = f(q - eps * dq, k - eps * dk, v - eps * dv)
  _close(tangent, (plus - minus) / (2 * eps), 2e-3)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_grad_of_loss_on_jvp_matches_naive(dtype):
  """Gradients with respect to primals and tangents (LSD also backpropagates into the tangent)."""
  def loss(attend):
    def fn(q, k, v, dq, dk, dv):
      return jnp.sum(jax.jvp(attend, (q, k, v), (dq, dk, dv))[1].astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(fn, argnums=tuple(range(6))))
  args = _inputs(dtype)
  for g, r in zip(loss(_blockwise)(*args), loss(attention.naive_attention)(*args)):
    assert g.dtype == dtype
    _close(g, r, 2 * TOLS[dtype])


def test_grad_of_loss_on_output_matches_naive():
  q, k, v, *_ = _inputs(jnp.float32)
  loss = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2)))
  for g, r in zip(loss(_blockwise)(q, k, v), loss(attention.naive_attention)(q, k, v)):
    _close(g, r, 2 * TOLS[jnp.float32])


def test_selector_cross_attention_lengths_and_vmap():
  q, k, v, *_ = _inputs(jnp.float32, n_q=7, n_k=37)
  attend = attention.attention_fn('blockwise', block_size=BLOCK)
  batched = jax.jit(jax.vmap(attend))(q[None], k[None], v[None])[0]
  _close(batched, jax.jit(attention.naive_attention)(q, k, v), TOLS[jnp.float32])
  assert attention.attention_fn('naive') is attention.naive_attention
  with pytest.raises(ValueError, match='choose one of'):
    attention.attention_fn('flashy')
  with pytest.raises(ValueError, match='heads, head_dim'):
    attention.naive_attention(q[0], k[0], v[0])


def _largest_intermediate(fn, *args) -> int:
  """Size of the largest array any equation of fn's jaxpr (sub-jaxprs included) produces."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        best = max(best, int(np.prod(getattr(var.aval, 'shape', ()))))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            best = max(best, walk(inner))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_no_seq_by_seq_array_under_grad_of_jvp():
  """The point of the blockwise rule: nothing of size seq x seq, even in grad of the jvp."""
  n, block = 512, 64
  q, k, v, dq, dk, dv = _inputs(jnp.float32, n_q=n, n_k=n)
  scores = B * H * n * n
  grad_fn = lambda f: jax.grad(lambda q, k, v: jnp.sum(jax.jvp(f, (q, k, v), (dq, dk, dv))[1] ** 2),
                               argnums=(0, 1, 2))
  blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, block)
  assert _largest_intermediate(grad_fn(attention.naive_attention), q, k, v) >= scores   # the check can fail
  assert _largest_intermediate(grad_fn(blockwise), q, k, v) <= scores // 4


def test_multi_head_self_attention_splits_heads():
  b, n, heads, hd = 2, 6, 3, 4
  qkv = jax.random.normal(jax.random.key(1), (b, n, 3 * heads * hd))
  out = attention.multi_head_self_attention(qkv, heads)
  q, k, v = (qkv[..., i * heads * hd:(i + 1) * heads * hd].reshape(b, n, heads, hd) for i in range(3))
  _close(out, attention.naive_attention(q, k, v).reshape(b, n, heads * hd), 1e-6)
