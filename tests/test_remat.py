"""Rematerialization of the DiT and U-Net blocks (fmjax.models.remat, `remat`): the same numbers,
less memory.

A checkpoint policy changes what the backward pass keeps, never what it computes: a flow-map
rule's loss and its gradient must be the same under every policy, for a rule whose gradient
runs through the jvp tangent (LSD) and one whose tangent is stop-gradiented (MeanFlow), on a
class-conditional DiT with two-time conditioning, and on a U-Net that drops units (the dropout
key is a block input, so the recomputation drops the same ones). And the policy must act: the
loss keeps less for its backward pass under 'dots' than 'none', and least under 'block'; the
U-Net's 'dots' keeps its convolutions' outputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import benchmarking, configs, flow_maps, interpolants, losses, models
from fmjax.models import remat as remat_lib

KW = dict(image_size=8, in_channels=4, patch_size=2, hidden=32, depth=2, num_heads=2, num_classes=10,
          time_conditioning='t_gap', time_frequency_dim=32)
BATCH = 16


@functools.lru_cache(maxsize=None)
def _params():
  _, state = nnx.split(models.build('dit', **KW))
  # adaLN-Zero and the zero final layer would make most gradients vanish: move off zero.
  return jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)).astype(p.dtype),
                      state.to_pure_dict())


def _step(remat, rule):
  graphdef, _ = nnx.split(models.abstract('dit', remat=remat, **KW))
  apply = lambda p, s, t, x, labels=None: nnx.merge(graphdef, p)(s, t, x, labels)
  interp = interpolants.linear()
  loss = losses.make(rule, flow_maps.make('displacement', apply, interp), interp, diagonal_fraction=0.25)
  batch = {'x1': jax.random.normal(jax.random.PRNGKey(1), (BATCH, 8, 8, 4)),
           'labels': jnp.arange(BATCH) % 10}
  return jax.jit(jax.value_and_grad(lambda p: loss(p, batch, jax.random.PRNGKey(3))[0]),
                 compiler_options=models.FAST_COMPILE), loss.init(_params(), jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _loss_and_grad(remat, rule):
  step, params = _step(remat, rule)
  return params, step(params)


@pytest.mark.parametrize('rule,remat', [('lsd', 'dots'), ('lsd', 'block'), ('meanflow', 'block')])
def test_every_policy_gives_the_same_loss_and_gradient(rule, remat):
  params, (loss, grad) = _loss_and_grad('none', rule)
  norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad))))
  assert norm > 0
  # The same parameter tree runs under every policy: checkpoints interchange.
  params_r, (loss_r, grad_r) = _loss_and_grad(remat, rule)
  assert jax.tree.structure(params_r) == jax.tree.structure(params)
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
  # Recomputation may reassociate float32 sums: agreement to 1e-5 of the gradient's norm.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * norm), grad_r, grad)


def test_policies_keep_less_for_the_backward():
  # What the loss keeps from its forward pass and jvp for the backward (read from the jaxpr,
  # the same on every backend): all activations, the matmul outputs, or each block's input.
  kept = {}
  for remat in ('none', 'dots', 'block'):
    graphdef, _ = nnx.split(models.abstract('dit', remat=remat, **KW))
    apply = lambda p, s, t, x, labels=None: nnx.merge(graphdef, p)(s, t, x, labels)
    interp = interpolants.linear()
    loss = losses.make('lsd', flow_maps.make('displacement', apply, interp), interp, diagonal_fraction=0.25)
    batch = {'x1': jax.ShapeDtypeStruct((BATCH, 8, 8, 4), jnp.float32),
             'labels': jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    kept[remat] = benchmarking.saved_residual_bytes(lambda p, b: loss(p, b, jax.random.PRNGKey(3))[0],
                                                    loss.init(_params(), jax.random.PRNGKey(0)), batch)
  assert kept['block'] < kept['dots'] < kept['none'], kept
  assert kept['block'] < 0.25 * kept['none'], kept


def test_bad_remat_values_are_named():
  with pytest.raises(ValueError, match=r"Unknown remat policy 'blocks'; choose one of \('none', 'dots', 'block'\)"):
    models.abstract('dit', remat='blocks', **KW)
  config = configs.base_config()
  config.model.name = 'dit'
  config.model.remat = 'blocks'
  with pytest.raises(configs.ConfigError, match=r"config.model.remat = 'blocks'; choose one of"):
    configs.resolve(config)
  config.model.name, config.model.remat = 'mlp', 'block'
  with pytest.raises(configs.ConfigError, match=r"Unknown option\(s\) \['remat'\] for the mlp network"):
    configs.resolve(config)
  assert set(remat_lib.REMAT_POLICIES) == {'none', 'dots', 'block'}


# One level (its residual blocks, the middle pair with attention, the decoder's with skips).
UNET_KW = dict(image_size=8, in_channels=3, model_channels=16, channel_mult=(1,), num_res_blocks=1,
               attn_resolutions=(8,), channels_per_head=16, dropout=0.2, num_classes=10,
               time_conditioning='t_gap')


@functools.lru_cache(maxsize=None)
def _unet_params():
  _, state = nnx.split(models.build('unet', seed=1, **UNET_KW))
  # The zero-initialized last convolutions would zero most gradients: move off zero.
  return jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)).astype(p.dtype),
                      state.to_pure_dict())


def _unet_loss(remat, rule='lsd'):
  graphdef, _ = nnx.split(models.abstract('unet', remat=remat, **UNET_KW))
  dropout_key = jax.random.PRNGKey(11)   # one key for every evaluation the rule makes
  apply = lambda p, s, t, x, labels=None: nnx.merge(graphdef, p)(s, t, x, labels, key=dropout_key)
  interp = interpolants.linear()
  loss = losses.make(rule, flow_maps.make('displacement', apply, interp), interp, diagonal_fraction=0.25)
  return loss, loss.init(_unet_params(), jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _unet_loss_and_grad(remat, rule):
  loss, params = _unet_loss(remat, rule)
  batch = {'x1': jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3)), 'labels': jnp.arange(8) % 10}
  step = jax.jit(jax.value_and_grad(lambda p: loss(p, batch, jax.random.PRNGKey(3))[0]),
                 compiler_options=models.FAST_COMPILE)
  return step(params)


@pytest.mark.parametrize('rule,remat', [('lsd', 'dots'), ('lsd', 'block')])
def test_unet_policies_give_the_same_loss_and_gradient_with_dropout(rule, remat):
  loss, grad = _unet_loss_and_grad('none', rule)
  norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad))))
  assert norm > 0
  loss_r, grad_r = _unet_loss_and_grad(remat, rule)
  # Recomputed convolutions and GroupNorms may be fused and summed in another order: float32
  # agreement, which a dropout mask drawn anew (a fifth of the units) would be far outside.
  np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * norm), grad_r, grad)


def test_unet_policies_keep_less_and_dots_keeps_the_convolutions(monkeypatch):
  # 'dense' keeps only matmuls without batch dimensions (no convolutions), for comparison.
  monkeypatch.setitem(remat_lib.REMAT_POLICIES, 'dense', jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  batch = {'x1': jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32),
           'labels': jax.ShapeDtypeStruct((8,), jnp.int32)}
  kept = {}
  for remat in ('none', 'dots', 'dense', 'block'):
    loss, params = _unet_loss(remat)
    kept[remat] = benchmarking.saved_residual_bytes(lambda p, b: loss(p, b, jax.random.PRNGKey(3))[0],
                                                    params, batch)
  assert kept['block'] < kept['dense'] < kept['dots'] < kept['none'], kept
  assert kept['block'] < 0.35 * kept['none'], kept
