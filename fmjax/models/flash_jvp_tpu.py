"""The fused forward + jvp attention kernel of fmjax.models.flash_jvp, written for Pallas TPU (Mosaic).

Same math as `flash_jvp` (its module docstring: sCM, Lu & Song 2024, App. F; FlashAttention's
online softmax, Dao et al. 2022, Alg. 1): per query block one pass over the key blocks keeps the
running max m, the normalizer l = sum_j w_ij, sum_j w_ij v_j, sum_j w_ij (dS_ij v_j + dv_j) and
sum_j w_ij dS_ij in float32, all rescaled by exp(m_old - m_new), and finishes with

  O = acc / l,   dO = tacc / l - (c / l) O,   logsumexp = m + log l.

What differs on TPU:

- Layout. Mosaic tiles the last two dimensions of every block in (8, 128) (sublanes, lanes)
  units: they must be multiples of (8, 128) or equal the whole array dimension. Inside the
  kernel the operands are [batch, heads, seq, head_dim] (heads squeezed out of each block, so a
  program sees 2-D [block, head_dim] tiles), head_dim zero-padded to a multiple of 128 (72 ->
  128; zero columns of q, k add nothing to S, zero columns of v give zero output columns, which
  are sliced away), queries padded to a multiple of block_q and keys to a multiple of block_k,
  with the padded keys masked. Keys sit on the lanes of the score tile [block_q, block_k], so
  block_k must be a multiple of 128 and block_q a multiple of 8.
- Grid and scratch memory. The grid is (batch, heads, query blocks, key blocks); the key-block
  axis is the innermost and "arbitrary" (sequential on one core), the others "parallel" (split
  across TensorCores). The five accumulators live in VMEM scratch, which persists across the
  key-block steps of one query block: zeroed at the first key block, turned into the outputs at
  the last. Pallas' pipeline streams each [block_k, head_dim] tile of k, v, dk, dv from HBM, so
  VMEM use does not grow with the sequence length.
- Row statistics (m, l, the sum of w dS, and the logsumexp output) are stored broadcast across
  the 128 lanes, [block_q, 128], the layout of the per-row vectors Mosaic keeps in vregs (as
  JAX's own TPU flash attention does); the logsumexp is returned as [B, H, Nq] (lane 0).

`interpret=True` runs the kernel in Pallas' TPU interpret mode (`pltpu.InterpretParams()`) on any
backend: it simulates the TPU's memories, fills uninitialized VMEM with NaNs (a missing
initialization shows up in the outputs) and runs the key-block axis sequentially as on the chip.
It does not check the (8, 128) block rule; `attention_and_tangent` checks it itself (and the
Mosaic lowering checks it again, which the tests run on CPU through
`jax.jit(...).trace(...).lower(lowering_platforms=('tpu',))`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128     # minor (lane) dimension of a TPU vreg / VMEM tile
SUBLANES = 8    # second-minor (sublane) dimension

# Score of a padded key: finite so that exp(S - m) underflows to 0 without inf - inf.
_MASKED = -1e30


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _dot(a, b):
  """a @ b with float32 accumulation (the MXU's accumulator type)."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_t(a, b):
  """a @ b^T with float32 accumulation; the MXU takes the transposed operand directly."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _lanes_to(x, width: int):
  """A lane-broadcast row statistic [rows, 128] widened to [rows, width] (width % 128 == 0)."""
  return x if width == LANES else jnp.tile(x, (1, width // LANES))


def _jvp_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref,      # inputs: [block, d] tiles
                o_ref, do_ref, lse_ref, *refs,                      # outputs [, mu]
                scale: float, block_k: int, kv_len: int, num_k_blocks: int, with_mu: bool):
  """One (batch, head, query block, key block) step of the online softmax and its tangent.
  With `with_mu`, a fourth output: mu_i = sum_j P_ij dS_ij (what the reverse mode needs)."""
  mu_ref = refs[0] if with_mu else None
  m_ref, l_ref, c_ref, acc_ref, tacc_ref = refs[with_mu:]             # VMEM scratch (accumulators)
  key_block = pl.program_id(3)
  f32 = jnp.float32

  @pl.when(key_block == 0)
  def _start_query_block():
    m_ref[...] = jnp.full(m_ref.shape, _MASKED, f32)
    l_ref[...] = jnp.zeros(l_ref.shape, f32)
    c_ref[...] = jnp.zeros(c_ref.shape, f32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, f32)
    tacc_ref[...] = jnp.zeros(tacc_ref.shape, f32)

  q, dq = q_ref[...], dq_ref[...]
  k, v, dk, dv = k_ref[...], v_ref[...], dk_ref[...], dv_ref[...]
  s = _dot_t(q, k) * scale
  ds = (_dot_t(dq, k) + _dot_t(q, dk)) * scale
  if kv_len % block_k:     # only the padded case pays for the mask
    key_index = key_block * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    valid = key_index < kv_len
    s = jnp.where(valid, s, _MASKED)
    ds = jnp.where(valid, ds, 0.0)

  m_prev = m_ref[...]                                               # [block_q, 128]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  rescale = jnp.exp(m_prev - m_next)
  w = jnp.exp(s - _lanes_to(m_next, block_k))
  wds = w * ds
  m_ref[...] = m_next
  l_ref[...] = rescale * l_ref[...] + jnp.sum(w, axis=1, keepdims=True)
  c_ref[...] = rescale * c_ref[...] + jnp.sum(wds, axis=1, keepdims=True)
  rescale_d = _lanes_to(rescale, acc_ref.shape[1])
  acc_ref[...] = rescale_d * acc_ref[...] + _dot(w.astype(v.dtype), v)
  tacc_ref[...] = (rescale_d * tacc_ref[...] + _dot(wds.astype(v.dtype), v)
                   + _dot(w.astype(dv.dtype), dv))

  @pl.when(key_block == num_k_blocks - 1)
  def _finish_query_block():
    l = l_ref[...]
    inv_l = _lanes_to(1.0 / l, acc_ref.shape[1])
    o = acc_ref[...] * inv_l
    mu = c_ref[...] / l
    o_ref[...] = o.astype(o_ref.dtype)
    do_ref[...] = (tacc_ref[...] * inv_l - _lanes_to(mu, o.shape[1]) * o).astype(do_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l)
    if with_mu:
      mu_ref[...] = mu


def tpu_block_sizes(nq: int, nk: int, block_q: int, block_k: int) -> tuple[int, int]:
  """The (block_q, block_k) the kernel runs with, or a ValueError saying what to pass instead.

  A sequence shorter than its block is one block, padded to a multiple of 8 (queries) or 128
  (keys); longer sequences need block_q % 8 == 0 and block_k % 128 == 0 (the (8, 128) tiling)."""
  block_q = min(int(block_q), _round_up(nq, SUBLANES))
  block_k = min(int(block_k), _round_up(nk, LANES))
  if block_q <= 0 or block_q % SUBLANES:
    raise ValueError(f'flash_jvp_tpu: block_q={block_q} for {nq} queries must be a positive '
                     f'multiple of {SUBLANES} (TPU sublanes); pass e.g. block_q=128.')
  if block_k <= 0 or block_k % LANES:
    raise ValueError(f'flash_jvp_tpu: block_k={block_k} for {nk} keys must be a positive '
                     f'multiple of {LANES} (keys lie on the TPU lanes of the score tile); '
                     'pass e.g. block_k=128.')
  return block_q, block_k


def to_kernel_layout(x, seq: int, dim: int):
  """[B, N, H, D] -> [B, H, seq, dim], zero-padded (one fused copy: pad and transpose)."""
  b, n, h, d = x.shape
  return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, seq - n), (0, dim - d)))


def from_kernel_layout(x, n: int, d: int):
  """[B, H, seq, dim] -> [B, n, H, d]: the padding sliced away, the inverse of to_kernel_layout."""
  return x[:, :, :n, :d].transpose(0, 2, 1, 3)


def lane_broadcast(rows, seq: int):
  """A row statistic [B, H, N] -> [B, H, seq, 128] float32 (zero-padded rows): the layout of
  per-row vectors on the TPU (one value across the 128 lanes of its row)."""
  rows = jnp.pad(rows.astype(jnp.float32), ((0, 0), (0, 0), (0, seq - rows.shape[-1])))
  return jnp.broadcast_to(rows[..., None], rows.shape + (LANES,))


def interpret_params(interpret: bool | str):
  """pallas_call's `interpret` argument. False: compile for the TPU. True: Pallas' TPU interpret
  mode (TPU memories simulated, uninitialized VMEM filled with NaNs, the strict check the tests
  use). 'generic': Pallas' generic interpreter, whose kernels carry no ordered effects, so they
  can run where JAX does not thread effects (the transpose of a linear_call, where
  flash_attention runs the backward kernels)."""
  if interpret == 'generic':
    return True
  return pltpu.InterpretParams() if interpret else False


def check_shapes(name: str, q, k, v, dq, dk, dv):
  if (q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or dk.shape != k.shape
      or dv.shape != v.shape or dq.shape != q.shape
      or (k.shape[0], k.shape[2:]) != (q.shape[0], q.shape[2:])):
    raise ValueError(f'{name}: shapes q {q.shape} dq {dq.shape} k {k.shape} '
                     f'dk {dk.shape} v {v.shape} dv {dv.shape} do not match '
                     '([B, Nq, H, D] for q, dq; [B, Nk, H, D] for k, v, dk, dv).')


_STATIC = ('block_q', 'block_k', 'interpret')


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention_and_tangent(q, k, v, dq, dk, dv, *, block_q: int = 128, block_k: int = 128,
                          interpret: bool = False):
  """(O, dO, logsumexp) of softmax(q k^T / sqrt(d)) v and its jvp along (dq, dk, dv), fused, on TPU.

  q, dq: [B, Nq, H, D]; k, v, dk, dv: [B, Nk, H, D]. O and dO have q's dtype; the logsumexp
  [B, H, Nq] is float32. The same contract as `flash_jvp.attention_and_tangent`, with TPU block
  rules (see `tpu_block_sizes`). `interpret=True`: Pallas' TPU interpret mode (any backend).
  """
  return _forward(q, k, v, dq, dk, dv, block_q=block_q, block_k=block_k, interpret=interpret,
                  with_mu=False)


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention_tangent_and_statistics(q, k, v, dq, dk, dv, *, block_q: int = 128,
                                     block_k: int = 128, interpret: bool = False):
  """(O, dO, logsumexp, mu): `attention_and_tangent` plus mu_i = sum_j P_ij dS_ij [B, H, Nq]
  (float32), the residuals of the tangent's reverse mode (fmjax.models.flash_jvp_backward_tpu).
  The same kernel: mu is the c / l it computes anyway."""
  return _forward(q, k, v, dq, dk, dv, block_q=block_q, block_k=block_k, interpret=interpret,
                  with_mu=True)


def _forward(q, k, v, dq, dk, dv, *, block_q: int, block_k: int, interpret: bool, with_mu: bool):
  check_shapes('flash_jvp_tpu', q, k, v, dq, dk, dv)
  b, nq, h, d = q.shape
  nk = k.shape[1]
  block_q, block_k = tpu_block_sizes(nq, nk, block_q, block_k)
  nq_pad, nk_pad, d_pad = _round_up(nq, block_q), _round_up(nk, block_k), _round_up(d, LANES)
  dtype = q.dtype
  q, dq = (to_kernel_layout(x.astype(dtype), nq_pad, d_pad) for x in (q, dq))
  k, v, dk, dv = (to_kernel_layout(x.astype(dtype), nk_pad, d_pad) for x in (k, v, dk, dv))

  num_k_blocks = nk_pad // block_k
  kernel = functools.partial(_jvp_kernel, scale=1.0 / math.sqrt(d), block_k=block_k, kv_len=nk,
                             num_k_blocks=num_k_blocks, with_mu=with_mu)
  # Grid (batch, head, query block, key block); None squeezes batch and head out of the tiles.
  query_spec = pl.BlockSpec((None, None, block_q, d_pad), lambda bi, hi, i, j: (bi, hi, i, 0))
  key_spec = pl.BlockSpec((None, None, block_k, d_pad), lambda bi, hi, i, j: (bi, hi, j, 0))
  row_spec = pl.BlockSpec((None, None, block_q, LANES), lambda bi, hi, i, j: (bi, hi, i, 0))
  row_shape = jax.ShapeDtypeStruct((b, h, nq_pad, LANES), jnp.float32)
  row_stat = pltpu.VMEM((block_q, LANES), jnp.float32)
  outputs = pl.pallas_call(
      kernel,
      grid=(b, h, nq_pad // block_q, num_k_blocks),
      in_specs=[query_spec, key_spec, key_spec, query_spec, key_spec, key_spec],
      out_specs=[query_spec, query_spec, row_spec] + [row_spec] * with_mu,
      out_shape=[jax.ShapeDtypeStruct((b, h, nq_pad, d_pad), dtype),
                 jax.ShapeDtypeStruct((b, h, nq_pad, d_pad), dtype),
                 row_shape] + [row_shape] * with_mu,
      scratch_shapes=[row_stat, row_stat, row_stat,                     # m, l, sum w dS
                      pltpu.VMEM((block_q, d_pad), jnp.float32),       # sum w v
                      pltpu.VMEM((block_q, d_pad), jnp.float32)],      # sum w (dS v + dv)
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)),
      interpret=interpret_params(interpret),
      name='flash_attention_jvp_tpu',
  )(q, k, v, dq, dk, dv)
  o, do, *rows = outputs
  o, do = (from_kernel_layout(x, nq, d) for x in (o, do))
  return (o, do) + tuple(r[:, :, :nq, 0] for r in rows)
