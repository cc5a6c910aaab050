"""fmjax: flow maps in JAX/Flax (train, distill, evaluate and sample).

`fmjax.load(workdir, step=None)` returns a trained model with jitted `sample`, `flow_map`
and `velocity` (see fmjax/api.py). Imported lazily so that `import fmjax` stays light and
never initializes JAX's devices.
"""

__version__ = '0.1.0'


def load(workdir: str, step: int | None = None, **kwargs):
  """Loads a trained workdir; see fmjax.api.load."""
  from fmjax import api
  return api.load(workdir, step=step, **kwargs)
