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

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from fmjax import configs

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
    'eval', 'sample', 'sharding', 'data.worker_count', 'data.data_dir',
    'loss_defaults', 'model_defaults',
)


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint written by a config whose state does not fit this one."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Keep the last `keep` checkpoints plus every `keep_every`-th step; clean interrupted saves."""
  if not read_only:
    remove_interrupted_saves(workdir)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep if keep > 0 else None,
      keep_period=keep_every if keep_every > 0 else None,
      create=not read_only,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save,
      read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


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


def _flatten(tree, prefix: str = '') -> dict:
  """{'a.b.c': leaf} of a nested dict of JSON data (where tuples are already lists)."""
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def _is_safe(key: str) -> bool:
  return any(key == f or key.startswith(f + '.') for f in SAFE_FIELDS)


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


def changed_fields(saved_config: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{dotted key: (saved value, current value)} for every field outside SAFE_FIELDS that differs."""
  saved, current = _flatten(_resolved_dict(saved_config)), _flatten(_resolved_dict(config))
  return {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
          if not _is_safe(k) and saved.get(k) != current.get(k)}


def check_compatible(saved_config: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises IncompatibleCheckpointError naming every field outside SAFE_FIELDS that differs
  from the checkpoint's config: resuming must train what the checkpoint was training."""
  diffs = changed_fields(saved_config, config)
  if diffs:
    lines = [f'  {k}: checkpoint has {json.dumps(a)}, this config has {json.dumps(b)}'
             for k, (a, b) in diffs.items()]
    raise IncompatibleCheckpointError(
        f'{checkpoint_dir(workdir)} holds a checkpoint trained with another config:\n' + '\n'.join(lines) +
        '\nResuming must train what the checkpoint trained: use a fresh --workdir for this config, '
        'or set these values back to resume (fmjax.checkpointing.SAFE_FIELDS lists what may change).')


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
