"""A residual MLP flow-map network for toy and low-dimensional data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fmjax.models import embeddings


class MLP(nnx.Module):
  """net(s, t, x, labels) for vectors x of shape [batch, dim].

  Two-time conditioning by sinusoidal features of (s, t) or (t, t - s), concatenated with x;
  class labels by an embedding with one extra row, the null label `num_classes`, used for
  classifier-free guidance. Hidden layers are pre-norm residual blocks with SiLU.
  """

  def __init__(self, dim: int, *, hidden: int = 512, depth: int = 4, time_dim: int = 64,
               num_classes: int = 0, time_conditioning: str = 's_t', time_scale: float = 100.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
    self.time_conditioning = time_conditioning
    # Frequencies up to time_scale rad per unit time: enough to resolve t in [0, 1] without
    # the large time derivatives that DiT's 1000 t would feed into every jvp.
    self.time_scale = time_scale
    self.dtype = dtype
    self.input = nnx.Linear(dim + 2 * time_dim, hidden, dtype=dtype, rngs=rngs)
    self.label_embedding = (nnx.Embed(num_classes + 1, hidden, dtype=dtype, rngs=rngs)
                            if num_classes else None)
    self.blocks = nnx.List([
        nnx.Sequential(nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs),
                       nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs), nnx.silu,
                       nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs))
        for _ in range(depth - 1)
    ])
    self.output_norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
    self.output = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs,
                             kernel_init=nnx.initializers.zeros)

  def __call__(self, s, t, x, labels=None):
    s, t = embeddings.broadcast_times(s, t, x.shape[0])
    a, b = embeddings.two_time_inputs(s, t, self.time_conditioning)
    features = jnp.concatenate([
        x.astype(a.dtype),
        embeddings.sinusoidal_embedding(a, self.time_dim, scale=self.time_scale),
        embeddings.sinusoidal_embedding(b, self.time_dim, scale=self.time_scale)], axis=-1)
    h = self.input(features.astype(self.dtype))
    if self.label_embedding is not None:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      h = h + self.label_embedding(labels)
    for block in self.blocks:
      h = h + block(h)
    return self.output(nnx.silu(self.output_norm(h))).astype(x.dtype)
