"""Flax networks behind one pure interface: apply(params, s, t, x, labels) -> array like x."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx


def functional(module: nnx.Module) -> tuple[Callable[..., jax.Array], Any]:
  """Splits an NNX module once into a pure `apply(params, s, t, x, labels)` and its params.

  The graph definition is closed over; `nnx.merge` inside the (jitted) caller rebuilds the
  module from params, as the Flax performance guide recommends for plain `jax.jit`.
  """
  graphdef, params = nnx.split(module)

  def apply(params, s, t, x, labels=None):
    return nnx.merge(graphdef, params)(s, t, x, labels)

  return apply, params
