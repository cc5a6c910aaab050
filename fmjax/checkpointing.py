"""Orbax checkpoints, in one place (an Orbax API change stays local to this module).

Layout: WORKDIR/checkpoints/<step>/{state, config, data, meta}
  state   the training-state pytree (sharded arrays; every process writes its shards)
  config  the run's ConfigDict as JSON, checked against the current config on resume
  data    the data iterator state (a JSON dict)
  meta    what loading needs without the dataset: example shape, number of classes

Saves are asynchronous (training continues while the previous step is written) and atomic:
Orbax writes into a temporary folder and renames it when complete, so a save cut off by a
kill leaves a `*.orbax-checkpoint-tmp-*` folder that is never listed as a step and is removed
by the next CheckpointManager (cleanup_tmp_directories).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import configs
from fmjax import sharding

ITEMS = ('state', 'config', 'data', 'meta')

# Config fields that may change between a checkpoint and its resume: they change how a run is
# logged, evaluated, sampled, checkpointed, laid out on devices or fed, not what it trains.
# Every other field (data, network, rule options, optimizer, seed, ...) must match, compared
# on resolved configs (configs.resolve), so a rule option that a default fills counts too.
# A dotted prefix covers its whole section. The per-name defaults are safe because the
# resolved loss / model sections hold the values they gave.
SAFE_FIELDS = (
    'train.num_steps', 'train.log_every', 'train.eval_every', 'train.checkpoint_every',
    'train.keep_checkpoints', 'train.keep_every', 'train.async_checkpointing',
    'train.max_nonfinite_in_a_row', 'train.loss_log_file', 'train.restore_step',
    'eval', 'sample', 'steer', 'sharding', 'data.worker_count', 'data.data_dir',
    'data.in_memory_gib', 'data.read_threads',
    'loss_defaults', 'model_defaults',
    # The autoencoder's folder may move; its digest is checked against the latent dataset's.
    'autoencoder',
)


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint written by a config whose state does not fit this one."""


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read, or a step that does not exist: the message names the
  step and says what to do. Never answered by silently falling back to another step."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Keep the last `keep` checkpoints plus every `keep_every`-th step; clean interrupted saves."""
  if not read_only:
    remove_interrupted_saves(workdir)
  # A reader (read_only) gets a manager that keeps everything and never creates or cleans
  # anything; Orbax's own read_only flag would say the same with three warnings per load.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep if keep > 0 and not read_only else None,
      keep_period=keep_every if keep_every > 0 and not read_only else None,
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save and not read_only,
  )
  # Handlers named up front: a manager that only learns them from restore args warns about
  # every item it was not asked for ("found in the checkpoint, but could not be restored").
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'data': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


TMP_MARKER = '.orbax-checkpoint-tmp'


def remove_interrupted_saves(workdir: str) -> list[str]:
  """Deletes the temporary folders of saves that never completed (process 0 only).

  Orbax also does this in the background when a manager starts; doing it here, before the
  manager exists, means no later listing can race with it.
  """
  root = checkpoint_dir(workdir)
  if jax.process_index() != 0 or not os.path.isdir(root):
    return []
  removed = []
  for name in os.listdir(root):
    if TMP_MARKER in name:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
      removed.append(name)
  return removed


def save(manager: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict,
         data_state: dict, meta: dict, *, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta)), force=force)


