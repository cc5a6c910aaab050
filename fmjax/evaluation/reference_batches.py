"""Reference statistics in the three `.npz` layouts FID numbers in papers are computed against.

| layout | keys | written by |
| --- | --- | --- |
| `fmjax` | `mu` [2048] float64, `sigma` [2048, 2048] float64, `provenance` (JSON string) | `fid.save_statistics` |
| `adm` | `arr_0` uint8 [N, H, W, 3] images (NHWC, RGB, [0, 255]); optionally `mu`, `sigma` (pool3) and `mu_s`, `sigma_s` (sFID's spatial features); sample batches may add `arr_1` labels | the ADM evaluator's reference batches (Dhariwal & Nichol 2021, arXiv 2105.05233, `evaluations/evaluator.py`; e.g. `VIRTUAL_imagenet256_labeled.npz`) |
| `ttur` | `mu`, `sigma` only | the TTUR code's `fid_stats_*.npz` (Heusel et al. 2017) |

What the ADM evaluator does with a reference batch, and fmjax likewise: pool3 activations of
every `arr_0` image (precision/recall need them), FID against the file's `mu`/`sigma` when
present, else against statistics of those activations (mean, `np.cov`, ddof = 1). Its images
go into the graph as floats in [0, 255]; the graph resizes them (TF1 bilinear) to 299x299, which
is `inception.features`. fmjax does not compute sFID (`mu_s`, `sigma_s`: the first 7 channels of
`mixed_6/conv` at 17x17; the port's tap point for that tensor is not checked), and reads those
keys only to report that they are there.

Statistics from the ADM and TTUR files were computed by TensorFlow running the 2015 graph
(`classify_image_graph_def.pb`), fmjax's by the port of that graph (`inception.py`; 3e-5 from
the TorchScript conversion of the same graph, docs/evaluation.md; not compared with TensorFlow
itself here). `fid.fid` treats the two extractor ids as the same network (`fid.SAME_NETWORK`).

`arr_0` is streamed from the zip member in batches (a 10k x 256 x 256 x 3 batch is 2 GB), as the
ADM evaluator does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import zipfile
from typing import Iterator

import numpy as np

from fmjax.evaluation import fid, resize

LAYOUTS = ('fmjax', 'adm', 'ttur')
ADM_IMAGES = 'arr_0'


@dataclasses.dataclass
class Reference:
  """A reference file: its layout, the statistics it holds (or None), its images (if any)."""
  path: str
  layout: str
  stats: fid.Statistics | None
  num_images: int
  image_shape: tuple[int, ...]
  keys: tuple[str, ...]

  def image_batches(self, batch_size: int, num_images: int | None = None) -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of the first `num_images` (default all) `arr_0` images."""
    if self.num_images == 0:
      raise ValueError(f'{self.path} holds no images ({self.layout} layout: {self.keys}); '
                       'precision/recall need the reference images (an ADM reference batch)')
    total = self.num_images if num_images is None else min(num_images, self.num_images)
    with _open_member(self.path, ADM_IMAGES) as (f, shape, dtype):
      per_image = int(np.prod(shape[1:])) * dtype.itemsize
      for start in range(0, total, batch_size):
        b = min(batch_size, total - start)
        data = f.read(b * per_image)
        if len(data) != b * per_image:
          raise ValueError(f'{self.path}: {ADM_IMAGES} ends early ({start} images read)')
        yield np.frombuffer(data, dtype).reshape((b,) + tuple(shape[1:]))


@contextlib.contextmanager
def _open_member(path: str, key: str):
  """The open `.npy` member `key` of an npz, positioned at its data, with (shape, dtype)."""
  with zipfile.ZipFile(path) as archive:
    with archive.open(f'{key}.npy') as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise ValueError(f'{path}: unsupported .npy version {version} for {key}')
      if fortran or dtype.hasobject:
        raise ValueError(f'{path}: {key} is Fortran-ordered or has objects; save it with '
                         'np.savez(path, arr_0=np.ascontiguousarray(images))')
      yield f, shape, dtype


def _member_header(path: str, key: str):
  with _open_member(path, key) as (_, shape, dtype):
    return tuple(shape), dtype


