"""What a person watches during a run: console lines, TensorBoard, metrics.jsonl (pictures:
fmjax.plotting).

Only process 0 writes (every process computes the same replicated scalars).
  console        step, steps/s, ETA and every loss term, every config.train.log_every steps
  TensorBoard    scalars and sample images under WORKDIR/tensorboard (tensorboardX: no TF)
  metrics.jsonl  one JSON line per logged step (exact float32 values: resume tests compare them)
  JSON           final few-step metrics in WORKDIR/*.json (the PNGs: fmjax.plotting)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


def is_main_process() -> bool:
  return jax.process_index() == 0


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class MetricsLogger:
  """Console + TensorBoard + metrics.jsonl; inert on processes other than 0."""

  def __init__(self, workdir: str, num_steps: int, start_step: int, *, jsonl: bool = True,
               tensorboard: bool = True, stream=None):
    self.active = is_main_process()
    self.workdir = workdir
    self.num_steps = num_steps
    self.stream = stream or sys.stdout
    self._last_time, self._last_step = time.time(), start_step
    self._jsonl = None
    self._writer = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    if jsonl:
      path = os.path.join(workdir, 'metrics.jsonl')
      drop_steps_after(path, start_step)
      self._jsonl = open(path, 'a')
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=30)

  def restart_clock(self, step: int) -> None:
    """Measures steps/s and the ETA from here (after the first update: without its compile time)."""
    self._last_time, self._last_step = time.time(), step

  def log_train(self, step: int, metrics: dict) -> None:
    """step = number of updates done; metrics are host floats of the last update."""
    if not self.active:
      return
    now = time.time()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    eta = (self.num_steps - step) / rate if rate > 0 else float('inf')
    terms = '  '.join(f'{k} {v:.4g}' for k, v in sorted(metrics.items()))
    print(f'step {step:>7d}/{self.num_steps}  {rate:7.2f} steps/s  ETA {_format_duration(eta):>7}  '
          f'{terms}', file=self.stream, flush=True)
    if self._jsonl:
      self._jsonl.write(json.dumps({'step': step, **{k: float(v) for k, v in metrics.items()}}) + '\n')
      self._jsonl.flush()
    self.scalars(step, {f'train/{k}': v for k, v in metrics.items()}, extra={'train/steps_per_s': rate})

  def scalars(self, step: int, values: dict, extra: dict | None = None) -> None:
    if not self.active or self._writer is None:
      return
    for k, v in {**values, **(extra or {})}.items():
      self._writer.add_scalar(k, float(v), step)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """An HWC uint8 image into TensorBoard."""
    if self.active and self._writer is not None:
      self._writer.add_image(tag, image, step, dataformats='HWC')

  def info(self, message: str) -> None:
    if self.active:
      print(message, file=self.stream, flush=True)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._writer is not None:
      self._writer.close()


def drop_steps_after(path: str, step: int) -> int:
  """Removes the lines of a metrics.jsonl logged after `step` (a resumed run logs them again,
  so every step appears once). Returns how many were dropped."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if line.strip() and json.loads(line)['step'] <= step]
  if len(keep) != len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)   # atomic: a kill here leaves the old or the new file
  return len(lines) - len(keep)
