"""Softmax attention that stays memory-efficient under `jax.jvp` and under grad of a jvp.

The flow-map rules differentiate the network in time with `jax.jvp`, and several (LSD,
sCT with tangent warm-up, ...) backpropagate through that jvp. Plain einsum attention
works under jvp but materializes the [seq, seq] score matrix for the primal *and* the
tangent; fused kernels that only define a custom VJP (cuDNN / FlashAttention bindings)
cannot be used under `jax.jvp` at all. `blockwise_attention` is FlashAttention's online
softmax (Dao et al. 2022, Alg. 1; Rabe & Staats 2021) with a `jax.custom_jvp` whose rule
computes the primal and the tangent together in the same blockwise pass, in plain JAX so
it runs on every backend.

The tangent (as in sCM, Lu & Song 2024, App. F "JVP of FlashAttention"). With
S = q k^T / sqrt(d), P = softmax(S) row-wise and O = P v:

  dS = (dq k^T + q dk^T) / sqrt(d)
  dP = P * (dS - rowsum(P * dS))
  dO = dP v + P dv = [sum_j w_j (dS_j v_j + dv_j)] / l  -  ([sum_j w_j dS_j] / l) * O

with unnormalized weights w_j = exp(S_j - m) and normalizer l = sum_j w_j. Every bracket is
a sum over keys, so it is accumulated over key blocks with the same running max m and the
same rescaling exp(m_old - m_new) as the primal accumulator: never a [seq, seq] array.

Reverse mode. The primal and tangent kernels are a `lax.map` over query blocks whose body
is `jax.checkpoint`ed, with a `lax.scan` over key blocks inside. Reverse-mode through
either (grad of a loss on the output, or on the jvp output) therefore saves only the
inputs of each query block and recomputes one query block at a time: the transient is
O(query_block * seq), not O(seq^2). The running max is a stop-gradient (the output does
not depend on its value), which keeps the derivative graph small and free of infinities.

Softmax statistics and accumulators are float32 whatever the input dtype; the two matmuls
per block run in the input dtype with float32 accumulation (as FlashAttention does on GPU).
Shapes everywhere: [batch, seq, heads, head_dim].
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, linear_call

ATTENTION_IMPLEMENTATIONS = ('naive', 'blockwise', 'flash', 'auto')

# Scores of padded keys. Finite (not -inf) so that no inf - inf appears in any derivative.
_MASKED = -1e30


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError('attention expects q, k, v shaped [batch, seq, heads, head_dim]; got '
                     f'{q.shape}, {k.shape}, {v.shape}.')
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f'Incompatible attention shapes q {q.shape}, k {k.shape}, v {v.shape}: '
                     'k and v must match, and batch/heads/head_dim must agree with q.')


def naive_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with the full [batch, heads, seq_q, seq_k] matrix (reference)."""
  _check_shapes(q, k, v)
  scale = 1.0 / math.sqrt(q.shape[-1])
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.astype(q.dtype)


# ---------------------------------------------------------------------------------------
# Blocking helpers.


