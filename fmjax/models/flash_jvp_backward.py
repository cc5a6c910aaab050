"""Fused Pallas kernels for the reverse mode of attention's tangent: the vjp of dO w.r.t. (q, k, v, dq, dk, dv).

The forward-mode tangent of O = softmax(S) v, S = c q k^T (c = 1/sqrt(d)), is (sCM, Lu & Song
2024, arXiv 2410.11081, App. F; fmjax.models.flash_jvp computes it):

  dS = c (dq k^T + q dk^T),   mu_i = sum_j P_ij dS_ij,   dP = P o (dS - mu),   dO = dP v + P dv.

Rules that backpropagate through dO (LSD) need its vjp. For a cotangent G of dO ([Nq, D]) write
A = G v^T, B = G dv^T ([Nq, Nk]) and the row statistics alpha_i = G_i . O_i, delta_i = G_i . dO_i.
Differentiating L = sum_i G_i . dO_i = sum_j P_ij [dS_ij A_ij + B_ij] - mu_i alpha_i:

  dL/dv = dP^T G,   dL/ddv = P^T G,
  E = dL/ddS = P o (A - alpha),
  dL/dP_ij = dS_ij (A_ij - alpha_i) - mu_i A_ij + B_ij, and through the softmax (its row sum
  under P is delta_i - mu_i alpha_i):  H = dL/dS = P o [(dS - mu) o (A - alpha) + B - delta],

  dL/dq = c H k + c E dk,   dL/ddq = c E k,   dL/dk = c H^T q + c E^T dq,   dL/ddk = c E^T q.

Everything is elementwise in (i, j) given P_ij = exp(S_ij - lse_i) and the four row statistics
lse, mu (saved by the forward kernel), alpha, delta (O(seq D) dot products of saved outputs): no
pass over the keys is needed for them, as FlashAttention-2's backward needs none for its D_i
(Dao 2023, Alg. 2). So the backward is FlashAttention-2's two kernels, one over key blocks
(each program owns a key block and walks the query blocks, accumulating grad k, v, dk, dv in
float32: 10 matmuls per tile) and one over query blocks (grad q and dq: 8 matmuls per tile),
with nothing of size [seq, seq] in memory.

Padding, as in the forward: sequences padded to whole blocks, head dims to a power of two >= 16,
all with zeros. Padded keys get the masked score (their P is 0; unmasked, exp(0 - lse) overflows
when all real scores are far below zero). Padded query rows need no mask: their cotangent G is
zero, so A = B = alpha = delta = 0 and E = H = dP^T G = P^T G = 0 there exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fmjax.models.flash_jvp import _MASKED, _dot, _dot_t, _pad_to, check_shapes, compiler_params, padded_sizes


def tile(q, k, v, dq, dk, dv, g, lse, mu, alpha, delta, valid, scale):
  """The [block_q, block_k] tiles P, dP, E, H of one (query block, key block) pair (float32).

  The row statistics lse, mu, alpha, delta come as columns that broadcast against the tile
  ([block_q, 1] here; lane-broadcast [block_q, block_k] in the TPU kernels), `valid` (keys that
  are not padding) as a mask that broadcasts against it, or None when no key is padded."""
  s = _dot_t(q, k) * scale
  ds = (_dot_t(dq, k) + _dot_t(q, dk)) * scale
  if valid is not None:
    s = jnp.where(valid, s, _MASKED)
    ds = jnp.where(valid, ds, 0.0)
  p = jnp.exp(s - lse)
  a_centered = _dot_t(g, v) - alpha                   # A - alpha
  ds_centered = ds - mu                               # dS - mu
  e = p * a_centered
  h = p * (ds_centered * a_centered + _dot_t(g, dv) - delta)
  return p, p * ds_centered, e, h


def _columns(*rows):
  return tuple(r[:, None] for r in rows)


def _key_block_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, g_ref, lse_ref, mu_ref,
                      alpha_ref, delta_ref, grad_k_ref, grad_v_ref, grad_dk_ref, grad_dv_ref, *,
                      scale: float, block_q: int, kv_len: int, num_q_blocks: int):
  """One (key block, batch, head) program: walk the query blocks, accumulate grad k, v, dk, dv."""
  k, v, dk, dv = k_ref[...], v_ref[...], dk_ref[...], dv_ref[...]
  block_k, d = k.shape
  valid = None
  if kv_len % block_k:     # only the padded case pays for the mask
    valid = ((pl.program_id(0) * block_k + jnp.arange(block_k)) < kv_len)[None, :]

  def body(i, carry):
    acc_k, acc_v, acc_dk, acc_dv = carry
    rows = pl.ds(i * block_q, block_q)
    q, dq, g = q_ref[rows, :], dq_ref[rows, :], g_ref[rows, :]
    stats = _columns(lse_ref[rows], mu_ref[rows], alpha_ref[rows], delta_ref[rows])
    p, dp, e, h = tile(q, k, v, dq, dk, dv, g, *stats, valid, scale)
    acc_v = acc_v + _dot(dp.astype(g.dtype).T, g)
    acc_dv = acc_dv + _dot(p.astype(g.dtype).T, g)
    acc_k = acc_k + _dot(h.astype(q.dtype).T, q) + _dot(e.astype(dq.dtype).T, dq)
    acc_dk = acc_dk + _dot(e.astype(q.dtype).T, q)
    return acc_k, acc_v, acc_dk, acc_dv

  zeros = jnp.zeros((block_k, d), jnp.float32)
  acc_k, acc_v, acc_dk, acc_dv = jax.lax.fori_loop(0, num_q_blocks, body, (zeros,) * 4)
  grad_k_ref[...] = (scale * acc_k).astype(grad_k_ref.dtype)
  grad_v_ref[...] = acc_v.astype(grad_v_ref.dtype)
  grad_dk_ref[...] = (scale * acc_dk).astype(grad_dk_ref.dtype)
  grad_dv_ref[...] = acc_dv.astype(grad_dv_ref.dtype)


def _query_block_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, g_ref, lse_ref, mu_ref,
                        alpha_ref, delta_ref, grad_q_ref, grad_dq_ref, *,
                        scale: float, block_k: int, kv_len: int, num_k_blocks: int):
  """One (query block, batch, head) program: walk the key blocks, accumulate grad q and dq."""
  q, dq, g = q_ref[...], dq_ref[...], g_ref[...]
  stats = _columns(lse_ref[...], mu_ref[...], alpha_ref[...], delta_ref[...])
  block_q, d = q.shape

  def body(j, carry):
    acc_q, acc_dq = carry
    keys = pl.ds(j * block_k, block_k)
    k, v, dk, dv = k_ref[keys, :], v_ref[keys, :], dk_ref[keys, :], dv_ref[keys, :]
    valid = None
    if kv_len % block_k:
      valid = ((j * block_k + jnp.arange(block_k)) < kv_len)[None, :]
    _, _, e, h = tile(q, k, v, dq, dk, dv, g, *stats, valid, scale)
    acc_q = acc_q + _dot(h.astype(k.dtype), k) + _dot(e.astype(dk.dtype), dk)
    acc_dq = acc_dq + _dot(e.astype(k.dtype), k)
    return acc_q, acc_dq

  zeros = jnp.zeros((block_q, d), jnp.float32)
  acc_q, acc_dq = jax.lax.fori_loop(0, num_k_blocks, body, (zeros, zeros))
  grad_q_ref[...] = (scale * acc_q).astype(grad_q_ref.dtype)
  grad_dq_ref[...] = (scale * acc_dq).astype(grad_dq_ref.dtype)


def row_statistic(g, x):
  """sum_d g[b, i, h, d] x[b, i, h, d] in float32 -> [B, H, N] (alpha from O, delta from dO)."""
  return jnp.einsum('bihd,bihd->bhi', g.astype(jnp.float32), x.astype(jnp.float32))


def _pad_rows(x, n: int):
  return jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[-1])))


def check_residuals(name: str, q, o, do, lse, mu, g):
  """The forward's outputs and the cotangent have the shapes `tangent_vjp` needs."""
  b, nq, h, _ = q.shape
  if o.shape != q.shape or do.shape != q.shape or g.shape != q.shape:
    raise ValueError(f'{name}: o {o.shape}, do {do.shape} and the cotangent g {g.shape} '
                     f'must have the shape of q {q.shape}.')
  if lse.shape != (b, h, nq) or mu.shape != (b, h, nq):
    raise ValueError(f'{name}: lse {lse.shape} and mu {mu.shape} must be [batch, heads, '
                     f'seq_q] = {(b, h, nq)}; take them from attention_tangent_and_statistics.')


