r"""Command-line entry point.

  python -m fmjax.main --config=experiments/toy_gmm.py --workdir=runs/gmm \
      [--config.train.num_steps=5000 ...] [--mode=train|eval|sample|steer]

--config names an experiment file with get_config(arg=None) (`file.py:ARG` passes ARG);
every field can be overridden as --config.section.key=VALUE. The config is then resolved
(fmjax.configs.resolve: every rule and network option in force filled in) and validated;
an unknown key, a value of the wrong type, an unknown rule, network or option, a missing
experiment file or a workdir that cannot be written stops here with one line that says what
to change, before any data, teacher or device work; so does an experiment file whose
get_config raises (one line naming the file and the error).

--mode=train trains the config (resuming WORKDIR's latest checkpoint, which must have been
trained with the same training fields: fmjax.checkpointing.SAFE_FIELDS lists what may change).
--mode=eval, sample and steer read the run's recorded config (WORKDIR/config.json, written by
training): the experiment file's defaults do not apply, and the command line may change only
the fields of RUN_MODE_FIELDS: config.eval, config.sample, config.steer, config.seed (the
evaluation's and sampler's noise), config.train.restore_step, config.sharding, and the places
of inputs that may have moved (config.data.data_dir, config.data.worker_count,
config.autoencoder, config.teacher.workdir). Any other --config.X that differs from the
recorded value is a training field: an error naming it (repeating a training value as it was
trained is accepted). Each of these modes prints which weights it uses (an EMA copy with its
decay, or the raw parameters) and of which step. Multi-host jobs: run the same
command on every host; jax.distributed starts by itself on TPU pods and SLURM, or from
--coordinator/--num_processes/--process_id (or FMJAX_COORDINATOR / FMJAX_NUM_PROCESSES /
FMJAX_PROCESS_ID).

Exit status: 0 finished; 1 an error (a user error prints one `fmjax: ...` line); 75
(`train.PREEMPTED_EXIT_CODE`) stopped by SIGTERM after saving a checkpoint: requeue the same
command to resume; 130 (`train.INTERRUPTED_EXIT_CODE`) stopped by ctrl-C (SIGINT): training
saves the next update first and the same command resumes from it; a second ctrl-C exits at
once without saving.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import ml_collections

from fmjax import checkpointing, configs, logging_utils, sharding, train, user_files
from fmjax.cli import RUN_MODE_FIELDS  # the fields eval / sample / steer may change
from fmjax.cli import evaluate as cli_evaluate
from fmjax.cli import sample as cli_sample
from fmjax.data import datasets
from fmjax.evaluation import assets
from fmjax.steering import classifier

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file: experiments/NAME.py[:ARG].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and samples go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'steer'],
                          'train (resumes if WORKDIR has a checkpoint), eval (few-step sweep of the '
                          'latest checkpoint), sample (config.sample.num_samples samples to WORKDIR/samples) '
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


def prepare(config, workdir: str, mode: str = 'train', overrides=None):
  """The resolved config (every option in force), after checking it and the workdir.

  Training: `config` itself. --mode=eval/sample/steer: the run's recorded config with the
  RUN_MODE_FIELDS of `config` on top (`run_mode_config`; `overrides`, the dotted keys set on the
  command line, limits that to what the user typed).
  """
  if mode == 'train' or overrides is None:
    config = configs.resolve(config)
  # else only the typed fields count, and they are checked within the recorded config: the
  # experiment's own defaults (a distillation config without its teacher, say) need not resolve.
  check_workdir(workdir, mode)
  if mode != 'train':
    config = run_mode_config(config, workdir, mode, overrides)
  return config


def _in(key: str, fields) -> bool:
  return any(key == f or key.startswith(f + '.') for f in fields)


def _set_leaf(tree: dict, key: str, value) -> None:
  *sections, leaf = key.split('.')
  for name in sections:
    if not isinstance(tree.get(name), dict):
      tree[name] = {}
    tree = tree[name]
  tree[leaf] = value


def _tuples(tree):
  """JSON lists back to the tuples configs hold (jit's static arguments must be hashable)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def recorded_config(workdir: str) -> dict | None:
  """The config a training run recorded in WORKDIR/config.json (JSON data); None if none."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise configs.ConfigError(f'{path} cannot be read ({e}); it is written by --mode=train: rerun '
                              'training to rewrite it, or restore the file.') from None


def run_mode_config(config, workdir: str, mode: str, overrides=None) -> ml_collections.ConfigDict:
  """The config --mode=eval/sample/steer runs: WORKDIR/config.json, with the RUN_MODE_FIELDS of
  `config` on top, resolved.

  overrides: the dotted keys the user set (main passes the command line's --config.X flags);
  None takes every field of `config` as requested (a caller passing a whole config). A
  requested training field (outside RUN_MODE_FIELDS) must equal the recorded value: a different
  one raises ConfigError naming it, since evaluation cannot change what the run trained. Fields
  of RUN_MODE_FIELDS that the record lacks (runs saved by an older version) come from `config`.
  A workdir without config.json (no training started there) gets `config` itself: the mode then
  stops at its first missing input (a classifier, the checkpoint) with that input's message.
  """
  recorded = recorded_config(workdir)
  if recorded is None:
    return configs.resolve(config)
  record = checkpointing._flatten(checkpointing._resolved_dict(recorded))
  wanted = checkpointing._flatten(json.loads(config.to_json_best_effort()))
  if overrides is not None:
    # An old field name and its new one hold one value (configs.ALIASES): typing either sets both.
    aliases = getattr(configs, 'ALIASES', {})
    overrides = set(overrides) | {b for a, b in aliases.items() if a in overrides} | {
        a for a, b in aliases.items() if b in overrides}
  keys = (set(wanted) if overrides is None else
          {k for k in wanted if any(k == o or k.startswith(o + '.') for o in overrides)})
  missing = object()
  conflicts = []
  for key in sorted(keys):
    if _in(key, RUN_MODE_FIELDS) or _in(key, ('loss_defaults', 'model_defaults')):
      continue   # the per-name defaults live on in the resolved loss / model sections
    if key not in record and overrides is None:
      continue   # a field newer than the run: not the caller's choice
    if record.get(key, missing) != wanted[key]:
      conflicts.append(key)
  if conflicts:
    where = os.path.join(workdir, 'config.json')
    lines = [f'  config.{k} = {json.dumps(wanted[k])}: the run trained with '
             f'{json.dumps(record[k]) if k in record else "no such field"}' for k in conflicts]
    raise configs.ConfigError(
        f'--mode={mode} uses the config the run recorded in {where}; these values belong to '
        f'training and differ from it:\n' + '\n'.join(lines) + '\nLeave them out (the recorded '
        'values apply), or train a run with them in a fresh --workdir. In this mode the command '
        f'line may change only {", ".join(f + ("" if f in ("seed", "autoencoder") or "." in f else ".*") for f in RUN_MODE_FIELDS)}.')
  merged = dict(recorded)
  present = set(checkpointing._flatten(recorded))
  for key in sorted(wanted):
    if _in(key, RUN_MODE_FIELDS):
      if key in keys or key not in present:
        _set_leaf(merged, key, wanted[key])
  return configs.resolve(ml_collections.ConfigDict(_tuples(merged)))


def run(config, workdir: str, mode: str, overrides=None) -> dict:
  """What main does after flag parsing (importable, so tests and notebooks can call it).

  --mode=eval/sample/steer run the recorded config of `workdir` with `config`'s evaluation,
  sampling and steering fields (`run_mode_config`; `overrides` as there)."""
  config = prepare(config, workdir, mode, overrides)
  if mode == 'train':
    return train.train_and_evaluate(config, workdir)
  if mode == 'eval':
    return cli_evaluate.evaluate_checkpoint(config, workdir)
  line = cli_sample.weights_line(config, workdir)
  if line and logging_utils.is_main_process():
    print(f'fmjax: --mode={mode} with the {line}.', flush=True)
  if mode == 'steer':
    from fmjax.cli import steer   # imported when used: the steering stack stays off the train path
    return steer.steer_to_workdir(config, workdir)
  return cli_sample.sample_to_workdir(config, workdir)


def _config_spec(argv) -> str | None:
  """The value of --config in argv (FILE or FILE:ARG), if any."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_path(argv) -> str | None:
  """The experiment file named by --config in argv (without its :ARG), if any."""
  spec = _config_spec(argv)
  return None if spec is None else spec.split(':', 1)[0]


def check_experiment(spec: str) -> None:
  """Loads the experiment file of --config=FILE[:ARG] and calls its get_config(ARG) once, so that
  an error inside it is one line naming the file, the line and the error (absl and
  ml_collections would wrap it in 40-odd lines of their own traceback). Exits on an error."""
  path, *arg = spec.split(':', 1)
  try:
    module = user_files.run(path, 'fmjax_experiment_check')
    if not hasattr(module, 'get_config'):
      sys.exit(f'fmjax: --config={spec}: {path} defines no get_config(arg=None); an experiment '
               'file returns its ConfigDict from get_config (see experiments/toy_gmm.py).')
    module.get_config(*arg)
  except Exception as e:   # whatever the user's file raises: say where, once
    sys.exit(experiment_error_message(spec, path, e))


def experiment_error_message(spec: str, path: str, error: BaseException) -> str:
  """'fmjax: --config=SPEC: FILE line N: Type: message' for an error raised in the experiment file."""
  return (f'fmjax: --config={spec}: the experiment file raised an error '
          f'({user_files.location(path, error)}): {user_files.error_text(error)}')


def parse_flags(argv):
  """absl's flag parsing with clean errors for a missing or failing experiment file and unknown keys."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    sys.exit(f'fmjax: --config: no experiment file {path!r}; name one such as experiments/toy_gmm.py.')
  if path is not None:
    check_experiment(_config_spec(argv))
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
                train.NonFiniteError, classifier.ClassifierError, datasets.DatasetNotFoundError,
                datasets.DatasetError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax and JAX log every checkpoint step at INFO; keep the console to fmjax's own lines.
    logging.set_verbosity(logging.WARNING)
  # Only what the user typed may change an eval/sample/steer run's recorded config.
  overrides = sorted(config_flags.get_override_values(flags.FLAGS['config']))
  try:
    config = prepare(_CONFIG.value, _WORKDIR.value, _MODE.value, overrides)
  except configs.ConfigError as e:
    sys.exit(f'fmjax: {e}')
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    results = run(config, _WORKDIR.value, _MODE.value)
  except _USER_ERRORS as e:
    sys.exit(f'fmjax: {e}')
  except KeyboardInterrupt:
    # Training saves on the first ctrl-C (it returns, below); this is a second one, or one outside
    # the training loop (start-up, evaluation, sampling), where there is nothing to save.
    print(f'\nfmjax: interrupted (ctrl-C); exiting with status {train.INTERRUPTED_EXIT_CODE}. '
          'Checkpoints saved before it are kept: the same command resumes from the latest.',
          file=sys.stderr, flush=True)
    sys.exit(train.INTERRUPTED_EXIT_CODE)
  if 'preempted_at' in results:
    sys.exit(train.EXIT_CODES[results.get('signal', 'SIGTERM')])


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