def read_reference(path: str) -> Reference:
  """Detects the layout of `path` and reads its statistics (not its images: see `image_batches`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no reference file {path}')
  with zipfile.ZipFile(path) as archive:
    keys = tuple(sorted(n[:-4] for n in archive.namelist() if n.endswith('.npy')))
  num_images, image_shape = 0, ()
  if ADM_IMAGES in keys:
    image_shape, dtype = _member_header(path, ADM_IMAGES)
    if dtype != np.uint8 or len(image_shape) != 4 or image_shape[-1] != 3:
      raise ValueError(f'{path}: {ADM_IMAGES} is {dtype} {image_shape}; an ADM batch holds uint8 '
                       'RGB images [N, H, W, 3] (quantize samples with resize.to_uint8)')
    num_images = image_shape[0]
  if 'provenance' in keys:
    layout = 'fmjax'
    stats = fid.load_statistics(path)
  elif ADM_IMAGES in keys:
    layout = 'adm'
    stats = None
    if 'mu' in keys:
      with np.load(path, allow_pickle=False) as data:
        mu, sigma = data['mu'], data['sigma']
      stats = fid.Statistics(mu, sigma, {
          'dataset': os.path.basename(path), 'split': 'adm_reference_batch',
          'count': num_images, 'resize': resize.RESIZE_MODE,
          'feature_extractor': fid.TF_GRAPH_EXTRACTOR_ID, **_adm_crop(image_shape)})
  elif 'mu' in keys and 'sigma' in keys:
    layout = 'ttur'
    with np.load(path, allow_pickle=False) as data:
      mu, sigma = data['mu'], data['sigma']
    stats = fid.Statistics(mu, sigma, {
        'dataset': os.path.basename(path), 'split': 'ttur_stats', 'count': -1,
        'resize': resize.RESIZE_MODE, 'feature_extractor': fid.TF_GRAPH_EXTRACTOR_ID})
  else:
    raise ValueError(f'{path}: keys {keys} match no reference layout: expected mu/sigma '
                     f'(+ provenance), or ADM images {ADM_IMAGES}')
  if stats is not None and stats.mu.shape != (stats.sigma.shape[0],):
    raise ValueError(f'{path}: mu {stats.mu.shape} and sigma {stats.sigma.shape} do not match')
  return Reference(path, layout, stats, num_images, image_shape, keys)


def reference_features(ref: Reference, feature_fn, *, batch_size: int = 200,
                       num_images: int | None = None) -> np.ndarray:
  """Features [N, d] of the reference images; `feature_fn` takes uint8 [b, H, W, 3] (e.g. a
  `fid.FeatureExtractor` with local batch >= batch_size)."""
  return np.concatenate([np.asarray(feature_fn(b), np.float64)
                         for b in ref.image_batches(batch_size, num_images)])


def reference_statistics(ref: Reference, features: np.ndarray | None = None) -> fid.Statistics:
  """The file's statistics when it has them (as the ADM evaluator), else those of `features`."""
  if ref.stats is not None:
    return ref.stats
  if features is None:
    raise ValueError(f'{ref.path} has no mu/sigma: pass the features of its images '
                     '(reference_features)')
  return fid.statistics(features, dataset=os.path.basename(ref.path), split='adm_reference_batch',
                        resize=resize.RESIZE_MODE, feature_extractor=fid.extractor_id(),
                        **_adm_crop(ref.image_shape))


def _adm_crop(image_shape) -> dict:
  """ADM's reference batches hold ADM center crops (`center_crop_arr`) of square size H."""
  from fmjax.data import image_folder   # pylint: disable=import-outside-toplevel
  if len(image_shape) == 4 and image_shape[1] == image_shape[2]:
    return {'crop': image_folder.crop_name(int(image_shape[1]))}
  return {}


def describe(ref: Reference) -> str:
  return json.dumps({'path': ref.path, 'layout': ref.layout, 'keys': list(ref.keys),
                     'num_images': ref.num_images, 'image_shape': list(ref.image_shape),
                     'has_stats': ref.stats is not None})


def evaluate_batches(reference_path: str, sample_path: str, feature_fn, *, batch_size: int = 200,
                     k: int = 3) -> dict:
  """The ADM evaluator's FID, precision and recall for a sample batch against a reference.

  The sample batch in the ADM layout (`arr_0` uint8 images). The reference in any layout: an
  ADM batch with images (FID against its `mu`/`sigma` when it has them, precision and recall
  against its images' features), or statistics only (fmjax, TTUR: FID alone).
  `feature_fn`: uint8 [b, H, W, 3] -> [b, 2048] (a `fid.FeatureExtractor`).
  No Inception Score: fmjax's weights end at pool3 (`inception_score`).
  """
  ref = read_reference(reference_path)
  ref_features = (reference_features(ref, feature_fn, batch_size=batch_size)
                  if ref.num_images else None)
  return score_sample_batch(ref, ref_features, sample_path, feature_fn, batch_size=batch_size, k=k)


