"""A fused Pallas kernel for the jvp of softmax attention: output, logsumexp and tangent in one pass.

With S = c q k^T (c = 1/sqrt(d)), P = softmax(S) row-wise and O = P v, the forward-mode tangent
for input tangents (dq, dk, dv) is (sCM, Lu & Song 2024, arXiv 2410.11081, App. F):

  dS = c (dq k^T + q dk^T),
  dO_i = sum_j P_ij [dS_ij (v_j - O_i) + dv_j]
       = [sum_j w_ij (dS_ij v_j + dv_j)] / l_i  -  ([sum_j w_ij dS_ij] / l_i) O_i,

with unnormalized weights w_ij = exp(S_ij - m_i) and l_i = sum_j w_ij. Every bracket is a sum
over keys, so one query block walks the key/value blocks once and keeps five accumulators in
float32 (the running max m, l, sum w v, sum w (dS v + dv), sum w dS), all rescaled by the same
exp(m_old - m_new) as FlashAttention's output accumulator (Dao et al. 2022, Alg. 1). Per key
block: six matmuls (q k^T, dq k^T, q dk^T, w v, (w dS) v, w dv) on tiles in on-chip memory;
nothing of size [seq, seq] is ever written, so memory is O(seq) (plus the outputs).

The kernel runs on the Pallas Triton GPU backend, and on every backend in Pallas' interpret
mode (`interpret=True`, what the CPU tests use). Its TPU variant, with Mosaic's block shapes and
layout, is fmjax.models.flash_jvp_tpu.

Shapes: [batch, seq, heads, head_dim] like the rest of fmjax.models.attention. Sequence lengths
that are not multiples of the blocks are zero-padded, and padded keys masked; head dimensions
are zero-padded to a power of two (zero columns of q, k add nothing to S; zero columns of v give
zero output columns, which are sliced away).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Score of a padded key: finite so that exp(S - m) underflows to 0 without inf - inf.
_MASKED = -1e30


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _dot(a, b):
  """a @ b with float32 accumulation (the MMA's accumulator type)."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_t(a, b):
  """a @ b^T with float32 accumulation; the transpose folds into the matmul (no copy of b)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _jvp_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, o_ref, do_ref, lse_ref, *mu_ref,
                scale: float, block_k: int, kv_len: int, num_k_blocks: int):
  """One (query block, batch, head) program: walk all key blocks once (see module docstring).
  With a fourth output ref, also writes mu_i = sum_j P_ij dS_ij (what the reverse mode needs)."""
  q = q_ref[...]
  dq = dq_ref[...]
  block_q, d = q.shape
  f32 = jnp.float32

  def body(j, carry):
    m, l, acc, tacc, c = carry
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    dk, dv = dk_ref[keys, :], dv_ref[keys, :]
    s = _dot_t(q, k) * scale
    ds = (_dot_t(dq, k) + _dot_t(q, dk)) * scale
    if kv_len % block_k:     # only the padded case pays for the mask
      valid = (j * block_k + jnp.arange(block_k)) < kv_len
      s = jnp.where(valid[None, :], s, _MASKED)
      ds = jnp.where(valid[None, :], ds, 0.0)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    rescale = jnp.exp(m - m_new)
    w = jnp.exp(s - m_new[:, None])
    wds = w * ds
    l = rescale * l + jnp.sum(w, axis=1)
    c = rescale * c + jnp.sum(wds, axis=1)
    acc = rescale[:, None] * acc + _dot(w.astype(v.dtype), v)
    tacc = rescale[:, None] * tacc + _dot(wds.astype(v.dtype), v) + _dot(w.astype(dv.dtype), dv)
    return m_new, l, acc, tacc, c

  init = (jnp.full((block_q,), _MASKED, f32), jnp.zeros((block_q,), f32),
          jnp.zeros((block_q, d), f32), jnp.zeros((block_q, d), f32), jnp.zeros((block_q,), f32))
  m, l, acc, tacc, c = jax.lax.fori_loop(0, num_k_blocks, body, init)
  o = acc / l[:, None]
  mu = c / l     # sum_j P_ij dS_ij, computed once whether or not it is written
  o_ref[...] = o.astype(o_ref.dtype)
  do_ref[...] = (tacc / l[:, None] - mu[:, None] * o).astype(do_ref.dtype)
  lse_ref[...] = m + jnp.log(l)
  if mu_ref:
    mu_ref[0][...] = mu


def _pad_to(x, seq: int, dim: int):
  b, n, h, d = x.shape
  if (n, d) == (seq, dim):
    return x
  return jnp.pad(x, ((0, 0), (0, seq - n), (0, 0), (0, dim - d)))


def compiler_params(interpret: bool, d_pad: int, num_warps: int | None, num_stages: int):
  """Triton launch options (None in interpret mode): 4 warps up to head dim 64, 8 above."""
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu   # GPU-only import
  params_class = getattr(plgpu, 'CompilerParams', None) or getattr(plgpu, 'TritonCompilerParams')
  return params_class(num_warps=num_warps or (4 if d_pad <= 64 else 8), num_stages=num_stages)


def padded_sizes(nq: int, nk: int, d: int, block_q: int, block_k: int):
  """(block_q, block_k, nq_pad, nk_pad, d_pad): blocks no larger than the (power-of-two rounded)
  lengths, lengths padded to whole blocks, head dim to a power of two >= 16 (Triton's dots)."""
  block_q = min(block_q, _next_power_of_2(nq))
  block_k = min(block_k, _next_power_of_2(nk))
  nq_pad, nk_pad = -(-nq // block_q) * block_q, -(-nk // block_k) * block_k
  return block_q, block_k, nq_pad, nk_pad, max(16, _next_power_of_2(d))


def check_shapes(name: str, q, k, v, dq, dk, dv):
  if k.shape != v.shape or dk.shape != k.shape or dv.shape != v.shape or dq.shape != q.shape:
    raise ValueError(f'{name}: shapes q {q.shape} dq {dq.shape} k {k.shape} '
                     f'dk {dk.shape} v {v.shape} dv {dv.shape} do not match.')


def _forward(q, k, v, dq, dk, dv, *, block_q, block_k, interpret, num_warps, num_stages,
             with_mu: bool):
  b, nq, h, d = q.shape
  nk = k.shape[1]
  check_shapes('attention_and_tangent', q, k, v, dq, dk, dv)
  block_q, block_k, nq_pad, nk_pad, d_pad = padded_sizes(nq, nk, d, block_q, block_k)
  dtype = q.dtype
  q, dq = (_pad_to(x.astype(dtype), nq_pad, d_pad) for x in (q, dq))
  k, v, dk, dv = (_pad_to(x.astype(dtype), nk_pad, d_pad) for x in (k, v, dk, dv))

  kernel = functools.partial(_jvp_kernel, scale=1.0 / math.sqrt(d), block_k=block_k, kv_len=nk,
                             num_k_blocks=nk_pad // block_k)
  query_spec = pl.BlockSpec((None, block_q, None, d_pad), lambda i, bi, hi: (bi, i, hi, 0))
  key_spec = pl.BlockSpec((None, nk_pad, None, d_pad), lambda i, bi, hi: (bi, 0, hi, 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
  row_shape = jax.ShapeDtypeStruct((b, h, nq_pad), jnp.float32)
  outputs = pl.pallas_call(
      kernel,
      grid=(nq_pad // block_q, b, h),
      in_specs=[query_spec, key_spec, key_spec, query_spec, key_spec, key_spec],
      out_specs=[query_spec, query_spec, row_spec] + [row_spec] * with_mu,
      out_shape=[jax.ShapeDtypeStruct((b, nq_pad, h, d_pad), dtype),
                 jax.ShapeDtypeStruct((b, nq_pad, h, d_pad), dtype),
                 row_shape] + [row_shape] * with_mu,
      compiler_params=compiler_params(interpret, d_pad, num_warps, num_stages),
      interpret=interpret,
      name='flash_attention_jvp',
  )(q, k, v, dq, dk, dv)
  o, do, *rows = outputs
  return (o[:, :nq, :, :d], do[:, :nq, :, :d]) + tuple(r[:, :, :nq] for r in rows)


_STATIC = ('block_q', 'block_k', 'interpret', 'num_warps', 'num_stages')


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention_and_tangent(q, k, v, dq, dk, dv, *, block_q: int = 64, block_k: int = 64,
                          interpret: bool = False, num_warps: int | None = None,
                          num_stages: int = 2):
  """(O, dO, logsumexp) of softmax(q k^T / sqrt(d)) v and its jvp along (dq, dk, dv), fused.

  q, dq: [B, Nq, H, D]; k, v, dk, dv: [B, Nk, H, D]. O and dO have q's dtype; the logsumexp
  [B, H, Nq] is float32. Not differentiable itself: fmjax.models.attention.flash_attention wraps
  it with the derivative rules.
  """
  return _forward(q, k, v, dq, dk, dv, block_q=block_q, block_k=block_k, interpret=interpret,
                  num_warps=num_warps, num_stages=num_stages, with_mu=False)


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention_tangent_and_statistics(q, k, v, dq, dk, dv, *, block_q: int = 64, block_k: int = 64,
                                     interpret: bool = False, num_warps: int | None = None,
                                     num_stages: int = 2):
  """(O, dO, logsumexp, mu): `attention_and_tangent` plus mu_i = sum_j P_ij dS_ij [B, H, Nq]
  (float32), the residuals of the tangent's reverse mode (fmjax.models.flash_jvp_backward).
  The same kernel and the same FLOPs: mu is the c / l it computes anyway."""
  return _forward(q, k, v, dq, dk, dv, block_q=block_q, block_k=block_k, interpret=interpret,
                  num_warps=num_warps, num_stages=num_stages, with_mu=True)
