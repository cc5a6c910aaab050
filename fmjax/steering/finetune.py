"""Reward fine-tuning of a flow map toward the tilted law q(x) ∝ p(x) exp(r(x) / lambda).

Two objectives, both pure functions of a FlowMap, its params, a batch and a key (the rules
'reward_distill' and 'reward_backprop' of fmjax.losses). p is the law of the frozen base
model's k-step sampler (`base_sample`), lambda the temperature.

1. Reward-weighted self-distillation ('reward_distill', the method with the right fixed point).
   Each step draws M = candidates x B samples x_i = S_base(z_i) of the frozen base sampler,
   gives them self-normalized weights w_i = exp(r(x_i)/lambda) / sum_j exp(r(x_j)/lambda),
   resamples B rows with those weights (systematic resampling, `systematic_resample`), shuffles
   them (with their labels; systematic resampling returns them in candidate order, and the inner
   rule splits rows by position into its diagonal and off-diagonal parts) and trains on them with a self-distillation rule of fmjax ('lsd' by default; 'esd', 'psd' or
   'flow_matching'): the data of the inner rule are the resampled base samples.
   The weighting of flow matching by a reward is the reward-weighted conditional flow matching
   of Fan et al., "Online reward-weighted fine-tuning of flow matching with Wasserstein
   regularization" (arXiv 2502.06061); they weight the *current* model's samples (online), whose
   tilt compounds round after round (their paper bounds it with a W2 regularizer). Here the
   samples come from the *frozen base*, which fixes the target at q (equation numbers of that
   paper not checked). Adjoint Matching (Domingo-Enrich et al., arXiv 2409.08861), the
   memoryless-SDE stochastic-control route to the same q, is not implemented.

   Fixed point (proof). Let f be any bounded function of a training row. Given the candidates,
   systematic resampling picks row i with expected count B w_i, so
     E[(1/B) sum_rows f(row)] = E[sum_i w_i f(x_i)],
   the self-normalized importance estimate of E_p[e^{r/lambda} f] / E_p[e^{r/lambda}] = E_q[f]
   (Z = E_p e^{r/lambda} finite), which converges to E_q[f] as M -> inf, with bias O(1/M).
   The weights depend on the base and the reward only, never on the trained params, so the
   expected loss is the inner rule's loss with data law q (plus the O(1/M) bias). The inner
   rule's minimizer with data q is the flow map of q: its diagonal term E|v_{t,t}(I_t) - dI/dt|^2
   is minimized by v_{t,t} = b^q_t(x) = E_q[dI_t/dt | I_t = x] (the velocity of q's interpolant),
   and its off-diagonal residual (LSD: d/dt X_{s,t} = v_{t,t}(X_{s,t})) vanishes exactly on the
   flow of that velocity, i.e. on X^q. Hence the exact tilted map is the fixed point: at it the
   expected gradient vanishes (tests/test_finetune.py checks this on a Gaussian mixture, whose q
   is closed-form: fmjax.steering.tilted).

2. Direct reward backpropagation ('reward_backprop', the practical baseline). Backpropagate the
   reward through the fine-tuned model's k-step sampler x(z) = S_theta(z), regularized toward the
   base sampler on the same noise:
     L(theta) = E_z[ -r(S_theta(z)) + (lambda rho / 2) |S_theta(z) - sg[S_base(z)]|^2 ],
   |.|^2 summed over dimensions (like the reward). The squared transport distance on shared noise
   (an upper bound of W2(law S_theta, p)^2, the regularizer family of arXiv 2502.06061) stands in
   for the KL term of max E r - lambda KL(. || p), whose maximizer is q. It is not q: each sample
   moves to the pointwise optimum argmax_x r(x) - (lambda rho / 2)|x - S_base(z)|^2, so mass never
   moves between modes by the right amount and the spread shrinks; with small rho it over-optimizes
   (reward above q's, distance to q growing). docs/steering.md measures both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fmjax import samplers
from fmjax.losses import RuleSpec, base, eulerian, lagrangian, semigroup
from fmjax.steering.resampling import ess_fraction, systematic_resample

sg = jax.lax.stop_gradient


def _flow_matching_rule(ctx):
  return base.two_part_rule(ctx, off_diagonal_fn=None)


# Self-distillation rules that reward_distill can wrap (no teacher: their data are the samples).
INNER_RULES = {'lsd': lagrangian.lagrangian_rule, 'esd': eulerian.eulerian_rule,
               'psd': semigroup.semigroup_rule, 'flow_matching': _flow_matching_rule}
RULE_NAMES = ('reward_distill', 'reward_backprop')
MAX_STEPS = 8


@dataclasses.dataclass(frozen=True)
class BaseModel:
  """The frozen base model: flow_map(s, t, x, labels) -> X_{s,t}(x), velocity(t, x, labels).

  Called as base(t, x, labels) it is the velocity, so it also serves as a distillation teacher.
  params: the base network's parameters (the fine-tuning starts from them), or None.
  """

  flow_map: Callable[..., jax.Array]
  velocity: Callable[..., jax.Array]
  params: Any = None

  def __call__(self, t, x, labels=None):
    return self.velocity(t, x, labels)


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
  """What both fine-tuning rules need beyond the common rule options.

  reward: r(x, labels) -> [batch]; temperature: lambda > 0; steps: uniform steps of both the
  base and the fine-tuned sampler (1..MAX_STEPS); regularization: rho >= 0 of reward_backprop;
  candidates: reward_distill's base samples per training row (M = candidates x B); inner:
  reward_distill's rule (INNER_RULES).
  """

  reward: Callable[..., jax.Array]
  temperature: float = 1.0
  steps: int = 1
  regularization: float = 1.0
  candidates: int = 4
  inner: str = 'lsd'

  def __post_init__(self):
    if not callable(self.reward):
      raise ValueError('FinetuneOptions.reward must be a function r(x, labels) -> [batch].')
    if not self.temperature > 0:
      raise ValueError(f'the temperature must be > 0, got {self.temperature}.')
    if not (isinstance(self.steps, int) and 1 <= self.steps <= MAX_STEPS):
      raise ValueError(f'steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}.')
    if not self.regularization >= 0:
      raise ValueError(f'regularization must be >= 0, got {self.regularization}.')
    if not (isinstance(self.candidates, int) and self.candidates >= 1):
      raise ValueError(f'candidates must be an integer >= 1, got {self.candidates!r}.')
    if self.inner not in INNER_RULES:
      raise ValueError(f'unknown inner rule {self.inner!r}; choose one of {sorted(INNER_RULES)}.')


# ------------------------------------------------------------------------- building blocks


def tilt_log_weights(rewards: jax.Array, temperature: float) -> jax.Array:
  """Self-normalized log-weights log softmax(r / lambda) of a batch of rewards [n]."""
  return jax.nn.log_softmax(rewards / temperature)


def k_step_sample(flow_map: Callable[..., jax.Array], x0, steps: int, labels=None) -> jax.Array:
  """x_{i+1} = X_{t_i, t_{i+1}}(x_i) on the uniform grid t_i = i / steps: `samplers.flow_map_steps`
  (static, unrolled so the reward's gradient flows through every step)."""
  times = [i / steps for i in range(steps + 1)]
  return samplers.flow_map_steps(flow_map, x0, times, labels, unroll=True)


def _row_sum_square(d):
  return jnp.sum(jnp.square(d).reshape(d.shape[0], -1), axis=-1)


def reward_backprop_loss(x_model, x_base, reward, labels, temperature: float,
                         regularization: float):
  """(mean of -r(x_model) + (lambda rho / 2)|x_model - sg[x_base]|^2, metrics); module docstring, 2."""
  r = reward(x_model, labels)
  distance = _row_sum_square(x_model - sg(x_base))
  loss = jnp.mean(-r + 0.5 * temperature * regularization * distance)
  return loss, {'reward': jnp.mean(r), 'distance_to_base': jnp.mean(distance)}


# ---------------------------------------------------------------------------------- rules


def _unbuilt(name):
  # resolve_options builds every rule once on an empty context to check its options; the
  # fine-tuning rules get their FinetuneOptions only from the training system (or a caller).
  def loss_fn(params, batch, key):
    raise ValueError(f'{name} was built without FinetuneOptions: pass finetune=FinetuneOptions(...).')
  return loss_fn


def _needs(ctx, finetune, name):
  if finetune is None or ctx.flow_map is None:   # the empty context of resolve_options
    return False
  if not isinstance(ctx.teacher, BaseModel):
    raise ValueError(f'{name} needs the frozen base model: teacher=BaseModel(flow_map, velocity) '
                     '(the training system loads it from config.teacher.workdir).')
  return True


def reward_distill_rule(ctx: base.Context, finetune: FinetuneOptions | None = None):
  """Reward-weighted self-distillation on the frozen base's samples (module docstring, 1).

  loss_fn(params, batch, key): batch['x1'] gives only the shape (the rows are base samples);
  labels, when given, are tiled over the candidates and resampled with them.
  """
  if not _needs(ctx, finetune, 'reward_distill'):
    return _unbuilt('reward_distill')
  inner = INNER_RULES[finetune.inner](ctx._replace(teacher=None))
  base_model = ctx.teacher

  def loss_fn(params, batch, key):
    x1 = batch['x1']
    n = x1.shape[0]
    m = n * finetune.candidates
    key_noise, key_pick, key_inner = jax.random.split(key, 3)
    z = jax.random.normal(key_noise, (m,) + x1.shape[1:], x1.dtype)
    labels = batch.get('labels')
    labels_c = None if labels is None else jnp.tile(labels, finetune.candidates)
    x_c = sg(k_step_sample(base_model.flow_map, z, finetune.steps, labels_c))
    r = sg(finetune.reward(x_c, labels_c))
    log_w = tilt_log_weights(r, finetune.temperature)
    key_pick, key_shuffle = jax.random.split(key_pick)
    # Systematic resampling returns the picks in candidate order (copies of a heavy candidate
    # side by side), and the inner rule trains its last rows on the diagonal and the others
    # off it: shuffled, the two parts are exchangeable draws of the resampled rows.
    pick = jax.random.permutation(key_shuffle, systematic_resample(key_pick, log_w, n))
    rows = {'x1': x_c[pick]}
    if labels_c is not None:
      rows['labels'] = labels_c[pick]
    if 'step' in batch:
      rows['step'] = batch['step']
    loss, metrics = inner(params, rows, key_inner)
    w = jnp.exp(log_w)
    return loss, dict(metrics, reward_base=jnp.mean(r), reward_tilted=jnp.sum(w * r),
                      ess=ess_fraction(log_w))

  return loss_fn


def reward_backprop_rule(ctx: base.Context, finetune: FinetuneOptions | None = None):
  """Direct reward backpropagation through the k-step sampler (module docstring, 2).

  loss_fn(params, batch, key): noise batch['x0'] if given, else drawn like batch['x1'].
  """
  if not _needs(ctx, finetune, 'reward_backprop'):
    return _unbuilt('reward_backprop')
  fm, base_model = ctx.flow_map, ctx.teacher

  def loss_fn(params, batch, key):
    x1 = batch['x1']
    z = batch['x0'] if 'x0' in batch else jax.random.normal(key, x1.shape, x1.dtype)
    labels = batch.get('labels')
    x_model = k_step_sample(lambda s, t, x, y: fm.X(params['net'], s, t, x, y), z,
                            finetune.steps, labels)
    x_base = k_step_sample(base_model.flow_map, z, finetune.steps, labels)
    return reward_backprop_loss(x_model, x_base, finetune.reward, labels, finetune.temperature,
                                finetune.regularization)

  return loss_fn


# The fine-tuning rules' registry (fmjax.losses.make, resolve_options, ... look names up here).
# Kept apart from fmjax.losses.RULES (the flow-map rules, each with a float64 reference and a run
# on any teacher velocity): their "teacher" is the frozen base model (BaseModel) and the reward,
# temperature, ... come as finetune=FinetuneOptions (the training system builds it from
# config.finetune). It lives here, not in fmjax.losses, so that fmjax.losses never imports this
# module at import time: this module builds on the rule modules of fmjax.losses.
FINETUNE_RULES: dict[str, RuleSpec] = {
    'reward_distill': RuleSpec(reward_distill_rule, 'required', {}),
    'reward_backprop': RuleSpec(reward_backprop_rule, 'required', {'diagonal_fraction': 0.0}),
}
assert tuple(FINETUNE_RULES) == RULE_NAMES   # one list of names, two spellings of it
