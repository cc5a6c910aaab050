"""The TPU (Mosaic) variant of the fused jvp attention kernel, run on CPU in Pallas' TPU interpret
mode, against float64 attention written out from full matrices; its block-shape errors; and its
lowering to Mosaic for TPU (done on CPU: no TPU is needed to lower, only to compile and run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import flash_jvp_tpu
from test_flash_jvp import _naive64


def _inputs(b, nq, nk, h, d, seed=0, dtype=jnp.float32):
  """q, k, v, dq, dk, dv with nq queries and nk keys."""
  keys = jax.random.split(jax.random.key(seed), 6)
  shapes = [(b, nq, h, d), (b, nk, h, d), (b, nk, h, d)] * 2
  return [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes)]


# (batch, queries, keys, heads, head_dim), blocks. Sequence lengths that are and are not multiples
# of the blocks (200 keys: two key blocks, the second with 56 masked keys; 72 queries: one block of
# the whole sequence), head dims 64 and 72 (both padded to 128), Nq != Nk both ways. (A single
# whole block is the bfloat16 test's case.)
@pytest.mark.parametrize('shape,blocks', [((2, 200, 200, 2, 72), (128, 128)),
                                          ((2, 72, 200, 3, 64), (128, 128)),
                                          ((1, 256, 100, 2, 72), (64, 128))])
def test_kernel_matches_float64_naive_in_tpu_interpret_mode(shape, blocks):
  args = _inputs(*shape)
  o, do, lse = flash_jvp_tpu.attention_and_tangent(*args, block_q=blocks[0], block_k=blocks[1],
                                                   interpret=True)
  ro, rdo, rlse = _naive64(*args)
  assert o.shape == do.shape == args[0].shape and lse.shape == (shape[0], shape[3], shape[1])
  np.testing.assert_allclose(o, ro, atol=2e-6)
  np.testing.assert_allclose(do, rdo, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, rlse, atol=2e-6)


def test_kernel_in_bfloat16_accumulates_in_float32():
  args = _inputs(2, 160, 160, 2, 64, seed=1, dtype=jnp.bfloat16)
  o, do, lse = flash_jvp_tpu.attention_and_tangent(*args, interpret=True)
  ro, rdo, rlse = _naive64(*args)
  assert o.dtype == do.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(o, np.float32), ro, atol=3e-2)
  np.testing.assert_allclose(np.asarray(do, np.float32), rdo, atol=6e-2, rtol=3e-2)
  np.testing.assert_allclose(lse, rlse, atol=3e-2)


@pytest.mark.parametrize('blocks,message', [((128, 64), 'block_k=64 .* multiple of 128'),
                                            ((12, 128), 'block_q=12 .* multiple of 8')])
def test_blocks_off_the_tpu_tiling_are_refused_before_any_work(blocks, message):
  """200 tokens are longer than both blocks, so the blocks tile the sequence and must follow
  the (8, 128) rule; the error comes while tracing, before any padding or kernel."""
  args = _inputs(1, 200, 200, 1, 64)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda *a: flash_jvp_tpu.attention_and_tangent(
        *a, block_q=blocks[0], block_k=blocks[1]), *args)


def test_shapes_are_checked():
  q, k = _inputs(1, 16, 24, 1, 8)[:2]
  with pytest.raises(ValueError, match='do not match'):
    flash_jvp_tpu.attention_and_tangent(q, k, k, q, k, q)


def test_short_sequences_are_one_padded_block():
  assert flash_jvp_tpu.tpu_block_sizes(72, 72, 128, 128) == (72, 128)
  assert flash_jvp_tpu.tpu_block_sizes(4000, 300, 256, 512) == (256, 384)


@pytest.mark.parametrize('shape,dtype', [((2, 200, 72, 2, 72), jnp.float32)])
def test_lowers_to_mosaic_for_tpu(shape, dtype):
  """The Pallas TPU lowering (block shapes against the (8, 128) tiling, every op of the kernel
  body) accepts the kernel; interpret mode checks neither."""
  args = _inputs(*shape, dtype=dtype)
  lowered = jax.jit(lambda *a: flash_jvp_tpu.attention_and_tangent(*a)).trace(*args).lower(
      lowering_platforms=('tpu',))
  assert 'tpu_custom_call' in lowered.as_text()


def test_flash_attention_runs_the_tpu_kernel_by_name_and_checks_the_options(monkeypatch):
  """kernel='tpu' (what kernel='auto' picks on a TPU backend) runs this module's kernel: the jvp
  and the gradient of a loss through the tangent by the blockwise path equal naive attention's
  (the fused TPU backward's own test is in test_flash_jvp_backward_tpu); unknown kernel names
  are refused."""
  from fmjax.models import attention
  calls = []
  kernel = flash_jvp_tpu.attention_and_tangent
  monkeypatch.setattr(flash_jvp_tpu, 'attention_and_tangent',
                      lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
  q, k, v, dq, dk, dv = _inputs(1, 40, 40, 1, 16, seed=11)
  attend = lambda a, b, c: attention.flash_attention(a, b, c, kernel='tpu', interpret=True,
                                                     tangent_backward='blockwise')
  out, tangent = jax.jvp(attend, (q, k, v), (dq, dk, dv))
  ref_out, ref_tangent = jax.jvp(attention.naive_attention, (q, k, v), (dq, dk, dv))
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(tangent, ref_tangent, atol=1e-4, rtol=1e-4)
  assert calls and calls[0]['block_q'] == calls[0]['block_k'] == 128   # the TPU default blocks
  grad = lambda f: jax.grad(lambda a: jnp.sum(jax.jvp(f, (a, k, v), (dq, dk, dv))[1] ** 2))(q)
  np.testing.assert_allclose(grad(attend), grad(attention.naive_attention), atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="kernel must be 'auto', 'triton' or 'tpu'"):
    attention.flash_attention(q, k, v, kernel='mosaic')
