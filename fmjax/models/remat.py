"""Rematerialization of a network's blocks (Chen et al. 2016, "Training deep nets with sublinear
memory cost"): each block runs under `jax.checkpoint` with a saving policy, so the backward pass
recomputes what the policy does not keep instead of holding it from the forward pass.

Policies (`remat=`, config.model.remat), shared by the DiT's transformer blocks and the U-Net's
residual blocks:
  'none'   no checkpoint: every activation is kept (the default; fastest when it fits);
  'dots'   the outputs of the linear layers are kept (matmuls without batch dimensions and
           convolutions), norms, activations, modulation and attention are recomputed;
  'block'  only each block's inputs are kept and the whole block is recomputed (about one
           extra forward pass).
Values and gradients are the same under every policy; only memory and time change. The jvp of
a checkpointed block is checkpointed, so the flow-map rules' tangents are recomputed too.
"""

from __future__ import annotations

import jax
from flax import nnx


def _linear_layer_outputs(prim, *args, **params) -> bool:
  """Keeps matmuls without batch dimensions (dense layers) and convolutions, not attention's
  batched score and value products (those are [batch, heads, seq, seq]-sized)."""
  return (prim is jax.lax.conv_general_dilated_p
          or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# What each block keeps for the backward pass (jax.checkpoint policies); None: no checkpoint.
REMAT_POLICIES = {
    'none': None,
    'dots': _linear_layer_outputs,
    'block': jax.checkpoint_policies.nothing_saveable,
}


def remat_policy(remat: str):
  """The jax.checkpoint policy that `remat` names (None: no checkpoint); an unknown name raises."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {remat!r}; choose one of {tuple(REMAT_POLICIES)}.')
  return REMAT_POLICIES[remat]


def pure_block(graphdef):
  """(block arrays, *inputs) -> block(*inputs), the module rebuilt from `graphdef` inside."""
  return lambda state, *inputs: nnx.merge(graphdef, state)(*inputs)


def _call_block(block, *inputs):
  return block(*inputs)


def block_caller(remat: str):
  """(block, *inputs) -> block(*inputs), checkpointed under the policy `remat` names.

  The checkpointed function is pure (the block's arrays and inputs in, the output out, the module
  rebuilt inside by nnx.merge): a module merged under an outer jvp or grad trace cannot be updated
  from the checkpoint's trace, which nnx.remat would attempt. The blocks hold no mutable state
  (dropout takes an explicit key, which is one of the inputs, so the recomputation drops the same
  units).
  """
  policy = remat_policy(remat)
  if policy is None:
    return _call_block

  def call(block, *inputs):
    graphdef, state = nnx.split(block)
    return jax.checkpoint(pure_block(graphdef), policy=policy)(state, *inputs)

  return call
