"""The fused backward of attention's tangent for Pallas TPU (Mosaic): the vjp of dO w.r.t.
(q, k, v, dq, dk, dv), the TPU counterpart of fmjax.models.flash_jvp_backward.

The formulas are that module's (its docstring; sCM, Lu & Song 2024, App. F for the tangent):
with P = exp(S - lse), the row statistics mu (from the forward kernel), alpha = G . O and
delta = G . dO, every [block_q, block_k] tile of E = dL/ddS and H = dL/dS is elementwise, and

  dL/dq = c H k + c E dk,   dL/ddq = c E k,   dL/dk = c H^T q + c E^T dq,   dL/ddk = c E^T q,
  dL/dv = dP^T G,           dL/ddv = P^T G.

`flash_jvp_backward.tile` computes the tiles for both backends. What differs on TPU (the layout
is the forward TPU kernel's, fmjax.models.flash_jvp_tpu):

- Operands [batch, heads, seq, head_dim], head_dim zero-padded to a multiple of 128, sequences
  to whole blocks (padded keys masked; padded query rows have a zero cotangent and contribute
  exactly nothing, as on GPU).
- Two grids, each with its reduction axis innermost and "arbitrary" (sequential on one core)
  and float32 accumulators in VMEM scratch, zeroed at the first step and written out at the
  last: (batch, head, key block, query block) accumulates grad k, v, dk, dv of one key block
  (four [block_k, head_dim] accumulators, ten matmuls per tile); (batch, head, query block, key
  block) accumulates grad q and dq (two accumulators, eight matmuls). Pallas streams the walked
  side's tiles from HBM, so VMEM use does not grow with the sequence.
- The four row statistics travel lane-broadcast, [B, H, Nq, 128] float32 (each row's value on
  all 128 lanes, the layout of per-row vectors in vregs; JAX's own TPU flash attention backward
  passes its l, m and di the same way), and are widened to the tile with `jnp.tile`.
- Keys sit on the lanes of every tile; the key-side gradients contract over queries with the
  tile transposed in VMEM (x.T), so block_q, like block_k, must be a multiple of 128.

`interpret=True` runs both kernels in Pallas' TPU interpret mode on any backend (the CPU tests);
the Mosaic lowering is checked on CPU too, compiling and timing need a TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fmjax.models.flash_jvp_backward import check_residuals, row_statistic, tile
from fmjax.models.flash_jvp_tpu import (LANES, _dot, _lanes_to, _round_up, check_shapes,
                                        from_kernel_layout, interpret_params, lane_broadcast,
                                        to_kernel_layout)

_SEMANTICS = pltpu.CompilerParams(
    dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY))


def backward_block_sizes(nq: int, nk: int, block_q: int, block_k: int) -> tuple[int, int]:
  """The (block_q, block_k) the backward runs with: no longer than the sequence rounded up to
  128, and both multiples of 128 (keys on the lanes, and the tile is transposed), or a
  ValueError saying what to pass instead."""
  block_q = min(int(block_q), _round_up(nq, LANES))
  block_k = min(int(block_k), _round_up(nk, LANES))
  for name, block, n in (('block_q', block_q, nq), ('block_k', block_k, nk)):
    if block <= 0 or block % LANES:
      raise ValueError(f'flash_jvp_backward_tpu: {name}={block} for {n} tokens must be a '
                       f'positive multiple of {LANES} (the score tile is transposed on the TPU); '
                       'pass e.g. 128.')
  return block_q, block_k


def _key_mask(key_block, block_q: int, block_k: int, kv_len: int):
  """Keys of this block that are not padding, as a [block_q, block_k] mask, or None."""
  if kv_len % block_k == 0:    # only the padded case pays for the mask
    return None
  keys = key_block * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  return keys < kv_len


def _tile_inputs(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, g_ref, stat_refs, key_block, scale,
                 kv_len):
  """The tiles P, dP, E, H of this (query block, key block) step, and the operand tiles."""
  q, dq, g = q_ref[...], dq_ref[...], g_ref[...]
  k, v, dk, dv = k_ref[...], v_ref[...], dk_ref[...], dv_ref[...]
  block_q, block_k = q.shape[0], k.shape[0]
  stats = tuple(_lanes_to(r[...], block_k) for r in stat_refs)     # lse, mu, alpha, delta
  valid = _key_mask(key_block, block_q, block_k, kv_len)
  return tile(q, k, v, dq, dk, dv, g, *stats, valid, scale), (q, k, dq, dk, g)


def _key_block_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, g_ref,
                      lse_ref, mu_ref, alpha_ref, delta_ref,                   # inputs
                      grad_k_ref, grad_v_ref, grad_dk_ref, grad_dv_ref,        # outputs
                      acc_k, acc_v, acc_dk, acc_dv,                            # VMEM scratch
                      *, scale: float, kv_len: int, num_q_blocks: int):
  """One (batch, head, key block, query block) step: grad k, v, dk, dv of the key block."""
  query_block = pl.program_id(3)

  @pl.when(query_block == 0)
  def _start_key_block():
    for acc in (acc_k, acc_v, acc_dk, acc_dv):
      acc[...] = jnp.zeros(acc.shape, jnp.float32)

  (p, dp, e, h), (q, _, dq, _, g) = _tile_inputs(
      q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, g_ref,
      (lse_ref, mu_ref, alpha_ref, delta_ref), pl.program_id(2), scale, kv_len)
  e_t = e.T.astype(q.dtype)     # [block_k, block_q]: contract over the queries
  acc_v[...] += _dot(dp.T.astype(g.dtype), g)
  acc_dv[...] += _dot(p.T.astype(g.dtype), g)
  acc_k[...] += _dot(h.T.astype(q.dtype), q) + _dot(e_t, dq)
  acc_dk[...] += _dot(e_t, q)

  @pl.when(query_block == num_q_blocks - 1)
  def _finish_key_block():
    grad_k_ref[...] = (scale * acc_k[...]).astype(grad_k_ref.dtype)
    grad_v_ref[...] = acc_v[...].astype(grad_v_ref.dtype)
    grad_dk_ref[...] = (scale * acc_dk[...]).astype(grad_dk_ref.dtype)
    grad_dv_ref[...] = acc_dv[...].astype(grad_dv_ref.dtype)


def _query_block_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, g_ref,
                        lse_ref, mu_ref, alpha_ref, delta_ref,                 # inputs
                        grad_q_ref, grad_dq_ref,                               # outputs
                        acc_q, acc_dq,                                         # VMEM scratch
                        *, scale: float, kv_len: int, num_k_blocks: int):
  """One (batch, head, query block, key block) step: grad q and dq of the query block."""
  key_block = pl.program_id(3)

  @pl.when(key_block == 0)
  def _start_query_block():
    acc_q[...] = jnp.zeros(acc_q.shape, jnp.float32)
    acc_dq[...] = jnp.zeros(acc_dq.shape, jnp.float32)

  (_, _, e, h), (_, k, _, dk, _) = _tile_inputs(
      q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, g_ref,
      (lse_ref, mu_ref, alpha_ref, delta_ref), key_block, scale, kv_len)
  e = e.astype(k.dtype)
  acc_q[...] += _dot(h.astype(k.dtype), k) + _dot(e, dk)
  acc_dq[...] += _dot(e, k)

  @pl.when(key_block == num_k_blocks - 1)
  def _finish_query_block():
    grad_q_ref[...] = (scale * acc_q[...]).astype(grad_q_ref.dtype)
    grad_dq_ref[...] = (scale * acc_dq[...]).astype(grad_dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=('block_q', 'block_k', 'interpret'))
def tangent_vjp(q, k, v, dq, dk, dv, o, do, lse, mu, g, *, block_q: int = 128,
                block_k: int = 128, interpret: bool | str = False):
  """The vjp of the attention tangent dO(q, k, v, dq, dk, dv) at cotangent g, on TPU: six gradients.

  The contract of `flash_jvp_backward.tangent_vjp`: q, dq, o, do, g: [B, Nq, H, D]; k, v, dk,
  dv: [B, Nk, H, D]; lse, mu: [B, H, Nq] float32, with o, do, lse, mu from
  `fmjax.models.flash_jvp_tpu.attention_tangent_and_statistics` at the same inputs. Returns
  (grad q, grad k, grad v, grad dq, grad dk, grad dv) in the inputs' dtypes (float32
  accumulation). Blocks: see `backward_block_sizes`. `interpret=True`: Pallas' TPU interpret mode;
  'generic': Pallas' generic interpreter (`flash_jvp_tpu.interpret_params`).
  """
  check_shapes('flash_jvp_backward_tpu', q, k, v, dq, dk, dv)
  check_residuals('flash_jvp_backward_tpu', q, o, do, lse, mu, g)
  b, nq, h, d = q.shape
  nk = k.shape[1]
  block_q, block_k = backward_block_sizes(nq, nk, block_q, block_k)
  nq_pad, nk_pad, d_pad = _round_up(nq, block_q), _round_up(nk, block_k), _round_up(d, LANES)
  dtype = q.dtype
  stats = tuple(lane_broadcast(x, nq_pad)
                for x in (lse, mu, row_statistic(g, o), row_statistic(g, do)))
  q, dq, g = (to_kernel_layout(x.astype(dtype), nq_pad, d_pad) for x in (q, dq, g))
  k, v, dk, dv = (to_kernel_layout(x.astype(dtype), nk_pad, d_pad) for x in (k, v, dk, dv))
  inputs = (q, k, v, dq, dk, dv, g) + stats
  scale = 1.0 / math.sqrt(d)
  num_q_blocks, num_k_blocks = nq_pad // block_q, nk_pad // block_k

  def specs(query_index, key_index):
    """Block specs of the inputs, the query side at query_index(grid) and the keys at key_index."""
    query = pl.BlockSpec((None, None, block_q, d_pad), lambda *i: (i[0], i[1], query_index(i), 0))
    key = pl.BlockSpec((None, None, block_k, d_pad), lambda *i: (i[0], i[1], key_index(i), 0))
    row = pl.BlockSpec((None, None, block_q, LANES), lambda *i: (i[0], i[1], query_index(i), 0))
    return [query, key, key, query, key, key, query] + [row] * 4, query, key

  # Grid 1: (batch, head, key block, query block); the key side stays, the queries stream.
  in_specs, _, key_out = specs(lambda i: i[3], lambda i: i[2])
  grad_k, grad_v, grad_dk, grad_dv = pl.pallas_call(
      functools.partial(_key_block_kernel, scale=scale, kv_len=nk, num_q_blocks=num_q_blocks),
      grid=(b, h, num_k_blocks, num_q_blocks),
      in_specs=in_specs,
      out_specs=[key_out] * 4,
      out_shape=[jax.ShapeDtypeStruct((b, h, nk_pad, d_pad), dtype)] * 4,
      scratch_shapes=[pltpu.VMEM((block_k, d_pad), jnp.float32)] * 4,
      compiler_params=_SEMANTICS,
      interpret=interpret_params(interpret),
      name='flash_attention_jvp_vjp_keys_tpu',
  )(*inputs)

  # Grid 2: (batch, head, query block, key block); the query side stays, the keys stream.
  in_specs, query_out, _ = specs(lambda i: i[2], lambda i: i[3])
  grad_q, grad_dq = pl.pallas_call(
      functools.partial(_query_block_kernel, scale=scale, kv_len=nk, num_k_blocks=num_k_blocks),
      grid=(b, h, num_q_blocks, num_k_blocks),
      in_specs=in_specs,
      out_specs=[query_out] * 2,
      out_shape=[jax.ShapeDtypeStruct((b, h, nq_pad, d_pad), dtype)] * 2,
      scratch_shapes=[pltpu.VMEM((block_q, d_pad), jnp.float32)] * 2,
      compiler_params=_SEMANTICS,
      interpret=interpret_params(interpret),
      name='flash_attention_jvp_vjp_queries_tpu',
  )(*inputs)
  query_side, key_side = (lambda x: from_kernel_layout(x, nq, d)), (lambda x: from_kernel_layout(x, nk, d))
  return (query_side(grad_q), key_side(grad_k), key_side(grad_v), query_side(grad_dq),
          key_side(grad_dk), key_side(grad_dv))
