"""Opening a trained run: its checkpoint and recorded config -> the flow map and parameters.

The one opener of a trained workdir for reading is `restore_run`: the read-only checkpoint
manager, the step choice, the one "No checkpoint in ...; train first" message, the restore and
the manager's close. Every reader goes through it:
  --mode=eval     restores sharded onto the training mesh, checked against the current config
                  (fmjax.cli.evaluate);
  load_trained    restores replicated and rebuilds the flow map with fmjax.from_config exactly
                  as it was trained, from the config stored with the checkpoint (no experiment
                  file needed): `fmjax.load` (--mode=sample, --mode=steer), the base model of
                  reward fine-tuning and the distillation teacher (`load_teacher`).
`chosen_step` reads which step that would be without restoring (the console line of
--mode=sample/steer). Training's resume (fmjax.train) is not a reader: it keeps its own
writable manager.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from fmjax import checkpointing, configs, samplers, train_state
from fmjax.data import datasets
from fmjax.from_config import build_flow_map, build_interpolant, build_network
from fmjax.steering import finetune


def restore_run(workdir: str, step: int | None = None, *, abstract_state: Any = None,
                config: ml_collections.ConfigDict | None = None, also_safe=(),
                step_option: str = '--config.train.restore_step') -> checkpointing.Restored:
  """Restores `workdir`'s checkpoint at `step` (the latest if None or negative) for reading;
  `.step` of the result is the step chosen.

  abstract_state: the shardings to restore onto (--mode=eval: the training mesh's, so a pod
  never gathers the parameters on one host); None restores every array replicated over this
  process's devices. config / also_safe: checked against the saved config before any array is
  read (checkpointing.restore). The manager is read-only (nothing created or cleaned) and
  closed whatever happens.
  Raises checkpointing.CheckpointError when the workdir has no checkpoint, `step` was not
  saved, or the step is damaged (the message names `step_option` to pick an older step).
  """
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    chosen = checkpointing.choose_step(manager, workdir, step)
    if chosen is None:
      raise checkpointing.CheckpointError(
          f'No checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first with '
          f'--mode=train (`python -m fmjax.main --config=... --workdir={workdir}`).')
    return checkpointing.restore(manager, workdir, chosen, abstract_state, config,
                                 step_option=step_option, also_safe=also_safe)
  finally:
    manager.close()


def chosen_step(workdir: str, step: int | None = None) -> int | None:
  """The step `restore_run(workdir, step)` would restore (None: no checkpoint), read without
  restoring anything (for the console line that names the weights before they load)."""
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    return checkpointing.choose_step(manager, workdir, step)
  finally:
    manager.close()


@dataclasses.dataclass
class Trained:
  """A trained run's flow map, rebuilt from its checkpoint (what `fmjax.load` wraps)."""
  config: ml_collections.ConfigDict   # the saved, resolved config
  params: Any                         # the chosen network parameters, replicated locally
  flow_map: Any                       # the fmjax.flow_maps object (X, v, velocity taking params)
  example_shape: tuple[int, ...]
  num_classes: int
  step: int
  latent_info: dict | None = None   # latent runs: the dataset's autoencoder record (digest, scale, crop)
  # Which parameters `params` are, for the user: e.g. 'EMA copy 0 (decay 0.999, no warm-up) of
  # step 300' (fmjax.train_state.describe_weights).
  weights: str = ''


def load_trained(workdir: str, step: int | None = None, ema: int | None = None, *,
                 step_option: str = '--config.train.restore_step') -> Trained:
  """Restores `workdir`'s checkpoint at `step` (latest if None) and rebuilds its flow map from
  the config stored with it (no experiment file needed).

  ema: which EMA copy (config.optim.ema_decays order); -1 for the raw training parameters;
  None for the first EMA copy, or the raw parameters of a run that keeps none. The result's
  `weights` names the choice (copy, decay, warm-up, step) for logs.
  Raises checkpointing.CheckpointError for a missing step or a damaged checkpoint; its
  message names `step_option` as the way to pick an older step.
  """
  restored = restore_run(workdir, step, step_option=step_option)
  chosen = restored.step
  # The checkpoint records the example shape and classes, so the data need not be at hand
  # (arrays registered only in the training process, a folder on another machine).
  datasets.remember_recorded(restored.config.get('data', {}), restored.meta, workdir)
  config = configs.resolve(ml_collections.ConfigDict(restored.config), recorded=True)
  if ema is None:
    ema = 0 if restored.state.get('ema') else -1
  params = train_state.select_params(restored.state, ema)
  weights = train_state.describe_weights(tuple(config.optim.ema_decays), ema, chosen,
                                         bool(config.optim.get('ema_warmup')))
  example_shape = tuple(restored.meta['example_shape'])
  num_classes = int(restored.meta['num_classes'])
  interpolant = build_interpolant(config)
  _, apply = build_network(config, example_shape, num_classes)
  return Trained(config, params, build_flow_map(config, apply, interpolant), example_shape,
                 num_classes, chosen, restored.meta.get('latent_info'), weights)


def load_teacher(config: ml_collections.ConfigDict):
  """The model of config.teacher.workdir (its first EMA copy), or None: a
  finetune.BaseModel, which called as teacher(t, x, labels) is the velocity b_t(x) (for
  distillation) and also offers its flow map and parameters (for reward fine-tuning)."""
  if not config.teacher.workdir:
    return None
  try:
    teacher = load_trained(config.teacher.workdir,
                           None if config.teacher.step < 0 else config.teacher.step,
                           step_option='--config.teacher.step')
  except checkpointing.CheckpointError as e:   # say that it is the teacher's checkpoint
    raise checkpointing.CheckpointError(
        f'teacher (config.teacher.workdir={config.teacher.workdir}, config.teacher.step='
        f'{config.teacher.step}): {e}') from None
  params, flow_map = teacher.params, teacher.flow_map
  velocity = lambda t, x, labels=None: flow_map.velocity(params, t, x, labels)
  scale = float(config.teacher.get('guidance_scale', 1.0))
  if scale != 1.0:
    velocity = _guided_velocity(teacher, velocity, scale)
  return finetune.BaseModel(
      flow_map=lambda s, t, x, labels=None: flow_map.X(params, s, t, x, labels),
      velocity=velocity, params=params)


def _guided_velocity(teacher: Trained, velocity, scale: float):
  """The teacher's velocity under classifier-free guidance of `scale` (config.teacher.guidance_scale),
  so that the student learns the guided model and samples it in one evaluation at scale 1.
  Raises ConfigError before any training when the teacher cannot be guided."""
  guidance_input = bool(teacher.config.model.get('guidance_conditioning'))
  if not teacher.num_classes:
    raise configs.ConfigError(
        f'config.teacher.guidance_scale = {scale} guides a class-conditional teacher, but the '
        'teacher was trained without labels: set --config.teacher.guidance_scale=1.')
  if not guidance_input and not teacher.config.loss.get('label_dropout'):
    raise configs.ConfigError(
        f'config.teacher.guidance_scale = {scale} needs the teacher\'s unconditional velocity, but '
        'the teacher was trained with loss.label_dropout = 0, so its null label never saw data: '
        'retrain the teacher with --config.loss.label_dropout=0.1 or set --config.teacher.guidance_scale=1.')
  return samplers.guided(velocity, teacher.num_classes, scale, guidance_input=guidance_input)
