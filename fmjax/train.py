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

from fmjax import from_config, trained_runs
from fmjax import checkpointing
from fmjax import configs
from fmjax import logging_utils
from fmjax import losses
from fmjax import sharding as sharding_lib
from fmjax import train_state
from fmjax.data import pipelines
from fmjax.evaluation import evaluator
from fmjax.steering import finetune


# Exit status of `python -m fmjax.main` when a run stopped on SIGTERM after saving a checkpoint
# (sysexits' EX_TEMPFAIL: "try again later"), so a scheduler can tell a preempted run, to be
# requeued with the same command, from a finished one (0) or a failed one (1).
PREEMPTED_EXIT_CODE = 75
# ... and on SIGINT (ctrl-C) after saving: 128 + SIGINT, the shell's status for an interrupt.
INTERRUPTED_EXIT_CODE = 130
EXIT_CODES = {'SIGTERM': PREEMPTED_EXIT_CODE, 'SIGINT': INTERRUPTED_EXIT_CODE}


class NonFiniteError(FloatingPointError):
  """Too many consecutive updates had a non-finite loss or gradient."""


class _Preemption:
  """Turns SIGTERM (a preemption notice) and SIGINT (ctrl-C) into this process's flag for the
  next update: the loop saves that update and stops (`signal_name` says which came first).

  A second SIGINT raises KeyboardInterrupt at once (no save: the user asked twice); a second
  SIGTERM changes nothing (the save is already on its way).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal_name == 'SIGINT':
      raise KeyboardInterrupt
    if not self.requested:
      self.signal_name = signal.Signals(signum).name
    self.requested = True
    if signum == signal.SIGINT:
      # os.write, not print: a handler may interrupt a print to the same stream.
      os.write(2, b'\nfmjax: ctrl-C: saving at the next update, then exiting '
                  b'(ctrl-C again exits at once, without saving).\n')

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      if previous is not None:   # None: a handler installed outside Python, not restorable
        signal.signal(signum, previous)
    self._previous = {}


class _StopSignals:
  """The loop's two reasons to stop early, read one update late.

  Every update returns replicated `stop_requested` (any process got SIGTERM) and
  `nonfinite_run` (updates skipped in a row). Reading them right after dispatching the
  *next* update keeps the host one step ahead of the devices (no pipeline stall), while every
  process still sees the same values and so stops after the same update.
  """

  def __init__(self, max_nonfinite_in_a_row: int):
    self.limit = max_nonfinite_in_a_row
    self._pending = None

  def push(self, step: int, metrics: dict) -> bool:
    """Queues this update's signals; True if the previous update asked to stop (preemption)."""
    previous, self._pending = self._pending, (step, metrics)
    return self._read(previous)

  def drain(self) -> bool:
    """The last queued update's signals (after the loop)."""
    previous, self._pending = self._pending, None
    return self._read(previous)

  def _read(self, pending) -> bool:
    if pending is None:
      return False
    step, metrics = pending
    run, stop = jax.device_get((metrics['nonfinite_run'], metrics['stop_requested']))
    if int(run) >= self.limit:
      raise NonFiniteError(
          f'{int(run)} updates in a row had a non-finite loss or gradient norm (limit '
          f'config.train.max_nonfinite_in_a_row = {self.limit}); stopped after update {step}. '
          'Lower config.optim.learning_rate, enable config.optim.grad_clip, check the data for '
          'NaN/inf, or resume from an earlier checkpoint (--config.train.restore_step).')
    return bool(stop)


_SIGNALS = ('nonfinite_run', 'stop_requested')   # stop signals, not logged