def read_sample_batch(path: str) -> Reference:
  """`read_reference` of a sample batch, which must hold images."""
  sample = read_reference(path)
  if not sample.num_images:
    raise ValueError(f'{path} holds no images ({sample.layout} layout: {sample.keys}); a '
                     f'sample batch holds uint8 RGB images in {ADM_IMAGES}')
  return sample


def score_sample_batch(ref: Reference, ref_features: np.ndarray | None, sample_path: str, feature_fn,
                       *, batch_size: int = 200, k: int = 3) -> dict:
  """`evaluate_batches` with the reference read (and its features computed) once, for scoring
  many sample batches (e.g. a deferred sweep's, `sample_batches`) against it."""
  from fmjax.evaluation import precision_recall  # pylint: disable=import-outside-toplevel
  from fmjax.evaluation import sample_batches  # pylint: disable=import-outside-toplevel
  sample = read_sample_batch(sample_path)
  info = sample_batches.read_info(sample_path)
  sample_features = reference_features(sample, feature_fn, batch_size=batch_size)
  ref_stats = reference_statistics(ref, ref_features)
  # A deferred sweep's batch records its own provenance (resize, extractor, autoencoder, crop),
  # which fid.fid checks against the reference's.
  provenance = {'dataset': os.path.basename(sample_path), 'split': 'samples',
                'resize': resize.RESIZE_MODE,
                'feature_extractor': ref_stats.provenance.get('feature_extractor'),
                **info.get('provenance', {})}
  sample_stats = fid.statistics(sample_features, **provenance)
  row = {'samples': sample_path, 'fid': fid.fid(sample_stats, ref_stats),
         'num_reference': ref.num_images if ref.num_images else ref_stats.provenance.get('count'),
         'num_samples': sample.num_images,
         'fid_reference_stats': 'file mu/sigma' if ref.stats is not None else 'arr_0 features'}
  if info:
    row.update(sampler=info.get('sampler'), nfe=info.get('nfe'), steps=info.get('steps'))
  if ref_features is not None:
    pr = precision_recall.precision_recall(ref_features, sample_features, k)
    row.update(precision=pr['precision'], recall=pr['recall'], k=k)
  return row


def main(argv=None):
  """python -m fmjax.evaluation.reference_batches REF.npz SAMPLES.npz [SAMPLES2.npz ...]"""
  import argparse  # pylint: disable=import-outside-toplevel
  from fmjax.evaluation import inception  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description='FID (and, against a reference batch with images, '
                                   'precision and recall) of ADM-layout sample batches, e.g. those '
                                   "a sweep with config.eval.fid_features='deferred' wrote (no IS: "
                                   'see docs)')
  parser.add_argument('reference', help='reference: an ADM batch, fmjax reference_stats or TTUR stats')
  parser.add_argument('samples', nargs='+', help='ADM-layout sample batches (arr_0 uint8 images)')
  parser.add_argument('--batch_size', type=int, default=200)
  parser.add_argument('--weights', default=None, help='Inception checkpoint (default: the cache)')
  parser.add_argument('--out', default='', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  # Layout errors (and missing files) before loading the network.
  ref = read_reference(args.reference)
  print(describe(ref))
  for path in args.samples:
    try:
      read_sample_batch(path)
    except ValueError as e:
      parser.error(str(e))
  extractor = fid.FeatureExtractor(inception.load_params(args.weights), batch_size=args.batch_size)
  ref_features = reference_features(ref, extractor, batch_size=args.batch_size) if ref.num_images else None
  rows = []
  for path in args.samples:
    rows.append(score_sample_batch(ref, ref_features, path, extractor, batch_size=args.batch_size))
    print(json.dumps(rows[-1]), flush=True)
    if args.out:   # rewritten after each batch: a long CPU scoring run keeps what it finished
      with open(args.out, 'w') as f:
        json.dump(rows, f, indent=1)
  return rows


if __name__ == '__main__':
  main()