def _to_blocks(x, block: int):
  """[B, N, H, D] -> [N_pad / block, B, block, H, D], zero-padding N up to a multiple."""
  b, n, h, d = x.shape
  nb = -(-n // block)
  x = jnp.pad(x, ((0, 0), (0, nb * block - n), (0, 0), (0, 0)))
  return x.reshape(b, nb, block, h, d).transpose(1, 0, 2, 3, 4)


def _from_blocks(x, n: int):
  """[nb, B, block, H, D] -> [B, n, H, D] (dropping the padding)."""
  nb, b, block, h, d = x.shape
  return x.transpose(1, 0, 2, 3, 4).reshape(b, nb * block, h, d)[:, :n]


def _key_mask(n: int, block: int):
  nb = -(-n // block)
  return (jnp.arange(nb * block) < n).reshape(nb, block)


def _scores(qb, kb, mask, scale):
  """Masked float32 scores of one (query block, key block) pair, layout [B, H, bq, bk]."""
  s = jnp.einsum('bqhd,bkhd->bhqk', qb, kb, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask[None, None, None, :], s, _MASKED)


def _online_update(m, s):
  """New running max (a stop-gradient: the output is invariant to it), rescale, weights."""
  m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
  return m_new, jnp.exp(m - m_new), jnp.exp(s - m_new[..., None])


def _pv(w, vb):
  """sum_k w[b,h,q,k] v[b,k,h,d] -> [B, H, bq, D], float32 accumulation."""
  return jnp.einsum('bhqk,bkhd->bhqd', w.astype(vb.dtype), vb, preferred_element_type=jnp.float32)


def _init_stats(qb):
  b, bq, h, d = qb.shape
  m = jnp.full((b, h, bq), _MASKED, jnp.float32)
  return m, jnp.zeros((b, h, bq), jnp.float32), jnp.zeros((b, h, bq, d), jnp.float32)


def _primal_query_block(qb, k_blocks, v_blocks, mask, scale):
  """Online softmax over key blocks for one query block: returns [B, bq, H, D] float32."""

  def body(carry, xs):
    m, l, acc = carry
    kb, vb, mb = xs
    m_new, alpha, w = _online_update(m, _scores(qb, kb, mb, scale))
    l = alpha * l + w.sum(-1)
    acc = alpha[..., None] * acc + _pv(w, vb)
    return (m_new, l, acc), None

  (_, l, acc), _ = jax.lax.scan(body, _init_stats(qb), (k_blocks, v_blocks, mask))
  return (acc / l[..., None]).transpose(0, 2, 1, 3)


def _jvp_query_block(qb, dqb, k_blocks, v_blocks, dk_blocks, dv_blocks, mask, scale):
  """Primal and tangent of one query block together (see the module docstring for the math)."""

  def body(carry, xs):
    m, l, acc, tacc, c = carry
    kb, vb, dkb, dvb, mb = xs
    m_new, alpha, w = _online_update(m, _scores(qb, kb, mb, scale))
    ds = (jnp.einsum('bqhd,bkhd->bhqk', dqb, kb, preferred_element_type=jnp.float32)
          + jnp.einsum('bqhd,bkhd->bhqk', qb, dkb, preferred_element_type=jnp.float32)) * scale
    wds = w * ds
    l = alpha * l + w.sum(-1)
    acc = alpha[..., None] * acc + _pv(w, vb)
    tacc = alpha[..., None] * tacc + _pv(wds, vb) + _pv(w, dvb)
    c = alpha * c + wds.sum(-1)
    return (m_new, l, acc, tacc, c), None

  m, l, acc = _init_stats(qb)
  init = (m, l, acc, jnp.zeros_like(acc), jnp.zeros_like(l))
  (_, l, acc, tacc, c), _ = jax.lax.scan(body, init, (k_blocks, v_blocks, dk_blocks, dv_blocks, mask))
  o = acc / l[..., None]
  do = tacc / l[..., None] - (c / l)[..., None] * o
  return o.transpose(0, 2, 1, 3), do.transpose(0, 2, 1, 3)


def _block_sizes(q, k, block_size, query_block_size):
  if block_size < 1:
    raise ValueError(f'block_size must be a positive integer, got {block_size}.')
  bk = min(block_size, k.shape[1])
  bq = min(query_block_size or block_size, q.shape[1])
  return bq, bk


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _blockwise(q, k, v, block_size, query_block_size):
  bq, bk = _block_sizes(q, k, block_size, query_block_size)
  scale = 1.0 / math.sqrt(q.shape[-1])
  k_blocks, v_blocks, mask = _to_blocks(k, bk), _to_blocks(v, bk), _key_mask(k.shape[1], bk)
  kernel = jax.checkpoint(
      lambda qb: _primal_query_block(qb, k_blocks, v_blocks, mask, scale), prevent_cse=False)
  out = jax.lax.map(kernel, _to_blocks(q, bq))
  return _from_blocks(out, q.shape[1]).astype(q.dtype)


@_blockwise.defjvp
def _blockwise_jvp(block_size, query_block_size, primals, tangents):
  q, k, v = primals
  dq, dk, dv = tangents
  bq, bk = _block_sizes(q, k, block_size, query_block_size)
  scale = 1.0 / math.sqrt(q.shape[-1])
  kv = (_to_blocks(k, bk), _to_blocks(v, bk), _to_blocks(dk.astype(k.dtype), bk),
        _to_blocks(dv.astype(v.dtype), bk))
  mask = _key_mask(k.shape[1], bk)
  kernel = jax.checkpoint(
      lambda qs: _jvp_query_block(qs[0], qs[1], *kv, mask, scale), prevent_cse=False)
  out, tangent_out = jax.lax.map(kernel, (_to_blocks(q, bq), _to_blocks(dq.astype(q.dtype), bq)))
  n = q.shape[1]
  return _from_blocks(out, n).astype(q.dtype), _from_blocks(tangent_out, n).astype(q.dtype)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int = 128,
                        query_block_size: int | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v by online softmax over key blocks of `block_size`.

  Exact (up to float rounding) for any sequence lengths: lengths that are not multiples of
  the block are padded and the padded keys masked. Differentiable in every mode with
  memory linear in the sequence length per query block: forward, `jax.jvp` (a custom
  blockwise rule), reverse mode, and reverse mode of the jvp. See the module docstring.
  """
  _check_shapes(q, k, v)
  return _blockwise(q, k, v, int(block_size), None if query_block_size is None else int(query_block_size))


# ---------------------------------------------------------------------------------------
# Fused attention whose jvp is one Pallas kernel (fmjax.models.flash_jvp).


class FlashOptions(NamedTuple):
  """Static options of `flash_attention` (hashable: they travel as a nondiff argument)."""
  block_q: int = 64
  block_k: int = 64
  interpret: bool = False
  primal: str = 'auto'            # 'auto' | 'xla' | 'cudnn': who computes O and its reverse mode
  tangent_gradient: str = 'exact'  # 'exact' | 'zero': reverse mode of the tangent dO
  block_size: int = 128           # blocks of the blockwise path behind the exact tangent gradient
  tangent_backward: str = 'blockwise'  # 'blockwise' | 'kernel': who transposes the exact gradient
  kernel: str = 'triton'          # 'triton' (flash_jvp, GPUs) | 'tpu' (flash_jvp_tpu, Mosaic)
  num_warps: int | None = None    # Triton launch options of the forward kernel (None: by head dim)
  num_stages: int = 2
  # Blocks of the fused backward kernels (tangent_backward='kernel'). Their own: they hold more
  # tiles than the forward kernel, so the forward's tuned blocks can exceed the GPU's shared
  # memory there (128 x 64 at head dim 128 asked an H100 for 278 KiB of its 227).
  backward_block: int = 64


def _primal_attention(q, k, v, opts: FlashOptions):
  """O = softmax(q k^T / sqrt(d)) v by a fused kernel that has a reverse mode of its own:
  cuDNN's flash attention through jax.nn.dot_product_attention on GPU (half precision; for
  float32 it lets XLA choose), XLA's fused einsums elsewhere."""
  primal = opts.primal
  if primal == 'auto':
    primal = 'cudnn' if jax.default_backend() == 'gpu' and not opts.interpret else 'xla'
  if primal == 'xla':
    return naive_attention(q, k, v)
  implementation = 'cudnn' if q.dtype in (jnp.bfloat16, jnp.float16) else None
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation).astype(q.dtype)