class Setup:
  """Everything the loop needs, built from the config (also used by tests)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, make_source=None,
               teacher=None):
    """make_source(config, mesh) -> source replaces the data pipeline (benchmarks feed
    synthetic batches already on device: benchmarks/train_throughput.py). teacher(t, x, labels)
    -> b_t(x) replaces config.teacher for rules that take an optional teacher (a Python caller's
    velocity, e.g. a toy target's exact one: benchmarks/meanflow_ablation.py)."""
    config = configs.resolve(config)   # every option in force, validated
    spec = losses.RULES.get(config.loss.name)
    if teacher is not None and (config.teacher.workdir or spec is None or spec.teacher != 'optional'):
      raise ValueError(f'A Python teacher is for rules with an optional teacher (flow_matching, '
                       f'meanflow, imf, sct, ect) and no config.teacher.workdir; got loss '
                       f'{config.loss.name!r}, teacher.workdir {config.teacher.workdir!r}.')
    self.config, self.workdir = config, workdir
    self.mesh = sharding_lib.make_mesh(config.sharding.data, config.sharding.fsdp)
    microbatches = int(config.train.get('microbatches', 1))
    per_device = config.train.batch_size // max(jax.device_count(), 1)
    if microbatches > 1 and per_device % microbatches:
      raise ValueError(f'config.train.microbatches = {microbatches} must divide the {per_device} '
                       f'examples per device (config.train.batch_size = {config.train.batch_size} '
                       f'over {jax.device_count()} devices): every microbatch takes the same rows '
                       'of every device. Choose a divisor, or a batch that is a multiple of both.')
    self.source = (make_source or pipelines.make_source)(config, self.mesh)
    # Latent runs: the decoder for evaluation, checked now against the dataset's encoder.
    self.autoencoder = from_config.load_autoencoder(config)
    latent_info = getattr(self.source, 'latent_info', None)
    from_config.check_autoencoder(self.autoencoder, latent_info, f'dataset {config.data.name!r}')
    self.interpolant = from_config.build_interpolant(config)
    net_init, self.apply = from_config.build_network(config, self.source.example_shape,
                                               self.source.num_classes)
    self.flow_map = from_config.build_flow_map(config, self.apply, self.interpolant)
    teacher = teacher if teacher is not None else trained_runs.load_teacher(config)
    # Reward fine-tuning starts at the base model's parameters (same network, checked here;
    # a base run of the other DiT block layout is converted in init_state).
    self.base_params, self.base_layout = None, None
    if config.loss.name in finetune.RULE_NAMES:
      self.base_layout = from_config.base_params_layout(net_init, teacher)
      self.base_params = teacher.params

    def rule_for(apply):
      return from_config.build_rule(config, from_config.build_flow_map(config, apply, self.interpolant),
                              self.interpolant, self.source.num_classes, teacher)

    self.rule = rule_for(self.apply)
    # With dropout, the step rebuilds the rule around apply(..., key=k): one dropout key per
    # step, derived from the step's key, so resumed runs drop the same units.
    dropout_rule = ((lambda key: rule_for(functools.partial(self.apply, key=key)))
                    if from_config.uses_dropout(config) else None)
    self.tx = train_state.make_optimizer(config.optim, config.train.num_steps)
    self.init_fn = functools.partial(train_state.init_state, self.rule, net_init, self.tx,
                                     tuple(config.optim.ema_decays))
    self.seed_key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(self.init_fn, self.seed_key)
    self.state_shardings = sharding_lib.state_shardings(abstract, self.mesh,
                                                        config.sharding.fsdp_min_size)
    self.abstract_state = checkpointing.abstract_like(abstract, self.state_shardings)
    self.train_step = jax.jit(
        train_state.make_train_step(self.rule, self.tx, config.optim.ema_decays, dropout_rule,
                                    ema_warmup=bool(config.optim.ema_warmup), microbatches=microbatches),
        in_shardings=(self.state_shardings, sharding_lib.batch_sharding(self.mesh),
                      sharding_lib.batch_sharding(self.mesh)),
        out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)),
        donate_argnums=0)
    self.meta = {'example_shape': list(self.source.example_shape),
                 'num_classes': int(self.source.num_classes),
                 'process_count': jax.process_count(), 'device_count': jax.device_count()}
    if latent_info:
      self.meta['latent_info'] = {k: latent_info[k] for k in ('autoencoder_digest', 'scaling_factor', 'crop')
                                  if k in latent_info}

  def init_state(self):
    """The fresh state, created already sharded (no host copy of the full parameters)."""
    if self.base_params is None:
      return jax.jit(self.init_fn, out_shardings=self.state_shardings)(self.seed_key)
    # The base parameters enter as an argument, not a closure: a closed-over array would be
    # baked into the program as a constant (the whole network, for a large model).
    def from_base(key, base_params):
      return train_state.init_state(self.rule, lambda _: self.base_layout(base_params), self.tx,
                                    tuple(self.config.optim.ema_decays), key)
    return jax.jit(from_base, out_shardings=self.state_shardings)(self.seed_key, self.base_params)


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if logging_utils.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _start(setup: Setup, manager) -> tuple[dict, bool]:
  """The state to train from: config.train.restore_step's checkpoint (or the latest), checked
  against the config before its arrays are read, or a fresh one. Returns (state, resumed)."""
  config, workdir = setup.config, setup.workdir
  step = checkpointing.choose_step(manager, workdir, config.train.restore_step)
  if step is None:
    return setup.init_state(), False
  restored = checkpointing.restore(manager, workdir, step, setup.abstract_state, config)
  # Only once the step has been read and accepted: a damaged or incompatible step leaves the
  # checkpoint folder exactly as it was.
  later = checkpointing.set_aside_later_steps(manager, workdir, step)
  setup.source.set_state(restored.data_state)
  if later and logging_utils.is_main_process():
    print(f'Resuming from step {step}: later checkpoints {later} moved to '
          f'{os.path.join(workdir, "checkpoints_set_aside")}.', flush=True)
  return restored.state, True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stream=None,
                       teacher=None) -> dict:
  """Trains config.train.num_steps updates (resuming from WORKDIR/checkpoints if present),
  then runs the few-step evaluation. Returns the final evaluation metrics, or
  {'preempted_at': step, 'signal': 'SIGTERM' | 'SIGINT'} when a signal stopped the run (after
  saving that step; `EXIT_CODES` maps the signal to main's exit status). teacher: see Setup."""
  setup = Setup(config, workdir, teacher=teacher)
  config = setup.config                # resolved: what trains is what config.json and checkpoints record
  train = config.train
  evaluate = evaluator.Evaluator(config, workdir, setup.mesh, setup.source, setup.interpolant,
                                 setup.flow_map, autoencoder=setup.autoencoder)
  if config.eval.at_end or train.eval_every:
    evaluate.check_ready()   # missing Inception weights / reference stats: fail now, not later
  with jax.set_mesh(setup.mesh):
    manager = checkpointing.make_manager(workdir, keep=train.keep_checkpoints,
                                         keep_every=train.keep_every,
                                         async_save=train.async_checkpointing)
    state, resumed = _start(setup, manager)
    step = int(jax.device_get(state['step']))
    _write_config(config, workdir)
    logger = logging_utils.MetricsLogger(workdir, train.num_steps, step, jsonl=train.loss_log_file,
                                         stream=stream)
    logger.info(f'fmjax: {config.loss.name} on {config.data.name}, {jax.device_count()} devices '
                f'in {jax.process_count()} process(es), mesh {dict(setup.mesh.shape)}, '
                + (f'resumed at step {step}' if resumed else
                   f'from the base model in {config.teacher.workdir}'
                   if config.loss.name in finetune.RULE_NAMES else 'from scratch'))

    def save(force=False):
      checkpointing.save(manager, step, state, config, setup.source.get_state(), setup.meta,
                         force=force)

    signals = _StopSignals(train.max_nonfinite_in_a_row)
    preempted = False
    preemption = _Preemption()
    first_step, started = step, time.time()
    if step < train.num_steps:
      # The first console line of the loop would otherwise come only at step log_every.
      logger.info(f'step {step}/{train.num_steps}: compiling the update step ...')
    try:
      with preemption:
        while step < train.num_steps and not preempted:
          batch = setup.source.batch(step)
          stop_requests = sharding_lib.per_device_flags(preemption.requested, setup.mesh)
          state, metrics = setup.train_step(state, batch, stop_requests)
          step += 1
          if step == first_step + 1:
            jax.block_until_ready(metrics['loss'])   # once: the compile time a user waits for
            logger.info(f'step {step}/{train.num_steps}: first update done in '
                        f'{time.time() - started:.1f} s (compiling included); training, a line '
                        f'every {train.log_every} steps.')
          preempted = signals.push(step, metrics)
          if step % train.log_every == 0 or step == train.num_steps:
            values = jax.device_get({k: v for k, v in metrics.items() if k not in _SIGNALS})
            logger.log_train(step, {k: float(v) for k, v in values.items()})
          if step == first_step + 1:
            logger.restart_clock(step)   # steps/s and ETA without the compile time
          if train.checkpoint_every and step % train.checkpoint_every == 0:
            save()
          # A preempted job has seconds left: save, do not start an evaluation.
          if (train.eval_every and step % train.eval_every == 0 and step < train.num_steps
              and not preempted):
            evaluate(state, step, logger, final=False)
        preempted = signals.drain() or preempted
      if manager.latest_step() != step:
        save(force=True)
    finally:
      manager.wait_until_finished()
      manager.close()
    if preempted:
      # Another process's SIGTERM stops this one too (stop_requested is global): call it SIGTERM.
      name = preemption.signal_name or 'SIGTERM'
      logger.info(f'{name}: saved checkpoint at step {step}; exiting with status '
                  f'{EXIT_CODES[name]} (resume with the same command).')
      logger.close()
      return {'preempted_at': step, 'signal': name}
    if config.eval.at_end:
      logger.info('fmjax: evaluating the ' + train_state.describe_weights(
          tuple(config.optim.ema_decays), config.eval.ema_index, step,
          bool(config.optim.ema_warmup)) + '.')
    results = evaluate(state, step, logger, final=True) if config.eval.at_end else {'step': step}
    logger.close()
    return results
