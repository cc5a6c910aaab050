"""The TPU (Mosaic) variant of the fused backward of attention's tangent, on CPU in Pallas' TPU
interpret mode: its six gradients against the float64 formulas of test_flash_jvp_backward (which
that file checks against jax.grad in float64), padded queries and masked keys, bfloat16,
flash_attention(kernel='tpu') end to end against naive attention, the block rule, and the
lowering to Mosaic for TPU (done on CPU: no TPU is needed to lower, only to compile and run)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import attention, flash_jvp_backward_tpu, flash_jvp_tpu
from test_flash_jvp_backward import NAMES, _formulas64, _grad_through_tangent, _inputs


def _kernel_grads(args, blocks=(128, 128)):
  q, k, v, dq, dk, dv, g = args
  o, do, lse, mu = flash_jvp_tpu.attention_tangent_and_statistics(q, k, v, dq, dk, dv,
                                                                  interpret=True)
  return flash_jvp_backward_tpu.tangent_vjp(q, k, v, dq, dk, dv, o, do, lse, mu, g,
                                            block_q=blocks[0], block_k=blocks[1], interpret=True)


# 200 queries and 300 keys in blocks of 128: two query blocks (56 padded rows) and three key
# blocks (84 masked keys), batch 2, two heads, head dim 72 (padded to 128); then whole blocks
# (no mask) with more queries than keys.
@pytest.mark.parametrize('shape', [(2, 200, 300, 2, 72), (1, 256, 128, 1, 64)])
def test_six_gradients_match_float64_formulas(shape):
  args = _inputs(*shape)
  for name, got, want in zip(NAMES, _kernel_grads(args), _formulas64(*args)):
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=f'grad {name}')


def test_padded_keys_stay_masked_when_every_score_is_far_below_zero():
  """Real scores near -100: an unmasked padded key (score 0) would get P = e^100 and overflow."""
  q, k, v, dq, dk, dv, g = _inputs(1, 16, 20, 1, 16, seed=4)
  args = (0.1 * q - 5.0, 0.1 * k + 5.0, v, dq, dk, dv, g)
  for name, got, want in zip(NAMES, _kernel_grads(args), _formulas64(*args)):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4, err_msg=f'grad {name}')


def test_bfloat16_inputs_accumulate_in_float32():
  args = _inputs(1, 136, 136, 1, 32, seed=5, dtype=jnp.bfloat16)
  for name, got, want in zip(NAMES, _kernel_grads(args), _formulas64(*args)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2 * np.abs(want).max(),
                               err_msg=f'grad {name}')


def test_flash_attention_with_the_tpu_kernel_backpropagates_through_it(monkeypatch):
  """kernel='tpu' (what 'auto' picks on a TPU) differentiates the tangent with this module's
  kernels by default, at the forward's blocks, and equals naive attention."""
  seen = []
  real = flash_jvp_backward_tpu.tangent_vjp
  monkeypatch.setattr(flash_jvp_backward_tpu, 'tangent_vjp',
                      lambda *a, **kw: seen.append((kw['block_q'], kw['block_k'])) or real(*a, **kw))
  args = _inputs(1, 40, 40, 2, 16, seed=6)
  attend = functools.partial(attention.flash_attention, kernel='tpu', interpret=True)
  got = _grad_through_tangent(attend, args)
  assert seen == [(128, 128)]
  for name, a, c in zip(NAMES, got, _grad_through_tangent(attention.naive_attention, args)):
    np.testing.assert_allclose(a, c, atol=2e-5, rtol=2e-5, err_msg=f'grad {name} vs naive')


def test_block_rule():
  """Both blocks are multiples of 128 (the score tile is transposed); a shorter sequence is one
  block of its length rounded up to 128; the error comes before any work."""
  assert flash_jvp_backward_tpu.backward_block_sizes(40, 40, 128, 128) == (128, 128)
  assert flash_jvp_backward_tpu.backward_block_sizes(4000, 300, 256, 512) == (256, 384)
  args = _inputs(1, 200, 200, 1, 16)
  with pytest.raises(ValueError, match='block_q=64 .* multiple of 128'):
    jax.eval_shape(lambda q, k, v, dq, dk, dv, g: flash_jvp_backward_tpu.tangent_vjp(
        q, k, v, dq, dk, dv, q, q, q[:, :, :, 0].transpose(0, 2, 1),
        q[:, :, :, 0].transpose(0, 2, 1), g, block_q=64), *args)


def test_lowers_to_mosaic_for_tpu():
  """The Pallas TPU lowering accepts the forward (with its statistics) and both backward kernels
  in bfloat16 (block shapes against the (8, 128) tiling, every op of the bodies, the in-VMEM
  transposes); interpret mode checks neither."""
  args = _inputs(2, 200, 300, 2, 72, dtype=jnp.bfloat16)

  def forward_and_backward(q, k, v, dq, dk, dv, g):
    o, do, lse, mu = flash_jvp_tpu.attention_tangent_and_statistics(q, k, v, dq, dk, dv)
    return flash_jvp_backward_tpu.tangent_vjp(q, k, v, dq, dk, dv, o, do, lse, mu, g)
  text = jax.jit(forward_and_backward).trace(*args).lower(lowering_platforms=('tpu',)).as_text()
  assert text.count('tpu_custom_call') == 3
