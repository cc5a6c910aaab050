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
    self.sample_fns = None            # the sweep's jitted samplers, built at the first evaluation
    self.feature_extractor = None     # the FID feature extractor, likewise
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
  if config.eval.at_end or train.eval_every:
    from fmjax.evaluation import sweep
    sweep.check_fid_ready(config)   # missing Inception weights / reference stats: fail now, not later
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
          evaluate(setup, state, step, logger, final=False)
    if manager.latest_step() != step:
      save(force=True)
    manager.wait_until_finished()
    manager.close()
    results = evaluate(setup, state, step, logger, final=True) if config.eval.at_end else {'step': step}
    logger.close()
    return results


# ----------------------------------------------------------------------------- evaluation


def few_step_samples(flow_map, params, x0, steps, labels=None, null_label=None, guidance_scale=1.0):
  """{k: samples of the k-step flow map on a uniform grid} for every k in steps."""
  from fmjax import samplers
  sample = samplers.make_flow_map_sampler(flow_map, null_label=null_label)
  return {int(k): sample(params, x0, samplers.uniform_grid(int(k)), labels,
                         guidance_scale=guidance_scale) for k in steps}


def evaluate(setup: Setup, state, step: int, logger, *, final: bool, feature_fn=None) -> dict:
  """The few-step sweep (fmjax.evaluation.sweep): the flow map at k = config.eval.steps and the
  ODE on its velocity at config.eval.ode_nfe, scored by FID (image sets) or by distances to the
  target and errors against the exact map (toy targets); table, JSON, plots, TensorBoard.

  feature_fn: image sets only, replaces the Inception feature extractor (tests).
  """
  from fmjax.evaluation import sweep
  config, workdir = setup.config, setup.workdir
  params = train_state.select_params(state, config.eval.ema_index)
  toy = config.data.name in configs.TOY_DATASETS
  num_classes = setup.source.num_classes
  if setup.sample_fns is None:
    # Built once per run: the jitted samplers then compile once, not at every evaluation.
    setup.sample_fns = sweep.make_sample_fns(setup.flow_map, sweep.plan_from_config(config),
                                             null_label=num_classes or None,
                                             guidance_scale=config.eval.guidance_scale)
  sample_fns = setup.sample_fns
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)
  batch_sharding = sharding_lib.batch_sharding(setup.mesh)
  if toy:
    n = config.eval.num_samples - config.eval.num_samples % jax.device_count()
    x0 = jax.jit(lambda k: jax.random.normal(k, (n,) + tuple(setup.source.example_shape)),
                 out_shardings=batch_sharding)(key)
    reference = setup.source.reference_samples(jax.random.PRNGKey(0xBEEF), n)
    other = setup.source.reference_samples(jax.random.PRNGKey(0xF00D), n)
    results, samples = sweep.toy_sweep(
        sample_fns, params, x0, None, reference, reference_other=other,
        target=setup.source.target, interpolant=setup.interpolant, flow_map=setup.flow_map,
        key=jax.random.fold_in(key, 1), exact_pairs=tuple(tuple(p) for p in config.eval.exact_pairs))
  else:
    results, samples = _image_sweep(setup, params, sample_fns, key, feature_fn)
  results = {'step': step, **results}
  # Gathers are collectives: every process joins them before process 0 alone writes.
  samples = {spec: np.asarray(sharding_lib.gather_to_host(x)) for spec, x in samples.items()}
  reference = np.asarray(sharding_lib.gather_to_host(reference)) if toy else None
  if not logging_utils.is_main_process():
    return results
  _write_samples(setup, step, samples, logger, toy, reference)
  logger.info(sweep.format_table(results))
  sweep.write_outputs(results, workdir, final=final, logger=logger)
  return results


def _image_sweep(setup: Setup, params, sample_fns, key, feature_fn):
  """FID per sampler when enabled, else just config.eval.grid_size^2 samples for the grids."""
  from fmjax.evaluation import fid, sweep
  config = setup.config
  shape, num_classes = tuple(setup.source.example_shape), setup.source.num_classes
  sharding = sharding_lib.batch_sharding(setup.mesh)
  grid = config.eval.grid_size ** 2
  if not sweep.fid_enabled(config):
    n = grid + (-grid) % jax.device_count()
    (x0, labels, _), = sweep.noise_batches(key, shape, n, n, num_classes=num_classes, sharding=sharding)
    return {'few_step': {}, 'ode': {}}, {
        spec: np.asarray(sharding_lib.gather_to_host(fn(params, x0, labels)))[:grid] for spec, fn in sample_fns.items()}
  batch = config.eval.fid_batch_size
  batch -= batch % jax.device_count()
  if not batch:
    raise ValueError(f'config.eval.fid_batch_size must be at least the {jax.device_count()} devices.')
  if feature_fn is None:
    if setup.feature_extractor is None:
      from fmjax.evaluation import inception
      setup.feature_extractor = fid.FeatureExtractor(
          inception.load_params(sweep.weights_path(config)), batch_size=batch, mesh=setup.mesh,
          data_axis=sharding_lib.BATCH_AXES)
    feature_fn = setup.feature_extractor
  reference = sweep.load_reference(config)
  noise = lambda: sweep.noise_batches(key, shape, config.eval.fid_num_samples, batch,
                                      num_classes=num_classes, sharding=sharding)
  provenance = {'dataset': f'{config.data.name} (generated)', 'split': 'samples'}
  if getattr(feature_fn, 'feature_fn', None) is not None:
    from fmjax.evaluation import inception, resize
    if feature_fn.feature_fn is inception.features:
      provenance.update(resize=resize.RESIZE_MODE, feature_extractor=fid.extractor_id())
  return sweep.image_sweep(sample_fns, params, noise, feature_fn, reference,
                           config.eval.fid_num_samples, keep=grid, provenance=provenance,
                           log=_main_print)


def _main_print(line: str) -> None:
  if logging_utils.is_main_process():
    print(line, flush=True)


def _write_samples(setup: Setup, step: int, samples: dict, logger, toy: bool, reference) -> None:
  """Scatter plots (toys) or image grids of every sampler to WORKDIR/samples and TensorBoard."""
  workdir, config = setup.workdir, setup.config
  gathered = samples
  if toy:
    panels = [(spec.label, v) for spec, v in gathered.items() if spec.family == 'flow_map']
    odes = [(spec.label, v) for spec, v in gathered.items() if spec.family == 'ode']
    panels += odes[-1:]   # the most accurate ODE solve, for comparison
    picture = logging_utils.scatter_png(os.path.join(workdir, 'samples', f'step_{step}.png'), panels,
                                        reference)
    logger.image(step, 'samples/few_step', picture)
    return
  for spec, v in gathered.items():
    g = logging_utils.image_grid(v, config.eval.grid_size)
    name = (f'{spec.steps}steps' if spec.family == 'flow_map'
            else f'ode_{spec.method}_{spec.nfe}nfe')
    logging_utils.save_png(os.path.join(workdir, 'samples', f'step_{step}_{name}.png'), g)
    logger.image(step, f'samples/{name}', g if g.ndim == 3 else g[..., None])




def format_table(results: dict) -> str:
  """The few-step table printed at eval time (fmjax.evaluation.sweep.format_table)."""
  from fmjax.evaluation import sweep
  return sweep.format_table(results)
