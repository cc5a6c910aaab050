"""From a config to the pieces of a run: network, flow map, interpolant and training rule.

Shared by the training loop and `fmjax.load`, so a loaded model is built exactly as it was
trained. Network parameters are kept as plain nested dicts with string keys (what Orbax
stores); the NNX graph definition is rebuilt from the config and closed over by `apply`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fmjax import flow_maps, interpolants


def _to_str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _to_str_keys(v) for k, v in tree.items()}
  return tree


def _to_nnx_keys(tree):
  # nnx.List entries are keyed by int; Orbax and JSON want strings.
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _to_nnx_keys(v)
            for k, v in tree.items()}
  return tree


def _module_factory(config: ml_collections.ConfigDict, example_shape, num_classes: int):
  """A function rngs -> NNX module for config.model (the MLP flattens image inputs)."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  if m.name == 'mlp':
    from fmjax.models.mlp import MLP
    dim = int(math.prod(example_shape))
    return lambda rngs: MLP(dim, hidden=m.hidden, depth=m.depth, time_dim=m.time_dim,
                            num_classes=num_classes, time_conditioning=m.time_conditioning,
                            dtype=dtype, rngs=rngs)
  try:
    from fmjax.models import build as build_model
  except ImportError as e:
    raise NotImplementedError(
        f"config.model.name = {m.name!r} needs the network registry fmjax.models.build, which "
        "this installation does not have yet; use config.model.name = 'mlp'.") from e
  kwargs = dict(m.kwargs.to_dict())
  return lambda rngs: build_model(m.name, example_shape=tuple(example_shape), num_classes=num_classes,
                                  time_conditioning=m.time_conditioning, dtype=dtype, rngs=rngs,
                                  **kwargs)


def build_network(config: ml_collections.ConfigDict, example_shape, num_classes: int
                  ) -> tuple[Callable[[jax.Array], Any], Callable[..., jax.Array]]:
  """(init(key) -> params, apply(params, s, t, x, labels) -> like x) for config.model."""
  factory = _module_factory(config, example_shape, num_classes)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
  flatten = config.model.name == 'mlp' and len(example_shape) > 1

  def init(key):
    return _to_str_keys(nnx.split(factory(nnx.Rngs(key)))[1].to_pure_dict())

  def apply(params, s, t, x, labels=None, **kwargs):
    # kwargs reach the module: the U-Net's dropout key (`key=`) in training.
    module = nnx.merge(graphdef, _to_nnx_keys(params))
    if flatten:
      return module(s, t, x.reshape(x.shape[0], -1), labels, **kwargs).reshape(x.shape)
    return module(s, t, x, labels, **kwargs)

  return init, apply


def build_flow_map(config: ml_collections.ConfigDict, apply, interpolant):
  return flow_maps.make(config.flow_map.parameterization, apply, interpolant,
                        sigma_data=config.flow_map.sigma_data)


def build_interpolant(config: ml_collections.ConfigDict):
  return interpolants.get(config.interpolant)


def loss_options(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  options = {k: v for k, v in config.loss.items() if k != 'name'}
  options = {k: (v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v)
             for k, v in options.items()}
  if num_classes and 'null_label' not in options:
    options['null_label'] = num_classes    # the extra embedding row for guidance
  return options


def uses_dropout(config: ml_collections.ConfigDict) -> bool:
  return float(config.model.kwargs.to_dict().get('dropout', 0.0)) > 0.0


def build_rule(config: ml_collections.ConfigDict, flow_map, interpolant, num_classes: int,
               teacher=None):
  """fmjax.losses.make(config.loss.name, ...) with every other config.loss key as an option."""
  from fmjax import losses
  return losses.make(config.loss.name, flow_map, interpolant, teacher=teacher,
                     **loss_options(config, num_classes))


def load_teacher(config: ml_collections.ConfigDict):
  """The velocity b_t(x) of a trained workdir (EMA parameters) for distillation, or None."""
  if not config.teacher.workdir:
    return None
  from fmjax import api
  step = None if config.teacher.step < 0 else config.teacher.step
  model = api.load(config.teacher.workdir, step=step)
  return model.velocity_fn()
