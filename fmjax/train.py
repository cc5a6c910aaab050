"""The training loop, top to bottom: mesh -> data -> state -> step -> log / eval / checkpoint.

One program runs on every process (JAX's multi-controller model): each builds the same
global mesh, creates or restores the same sharded state, feeds only its share of each
batch, and calls the same jitted step. Nothing here is per-device code.

Exact resume: the step's PRNG key is fold_in(state['rng'], step) and the data stream is a
function of (seed, step) or a checkpointed iterator state, so restarting from a checkpoint
reproduces the uninterrupted run's losses (bitwise on CPU).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np

from fmjax import build
from fmjax import checkpointing
from fmjax import configs
from fmjax import logging_utils
from fmjax import sharding as sharding_lib
from fmjax import train_state
from fmjax.data import pipelines
from fmjax.evaluation import evaluator


class NonFiniteError(FloatingPointError):
  """Too many consecutive updates had a non-finite loss or gradient."""


class _Preemption:
  """Turns SIGTERM (a preemption notice) into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """True if any process got the signal (all processes must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))


class Setup:
  """Everything the loop needs, built from the config (also used by tests)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    config = configs.resolve(config)   # every option in force, validated
    self.config, self.workdir = config, workdir
    self.mesh = sharding_lib.make_mesh(config.sharding.data, config.sharding.fsdp)
    self.source = pipelines.make_source(config, self.mesh)
    self.interpolant = build.build_interpolant(config)
    net_init, self.apply = build.build_network(config, self.source.example_shape,
                                               self.source.num_classes)
    self.flow_map = build.build_flow_map(config, self.apply, self.interpolant)
    teacher = build.load_teacher(config)

    def rule_for(apply):
      return build.build_rule(config, build.build_flow_map(config, apply, self.interpolant),
                              self.interpolant, self.source.num_classes, teacher)

    self.rule = rule_for(self.apply)
    # With dropout, the step rebuilds the rule around apply(..., key=k): one dropout key per
    # step, derived from the step's key, so resumed runs drop the same units.
    dropout_rule = ((lambda key: rule_for(functools.partial(self.apply, key=key)))
                    if build.uses_dropout(config) else None)
    self.tx = train_state.make_optimizer(config.optim, config.train.num_steps)
    self.init_fn = functools.partial(train_state.init_state, self.rule, net_init, self.tx,
                                     tuple(config.optim.ema_decays))
    self.seed_key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(self.init_fn, self.seed_key)
    self.state_shardings = sharding_lib.state_shardings(abstract, self.mesh,
                                                        config.sharding.fsdp_min_size)
    self.abstract_state = checkpointing.abstract_like(abstract, self.state_shardings)
    self.train_step = jax.jit(
        train_state.make_train_step(self.rule, self.tx, config.optim.ema_decays, dropout_rule),
        in_shardings=(self.state_shardings, sharding_lib.batch_sharding(self.mesh)),
        out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)),
        donate_argnums=0)
    self.meta = {'example_shape': list(self.source.example_shape),
                 'num_classes': int(self.source.num_classes),
                 'process_count': jax.process_count(), 'device_count': jax.device_count()}

  def init_state(self):
    """The fresh state, created already sharded (no host copy of the full parameters)."""
    return jax.jit(self.init_fn, out_shardings=self.state_shardings)(self.seed_key)


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if logging_utils.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stream=None) -> dict:
  """Trains config.train.num_steps updates (resuming from WORKDIR/checkpoints if present),
  then runs the few-step evaluation. Returns the final evaluation metrics."""
  setup = Setup(config, workdir)
  config = setup.config                # resolved: what trains is what config.json and checkpoints record
  train = config.train
  evaluate = evaluator.Evaluator(config, workdir, setup.mesh, setup.source, setup.interpolant,
                                 setup.flow_map)
  if config.eval.at_end or train.eval_every:
    evaluate.check_ready()   # missing Inception weights / reference stats: fail now, not later
  with jax.set_mesh(setup.mesh):
    manager = checkpointing.make_manager(workdir, keep=train.keep_checkpoints,
                                         keep_every=train.keep_every,
                                         async_save=train.async_checkpointing)
    latest = manager.latest_step()
    if latest is not None:
      saved_config, data_state, _ = checkpointing.restore_json(manager, latest)
      checkpointing.check_compatible(saved_config, config, workdir)
      state = checkpointing.restore_state(manager, latest, setup.abstract_state)
      setup.source.set_state(data_state)
    else:
      state = setup.init_state()
    _write_config(config, workdir)
    step = int(jax.device_get(state['step']))
    logger = logging_utils.MetricsLogger(workdir, train.num_steps, step, jsonl=train.loss_log_file,
                                         stream=stream)
    logger.info(f'fmjax: {config.loss.name} on {config.data.name}, {jax.device_count()} devices '
                f'in {jax.process_count()} process(es), mesh {dict(setup.mesh.shape)}, '
                + (f'resumed at step {step}' if latest is not None else 'from scratch'))

    def save(force=False):
      checkpointing.save(manager, step, state, config, setup.source.get_state(), setup.meta,
                         force=force)

    with _Preemption() as preemption:
      while step < train.num_steps:
        batch = setup.source.batch(step)
        state, metrics = setup.train_step(state, batch)
        step += 1
        if step % train.log_every == 0 or step == train.num_steps:
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          logger.log_train(step, values)
          max_run = int(jax.device_get(state['nonfinite_max_run']))
          if max_run >= train.max_nonfinite_in_a_row:
            manager.wait_until_finished()
            raise NonFiniteError(
                f'{max_run} updates in a row had a non-finite loss or gradient (limit '
                f'config.train.max_nonfinite_in_a_row = {train.max_nonfinite_in_a_row}); stopped at '
                f'step {step}. Lower config.optim.learning_rate, enable config.optim.grad_clip, or '
                'resume from the last checkpoint in the workdir.')
          if preemption.any_process():
            save(force=True)
            manager.wait_until_finished()
            logger.info(f'SIGTERM: saved checkpoint at step {step}; exiting.')
            logger.close()
            manager.close()
            return {'preempted_at': step}
        if train.checkpoint_every and step % train.checkpoint_every == 0:
          save()
        if config.train.eval_every and step % config.train.eval_every == 0 and step < train.num_steps:
          evaluate(state, step, logger, final=False)
    if manager.latest_step() != step:
      save(force=True)
    manager.wait_until_finished()
    manager.close()
    results = evaluate(state, step, logger, final=True) if config.eval.at_end else {'step': step}
    logger.close()
    return results