def restore_json(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict, dict]:
  """(config dict, data state, meta) of a saved step, without touching the arrays."""
  out = manager.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  return out['config'], out['data'], out['meta']


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs).

  The shardings may belong to another mesh or another number of devices than the ones that
  saved it: Orbax reads each process's shards from the (global) array files.
  """
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return out['state']


@dataclasses.dataclass
class Restored:
  """One saved step of a run: what `restore` returns."""
  step: int
  config: dict          # the saved (resolved) config, as JSON
  data_state: dict      # the data iterator's state
  meta: dict            # example_shape, num_classes, device layout of the saving run
  state: Any            # the training-state pytree


def choose_step(manager: ocp.CheckpointManager, workdir: str, step: int | None = None) -> int | None:
  """The step to restore: `step` if given (>= 0) and saved, else the latest (None if none)."""
  steps = sorted(manager.all_steps())
  if step is None or step < 0:
    return steps[-1] if steps else None
  if step not in steps:
    raise CheckpointError(f'No checkpoint for step {step} in {checkpoint_dir(workdir)}; saved steps: '
                          f'{steps or "none"}.')
  return step


def set_aside_later_steps(manager: ocp.CheckpointManager, workdir: str, step: int) -> list[int]:
  """Moves the checkpoints saved after `step` to WORKDIR/checkpoints_set_aside/ (process 0),
  so that training resumed from an older step can save its own later steps; nothing is
  deleted. Every process must call it (it ends with a barrier)."""
  later = [s for s in sorted(manager.all_steps()) if s > step]
  if later and jax.process_index() == 0:
    aside = os.path.join(os.path.abspath(workdir), 'checkpoints_set_aside')
    os.makedirs(aside, exist_ok=True)
    for s in later:
      target = os.path.join(aside, str(s))
      if os.path.exists(target):
        shutil.rmtree(target)
      shutil.move(os.path.join(checkpoint_dir(workdir), str(s)), target)
  sharding.barrier('fmjax_set_aside_checkpoints')
  manager.reload()
  return later


def _replicated_abstract(manager: ocp.CheckpointManager, step: int) -> Any:
  """The saved state's shapes and dtypes, replicated over this process's devices (sampling)."""
  replicated = NamedSharding(sharding.local_mesh(), P())
  metadata = manager.item_metadata(step)['state']
  metadata = getattr(metadata, 'tree', metadata)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
                      metadata, is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))


def damage_detail(error: Exception, folder: str) -> str:
  """What is wrong with a checkpoint folder, in words, from the storage layer's error.

  Orbax and TensorStore errors carry status codes, zarr keys and pybind reprs; a user needs
  only which file (if the error names one inside `folder`) and whether it is missing or damaged.
  """
  text = str(error)
  if isinstance(error, (KeyError, FileNotFoundError)) or 'not found' in text or 'Unknown key' in text:
    return 'files are missing'
  if isinstance(error, json.JSONDecodeError) or 'Invalid JSON' in text:
    kind = 'not valid JSON'
  else:
    kind = 'truncated or corrupt'
  root = os.path.abspath(folder)
  named = [p for p in re.findall(r'"(/[^"]+)"', text) if p.startswith(root + os.sep)]
  named = [p for p in named if os.path.isfile(p)] or named
  if named:
    return f'{os.path.relpath(max(named, key=len), root)} is {kind}'
  return f'a file is {kind}'


def _unreadable(manager, workdir: str, step: int, what: str, error: Exception,
                step_option: str) -> CheckpointError:
  folder = os.path.join(checkpoint_dir(workdir), str(step))
  # The storage layer's own words stay available (--verbosity=1), out of the message.
  logging.info('Checkpoint %s: %s cannot be read: %r', folder, what, error)
  older = [s for s in sorted(manager.all_steps()) if s < step]
  advice = (f'resume from an older step with {step_option}={older[-1]} '
            f'(saved: {older})' if older else 'no older checkpoint is saved')
  return CheckpointError(
      f'Checkpoint step {step} ({folder}) is damaged or incomplete: {what} cannot be read '
      f'({damage_detail(error, folder)}). Delete {folder} to continue from the step before it, '
      f'or {advice}; with no usable checkpoint, use a fresh --workdir.')


def restore(manager: ocp.CheckpointManager, workdir: str, step: int,
            abstract_state: Any = None, config: ml_collections.ConfigDict | None = None, *,
            step_option: str = '--config.train.restore_step', also_safe=()) -> Restored:
  """Restores step `step` of the run in `workdir`: the one way training, evaluation,
  `fmjax.load` and distillation teachers read a checkpoint.

  abstract_state: ShapeDtypeStructs with the shardings to restore onto (training and
  evaluation, whose config rebuilds the state); None restores every array replicated over
  this process's devices, with the shapes the checkpoint records (sampling, teachers).
  config: the config about to use the state; checked against the saved one
  (`check_compatible`, with `also_safe` fields allowed to differ besides SAFE_FIELDS) before any
  array is read.
  A step whose files are damaged or missing raises CheckpointError naming it and the option
  (`step_option`) that picks an older step.
  """
  try:
    saved_config, data_state, meta = restore_json(manager, step)
  except Exception as e:   # Orbax raises whatever its storage layer does (JSON, OS, KeyError)
    raise _unreadable(manager, workdir, step, 'its config, data or meta record', e,
                      step_option) from None
  if config is not None:
    check_compatible(saved_config, config, workdir, also_safe)
  try:
    if abstract_state is None:
      abstract_state = _replicated_abstract(manager, step)
    state = restore_state(manager, step, abstract_state)
  except Exception as e:   # truncated or missing array files, a state of another structure
    raise _unreadable(manager, workdir, step, 'its training state', e, step_option) from None
  return Restored(step, saved_config, data_state, meta, state)


def _flatten(tree, prefix: str = '') -> dict:
  """{'a.b.c': leaf} of a nested dict of JSON data (where tuples are already lists)."""
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def _is_safe(key: str, also_safe=()) -> bool:
  return any(key == f or key.startswith(f + '.') for f in (*SAFE_FIELDS, *also_safe))


def _resolved_dict(config) -> dict:
  """The resolved config as JSON data; a saved config from an older version is upgraded
  (configs.resolve) when it can be, else compared as saved."""
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  try:
    config = configs.resolve(config)
  except (configs.ConfigError, ValueError, KeyError, AttributeError):
    pass
  return json.loads(config.to_json_best_effort())


def changed_fields(saved_config: dict, config: ml_collections.ConfigDict,
                   also_safe=()) -> dict[str, tuple]:
  """{dotted key: (saved value, current value)} for every field outside SAFE_FIELDS (and
  `also_safe`) that differs."""
  saved, current = _flatten(_resolved_dict(saved_config)), _flatten(_resolved_dict(config))
  return {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
          if not _is_safe(k, also_safe) and saved.get(k) != current.get(k)}


def check_compatible(saved_config: dict, config: ml_collections.ConfigDict, workdir: str,
                     also_safe=()) -> None:
  """Raises IncompatibleCheckpointError naming every field outside SAFE_FIELDS (and `also_safe`)
  that differs from the checkpoint's config: resuming must train what the checkpoint was
  training."""
  diffs = changed_fields(saved_config, config, also_safe)
  if diffs:
    lines = [f'  {k}: checkpoint has {json.dumps(a)}, this config has {json.dumps(b)}'
             for k, (a, b) in diffs.items()]
    raise IncompatibleCheckpointError(
        f'{checkpoint_dir(workdir)} holds a checkpoint trained with another config:\n' + '\n'.join(lines) +
        '\nResuming must train what the checkpoint trained: use a fresh --workdir for this config, '
        'or set these values back to resume (fmjax.checkpointing.SAFE_FIELDS lists what may change).')


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
