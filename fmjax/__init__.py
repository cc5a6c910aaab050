"""fmjax: flow maps in JAX/Flax.

The math layer (interpolants, flow_maps, losses, samplers, data.toy) is pure functions of
arrays; `fmjax.load(workdir)` (from fmjax.api) returns a trained model with jitted samplers.
"""

__version__ = '0.1.0'


def __getattr__(name):
  # Lazy, so that importing the math layer never imports the training system.
  if name == 'load':
    from fmjax.api import load
    return load
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
