"""Flax networks behind one pure interface: apply(params, s, t, x, labels) -> array like x.

Networks are named by string so configs can pick them: `build('unet-cifar10', seed=0)`,
`build('dit', hidden=256, depth=4, ...)`, `build('DiT-XL/2', num_classes=1000)`. A name is
a family ('mlp', 'unet', 'dit': the constructor's defaults) or a preset (family + sizes);
keyword arguments override either. `functional(module)` turns the module into the pure
`(apply, params)` pair that losses and samplers use.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmjax.models import dit, mlp, unet

FAMILIES = {'mlp': mlp.MLP, 'unet': unet.UNet, 'dit': dit.DiT}

PRESETS: dict[str, tuple[str, dict]] = {
    'mlp-toy': ('mlp', dict(dim=2, hidden=256, depth=4)),
    'mlp-tiny': ('mlp', dict(dim=2, hidden=32, depth=2, time_dim=16)),
    **{f'unet-{k}': ('unet', v) for k, v in unet.PRESETS.items()},
    **{k: ('dit', v) for k, v in dit.PRESETS.items()},
}
_LOOKUP = {k.lower(): k for k in (*FAMILIES, *PRESETS)}


# Config spellings accepted for the constructors' argument names.
ALIASES = {'channels': 'model_channels', 'channel_mults': 'channel_mult',
           'attention_resolutions': 'attn_resolutions', 'width': 'hidden'}


def _shape_kwargs(family: str, example_shape) -> dict:
  """Constructor sizes from one example's shape: [dim] for the MLP, [H, W, C] for images."""
  shape = tuple(int(d) for d in example_shape)
  if family == 'mlp':
    return {'dim': int(np.prod(shape))}
  if len(shape) != 3 or shape[0] != shape[1]:
    raise ValueError(f'The {family} takes square NHWC images; example_shape (one example, no '
                     f'batch) must be (size, size, channels), got {shape}.')
  return {'image_size': shape[0], 'in_channels': shape[2]}


# Constructor arguments that are not network options of a config: sizes and classes come from
# the data, precision and time conditioning from config.model.dtype / time_conditioning, and
# dict-valued attention_options is for Python callers.
NOT_OPTIONS = ('dim', 'image_size', 'in_channels', 'out_channels', 'num_classes', 'time_conditioning',
               'dtype', 'param_dtype', 'rngs', 'attention_options')


def _parameters(family: str) -> dict[str, inspect.Parameter]:
  return {k: p for k, p in inspect.signature(FAMILIES[family].__init__).parameters.items()
          if k != 'self'}


def family_of(name: str) -> str:
  """The family ('mlp', 'unet', 'dit') of a family or preset name (case-insensitive)."""
  key = _LOOKUP.get(name.lower())
  if key is None:
    raise ValueError(f'Unknown network {name!r}; choose a family {sorted(FAMILIES)} or a preset '
                     f'{sorted(PRESETS)}.')
  return key if key in FAMILIES else PRESETS[key][0]


def option_types() -> dict[str, type]:
  """Every network option of some family -> its type (from the constructors' defaults).
  fmjax.configs makes one config.model field of each."""
  types = {}
  for family in FAMILIES:
    for k, p in _parameters(family).items():
      if k not in NOT_OPTIONS:
        kind = tuple if isinstance(p.default, (tuple, list)) else type(p.default)
        if types.setdefault(k, kind) is not kind:
          raise TypeError(f'Network option {k!r} has two types ({types[k]}, {kind}); rename one.')
  return types


def options(name: str, **overrides) -> tuple[str, dict]:
  """(family, every network option in force) for `name` with `overrides`: overrides over the
  preset over the constructor's defaults. Sizes set by the data (NOT_OPTIONS) are left out.
  Raises ValueError for an unknown name or option, naming the valid ones."""
  family, kwargs = resolve(name, **overrides)
  defaults = {k: p.default for k, p in _parameters(family).items() if k not in NOT_OPTIONS}
  return family, {**defaults, **{k: v for k, v in kwargs.items() if k in defaults}}


def resolve(name: str, *, example_shape=None, **kwargs) -> tuple[str, dict]:
  """name (case-insensitive) + overrides -> (family, constructor kwargs).

  `example_shape` (one example, no batch dimension) sets the input size; config spellings
  in ALIASES are translated to the constructor's names.
  """
  family = family_of(name)
  key = _LOOKUP[name.lower()]
  preset = {} if key in FAMILIES else PRESETS[key][1]
  kwargs = {ALIASES.get(k, k): v for k, v in kwargs.items()}
  unknown = set(kwargs) - set(_parameters(family)) - {'rngs'}
  if unknown:
    valid = sorted(set(_parameters(family)) - set(NOT_OPTIONS))
    raise ValueError(f'Unknown option(s) {sorted(unknown)} for the {family} network {name!r}; '
                     f'valid: {valid}.')
  if example_shape is not None:
    kwargs = {**_shape_kwargs(family, example_shape), **kwargs}
  for k in ('channel_mult', 'attn_resolutions'):
    if k in kwargs:
      kwargs[k] = tuple(kwargs[k])
  return family, {**preset, **kwargs}


