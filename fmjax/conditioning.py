"""Guidance as a network input: the labels together with the guidance scale and interval.

Improved MeanFlow (iMF; Geng, Lu et al. 2025, arXiv 2512.02012, Sec. on flexible guidance;
equation numbers not checked) conditions the network on the classifier-free guidance scale
omega and on a guidance interval, so that one network serves every scale with one evaluation
per step. In fmjax these inputs travel where the labels do: the `labels` argument of
`apply(params, s, t, x, labels)` (and of every flow map method) may be a `Guidance`, a pytree
of [batch] arrays. Networks built with `guidance_conditioning=True` embed it; plain labels
(or None) mean omega = 1 on the interval [0, 1], i.e. no guidance.

The interval is in fmjax time (0 noise, 1 data): guidance acts at times s with
start <= s <= end. The reference code (Lyy-iiis/imeanflow, imf.py) writes it in MeanFlow time
(1 noise), [t_min, t_max] = [1 - end, 1 - start].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Guidance(NamedTuple):
  """Labels (int [batch] or None) with the guidance scale and interval ([batch] floats)."""
  labels: jax.Array | None
  omega: jax.Array
  start: jax.Array
  end: jax.Array


def split(labels):
  """(labels, Guidance or None): what a network reads from its `labels` argument."""
  if isinstance(labels, Guidance):
    return labels.labels, labels
  return labels, None


def make(labels, omega, batch: int, start=0.0, end=1.0) -> Guidance:
  """A Guidance with scalars or [batch] arrays broadcast to float32 [batch] arrays."""
  as_rows = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.float32), (batch,))
  return Guidance(labels, as_rows(omega), as_rows(start), as_rows(end))


def scalars(guidance: Guidance | None, batch: int, dtype=jnp.float32):
  """The three scalars a network embeds, [batch] each: (1 - 1/omega, start, end).

  iMF's reference network embeds 1 - 1/omega (imfDiT `omega_embedder(1 - 1 / w)`), which maps
  omega in [1, inf) onto [0, 1) like a time. Without guidance inputs: omega = 1 on [0, 1].
  """
  if guidance is None:
    guidance = make(None, 1.0, batch)
  cast = lambda a: jnp.broadcast_to(jnp.asarray(a, dtype), (batch,))
  omega = cast(guidance.omega)
  return 1.0 - 1.0 / omega, cast(guidance.start), cast(guidance.end)


def concatenate(parts: list) -> Guidance | jax.Array | None:
  """Row-wise concatenation of labels or of Guidances (for batched conditional/null passes)."""
  if parts[0] is None:
    return None
  if isinstance(parts[0], Guidance):
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
  return jnp.concatenate(parts)