def _fused_tangent(opts, residuals, linear):
  """dO, linear in (dq, dk, dv), from the fused Pallas kernel (its O output is a by-product)."""
  # jax.experimental.pallas is imported only when used.
  (q, k, v), (dq, dk, dv) = residuals, linear
  if opts.kernel == 'tpu':
    from fmjax.models import flash_jvp_tpu
    return flash_jvp_tpu.attention_and_tangent(q, k, v, dq, dk, dv, block_q=opts.block_q,
                                               block_k=opts.block_k, interpret=opts.interpret)[1]
  from fmjax.models import flash_jvp
  return flash_jvp.attention_and_tangent(q, k, v, dq, dk, dv, block_q=opts.block_q,
                                         block_k=opts.block_k, interpret=opts.interpret,
                                         num_warps=opts.num_warps, num_stages=opts.num_stages)[1]


def _fused_tangent_transpose(opts, residuals, cotangent):
  """The transpose of (dq, dk, dv) -> dO is the reverse mode of attention itself: J^T g is the
  vjp of O at (q, k, v), here by the primal kernel's own backward (cuDNN's on GPU)."""
  q, k, v = residuals
  _, vjp = jax.vjp(lambda a, b, c: _primal_attention(a, b, c, opts), q, k, v)
  return vjp(cotangent.astype(q.dtype))