@functools.partial(jax.jit, static_argnames=('block_q', 'block_k', 'interpret', 'num_warps',
                                             'num_stages'))
def tangent_vjp(q, k, v, dq, dk, dv, o, do, lse, mu, g, *, block_q: int = 64, block_k: int = 64,
                interpret: bool = False, num_warps: int | None = None, num_stages: int = 2):
  """The vjp of the attention tangent dO(q, k, v, dq, dk, dv) at cotangent g: six gradients.

  q, dq, o, do, g: [B, Nq, H, D]; k, v, dk, dv: [B, Nk, H, D]; lse, mu: [B, H, Nq] float32, with
  o, do, lse, mu from `fmjax.models.flash_jvp.attention_tangent_and_statistics` at the same
  inputs. Returns (grad q, grad k, grad v, grad dq, grad dk, grad dv) in the inputs' dtypes
  (float32 accumulation inside). See the module docstring for the formulas.
  """
  b, nq, h, d = q.shape
  nk = k.shape[1]
  check_shapes('tangent_vjp', q, k, v, dq, dk, dv)
  check_residuals('tangent_vjp', q, o, do, lse, mu, g)
  block_q, block_k, nq_pad, nk_pad, d_pad = padded_sizes(nq, nk, d, block_q, block_k)
  dtype = q.dtype
  # Zero padding: padded query rows have g = 0 and so contribute exactly nothing (module docstring).
  alpha, delta = row_statistic(g, o), row_statistic(g, do)
  q, dq, g = (_pad_to(x.astype(dtype), nq_pad, d_pad) for x in (q, dq, g))
  k, v, dk, dv = (_pad_to(x.astype(dtype), nk_pad, d_pad) for x in (k, v, dk, dv))
  rows = tuple(_pad_rows(x.astype(jnp.float32), nq_pad) for x in (lse, mu, alpha, delta))
  inputs = (q, k, v, dq, dk, dv, g) + rows
  scale = 1.0 / math.sqrt(d)
  params = compiler_params(interpret, d_pad, num_warps, num_stages)
  query_shape = jax.ShapeDtypeStruct((b, nq_pad, h, d_pad), dtype)
  key_shape = jax.ShapeDtypeStruct((b, nk_pad, h, d_pad), dtype)

  # Kernel 1: grid over key blocks; the query side is read whole and walked in blocks.
  all_queries = pl.BlockSpec((None, nq_pad, None, d_pad), lambda j, bi, hi: (bi, 0, hi, 0))
  all_rows = pl.BlockSpec((None, None, nq_pad), lambda j, bi, hi: (bi, hi, 0))
  key_block = pl.BlockSpec((None, block_k, None, d_pad), lambda j, bi, hi: (bi, j, hi, 0))
  grad_k, grad_v, grad_dk, grad_dv = pl.pallas_call(
      functools.partial(_key_block_kernel, scale=scale, block_q=block_q, kv_len=nk,
                        num_q_blocks=nq_pad // block_q),
      grid=(nk_pad // block_k, b, h),
      in_specs=[all_queries] + [key_block] * 2 + [all_queries] + [key_block] * 2 + [all_queries]
      + [all_rows] * 4,
      out_specs=[key_block] * 4,
      out_shape=[key_shape] * 4,
      compiler_params=params,
      interpret=interpret,
      name='flash_attention_jvp_vjp_keys',
  )(*inputs)

  # Kernel 2: grid over query blocks; the key side is read whole and walked in blocks.
  query_block = pl.BlockSpec((None, block_q, None, d_pad), lambda i, bi, hi: (bi, i, hi, 0))
  row_block = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
  all_keys = pl.BlockSpec((None, nk_pad, None, d_pad), lambda i, bi, hi: (bi, 0, hi, 0))
  grad_q, grad_dq = pl.pallas_call(
      functools.partial(_query_block_kernel, scale=scale, block_k=block_k, kv_len=nk,
                        num_k_blocks=nk_pad // block_k),
      grid=(nq_pad // block_q, b, h),
      in_specs=[query_block] + [all_keys] * 2 + [query_block] + [all_keys] * 2 + [query_block]
      + [row_block] * 4,
      out_specs=[query_block] * 2,
      out_shape=[query_shape] * 2,
      compiler_params=params,
      interpret=interpret,
      name='flash_attention_jvp_vjp_queries',
  )(*inputs)
  query_out = lambda x: x[:, :nq, :, :d]
  key_out = lambda x: x[:, :nk, :, :d]
  return (query_out(grad_q), key_out(grad_k), key_out(grad_v), query_out(grad_dq),
          key_out(grad_dk), key_out(grad_dv))
