"""Planning the few-step sweep: which samplers run, at what cost, and their jitted functions.

Flow-map methods are compared by sample quality against the number of network function
evaluations (NFE): a k-step flow map costs k evaluations (Boffi et al. 2406.07507, Sec. 2),
an ODE solver on the learned velocity b_t = v_{t,t} costs `samplers.ode_nfe(steps, method)`.
`specs` lists the sweep's points (`SamplerSpec`), `make_sample_fns` turns them into jitted
samplers of `fmjax.samplers` with the step count traced, so a whole sweep compiles once per
family (flow map, ODE method) and batch shape, not once per point.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from fmjax import samplers


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One point of the sweep: a sampler family, its step count and its cost in NFE."""
  family: str          # 'flow_map' | 'ode'
  steps: int
  nfe: int             # network evaluations per sample (doubled under classifier-free guidance)
  method: str = ''     # ODE method ('' for the flow map)

  @property
  def key(self) -> str:
    """The results key: steps for the flow map (= NFE unguided), NFE for the ODE."""
    return str(self.steps if self.family == 'flow_map' else self.nfe)

  @property
  def label(self) -> str:
    if self.family == 'flow_map':
      return f'flow map, {self.steps} step' + ('s' if self.steps > 1 else '')
    return f'ODE {self.method}, {self.nfe} NFE'


def specs(flow_map_steps, ode_method: str, ode_nfe, guided: bool = False) -> list[SamplerSpec]:
  """Sweep points: the flow map at every k, the ODE at every NFE budget it can meet exactly.

  An NFE budget n is run with n // evals_per_step solver steps (Heun and midpoint take 2
  evaluations a step, RK4 4); budgets below one step, or not a multiple of a step, are
  dropped rather than reported under a wrong NFE.
  """
  if ode_method not in samplers.ODE_METHODS:
    raise ValueError(f'eval.ode_method = {ode_method!r}; choose one of {sorted(samplers.ODE_METHODS)}.')
  factor = 2 if guided else 1
  specs = [SamplerSpec('flow_map', int(k), factor * int(k)) for k in flow_map_steps]
  per_step = samplers.ODE_METHODS[ode_method]
  seen = set()
  for n in ode_nfe:
    steps = int(n) // per_step
    if steps < 1 or steps * per_step != int(n) or steps in seen:
      continue
    seen.add(steps)
    specs.append(SamplerSpec('ode', steps, factor * samplers.ode_nfe(steps, ode_method), ode_method))
  return specs


def specs_from_config(config) -> list[SamplerSpec]:
  # Guidance costs a second (null) pass, except for networks taking the scale as an input (iMF).
  guided = (bool(config.data.num_classes) and config.eval.guidance_scale != 1.0
            and not config.model.get('guidance_conditioning'))
  return specs(config.eval.steps, config.eval.ode_method, config.eval.ode_nfe, guided)


def make_sample_fns(flow_map, specs, *, null_label=None, guidance_scale: float = 1.0,
                    guidance_input: bool = False, guidance_interval=(0.0, 1.0)
                    ) -> dict[SamplerSpec, Callable]:
  """{spec: sample(params, x0, labels) -> x}: `samplers.flow_map_sample` on the uniform k-step
  grid and `samplers.flow_map_ode_sample`, jitted with the step count traced."""
  guidance = dict(null_label=null_label, guidance_scale=guidance_scale, guidance_input=guidance_input,
                  guidance_interval=tuple(guidance_interval))
  flow_map_fn = jax.jit(lambda params, x0, labels, k: samplers.flow_map_sample(
      flow_map, params, x0, None, labels, num_steps=k, **guidance))
  ode_fns = {}
  fns = {}
  for spec in specs:
    if spec.family == 'flow_map':
      fn = flow_map_fn
    else:
      if spec.method not in ode_fns:
        ode_fns[spec.method] = jax.jit(functools.partial(
            lambda method, params, x0, labels, k: samplers.flow_map_ode_sample(
                flow_map, params, x0, k, method, labels, **guidance), spec.method))
      fn = ode_fns[spec.method]
    fns[spec] = functools.partial(lambda f, k, params, x0, labels: f(params, x0, labels, k),
                                  fn, spec.steps)
  return fns
