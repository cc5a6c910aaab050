"""A residual MLP flow-map network for toy and low-dimensional data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fmjax.models import embeddings


class MLP(nnx.Module):
  """net(s, t, x, labels) for vectors x of shape [batch, dim].

  Two-time conditioning by sinusoidal features of (s, t) or (t, t - s), projected in
  float32 (times and their embeddings stay float32 whatever `dtype` is, see embeddings.py)
  and added to the projection of x; class labels by an embedding with one extra row, the
  null label `num_classes`, used for classifier-free guidance. Hidden layers are pre-norm
  residual blocks with SiLU; the output layer starts at zero.
  """

  def __init__(self, dim: int, *, hidden: int = 512, depth: int = 4, time_dim: int = 64,
               num_classes: int = 0, time_conditioning: str = 's_t', dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    embeddings.two_time_inputs(0.0, 0.0, time_conditioning)   # validates the name early
    self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
    self.time_conditioning = time_conditioning
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input = nnx.Linear(dim, hidden, **kw)
    self.time_input = nnx.Linear(2 * time_dim, hidden, dtype=jnp.float32, param_dtype=param_dtype,
                                 rngs=rngs)
    self.label_embedding = (nnx.Embed(num_classes + 1, hidden, **kw) if num_classes else None)
    self.blocks = nnx.List([
        nnx.Sequential(nnx.LayerNorm(hidden, **kw), nnx.Linear(hidden, hidden, **kw), nnx.silu,
                       nnx.Linear(hidden, hidden, **kw))
        for _ in range(depth - 1)
    ])
    self.output_norm = nnx.LayerNorm(hidden, **kw)
    self.output = nnx.Linear(hidden, dim, kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, s, t, x, labels=None):
    if x.ndim != 2 or x.shape[-1] != self.dim:
      raise ValueError(f'MLP expects x of shape [batch, {self.dim}], got {x.shape}.')
    s, t = embeddings.broadcast_times(s, t, x.shape[0])
    a, b = embeddings.two_time_inputs(s, t, self.time_conditioning)
    times = jnp.concatenate([embeddings.sinusoidal_embedding(a, self.time_dim),
                             embeddings.sinusoidal_embedding(b, self.time_dim)], axis=-1)
    h = self.input(x.astype(self.dtype)) + self.time_input(times).astype(self.dtype)
    if self.label_embedding is not None:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      h = h + self.label_embedding(labels)
    for block in self.blocks:
      h = h + block(h)
    return self.output(nnx.silu(self.output_norm(h))).astype(x.dtype)
