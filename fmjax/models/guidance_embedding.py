"""The guidance-input embedding and the output-head check shared by the networks.

`guidance_conditioning=True` embeds iMF's guidance inputs; `velocity_head=True` adds iMF's
auxiliary output (a second output layer predicting the instantaneous velocity, read with
`net(s, t, x, labels, head='velocity')`; the reference's head also has its own last 8
transformer blocks, fmjax's shares every layer but the output one).

iMF (Geng, Lu et al. 2025, arXiv 2512.02012) feeds the guidance scale omega and the guidance
interval to the network. Its reference DiT (Lyy-iiis/imeanflow, models/imfDiT.py) embeds
1 - 1/omega, t_min and t_max with one timestep embedder each and adds them to learned
in-context tokens. fmjax adds the embedding to each network's time conditioning instead (no
in-context tokens), and zero-initializes the last layer: a new guidance-conditioned network
starts as if the guidance inputs were absent.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fmjax import conditioning
from fmjax.models import embeddings


class GuidanceEmbedding(nnx.Module):
  """(1 - 1/omega, start, end) -> sinusoidal features -> Linear -> SiLU -> Linear (zero init)."""

  def __init__(self, out_dim: int, frequency_dim: int, *, scale: float, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.frequency_dim, self.scale, self.dtype = frequency_dim, scale, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear0 = nnx.Linear(3 * frequency_dim, out_dim, **kw)
    # Zero output: a fresh network ignores omega until training says otherwise.
    self.linear1 = nnx.Linear(out_dim, out_dim, kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, guidance: conditioning.Guidance | None, batch: int):
    features = [embeddings.sinusoidal_embedding(u, self.frequency_dim, scale=self.scale)
                for u in conditioning.scalars(guidance, batch, self.dtype)]
    return self.linear1(nnx.silu(self.linear0(jnp.concatenate(features, axis=-1))))


def check_inputs(guidance, conditioned: bool, family: str):
  """One clear error when guidance inputs reach a network built without them."""
  if guidance is not None and not conditioned:
    raise ValueError(f'The {family} received guidance inputs (fmjax.conditioning.Guidance) but was '
                     'built without them: set config.model.guidance_conditioning = True (or build '
                     'it with guidance_conditioning=True).')


# 'both': (average, velocity) from one pass of the shared trunk, as iMF's reference network
# returns (u, v) (Lyy-iiis/imeanflow models/imfDiT.py `forward`).
HEADS = ('average', 'velocity', 'both')


def check_head(head: str, has_velocity_head: bool, family: str):
  """One clear error for an unknown output head or a missing auxiliary velocity head."""
  if head not in HEADS:
    raise ValueError(f'Unknown head {head!r}; choose one of {HEADS}.')
  if head in ('velocity', 'both') and not has_velocity_head:
    raise ValueError(f'The {family} has no velocity head: set config.model.velocity_head = True (or '
                     'build it with velocity_head=True), or set the rule option velocity_head_weight = 0.')
