"""The training state and the one jitted update step.

The state is a plain dict pytree (Orbax saves and restores it as is):
  step                  int32, number of updates applied (skipped non-finite steps count too)
  rng                   the run's base PRNG key; the step's key is fold_in(rng, step), so a
                        resumed run draws exactly the keys an uninterrupted one would
  params                the rule's parameters {'net': ..., maybe 'log_variance': ...}
  opt_state             optax state
  ema                   a list of EMA copies of params['net'], one per config.optim.ema_decays
                        (`ema_update`: with config.optim.ema_warmup the decay of update t is
                        min(decay, (1 + t) / (10 + t)), so it follows `step`, checkpointed)
  nonfinite_run         length of the current run of skipped (non-finite) steps
  nonfinite_max_run     the longest such run so far (a record; the loop stops on nonfinite_run)
  nonfinite_total       skipped steps in all
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then constant, cosine or linear decay to the end."""
  peak = optim.learning_rate
  warmup = max(int(optim.warmup_steps), 0)
  decay_steps = max(num_steps - warmup, 1)
  end = peak * optim.final_lr_fraction
  if optim.schedule == 'constant':
    after = optax.constant_schedule(peak)
  elif optim.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.final_lr_fraction)
  else:
    after = optax.linear_schedule(peak, end, decay_steps)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim, num_steps)
  if optim.name == 'adam':
    base = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  elif optim.name == 'adamw':
    base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay)
  else:
    base = optax.radam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), base)
  return base


def init_state(rule, net_init: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               ema_decays, seed_key: jax.Array) -> dict:
  """A fresh state; run it under jax.jit with out_shardings so it is created sharded."""
  key_net, key_rule, key_run = jax.random.split(seed_key, 3)
  params = rule.init(net_init(key_net), key_rule)
  return {
      'step': jnp.zeros((), jnp.int32),
      'rng': key_run,
      'params': params,
      'opt_state': tx.init(params),
      'ema': [jax.tree.map(jnp.copy, params['net']) for _ in ema_decays],
      'nonfinite_run': jnp.zeros((), jnp.int32),
      'nonfinite_max_run': jnp.zeros((), jnp.int32),
      'nonfinite_total': jnp.zeros((), jnp.int32),
  }


def ema_decay_at(decay: float, step, warmup: bool):
  """The decay of the EMA update that follows `step` earlier updates (step = 0 for the first).

  warmup=False: `decay` itself. warmup=True: min(decay, (1 + step) / (10 + step)), the warm-up
  of TensorFlow's ExponentialMovingAverage(num_updates=step): the first update keeps a tenth
  of the initial weights, step 90 about 0.92, and `decay` governs only once
  (1 + step) / (10 + step) exceeds it (step 8,990 for 0.999). A short run (a 300-step reward
  fine-tune) then averages over its last few dozen updates instead of staying near its start.
  """
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: list, params: Any, ema_decays, step, warmup: bool = False) -> list:
  """One EMA update of each copy: e <- d e + (1 - d) p, d = ema_decay_at(decay, step, warmup)."""
  out = []
  for e, decay in zip(ema, ema_decays):
    d = ema_decay_at(float(decay), step, warmup)
    out.append(jax.tree.map(lambda e_, p_, d=d: d * e_ + (1.0 - d) * p_, e, params))
  return out


def describe_weights(ema_decays, ema_index: int, step: int, warmup: bool = False) -> str:
  """One line naming the parameters a checkpoint is scored or sampled with, e.g.
  'EMA copy 0 (decay 0.999, no warm-up) of step 300'."""
  if ema_index == -1 or not len(ema_decays):
    return f'raw training parameters (no EMA) of step {step}'
  decay = float(ema_decays[ema_index])
  if warmup:
    last = float(ema_decay_at(decay, max(step - 1, 0), True))
    how = f'decay {decay:g} with warm-up: {last:.4g} at the last update'
  else:
    how = f'decay {decay:g}, no warm-up'
  return f'EMA copy {ema_index} ({how}) of step {step}'


def select_params(state: dict, ema_index: int) -> Any:
  """The network parameters to sample or evaluate with: EMA copy `ema_index` (in
  config.optim.ema_decays order), or the raw training parameters for -1.

  Works on a restored state whose EMA list came back as a dict keyed '0', '1', ... (Orbax
  restores lists saved without a target that way). An index with no such copy is an error,
  never a silent substitute.
  """
  ema = state.get('ema') or []
  if isinstance(ema, dict):
    ema = [ema[k] for k in sorted(ema, key=int)]
  if ema_index == -1:
    return state['params']['net']
  if not 0 <= ema_index < len(ema):
    raise ValueError(f'EMA copy {ema_index} requested, but the run keeps {len(ema)} EMA cop'
                     f'{"y" if len(ema) == 1 else "ies"} (config.optim.ema_decays); use an index '
                     f'below {len(ema)}, or -1 for the raw training parameters.')
  return ema[ema_index]


