r"""Command-line entry point.

  python -m fmjax.main --config=experiments/toy_gmm.py --workdir=runs/gmm \
      [--config.train.num_steps=5000 ...] [--mode=train|eval|sample]

--config names an experiment file with get_config(arg=None) (`file.py:ARG` passes ARG);
every field can be overridden as --config.section.key=VALUE. The config is then resolved
(fmjax.configs.resolve: every rule and network option in force filled in) and validated;
an unknown key, a value of the wrong type, an unknown rule, network or option, a missing
experiment file or a workdir that cannot be written stops here with one line that says what
to change, before any data, teacher or device work. Multi-host jobs: run the same
command on every host; jax.distributed starts by itself on TPU pods and SLURM, or from
--coordinator/--num_processes/--process_id (or FMJAX_COORDINATOR / FMJAX_NUM_PROCESSES /
FMJAX_PROCESS_ID).

Exit status: 0 finished; 1 an error (a user error prints one `fmjax: ...` line); 75
(`train.PREEMPTED_EXIT_CODE`) stopped by SIGTERM after saving a checkpoint: requeue the same
command to resume.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import jax
import numpy as np

from fmjax import api, checkpointing, configs, logging_utils, sharding, train
from fmjax.evaluation import assets, evaluator
from fmjax.steering import classifier

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file: experiments/NAME.py[:ARG].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'steer'],
                          'train (resumes if WORKDIR has a checkpoint), eval (few-step sweep of the '
                          'latest checkpoint), sample (config.sample.num samples to WORKDIR/samples) '
                          'or steer (config.steer: reward-steered samples to WORKDIR/steer).')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'host:port of process 0 (multi-host only).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host only).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index (multi-host only).')
flags.mark_flags_as_required(['config', 'workdir'])


def check_workdir(workdir: str, mode: str = 'train') -> None:
  """Raises ConfigError unless `workdir` is a folder this process can write; training creates
  it if missing, eval and sample need the folder of a trained run."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise configs.ConfigError(f'--workdir={workdir} is a file, not a folder; name a folder '
                              '(it is created if missing).')
  if mode != 'train' and not os.path.isdir(workdir):
    raise configs.ConfigError(f'--workdir={workdir} does not exist; --mode={mode} reads a trained '
                              'run: train first with --mode=train, or name its workdir.')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise configs.ConfigError(f'--workdir={workdir} cannot be written ({e.strerror}); choose a '
                              'folder you can write to.') from None


def prepare(config, workdir: str, mode: str = 'train'):
  """The resolved config (every option in force), after checking it and the workdir."""
  config = configs.resolve(config)
  check_workdir(workdir, mode)
  return config


def run(config, workdir: str, mode: str) -> dict:
  """What main does after flag parsing (importable, so tests and notebooks can call it)."""
  config = prepare(config, workdir, mode)
  if mode == 'train':
    return train.train_and_evaluate(config, workdir)
  if mode == 'eval':
    return evaluate_checkpoint(config, workdir)
  if mode == 'steer':
    from fmjax import steer_mode   # imported when used: the steering stack stays off the train path
    return steer_mode.steer_to_workdir(config, workdir)
  return sample_to_workdir(config, workdir)


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Restores WORKDIR's checkpoint (config.train.restore_step, else the latest) and runs the
  few-step evaluation on it."""
  setup = train.Setup(config, workdir)
  config = setup.config
  evaluate = evaluator.Evaluator(config, workdir, setup.mesh, setup.source, setup.interpolant,
                                 setup.flow_map, autoencoder=setup.autoencoder)
  evaluate.check_ready()
  with jax.set_mesh(setup.mesh):
    manager = checkpointing.make_manager(workdir, read_only=True)
    try:
      step = checkpointing.choose_step(manager, workdir, config.train.restore_step)
      if step is None:
        raise checkpointing.CheckpointError(
            f'No checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first with --mode=train.')
      restored = checkpointing.restore(manager, workdir, step, setup.abstract_state, config)
    finally:
      manager.close()
    logger = logging_utils.MetricsLogger(workdir, config.train.num_steps, step, jsonl=False)
    results = evaluate(restored.state, step, logger, final=True)
    logger.close()
  return results


def sample_to_workdir(config, workdir: str) -> dict:
  """config.sample.num samples with config.sample.steps flow-map steps -> WORKDIR/samples/."""
  restore_step = config.train.restore_step
  model = api.load(workdir, None if restore_step < 0 else restore_step)
  x = np.asarray(model.sample(jax.random.PRNGKey(config.seed), config.sample.num,
                              steps=config.sample.steps))
  if not logging_utils.is_main_process():
    return {}
  out = os.path.join(workdir, 'samples', f'samples_{model.step}_{config.sample.steps}steps')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  np.save(out + '.npy', x)
  if x.ndim == 2:
    logging_utils.scatter_png(out + '.png', [(f'{config.sample.steps} step(s)', x)])
  else:
    columns = int(np.ceil(np.sqrt(len(x))))
    logging_utils.save_png(out + '.png', logging_utils.image_grid(x, columns))
  print(f'wrote {out}.npy and {out}.png')
  return {'path': out + '.npy', 'step': model.step}


def _config_path(argv) -> str | None:
  """The experiment file named by --config in argv (without its :ARG), if any."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    return value.split(':', 1)[0]
  return None


def parse_flags(argv):
  """absl's flag parsing with clean errors for a missing experiment file and unknown keys."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    sys.exit(f'fmjax: --config: no experiment file {path!r}; name one such as experiments/toy_gmm.py.')
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    sys.exit(unknown_key_message(e, argv))


def unknown_key_message(error: Exception, argv) -> str:
  """One line for an override of a key the config does not have, with ml_collections' suggestion.

  ml_collections raises AttributeError(KeyError("'key'\\nDid you mean ...?")) from deep inside
  absl's parser; the traceback says nothing the line does not.
  """
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]
  key, _, suggestion = str(error.args[0] if error.args else error).partition('\n')
  key = key.strip('\'"')
  overrides = [a.split('=')[0] for a in argv
               if a.startswith('--config.') and f'.{key}.' in a.split('=')[0] + '.']
  where = overrides[0] if overrides else '--config'
  return f'fmjax: {where}: no such config key {key!r}. {suggestion}'.rstrip()


# Errors a user can cause or fix (a damaged checkpoint, a changed config, missing FID inputs, a
# diverged run): one line that says what to do, no traceback.
_USER_ERRORS = (configs.ConfigError, checkpointing.CheckpointError,
                checkpointing.IncompatibleCheckpointError, assets.MissingFIDAssetsError,
                train.NonFiniteError, classifier.ClassifierError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax and JAX log every checkpoint step at INFO; keep the console to fmjax's own lines.
    logging.set_verbosity(logging.WARNING)
  try:
    config = prepare(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except configs.ConfigError as e:
    sys.exit(f'fmjax: {e}')
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    results = run(config, _WORKDIR.value, _MODE.value)
  except _USER_ERRORS as e:
    sys.exit(f'fmjax: {e}')
  if 'preempted_at' in results:
    sys.exit(train.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
