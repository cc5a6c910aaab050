"""Time and label conditioning shared by every network.

Times enter in float32 always, whatever the compute dtype: bfloat16 time inputs lose the
small differences t - s that the jvp rules differentiate through (a known source of NaNs
in continuous-time consistency training, Lu & Song 2024, Sec. 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIME_CONDITIONINGS = ('s_t', 't_gap')


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0, scale: float = 1000.0):
  """Transformer-style sinusoidal features of scale * t (DDPM / DiT); t of shape [batch].

  Computed in float32 or wider (float64 under x64, for finite-difference tests)."""
  t = at_least_float32(t) * scale
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
  angles = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def at_least_float32(t):
  t = jnp.asarray(t)
  return t.astype(jnp.promote_types(t.dtype, jnp.float32))


def two_time_inputs(s: jax.Array, t: jax.Array, conditioning: str):
  """The two scalars a network is conditioned on: (s, t) or (t, t - s) (MeanFlow's choice)."""
  if conditioning == 's_t':
    return s, t
  if conditioning == 't_gap':
    return t, t - s
  raise ValueError(f'Unknown time conditioning {conditioning!r}; choose one of {TIME_CONDITIONINGS}.')


def broadcast_times(s, t, batch: int):
  """Scalars or [batch] arrays -> two float32 arrays of shape [batch]."""
  s = jnp.broadcast_to(at_least_float32(s), (batch,))
  t = jnp.broadcast_to(at_least_float32(t), (batch,))
  return s, t
