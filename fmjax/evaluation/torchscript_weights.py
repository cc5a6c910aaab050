"""Read the tensors of a TorchScript archive with plain Python and numpy (no torch, no code).

A TorchScript `.pt` file is a zip archive under one top folder (`archive/`, or the module's
name, e.g. `out_jit_module/`):

  <top>/data.pkl           pickle (protocol 2) of the module tree: each submodule is a
                           `__torch__.<module path> <Class>` object whose state dict holds its
                           attributes (tensors, ints, `List[int]`, submodules)
  <top>/data/<key>         raw little-endian bytes of storage <key>
  <top>/constants.pkl      tensors used as constants by the code (an empty tuple here)
  <top>/code/__torch__/... the TorchScript source of every class (the forward passes)
  <top>/version            archive format version

Tensors appear in `data.pkl` as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, hooks)`, with `storage` a persistent id `('storage', torch.FloatStorage, key,
location, numel)` resolved against `data/<key>`.

Pickle can call any importable callable, so loading an untrusted `.pt` with `pickle` (or
`torch.load` without `weights_only`) can run arbitrary code. `_RestrictedUnpickler` admits only
the few names listed in `_ALLOWED_GLOBALS`, maps the module classes `__torch__.*` to inert stub
classes created here (nothing is imported), and raises `UnsafeArchiveError` on anything else.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

# torch storage class name -> numpy dtype (little-endian, as torch writes them).
_STORAGE_DTYPES = {
    'FloatStorage': np.dtype('<f4'),
    'DoubleStorage': np.dtype('<f8'),
    'HalfStorage': np.dtype('<f2'),
    'LongStorage': np.dtype('<i8'),
    'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'),
    'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'),
    'BoolStorage': np.dtype('?'),
}


class UnsafeArchiveError(pickle.UnpicklingError):
  """The archive asked for a global that a weights file has no reason to need."""


class _StorageType:
  """Stands in for `torch.<X>Storage`: only carries the dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class TorchModule:
  """Inert stand-in for a pickled `__torch__.*` module object.

  `type_name` is the TorchScript class name (e.g. `__torch__.inceptionv3.Conv2dLayer`);
  `attributes` the pickled state (parameters, ints, submodules), in pickled order.
  """

  type_name = '?'

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise UnsafeArchiveError(f'{self.type_name}: expected a dict state, got {type(state)}')
    self.attributes = dict(state)

  def __repr__(self):
    return f'<{self.type_name}>'


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  """numpy version of `torch._utils._rebuild_tensor_v2`: a strided view copied out."""
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return np.array(storage[storage_offset])
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  if last >= storage.size or storage_offset < 0 or min(stride) < 0:
    raise UnsafeArchiveError(f'tensor of size {size} stride {stride} offset {storage_offset} '
                             f'reads outside its storage of {storage.size} elements')
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)  # owns its memory, C-contiguous


def _build_intlist(values):
  return [int(v) for v in values]


# The only globals a weights pickle may name. Everything else raises.
_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch.jit._pickle', 'build_intlist'): _build_intlist,
    **{('torch', name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for `data.pkl` that can build tensors and module stubs and nothing else."""

  def __init__(self, file, read_record):
    super().__init__(file)
    self._read_record = read_record
    self._storages: dict[str, np.ndarray] = {}
    self._stub_classes: dict[str, type] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == '__torch__' or module.startswith('__torch__.'):
      qualname = f'{module}.{name}'
      if qualname not in self._stub_classes:
        # A fresh empty class per TorchScript class: NEWOBJ + BUILD fill it via __setstate__.
        self._stub_classes[qualname] = type(name, (TorchModule,), {'type_name': qualname})
      return self._stub_classes[qualname]
    raise UnsafeArchiveError(
        f'refusing to load global {module}.{name}: a weights archive only needs tensors and '
        'module stubs (is this file tampered with, or not a TorchScript weights file?)')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise UnsafeArchiveError(f'unexpected persistent id {pid!r}')
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise UnsafeArchiveError(f'unexpected storage type {storage_type!r}')
    key = str(key)
    if key not in self._storages:
      raw = self._read_record(f'data/{key}')
      array = np.frombuffer(raw, dtype=storage_type.dtype)
      if array.size < numel:
        raise UnsafeArchiveError(f'storage {key}: {array.size} elements, expected {numel}')
      self._storages[key] = array[:numel]
    return self._storages[key]


def _archive_root(names: list[str]) -> str:
  roots = sorted({n[:-len('data.pkl')] for n in names
                  if n.endswith('/data.pkl') and n.count('/') == 1})
  if len(roots) != 1:
    raise ValueError(f'not a TorchScript archive: expected one <top>/data.pkl, found {roots}')
  return roots[0]


def read_module(path_or_bytes) -> TorchModule:
  """The module tree of a TorchScript archive: `TorchModule` stubs with numpy tensors."""
  source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  with zipfile.ZipFile(source) as archive:
    root = _archive_root(archive.namelist())
    unpickler = _RestrictedUnpickler(
        io.BytesIO(archive.read(root + 'data.pkl')), lambda rec: archive.read(root + rec))
    module = unpickler.load()
  if not isinstance(module, TorchModule):
    raise ValueError(f'data.pkl holds a {type(module)}, not a TorchScript module')
  return module


def flatten(module: TorchModule, prefix: str = '') -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Splits a module tree into (tensors, other attributes), both keyed by dotted path.

  Bookkeeping attributes every `nn.Module` pickles (`training`, `_is_full_backward_hook`) are
  dropped; `other` keeps the rest (strides, paddings, ...), and records each module's class
  under `<path>.__class__`.
  """
  tensors, other = {}, {}
  other[(prefix + '__class__') if prefix else '__class__'] = module.type_name
  for key, value in module.attributes.items():
    if key in ('training', '_is_full_backward_hook'):
      continue
    path = prefix + key
    if isinstance(value, TorchModule):
      t, o = flatten(value, path + '.')
      tensors.update(t)
      other.update(o)
    elif isinstance(value, np.ndarray):
      tensors[path] = value
    else:
      other[path] = value
  return tensors, other


def read_tensors(path_or_bytes) -> dict[str, np.ndarray]:
  """name -> numpy array for every tensor of a TorchScript archive, e.g. `net.layers.conv.weight`."""
  return flatten(read_module(path_or_bytes))[0]


def read_code(path_or_bytes) -> dict[str, str]:
  """The TorchScript source files of an archive, keyed by path under `code/` (e.g.
  `__torch__/inceptionv3.py`). Read as text only, never executed."""
  source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  with zipfile.ZipFile(source) as archive:
    root = _archive_root(archive.namelist())
    prefix = root + 'code/'
    return {n[len(prefix):]: archive.read(n).decode('utf-8') for n in archive.namelist()
            if n.startswith(prefix) and n.endswith('.py')}
