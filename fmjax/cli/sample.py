"""--mode=sample: samples of a trained checkpoint -> WORKDIR/samples/ (.npy and .png), and the
console line that says which weights sample and steer use."""

from __future__ import annotations

import os

import jax
import numpy as np

from fmjax import api, logging_utils, plotting, train_state, trained_runs


def weights_line(config, workdir: str, ema_index: int | None = None) -> str:
  """Which parameters --mode=sample/steer (and fmjax.load's default) use, for the console."""
  decays = tuple(config.optim.ema_decays)
  if ema_index is None:
    ema_index = 0 if decays else -1
  restore_step = config.train.restore_step
  step = trained_runs.chosen_step(workdir, None if restore_step < 0 else restore_step)
  if step is None:
    return ''
  return train_state.describe_weights(decays, ema_index, step, bool(config.optim.get('ema_warmup')))


def sample_to_workdir(config, workdir: str) -> dict:
  """config.sample.num_samples (alias config.sample.num) samples with config.sample.steps
  flow-map steps -> WORKDIR/samples/."""
  restore_step = config.train.restore_step
  model = api.load(workdir, None if restore_step < 0 else restore_step)
  num = config.sample.get('num_samples', config.sample.get('num'))
  x = np.asarray(model.sample(jax.random.PRNGKey(config.seed), num,
                              steps=config.sample.steps))
  if not logging_utils.is_main_process():
    return {}
  out = os.path.join(workdir, 'samples', f'samples_{model.step}_{config.sample.steps}steps')
  os.makedirs(os.path.dirname(out), exist_ok=True)
  np.save(out + '.npy', x)
  if x.ndim == 2:
    plotting.scatter_png(out + '.png', [(f'{config.sample.steps} step(s)', x)])
  else:
    columns = int(np.ceil(np.sqrt(len(x))))
    plotting.save_png(out + '.png', plotting.image_grid(x, columns))
  print(f'wrote {out}.npy and {out}.png')
  return {'path': out + '.npy', 'step': model.step}
