"""Sampling: k-step flow-map jumps over a time grid, and ODE baselines on the velocity.

One implementation of each sampler. A time grid is either explicit (`times`, any increasing
array) or uniform with `num_steps` steps; a uniform step count may be a traced integer, so a
single compilation serves every k (the few-step sweep, `fmjax.evaluation.plan`, relies on it).
`flow_map_steps` is the one k-step loop x_{i+1} = X_{t_i, t_{i+1}}(x_i): the plain sampler
below, reward fine-tuning (`fmjax.steering.finetune.k_step_sample`) and look-ahead guidance
(`fmjax.steering.reward_guidance.guided_sample`, which adds its control in a per-step hook) run on it.
`make_flow_map_sampler` / `make_ode_sampler` return `jax.jit` functions that compile once per
(batch shape, number of steps). NFE (network function evaluations) are reported beside the
samples so that flow maps and ODE solvers can be compared at equal cost.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import conditioning
from fmjax.interpolants import expand

VelocityFn = Callable[..., jax.Array]   # velocity(t, x) -> b_t(x), t of shape [batch]
JumpFn = Callable[..., jax.Array]       # jump(s, t, x, labels) -> X_{s,t}(x), s and t of shape [batch]
StepHook = Callable[..., tuple]         # hook(i, s, t, x_before, x_after, carry) -> (x, carry)
ODE_METHODS = {'euler': 1, 'heun': 2, 'midpoint': 2, 'rk4': 4}   # evaluations per step


def uniform_grid(num_steps: int, t0: float = 0.0, t1: float = 1.0) -> jax.Array:
  """num_steps + 1 equally spaced times from t0 (noise) to t1 (data)."""
  return jnp.linspace(t0, t1, num_steps + 1, dtype=jnp.float32)


def _uniform_time(i, num_steps, t0, t1):
  """t_i = t0 + (i / k)(t1 - t0) on the k-step uniform grid, exactly t1 at i = k (k may be traced)."""
  t = t0 + (i / jnp.asarray(num_steps, jnp.float32)) * (t1 - t0)
  return jnp.where(i >= num_steps, t1, t).astype(jnp.float32)


def _march(step, state, num_steps, time, batch, unroll: bool = False):
  """state_{i+1} = step(i, state_i, t_i, t_{i+1}) for i < num_steps, t_i = time(i) as [batch] arrays.

  The one fori_loop behind the flow-map and ODE samplers. num_steps may be traced (a while
  loop then); unroll=True has XLA unroll a static loop (the body is still traced once).
  """
  def body(i, state):
    s = jnp.broadcast_to(time(i), batch)
    t = jnp.broadcast_to(time(i + 1), batch)
    return step(i, state, s, t)

  return jax.lax.fori_loop(0, num_steps, body, state, unroll=num_steps if unroll else None)


def _schedule(times, num_steps):
  """(number of steps, i -> t_i) of an explicit grid or of num_steps uniform steps on [0, 1]."""
  if (times is None) == (num_steps is None):
    raise ValueError('Pass either times (an explicit grid) or num_steps (the uniform grid).')
  if times is None:
    return num_steps, functools.partial(_uniform_time, num_steps=num_steps, t0=0.0, t1=1.0)
  times = jnp.asarray(times, jnp.float32)
  return times.shape[0] - 1, lambda i: times[i]


def _concrete_grid(times, num_steps) -> list:
  """The grid as Python floats, for the Python loop of flow_map_steps(unroll=True)."""
  if (times is None) == (num_steps is None):
    raise ValueError('Pass either times (an explicit grid) or num_steps (the uniform grid).')
  try:
    if times is None:
      return [i / int(num_steps) for i in range(int(num_steps) + 1)]
    grid = np.asarray(times, np.float64)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          jax.errors.TracerIntegerConversionError):
    raise ValueError('flow_map_steps(unroll=True) loops in Python over a concrete grid: pass times '
                     'as Python floats (a static tuple under jax.jit) and num_steps as an int, or '
                     'use unroll=False for a traced grid.') from None
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f'times must be a 1-D grid of at least 2 times, got shape {grid.shape}.')
  return [float(t) for t in grid]


def flow_map_steps(jump: JumpFn, x0, times=None, labels=None, *, num_steps=None,
                   step_hook: StepHook | None = None, carry=None, unroll: bool = False):
  """x_{i+1} = jump(t_i, t_{i+1}, x_i, labels) over a time grid t_0, ..., t_k: the k-step sampler.

  Boffi et al. 2406.07507, Sec. 2: with jump = X_{s,t} the flow map, k jumps carry noise x_0 at
  t_0 = 0 to data at t_k = 1 (any one-step transport works, e.g. an Euler step on a velocity).
  jump gets s and t as [batch] arrays. The grid is `times` (len(times) - 1 steps) or, with
  `num_steps` = k, the uniform grid i / k.

  step_hook(i, s, t, x_before, x_after, carry) -> (x, carry), if given, runs after each jump
  (x_before = x_i, x_after = its jump); its x is x_{i+1} (guidance adds its control there) and
  carry, started from `carry`, is its own state threaded through the steps.

  unroll=False: one lax.fori_loop (the jump is traced once); the grid may be traced and
    num_steps a traced integer (one compilation for every k; reverse-mode gradients need a
    static step count). The hook gets a traced step index i.
  unroll=True: a Python loop over a concrete grid (Python floats; ValueError otherwise): each
    step is traced on its own, so the hook gets i as a Python int and can use per-step Python
    data (guidance's plan), and the reward's gradient in fine-tuning flows through plain code.
  Returns x_k, or (x_k, carry) when a step_hook is given.
  """
  batch = (x0.shape[0],)

  def one_step(i, x, carry, s, t):
    x_next = jump(s, t, x, labels)
    if step_hook is not None:
      x_next, carry = step_hook(i, s, t, x, x_next, carry)
    return x_next, carry

  if unroll:
    grid = _concrete_grid(times, num_steps)
    x = x0
    for i, (s, t) in enumerate(zip(grid[:-1], grid[1:])):
      x, carry = one_step(i, x, carry, jnp.full(batch, s, jnp.float32), jnp.full(batch, t, jnp.float32))
  else:
    x, carry = _march(lambda i, state, s, t: one_step(i, *state, s, t), (x0, carry),
                      *_schedule(times, num_steps), batch)
  return x if step_hook is None else (x, carry)


def classifier_free_guidance(fn, labels, null_label, guidance_scale, *, guidance_input: bool = False,
           guidance_interval=(0.0, 1.0)):
  """Classifier-free guidance of f(*arrays, labels): f_null + w (f_c - f_null), in one batched call.

  Every positional argument of the returned function is a [batch, ...] array (doubled for the
  batched call); close over params.

  Used both for velocities and for flow-map average velocities (the usual approximation for
  maps trained without guidance; maps trained with guidance folded in need scale 1).

  guidance_input=True is for networks conditioned on the guidance scale (iMF, arXiv 2512.02012;
  `guidance_conditioning=True`): the scale w and the interval (start, end) in fmjax time go to
  the network as inputs (`fmjax.conditioning.Guidance`), one evaluation, no null pass.
  """
  if guidance_input:
    if labels is None:
      return lambda *args: fn(*args, None)
    start, end = guidance_interval
    return lambda *args: fn(*args, conditioning.make(labels, guidance_scale, args[0].shape[0], start, end))
  if labels is None or guidance_scale == 1.0:
    return lambda *args: fn(*args, labels)

  def call(*args):
    doubled = [jnp.concatenate([a, a]) for a in args]
    both = fn(*doubled, jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    conditional, unconditional = jnp.split(both, 2)
    return unconditional + guidance_scale * (conditional - unconditional)

  return call


def guided(fn, null_label, guidance_scale, *, guidance_input: bool = False,
           guidance_interval=(0.0, 1.0)):
  """f(*arrays, labels) -> its classifier-free guidance at a fixed scale, the labels passed per
  call as the last argument (`classifier_free_guidance` builds the guided function for fixed
  labels). A guided distillation teacher: b^w_t(x, c) = b_t(x, null) + w (b_t(x, c) - b_t(x, null)),
  which a student learns to follow in one evaluation (guided distillation, Meng et al. 2023,
  arXiv 2210.03142, with w fixed). Rows whose label is the null label get b_t(x, null)."""
  def call(*args):
    *arrays, labels = args
    return classifier_free_guidance(fn, labels, null_label, guidance_scale, guidance_input=guidance_input,
                                    guidance_interval=guidance_interval)(*arrays)
  return call


def flow_map_sample(flow_map, params, x0, times=None, labels=None, *, num_steps=None,
                    null_label=None, guidance_scale: float = 1.0, guidance_input: bool = False,
                    guidance_interval=(0.0, 1.0)):
  """x_{t_k} = X_{t_{k-1}, t_k}(x_{t_{k-1}}) over a time grid: one evaluation per step.

  Boffi et al. 2406.07507, Sec. 2: a k-step flow-map sampler; k = 1 jumps from noise to
  data in one evaluation. The grid is `times` (len(times) - 1 steps) or, with `num_steps`
  = k, the uniform grid i / k; k may be a traced integer (one compilation for every k).
  guidance_input, guidance_interval: see `classifier_free_guidance` (networks conditioned on the guidance scale).
  """
  v = classifier_free_guidance(lambda s, t, x, y: flow_map.v(params, s, t, x, y), labels, null_label,
             guidance_scale, guidance_input=guidance_input, guidance_interval=guidance_interval)
  # The labels are inside v (classifier_free_guidance batches them with the null label), so the jump ignores them.
  return flow_map_steps(lambda s, t, x, _: x + expand(t - s, x) * v(s, t, x), x0, times,
                        num_steps=num_steps)


def ode_step(velocity: VelocityFn, x, s, t, method: str):
  """One step of an explicit Runge-Kutta method from time s to t (arrays of shape [batch])."""
  h = expand(t - s, x)
  if method == 'euler':
    return x + h * velocity(s, x)
  if method == 'midpoint':
    k1 = velocity(s, x)
    return x + h * velocity(0.5 * (s + t), x + 0.5 * h * k1)
  if method == 'heun':
    k1 = velocity(s, x)
    k2 = velocity(t, x + h * k1)
    return x + 0.5 * h * (k1 + k2)
  if method == 'rk4':
    m = 0.5 * (s + t)
    k1 = velocity(s, x)
    k2 = velocity(m, x + 0.5 * h * k1)
    k3 = velocity(m, x + 0.5 * h * k2)
    k4 = velocity(t, x + h * k3)
    return x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
  raise ValueError(f'Unknown ODE method {method!r}; choose one of {sorted(ODE_METHODS)}.')


def integrate(velocity: VelocityFn, x, s, t, num_steps, method: str = 'rk4',
              unroll: bool = False):
  """Solves dx/dt = velocity(t, x) from s to t (scalars or [batch] arrays) in num_steps steps.

  num_steps may be a traced integer. unroll=True unrolls the step loop (XLA's cost analysis
  counts a loop body once, so inside a training step an unrolled solve also reports its true
  FLOPs); it needs a static num_steps.
  """
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (x.shape[0],))
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
  time = functools.partial(_uniform_time, num_steps=num_steps, t0=s, t1=t)
  return _march(lambda i, x, a, b: ode_step(velocity, x, a, b, method), x, num_steps, time,
                (x.shape[0],), unroll)


def ode_sample(velocity: VelocityFn, x0, num_steps, method: str = 'heun',
               t0: float = 0.0, t1: float = 1.0):
  """Integrates the probability-flow ODE from noise (t0) to data (t1). NFE: `ode_nfe`.

  num_steps may be a traced integer (one compilation for every step count)."""
  return integrate(velocity, x0, t0, t1, num_steps, method)


def flow_map_ode_sample(flow_map, params, x0, num_steps, method: str = 'heun', labels=None, *,
                        null_label=None, guidance_scale: float = 1.0, guidance_input: bool = False,
                        guidance_interval=(0.0, 1.0)):
  """`ode_sample` on the map's own velocity b_t = v_{t,t} (Boffi et al. 2406.07507, Sec. 2: the
  diagonal of a flow map is a flow-matching model), guided like `flow_map_sample`."""
  velocity = classifier_free_guidance(lambda t, x, y: flow_map.velocity(params, t, x, y), labels, null_label,
                    guidance_scale, guidance_input=guidance_input,
                    guidance_interval=guidance_interval)
  return ode_sample(velocity, x0, num_steps, method)


def ode_nfe(num_steps: int, method: str) -> int:
  """Network evaluations of `ode_sample` (Heun's last stage is not skipped, for simplicity)."""
  return num_steps * ODE_METHODS[method]


def make_flow_map_sampler(flow_map, *, null_label=None, guidance_input: bool = False):
  """A jitted sample(params, x0, times, labels=None, guidance_scale=1.0).

  The grid's values are traced, so one compilation serves every grid with the same number
  of steps and every batch of the same shape; the guidance scale is static (one compilation
  per scale used).
  """
  @functools.partial(jax.jit, static_argnames='guidance_scale')
  def sample(params, x0, times, labels=None, guidance_scale=1.0):
    return flow_map_sample(flow_map, params, x0, times, labels, null_label=null_label,
                           guidance_scale=guidance_scale, guidance_input=guidance_input)

  return sample


def make_ode_sampler(flow_map, num_steps: int, method: str = 'heun', *, null_label=None,
                     guidance_input: bool = False):
  """A jitted sample(params, x0, labels=None, guidance_scale=1.0) by the ODE on v_{t,t}."""
  @functools.partial(jax.jit, static_argnames='guidance_scale')
  def sample(params, x0, labels=None, guidance_scale=1.0):
    return flow_map_ode_sample(flow_map, params, x0, num_steps, method, labels,
                               null_label=null_label, guidance_scale=guidance_scale,
                               guidance_input=guidance_input)

  return sample
