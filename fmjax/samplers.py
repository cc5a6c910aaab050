"""Sampling: k-step flow-map jumps over a time grid, and ODE baselines on the velocity.

All functions are pure; `make_flow_map_sampler` / `make_ode_sampler` return `jax.jit`
functions that compile once per (batch shape, number of steps) and are reused for every
batch of that shape. NFE (network function evaluations) are reported beside the samples
so that flow maps and ODE solvers can be compared at equal cost.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from fmjax.interpolants import expand

VelocityFn = Callable[..., jax.Array]   # velocity(t, x) -> b_t(x), t of shape [batch]
ODE_METHODS = {'euler': 1, 'heun': 2, 'midpoint': 2, 'rk4': 4}   # evaluations per step


def uniform_grid(num_steps: int, t0: float = 0.0, t1: float = 1.0) -> jax.Array:
  """num_steps + 1 equally spaced times from t0 (noise) to t1 (data)."""
  return jnp.linspace(t0, t1, num_steps + 1, dtype=jnp.float32)


def _batch_time(t, x):
  return jnp.full((x.shape[0],), t, jnp.float32)


def guided(fn, labels, null_label, guidance_scale):
  """Classifier-free guidance of f(*arrays, labels): f_null + w (f_c - f_null), in one batched call.

  Every positional argument of the returned function is a [batch, ...] array (doubled for the
  batched call); close over params.

  Used both for velocities and for flow-map average velocities (the usual approximation for
  maps trained without guidance; maps trained with guidance folded in need scale 1).
  """
  if labels is None or guidance_scale == 1.0:
    return lambda *args: fn(*args, labels)

  def call(*args):
    doubled = [jnp.concatenate([a, a]) for a in args]
    both = fn(*doubled, jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    conditional, unconditional = jnp.split(both, 2)
    return unconditional + guidance_scale * (conditional - unconditional)

  return call


def flow_map_sample(flow_map, params, x0, times, labels=None, *, null_label=None,
                    guidance_scale: float = 1.0):
  """x_{t_k} = X_{t_{k-1}, t_k}(x_{t_{k-1}}) over a time grid: len(times) - 1 evaluations.

  Boffi et al. 2406.07507, Sec. 2: a k-step flow-map sampler; k = 1 jumps from noise to
  data in one evaluation.
  """
  times = jnp.asarray(times, jnp.float32)
  v = guided(lambda s, t, x, y: flow_map.v(params, s, t, x, y), labels, null_label,
             guidance_scale)

  def step(x, st):
    s, t = _batch_time(st[0], x), _batch_time(st[1], x)
    return x + expand(t - s, x) * v(s, t, x), None

  x, _ = jax.lax.scan(lambda x, st: step(x, st), x0, jnp.stack([times[:-1], times[1:]], axis=1))
  return x


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


def integrate(velocity: VelocityFn, x, s, t, num_steps: int, method: str = 'rk4',
              unroll: bool = False):
  """Solves dx/dt = velocity(t, x) from s to t (scalars or [batch] arrays) in num_steps steps.

  unroll=True unrolls the step loop (XLA's cost analysis counts a loop body once, so inside a
  training step an unrolled solve also reports its true FLOPs).
  """
  s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (x.shape[0],))
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
  fractions = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32)

  def body(x, ab):
    a, b = s + ab[0] * (t - s), s + ab[1] * (t - s)
    return ode_step(velocity, x, a, b, method), None

  x, _ = jax.lax.scan(body, x, jnp.stack([fractions[:-1], fractions[1:]], axis=1),
                      unroll=num_steps if unroll else 1)
  return x


def ode_sample(velocity: VelocityFn, x0, num_steps: int, method: str = 'heun',
               t0: float = 0.0, t1: float = 1.0):
  """Integrates the probability-flow ODE from noise (t0) to data (t1). NFE: `ode_nfe`."""
  return integrate(velocity, x0, t0, t1, num_steps, method)


def ode_nfe(num_steps: int, method: str) -> int:
  """Network evaluations of `ode_sample` (Heun's last stage is not skipped, for simplicity)."""
  return num_steps * ODE_METHODS[method]


def make_flow_map_sampler(flow_map, *, null_label=None):
  """A jitted sample(params, x0, times, labels=None, guidance_scale=1.0).

  The grid's values are traced, so one compilation serves every grid with the same number
  of steps and every batch of the same shape; the guidance scale is static (one compilation
  per scale used).
  """
  @functools.partial(jax.jit, static_argnames='guidance_scale')
  def sample(params, x0, times, labels=None, guidance_scale=1.0):
    return flow_map_sample(flow_map, params, x0, times, labels, null_label=null_label,
                           guidance_scale=guidance_scale)

  return sample


def make_ode_sampler(flow_map, num_steps: int, method: str = 'heun', *, null_label=None):
  """A jitted sample(params, x0, labels=None, guidance_scale=1.0) by the ODE on v_{t,t}."""
  @functools.partial(jax.jit, static_argnames='guidance_scale')
  def sample(params, x0, labels=None, guidance_scale=1.0):
    velocity = guided(lambda t, x, y: flow_map.velocity(params, t, x, y), labels, null_label,
                      guidance_scale)
    return ode_sample(velocity, x0, num_steps, method)

  return sample
