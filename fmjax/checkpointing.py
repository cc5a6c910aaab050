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

ITEMS = ('state', 'config', 'data', 'meta')

# Config fields that decide the shapes and meaning of the saved state: a checkpoint written
# under other values cannot be resumed (change the workdir, or the values back).
STRUCTURAL_FIELDS = (
    'interpolant', 'data.name', 'data.dim', 'data.num_classes', 'model', 'flow_map.parameterization',
    'loss.name', 'loss.weighting', 'optim.name', 'optim.grad_clip', 'optim.ema_decays',
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


def _lookup(tree: dict, dotted: str):
  node = tree
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _normalize(value):
  # JSON turns tuples into lists; compare them as lists.
  if isinstance(value, (list, tuple)):
    return [_normalize(v) for v in value]
  if isinstance(value, dict):
    return {k: _normalize(v) for k, v in value.items()}
  return value


def check_compatible(saved_config: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises IncompatibleCheckpointError naming every structural field that differs."""
  current = json.loads(config.to_json_best_effort())
  diffs = []
  for field in STRUCTURAL_FIELDS:
    a, b = _normalize(_lookup(saved_config, field)), _normalize(_lookup(current, field))
    if a != b:
      diffs.append(f'  {field}: checkpoint has {json.dumps(a)}, this config has {json.dumps(b)}')
  if diffs:
    raise IncompatibleCheckpointError(
        f'{checkpoint_dir(workdir)} holds a checkpoint from an incompatible config:\n' + '\n'.join(diffs) +
        '\nUse a fresh --workdir for this config, or restore the old values to resume.')


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