def build(name: str, *, seed: int = 0, rngs: nnx.Rngs | None = None, **kwargs) -> nnx.Module:
  """The NNX module called `name` (family or preset), with overrides `kwargs`.

  Mixed precision: `dtype` is the compute dtype (e.g. jnp.bfloat16); parameters are
  float32 (`param_dtype`), and times and their embeddings are float32 always.
  With `rngs` the module is initialized eagerly from them; with `seed` (the default) it is
  initialized by one jitted program compiled without backend optimization: eager
  initialization compiles every initializer separately, and an optimized compile of the
  init program costs tens of seconds for a U-Net on a CPU, for code that runs once.
  """
  family, config = resolve(name, **kwargs)
  construct = lambda rngs: FAMILIES[family](**config, rngs=rngs)
  if rngs is not None:
    return construct(rngs)
  graphdef, _ = nnx.split(abstract(name, **kwargs))
  init = jax.jit(lambda: nnx.split(construct(nnx.Rngs(seed)))[1], compiler_options=FAST_COMPILE)
  return nnx.merge(graphdef, init())


# XLA options for programs whose run time does not matter (initialization, tests).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def abstract(name: str, **kwargs) -> nnx.Module:
  """`build(name, **kwargs)` with shape/dtype placeholders for arrays: nothing allocated or compiled.

  Its graph definition works with the params of any built module of the same structure,
  e.g. to run float32 params with a bfloat16-compute variant:
  `nnx.merge(nnx.split(abstract(name, dtype=jnp.bfloat16))[0], params)`.
  """
  family, config = resolve(name, **kwargs)
  return nnx.eval_shape(lambda: FAMILIES[family](**config, rngs=nnx.Rngs(0)))


def param_count(name: str, **kwargs) -> int:
  """Number of parameters of `build(name, **kwargs)`, from shapes only (nothing is allocated)."""
  # jax.eval_shape of the Param state: as cheap as tracing the constructor once.
  family, config = resolve(name, **kwargs)
  shapes = jax.eval_shape(lambda: nnx.state(FAMILIES[family](**config, rngs=nnx.Rngs(0)), nnx.Param))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def functional(module: nnx.Module) -> tuple[Callable[..., jax.Array], Any]:
  """Splits an NNX module once into a pure `apply(params, s, t, x, labels)` and its params.

  The graph definition is closed over; `nnx.merge` inside the (jitted) caller rebuilds the
  module from params, as the Flax performance guide recommends for plain `jax.jit`.
  Extra keyword arguments reach the module (the U-Net takes `key=` to enable dropout).
  """
  graphdef, params = nnx.split(module)

  def apply(params, s, t, x, labels=None, **kwargs):
    return nnx.merge(graphdef, params)(s, t, x, labels, **kwargs)

  return apply, params


def example_input(module: nnx.Module, batch: int) -> jax.Array:
  """A standard-normal input batch of the shape `module` expects."""
  if isinstance(module, mlp.MLP):
    shape = (batch, module.dim)
  else:
    shape = (batch, module.image_size, module.image_size, module.in_channels)
  return jax.random.normal(jax.random.key(0), shape, jnp.float32)


BENCHMARK_SIZES = {
    'mlp': {'tiny': 'mlp-tiny', 'small': 'mlp-toy', 'full': 'mlp-toy'},
    'unet': {'tiny': 'unet-tiny',
             'small': ('unet', dict(image_size=32, in_channels=3, model_channels=32,
                                    channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                                    channels_per_head=32)),
             'full': 'unet-cifar10'},
    'dit': {'tiny': 'DiT-tiny',
            'small': ('dit', dict(image_size=16, in_channels=4, patch_size=2, hidden=128, depth=4,
                                  num_heads=4)),
            'full': 'DiT-B/2'},
}


def build_for_benchmark(name: str, size: str = 'small', *, batch: int = 8, seed: int = 0, **kwargs):
  """(apply, params, example_x) of a network family at a benchmark size.

  name: 'mlp' | 'unet' | 'dit'; size: 'tiny' (tests), 'small' (CPU benchmarks) or 'full'
  (CIFAR-10 U-Net, DiT-B/2: for accelerators). kwargs override the configuration, e.g.
  `attention='blockwise'`, `dtype=jnp.bfloat16`, `num_classes=10`.
  """
  if name not in BENCHMARK_SIZES or size not in BENCHMARK_SIZES[name]:
    raise ValueError(f'build_for_benchmark knows {sorted(BENCHMARK_SIZES)} x (tiny, small, full); '
                     f'got {name!r}, {size!r}.')
  spec = BENCHMARK_SIZES[name][size]
  preset, config = (spec, {}) if isinstance(spec, str) else spec
  module = build(preset, seed=seed, **{**config, **kwargs})
  apply, params = functional(module)
  return apply, params, example_input(module, batch)