def microbatch_gradients(loss_and_grad: Callable, params, batch: dict, key, microbatches: int):
  """(loss, metrics), gradient of one update accumulated over `microbatches` slices of `batch`.

  loss_and_grad(params, batch, key) -> ((loss, metrics), grads) runs on one microbatch at a
  time inside a lax.scan, so only one microbatch's activations are alive: a global batch that
  does not fit the devices in one pass trains as the mean of k passes (gradient accumulation).
  The result is the mean of the microbatches' losses, metrics and gradients, which for a rule
  whose loss is a mean over examples is the full batch's, with other noise draws: microbatch i
  gets key split(key, k)[i]. Microbatch j holds rows j, j + k, j + 2k, ... of the batch, so that
  with the batch sharded in contiguous blocks over the devices (B/devices a multiple of k)
  every device keeps its rows: no example moves. Entries without the batch's leading dimension
  (the step number) go to every microbatch whole.
  """
  k = microbatches
  size = max(x.shape[0] for x in jax.tree.leaves(batch) if jnp.ndim(x) >= 1)
  if size % k:
    raise ValueError(f'A batch of {size} examples does not split into {k} microbatches.')
  per_example = {name: v for name, v in batch.items()
                 if all(jnp.ndim(x) >= 1 and x.shape[0] == size for x in jax.tree.leaves(v))}
  shared = {name: v for name, v in batch.items() if name not in per_example}
  stacked = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(size // k, k, *x.shape[1:]), 0, 1),
                         per_example)

  def accumulate(grad_sum, inputs):
    micro_key, micro = inputs
    (loss, metrics), grads = loss_and_grad(params, dict(shared, **micro), micro_key)
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grad_sum, (losses, metrics) = jax.lax.scan(accumulate, zeros, (jax.random.split(key, k), stacked))
  grads = jax.tree.map(lambda g: g / k, grad_sum)
  return (jnp.mean(losses), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)), grads


def make_train_step(rule, tx: optax.GradientTransformation, ema_decays,
                    dropout_rule: Callable | None = None, ema_warmup: bool = False,
                    microbatches: int = 1) -> Callable:
  """train_step(state, batch, stop_requests) -> (state, metrics): one update, skipped if not finite.

  dropout_rule(key) -> rule, if given, is the rule around a network that drops units with
  that key; it gets a key folded from the step's key (the evaluation uses `rule`'s network,
  which does not drop).
  ema_warmup: the EMA decays warm up with the step count (`ema_decay_at`).
  microbatches: k > 1 accumulates the update's gradient over k slices of the batch
  (`microbatch_gradients`); each draws its noise, and its dropout key, from its own key.

  An update whose loss or global gradient norm is not finite (a NaN anywhere, or gradients so
  large that their norm overflows) leaves params, optimizer state and EMAs untouched (selected
  by jnp.where, so the step stays free of host syncs) and lengthens `nonfinite_run`.

  stop_requests: an int array with one entry per device, sharded like the batch, each
  process writing its own preemption flag into its entries (`sharding.per_device_flags`).
  Its any() comes back replicated as metrics['stop_requested'], so every process of a
  multi-process job reads the same value and stops after the same update, with no collective
  outside the step. metrics['nonfinite_run'] is the loop's other stop signal.
  """
  ema_decays = tuple(float(d) for d in ema_decays)

  def train_step(state, batch, stop_requests):
    step = state['step']
    key = jax.random.fold_in(state['rng'], step)
    batch = dict(batch, step=step)

    def loss_and_grad(params, batch, key):
      step_rule = rule if dropout_rule is None else dropout_rule(jax.random.fold_in(key, 0x0D))
      return jax.value_and_grad(lambda p: step_rule(p, batch, key), has_aux=True)(params)

    if microbatches == 1:
      (loss, metrics), grads = loss_and_grad(state['params'], batch, key)
    else:
      (loss, metrics), grads = microbatch_gradients(loss_and_grad, state['params'], batch, key,
                                                    microbatches)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = ema_update(state['ema'], params['net'], ema_decays, step, ema_warmup)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    run = jnp.where(ok, 0, state['nonfinite_run'] + 1)
    skipped = state['nonfinite_total'] + (~ok).astype(jnp.int32)
    new_state = {
        'step': step + 1,
        'rng': state['rng'],
        'params': keep(params, state['params']),
        'opt_state': keep(opt_state, state['opt_state']),
        'ema': keep(ema, state['ema']),
        'nonfinite_run': run,
        'nonfinite_max_run': jnp.maximum(state['nonfinite_max_run'], run),
        'nonfinite_total': skipped,
    }
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped_updates=skipped,
                   nonfinite_run=run, stop_requested=jnp.any(stop_requests > 0))
    return new_state, metrics

  return train_step
