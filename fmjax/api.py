"""The research API: load a trained workdir and call jitted samplers and maps.

  model = fmjax.load('runs/gmm')                  # latest checkpoint, first EMA copy
  x = model.sample(key, 1000, steps=2)            # 2-step flow-map samples
  x = model.sample(key, 64, times=[0, .5, .8, 1], labels=y, guidance_scale=2.0)
  y = model.flow_map(s, t, x)                     # X_{s,t}(x); s, t scalars or [batch]
  b = model.velocity(t, x)                        # b_t(x) = v_{t,t}(x)

The parameters are restored replicated over the caller's local devices (whatever they are:
one CPU, eight GPUs, ...); batches that split evenly are sharded over them. The model is
rebuilt from the config stored in the checkpoint, so no experiment file is needed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax import build
from fmjax import checkpointing
from fmjax import sharding
from fmjax import train_state


@dataclasses.dataclass
class Model:
  """A trained flow map: jitted `sample`, `flow_map` and `velocity` on the loaded parameters."""

  config: ml_collections.ConfigDict
  params: Any
  parameterization: Any       # the fmjax.flow_maps object (X, v, velocity taking params)
  example_shape: tuple[int, ...]
  num_classes: int
  step: int
  mesh: Mesh

  def __post_init__(self):
    self._sample = jax.jit(self._sample_impl, static_argnames=('num', 'guidance_scale'))
    fm = self.parameterization
    self._flow_map = jax.jit(lambda p, s, t, x, labels: fm.X(p, s, t, x, labels))
    self._velocity = jax.jit(lambda p, t, x, labels: fm.velocity(p, t, x, labels))

  # -------------------------------------------------------------- sampling

  def _sample_impl(self, params, key, times, labels, *, num, guidance_scale):
    from fmjax import samplers
    x0 = jax.random.normal(key, (num,) + self.example_shape, jnp.float32)
    x0 = jax.lax.with_sharding_constraint(x0, self._batch_sharding(num))
    return samplers.flow_map_sample(self.parameterization, params, x0, times, labels,
                                    null_label=self.num_classes or None,
                                    guidance_scale=guidance_scale)

  def sample(self, key, num: int, steps: int = 1, *, times=None, labels=None,
             guidance_scale: float = 1.0) -> jax.Array:
    """`num` samples by the flow map from noise (t = 0) to data (t = 1).

    steps: k, for the uniform grid 0, 1/k, ..., 1 (k network evaluations);
    times: an explicit increasing grid instead (its length - 1 evaluations);
    labels: int [num] class ids for class-conditional models (None = unconditional);
    guidance_scale: classifier-free guidance weight (1 = none).
    """
    from fmjax import samplers
    if times is None:
      if int(steps) < 1:
        raise ValueError(f'steps must be >= 1, got {steps}.')
      times = samplers.uniform_grid(int(steps))
    times = jnp.asarray(times, jnp.float32)
    if times.ndim != 1 or times.shape[0] < 2:
      raise ValueError('times must be a 1-D grid with at least two entries, e.g. [0.0, 1.0].')
    if labels is not None:
      if not self.num_classes:
        raise ValueError('This model is unconditional; call sample without labels.')
      labels = jnp.asarray(labels, jnp.int32)
      if labels.shape != (num,):
        raise ValueError(f'labels must have shape [{num}], got {labels.shape}.')
    return self._sample(self.params, key, times, labels, num=int(num),
                        guidance_scale=float(guidance_scale))

  # -------------------------------------------------------------- maps

  def velocity_fn(self):
    """b(t, x, labels=None) with the loaded parameters closed over (e.g. a distillation teacher)."""
    params, fm = self.params, self.parameterization
    return lambda t, x, labels=None: fm.velocity(params, t, x, labels)

  def _times(self, t, x):
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
      return jnp.full((x.shape[0],), t)
    if t.shape != (x.shape[0],):
      raise ValueError(f'times must be scalars or of shape [batch] = [{x.shape[0]}], got {t.shape}.')
    return t

  def _check_x(self, x):
    x = jnp.asarray(x, jnp.float32)
    if tuple(x.shape[1:]) != self.example_shape:
      raise ValueError(f'x must have shape [batch, {", ".join(map(str, self.example_shape))}], '
                       f'got {tuple(x.shape)}.')
    return x

  def _batch_sharding(self, num):
    return NamedSharding(self.mesh, P('batch') if num % self.mesh.size == 0 else P())

  def flow_map(self, s, t, x, labels=None) -> jax.Array:
    """X_{s,t}(x): the point at time t on the path through x at time s."""
    x = self._check_x(x)
    return self._flow_map(self.params, self._times(s, x), self._times(t, x), x, labels)

  def velocity(self, t, x, labels=None) -> jax.Array:
    """b_t(x) = v_{t,t}(x), the instantaneous velocity of the probability-flow ODE."""
    x = self._check_x(x)
    return self._velocity(self.params, self._times(t, x), x, labels)


def load(workdir: str, step: int | None = None, *, ema: int | None = None) -> Model:
  """Loads a trained workdir: the checkpoint at `step` (latest if None).

  ema: which EMA copy of the parameters (config.optim.ema_decays order); -1 for the raw
  training parameters; None (default) for the first EMA copy, or the raw parameters of a
  run that keeps none.
  """
  manager = checkpointing.make_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {checkpointing.checkpoint_dir(workdir)}; train with '
                            f'`python -m fmjax.main --config=... --workdir={workdir}` first.')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {checkpointing.checkpoint_dir(workdir)}; '
                            f'saved steps: {sorted(steps)}.')
  saved_config, _, meta = checkpointing.restore_json(manager, step)
  config = ml_collections.ConfigDict(saved_config)
  mesh = sharding.local_mesh()
  replicated = NamedSharding(mesh, P())
  metadata = manager.item_metadata(step)['state']
  metadata = getattr(metadata, 'tree', metadata)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
                          metadata, is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
  state = checkpointing.restore_state(manager, step, abstract)
  manager.close()
  if ema is None:
    ema = 0 if state.get('ema') else -1
  params = train_state.select_params(state, ema)
  example_shape = tuple(meta['example_shape'])
  num_classes = int(meta['num_classes'])
  interpolant = build.build_interpolant(config)
  _, apply = build.build_network(config, example_shape, num_classes)
  flow_map = build.build_flow_map(config, apply, interpolant)
  model = Model(config, params, flow_map, example_shape, num_classes, int(step), mesh)
  return model
