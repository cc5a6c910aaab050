"""Deferred FID: a sweep's samples written as ADM-layout sample batches, scored elsewhere.

With `config.eval.fid_features = 'deferred'` the few-step sweep (`sweep.image_sweep`) computes
no Inception features; `SampleBatchWriter` keeps every sampler's finite samples as the uint8
RGB images the feature network would have seen, and writes one `.npz` per sampler in the
layout of the ADM evaluator's sample batches (Dhariwal & Nichol 2021, arXiv 2105.05233,
`evaluations/evaluator.py`): `arr_0` uint8 [N, H, W, 3], `arr_1` the requested labels, plus
`fmjax_sample_info` (a JSON string: the sampler, NFE and the FID provenance of the samples,
e.g. the autoencoder that decoded them). Use it where the accelerator cannot hold or reach the
Inception weights; score the files where they are:

  python -m fmjax.evaluation.reference_batches REF.npz WORKDIR/eval_images/step_N/*.npz

Each process writes its own rows (`.process<i>` before `.npz` when there are several); a
sampler's images stay in host memory until its file is written (5,000 MNIST digits: 12 MB;
50,000 ImageNet 256 images: 9.8 GB, so give such a host the memory or fewer samples).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

ADM_LABELS = 'arr_1'
INFO_KEY = 'fmjax_sample_info'


def file_name(spec) -> str:
  """'flow_map_4_steps' | 'ode_heun_16_nfe' (a `sweep_samplers.SamplerSpec`)."""
  if spec.family == 'flow_map':
    return f'flow_map_{spec.steps}_steps'
  return f'ode_{spec.method or "ode"}_{spec.nfe}_nfe'


class SampleBatchWriter:
  """`image_sink` of `sweep.image_sweep`: collects (spec, uint8 images, labels) batches and
  writes one ADM-layout sample batch per sampler to `folder` when the sweep moves on."""

  def __init__(self, folder: str, provenance: dict | None = None):
    self.folder = folder
    self.provenance = dict(provenance or {})
    self.paths: list[str] = []
    self._spec, self._images, self._labels = None, [], []

  def __call__(self, spec, images: np.ndarray, labels: np.ndarray | None) -> None:
    if spec != self._spec:
      self.flush()
      self._spec = spec
    self._images.append(np.asarray(images, np.uint8))
    if labels is not None:
      self._labels.append(np.asarray(labels, np.int32))

  def flush(self) -> None:
    """Writes the current sampler's file (nothing when no sampler is pending)."""
    if self._spec is None:
      return
    spec, images, labels = self._spec, self._images, self._labels
    self._spec, self._images, self._labels = None, [], []
    os.makedirs(self.folder, exist_ok=True)
    suffix = f'.process{jax.process_index()}' if jax.process_count() > 1 else ''
    path = os.path.join(self.folder, file_name(spec) + suffix + '.npz')
    arrays = {'arr_0': np.concatenate(images) if images else np.zeros((0, 1, 1, 3), np.uint8)}
    if labels:
      arrays[ADM_LABELS] = np.concatenate(labels)
    info = {'sampler': spec.label, 'family': spec.family, 'steps': spec.steps, 'nfe': spec.nfe,
            'method': spec.method, 'provenance': self.provenance}
    # Written under a temporary name, then renamed: a file that exists is whole.
    partial = path + '.partial'
    with open(partial, 'wb') as f:
      np.savez_compressed(f, **arrays, **{INFO_KEY: np.array(json.dumps(info))})
    os.replace(partial, path)
    self.paths.append(path)

  close = flush


def read_info(path: str) -> dict:
  """The `fmjax_sample_info` of a sample batch written here ({} for other ADM batches)."""
  with np.load(path, allow_pickle=False) as data:
    return json.loads(str(data[INFO_KEY])) if INFO_KEY in data.files else {}