def _blockwise_tangent(opts, q, k, v, dq, dk, dv):
  return jax.jvp(lambda a, b, c: blockwise_attention(a, b, c, block_size=opts.block_size),
                 (q, k, v), (dq, dk, dv))[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _tangent(q, k, v, dq, dk, dv, opts):
  # linear_call: when reverse mode meets the tangent as a *linear* function of (dq, dk, dv)
  # (plain grad of the attention output goes through this jvp rule), it is transposed by
  # `_fused_tangent_transpose`, i.e. by attention's ordinary backward, not by tracing the kernel.
  return linear_call(functools.partial(_fused_tangent, opts),
                     functools.partial(_fused_tangent_transpose, opts), (q, k, v), (dq, dk, dv))


def _tangent_of_tangent(opts, present, residuals, linear):
  """The derivative of dO along the tangents of (q, k, v, dq, dk, dv) (only those flagged in
  `present`, the others are zero): the jvp of the blockwise tangent. Forward mode only (jvp of
  jvp); reverse mode runs `_tangent_of_tangent_transpose`."""
  linear = iter(linear)
  full = tuple(next(linear) if p else jnp.zeros_like(x) for p, x in zip(present, residuals[:6]))
  return jax.jvp(functools.partial(_blockwise_tangent, opts), residuals[:6], full)[1]


def _tangent_of_tangent_transpose(opts, present, residuals, cotangent):
  """Its transpose, the vjp of dO w.r.t. the inputs flagged in `present`, by the fused backward
  kernels (fmjax.models.flash_jvp_backward; flash_jvp_backward_tpu for kernel='tpu', with the
  forward's blocks: its tiles sit in VMEM, not in a GPU's shared memory)."""
  cotangent = cotangent.astype(residuals[0].dtype)
  if opts.kernel == 'tpu':
    from fmjax.models import flash_jvp_backward_tpu
    # The TPU interpret mode's callbacks are ordered effects, which a linear_call transpose
    # cannot carry: interpreted here, the kernels run in Pallas' generic interpreter.
    grads = flash_jvp_backward_tpu.tangent_vjp(*residuals, cotangent, block_q=opts.block_q,
                                               block_k=opts.block_k,
                                               interpret='generic' if opts.interpret else False)
  else:
    from fmjax.models import flash_jvp_backward
    grads = flash_jvp_backward.tangent_vjp(*residuals, cotangent, block_q=opts.backward_block,
                                           block_k=opts.backward_block, interpret=opts.interpret)
  return tuple(g.astype(x.dtype) for g, x, p in zip(grads, residuals[:6], present) if p)


def _instantiate(tangents):
  return tuple(jnp.zeros(t.shape, t.dtype) if isinstance(t, SymbolicZero) else t for t in tangents)


# symbolic_zeros: linear_call's transpose needs every linear input to be a linear variable, so
# the tangents of inputs that are not differentiated (zero) must be left out of it, not filled in.
@functools.partial(_tangent.defjvp, symbolic_zeros=True)
def _tangent_jvp(opts, primals, tangents):
  """Derivative of the tangent itself (reverse mode of a loss on dO, e.g. LSD's default).

  'exact' with tangent_backward='kernel' (default): one forward kernel call gives dO and the
  residuals (O, logsumexp, mu); the derivative is a linear_call whose transpose, what reverse
  mode runs, is the fused backward (fmjax.models.flash_jvp_backward), memory O(seq).
  tangent_backward='blockwise': the jvp of the blockwise tangent (the pure-JAX path), which
  reverse mode transposes. Either way, when the loss stops the gradient of dO (MeanFlow, iMF,
  sCT, ESD) the linear piece receives a zero cotangent and is never evaluated. 'zero': declare
  dO constant (only correct for such rules). On the kernel path this rule's dO comes straight
  from the kernel, so a third derivative through the tangent is not defined there ('blockwise'
  keeps it differentiable)."""
  present = tuple(not isinstance(t, SymbolicZero) for t in tangents)
  if opts.tangent_gradient == 'zero' or not any(present):
    out = _tangent(*primals, opts)
    return out, jnp.zeros_like(out)
  if opts.tangent_backward == 'blockwise':
    out = _tangent(*primals, opts)
    return out, jax.jvp(functools.partial(_blockwise_tangent, opts), primals, _instantiate(tangents))[1]
  if opts.kernel == 'tpu':
    from fmjax.models import flash_jvp_tpu
    o, out, lse, mu = flash_jvp_tpu.attention_tangent_and_statistics(
        *primals, block_q=opts.block_q, block_k=opts.block_k, interpret=opts.interpret)
  else:
    from fmjax.models import flash_jvp
    o, out, lse, mu = flash_jvp.attention_tangent_and_statistics(
        *primals, block_q=opts.block_q, block_k=opts.block_k, interpret=opts.interpret,
        num_warps=opts.num_warps, num_stages=opts.num_stages)
  tangent_out = linear_call(functools.partial(_tangent_of_tangent, opts, present),
                            functools.partial(_tangent_of_tangent_transpose, opts, present),
                            (*primals, o, out, lse, mu),
                            tuple(t for t, p in zip(tangents, present) if p))
  return out, tangent_out


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _flash(q, k, v, opts):
  return _primal_attention(q, k, v, opts)


@_flash.defjvp
def _flash_jvp(opts, primals, tangents):
  q, k, v = primals
  dq, dk, dv = (t.astype(x.dtype) for t, x in zip(tangents, primals))
  return _flash(q, k, v, opts), _tangent(q, k, v, dq, dk, dv, opts)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_q: int | None = None,
                    block_k: int | None = None, interpret: bool | None = None, primal: str = 'auto',
                    tangent_gradient: str = 'exact', block_size: int = 128,
                    tangent_backward: str = 'auto', kernel: str = 'auto',
                    num_warps: int | None = None, num_stages: int | None = None,
                    backward_block: int = 64) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with a fused forward and a fused jvp.

  - forward and its reverse mode: a fused kernel with its own backward (`primal`: cuDNN on GPU
    in half precision, XLA otherwise);
  - `jax.jvp`: the tangent from one Pallas pass over the keys (fmjax.models.flash_jvp), memory
    O(seq) per (batch, head);
  - reverse mode of the output, also inside a jvp: attention's own backward (the tangent map is
    linear in (dq, dk, dv) and transposes to the vjp);
  - reverse mode of the tangent: `tangent_gradient='exact'` (default; run only when a loss
    actually backpropagates through dO) or 'zero'. The exact gradient comes from fused Pallas
    kernels (`tangent_backward='kernel'`, fmjax.models.flash_jvp_backward; on an H100 1.40x
    faster than naive attention at 4,096 tokens and 8x faster than the blockwise path) or from
    the pure-JAX blockwise path ('blockwise', blocks of `block_size`); both have memory O(seq).
    'auto' (default): the kernels.
  `kernel`: 'triton' (fmjax.models.flash_jvp and flash_jvp_backward, GPUs), 'tpu'
  (fmjax.models.flash_jvp_tpu and flash_jvp_backward_tpu, Pallas TPU; tested in TPU interpret
  mode and lowered to Mosaic on CPU, not yet compiled or timed on a TPU) or 'auto' (default:
  'tpu' on a TPU backend, else 'triton'). Blocks: given, or the autotuned ones cached for this
  shape and device (fmjax.models.flash_autotune; Triton), else 64 x 64 (Triton) or 128 x 128
  (TPU: key blocks must be multiples of 128). The Triton backward kernels take square blocks of
  `backward_block` (default 64) whatever the forward's: they hold more tiles per block, in
  shared memory; the TPU backward takes the forward's blocks (both multiples of 128 there).
  `interpret=True` runs the kernel in Pallas' interpreter (any backend; tests on CPU; Pallas'
  TPU interpret mode for 'tpu', whose backward kernels run in the generic interpreter: see
  `flash_jvp_tpu.interpret_params`); the default, None, interprets when the backend is not the
  kernel's own (correct but slow).
  """
  _check_shapes(q, k, v)
  if primal not in ('auto', 'xla', 'cudnn'):
    raise ValueError(f"flash_attention: primal must be 'auto', 'xla' or 'cudnn', got {primal!r}.")
  if tangent_gradient not in ('exact', 'zero'):
    raise ValueError(f"flash_attention: tangent_gradient must be 'exact' or 'zero', got {tangent_gradient!r}.")
  if tangent_backward not in ('auto', 'kernel', 'blockwise'):
    raise ValueError("flash_attention: tangent_backward must be 'kernel' (fused Pallas backward), "
                     f"'blockwise' (pure-JAX path) or 'auto', got {tangent_backward!r}.")
  if kernel not in ('auto', 'triton', 'tpu'):
    raise ValueError(f"flash_attention: kernel must be 'auto', 'triton' or 'tpu', got {kernel!r}.")
  backend = jax.default_backend()
  if kernel == 'auto':
    kernel = 'tpu' if backend == 'tpu' else 'triton'
  if tangent_backward == 'auto':
    tangent_backward = 'kernel'
  if interpret is None:
    interpret = backend != {'triton': 'gpu', 'tpu': 'tpu'}[kernel]
  launch = {'block_q': block_q, 'block_k': block_k, 'num_warps': num_warps, 'num_stages': num_stages}
  if kernel == 'triton' and not interpret and None in launch.values():
    # Blocks tuned on this device kind for this shape (a cache read, no timing at trace time).
    from fmjax.models import flash_autotune
    tuned = flash_autotune.tuned_blocks((q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3]),
                                        q.dtype, kernel='jvp') or {}
    launch = {name: tuned.get(name) if value is None else value for name, value in launch.items()}
  default_block = 128 if kernel == 'tpu' else 64
  opts = FlashOptions(int(launch['block_q'] or default_block), int(launch['block_k'] or default_block),
                      bool(interpret), primal, tangent_gradient, int(block_size), tangent_backward,
                      kernel, launch['num_warps'], int(launch['num_stages'] or 2), int(backward_block))
  return _flash(q, k, v, opts)


# From this many keys up the fused jvp was measured faster than XLA's naive attention on an H100
# (1.43x at 1024 tokens, 1.55x at 4096: docs/bench/attention_flash_h100.md); shorter lengths were
# not measured, so naive is kept there. Through the tangent (LSD's default) the fused backward
# is 1.40x faster than naive at 4,096 tokens and 1.34x at 8,192, with 25-51 MiB of temporaries
# against 7.5-30 GiB (docs/bench/attention_flash_h100.md); at 1,024 it is not measured.
# On TPU the same threshold selects the TPU kernels (forward and backward); no TPU timing exists
# yet, so pass attention='naive' there to keep XLA's attention.
AUTO_MIN_FLASH_TOKENS = 1024


def auto_attention(q, k, v, *, min_flash_tokens: int = AUTO_MIN_FLASH_TOKENS, **flash_options):
  """Naive attention for short sequences or off GPU and TPU, `flash_attention` there from
  `min_flash_tokens` keys up (the choice is static: made from shapes and the backend)."""
  if jax.default_backend() in ('gpu', 'tpu') and k.shape[1] >= min_flash_tokens:
    return flash_attention(q, k, v, **flash_options)
  return naive_attention(q, k, v)


def attention_fn(name: str = 'naive', **options) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """The attention implementation called `name`: 'naive', 'blockwise' (options: block_size),
  'flash' (options of `flash_attention`) or 'auto' (naive below `min_flash_tokens`, or off GPU)."""
  if name == 'naive':
    if options:
      raise ValueError(f"'naive' attention takes no options, got {sorted(options)}.")
    return naive_attention
  if name == 'blockwise':
    return functools.partial(blockwise_attention, **options)
  if name == 'flash':
    return functools.partial(flash_attention, **options)
  if name == 'auto':
    return functools.partial(auto_attention, **options)
  raise ValueError(f'Unknown attention implementation {name!r}; choose one of {ATTENTION_IMPLEMENTATIONS}.')


def multi_head_self_attention(qkv: jax.Array, num_heads: int, attend: Callable = naive_attention) -> jax.Array:
  """[batch, seq, 3 * channels] projections -> [batch, seq, channels] attended values.

  The q/k/v split and head layout the U-Net and DiT share; `attend` is any implementation
  from `attention_fn` (all take and return [batch, seq, heads, head_dim]).
  """
  b, n, c3 = qkv.shape
  channels = c3 // 3
  if channels % num_heads:
    raise ValueError(f'{channels} channels do not split into {num_heads} heads.')
  q, k, v = jnp.split(qkv.reshape(b, n, 3, num_heads, channels // num_heads), 3, axis=2)
  return attend(q[:, :, 0], k[:, :, 0], v[:, :, 0]).reshape(b, n, channels)
