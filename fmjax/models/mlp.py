"""A residual MLP flow-map network for toy and low-dimensional data."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fmjax import conditioning
from fmjax.models import embeddings
from fmjax.models import guidance_embedding as guidance_lib


class MLP(nnx.Module):
  """net(s, t, x, labels) for vectors x of shape [batch, dim].

  Two-time conditioning by sinusoidal features of (s, t) or (t, t - s), projected and added to
  the projection of x; class labels by an embedding with one extra row, the null label
  `num_classes`, used for classifier-free guidance. Hidden layers are pre-activation residual
  blocks (SiLU, Linear, SiLU, Linear), the output layer starts at zero.
  """

  def __init__(self, dim: int, *, hidden: int = 512, depth: int = 4, time_dim: int = 64,
               num_classes: int = 0, time_conditioning: str = 's_t', time_scale: float = 100.0,
               guidance_conditioning: bool = False, velocity_head: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    embeddings.two_time_inputs(0.0, 0.0, time_conditioning)   # validates the name early
    self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
    self.time_conditioning = time_conditioning
    # Frequencies up to time_scale rad per unit time: enough to resolve t in [0, 1] without
    # the large time derivatives that DiT's 1000 t would feed into every jvp.
    self.time_scale = time_scale
    self.dtype = dtype
    # Separate input projections of x, emb(s) and emb(t) (a concatenation, split): under a
    # jvp in t alone the others carry symbolic-zero tangents, so only the t block is paid for.
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The time projections run in float32 at least (bfloat16 would round the small time
    # differences a jvp in time resolves; float64 stays float64 for finite-difference tests).
    self.time_dtype = jnp.promote_types(dtype, jnp.float32)
    time_kw = dict(kw, dtype=self.time_dtype)
    self.input = nnx.Linear(dim, hidden, **kw)
    self.first_time = nnx.Linear(time_dim, hidden, use_bias=False, **time_kw)
    self.second_time = nnx.Linear(time_dim, hidden, use_bias=False, **time_kw)
    self.label_embedding = nnx.Embed(num_classes + 1, hidden, **kw) if num_classes else None
    # iMF's guidance inputs (omega, interval), added to h; absent (no params) when off.
    self.guidance_embedding = (guidance_lib.GuidanceEmbedding(hidden, time_dim, scale=time_scale,
                                                              **time_kw)
                               if guidance_conditioning else None)
    self.blocks = nnx.List([
        nnx.Sequential(nnx.silu, nnx.Linear(hidden, hidden, **kw), nnx.silu,
                       nnx.Linear(hidden, hidden, **kw))
        for _ in range(depth - 1)
    ])
    self.output = nnx.Linear(hidden, dim, kernel_init=nnx.initializers.zeros, **kw)
    # iMF's auxiliary velocity head: a second output layer (absent when off).
    self.velocity_output = (nnx.Linear(hidden, dim, kernel_init=nnx.initializers.zeros, **kw)
                            if velocity_head else None)

  def __call__(self, s, t, x, labels=None, *, head: str = 'average'):
    guidance_lib.check_head(head, self.velocity_output is not None, 'MLP')
    if x.ndim != 2 or x.shape[-1] != self.dim:
      raise ValueError(f'MLP expects x of shape [batch, {self.dim}], got {x.shape}.')
    labels, guidance = conditioning.split(labels)
    guidance_lib.check_inputs(guidance, self.guidance_embedding is not None, 'MLP')
    s, t = embeddings.broadcast_times(s, t, x.shape[0])
    a, b = embeddings.two_time_inputs(s, t, self.time_conditioning)
    emb = lambda u: embeddings.sinusoidal_embedding(u, self.time_dim, scale=self.time_scale)
    h = (self.input(x.astype(self.dtype))
         + (self.first_time(emb(a)) + self.second_time(emb(b))).astype(self.dtype))
    if self.label_embedding is not None:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      h = h + self.label_embedding(labels)
    if self.guidance_embedding is not None:
      h = h + self.guidance_embedding(guidance, x.shape[0]).astype(self.dtype)
    for block in self.blocks:
      h = h + block(h)
    h = nnx.silu(h)
    if head == 'both':   # (average, velocity) from one pass of the trunk
      return self.output(h).astype(x.dtype), self.velocity_output(h).astype(x.dtype)
    output = self.velocity_output if head == 'velocity' else self.output
    return output(h).astype(x.dtype)
