"""The dataset registry (fmjax.data.datasets): a TFDS set that fmjax does not know, prepared
offline here by a minimal builder, trains by name and by folder path; arrays registered in
memory give the batches of the arrays themselves (scaled to [-1, 1], in grain's shuffled order,
labels with their images) and resume exactly; a tfrecord-only set, a wrong class count and an
unknown name each give their one message; fmjax.load of an arrays run needs no arrays."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fmjax import configs, main, sharding
from fmjax.data import datasets, pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'tiny_stripes'             # no built-in name, no TFDS catalog name
SHAPE, CLASSES, COUNT = (8, 6, 1), 3, 12


def stripes() -> tuple[np.ndarray, np.ndarray]:
  """COUNT images whose pixel rows encode their index (row 0: the index itself), class index % 3;
  one pixel of each is 255 so that the scaled maximum is exactly 1."""
  images = np.zeros((COUNT,) + SHAPE, np.uint8)
  for i in range(COUNT):
    images[i, 0] = i
    images[i, 1:] = (i * 37) % 200
    images[i, -1, -1] = 255
  return images, np.arange(COUNT) % CLASSES


def prepare_tiny_tfds(data_dir: str, name: str = NAME) -> str:
  """Prepares `name` in data_dir/name/1.0.0 (array_record) with a minimal TFDS builder."""
  import tensorflow_datasets as tfds
  images, labels = stripes()

  class TinyStripes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    code_path = None   # defined in a test: no source file or checksums for TFDS to look for

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=SHAPE, dtype=np.uint8),
          'label': tfds.features.ClassLabel(num_classes=CLASSES)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(COUNT):
        yield i, {'image': images[i], 'label': int(labels[i])}

  TinyStripes.name = name
  TinyStripes(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return os.path.join(data_dir, name, '1.0.0')


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  prepare_tiny_tfds(data_dir)
  return data_dir


def tiny_config(name, data_dir='', num_classes=CLASSES, batch_size=4, steps=2):
  c = configs.base_config()
  c.data.name, c.data.data_dir, c.data.num_classes = name, data_dir, num_classes
  c.loss.name = 'flow_matching'
  c.model_defaults.mlp.hidden, c.model_defaults.mlp.depth, c.model_defaults.mlp.time_dim = 16, 2, 8
  c.train.batch_size, c.train.num_steps, c.train.log_every = batch_size, steps, steps
  c.train.checkpoint_every = steps
  c.eval.at_end = False
  c.optim.warmup_steps = 0
  return c


def scaled(images):
  return images.astype(np.float32) / 127.5 - 1.0


def batches(source, n):
  out = [source.batch(step) for step in range(n)]
  return [{k: np.asarray(v) for k, v in b.items()} for b in out]


def test_an_unknown_tfds_set_trains_by_name_and_reads_the_same_by_path(tiny_dir, tmp_path):
  config = tiny_config(NAME, tiny_dir)
  main.run(config, str(tmp_path / 'run'), 'train')
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert rows[-1]['step'] == 2 and np.isfinite(rows[-1]['loss'])
  import fmjax
  model = fmjax.load(str(tmp_path / 'run'))
  assert model.example_shape == SHAPE and model.num_classes == CLASSES

  mesh = sharding.make_mesh()
  by_name = batches(pipelines.make_source(configs.resolve(tiny_config(NAME, tiny_dir)), mesh), 4)
  version = os.path.join(tiny_dir, NAME, '1.0.0')
  for path in (os.path.join(tiny_dir, NAME), version):       # the dataset folder or its version
    source = pipelines.make_source(configs.resolve(tiny_config(path)), mesh)
    assert source.example_shape == SHAPE and source.num_examples == COUNT
    for a, b in zip(by_name, batches(source, 4)):
      np.testing.assert_array_equal(a['x1'], b['x1'])
      np.testing.assert_array_equal(a['labels'], b['labels'])
  assert pipelines.find_prepared(version, '') == version
  assert pipelines.example_shape(tiny_config(version)) == SHAPE


def test_registered_arrays_are_the_batches_in_shuffled_order_and_resume(tmp_path):
  import grain
  images, labels = stripes()
  images, labels = images[:11], labels[:11]             # an odd size: epochs end inside batches
  datasets.register_arrays('stripes_in_memory', images, labels)
  try:
    config = configs.resolve(tiny_config('stripes_in_memory', num_classes=CLASSES))
    config.data.shuffle_seed = 5
    source = pipelines.make_source(config, sharding.make_mesh())
    assert source.example_shape == SHAPE and source.num_examples == 11
    got = batches(source, 3)
    state = json.loads(json.dumps(source.get_state()))   # as a checkpoint stores it
    later = batches(source, 3)
    # grain's order of the indices themselves: shuffled per epoch, repeated.
    order = [int(i) for i in grain.MapDataset.range(11).shuffle(seed=5).repeat(None)[:24]]
    assert sorted(order[:11]) == list(range(11)) and order[:11] != list(range(11))
    x = np.concatenate([b['x1'] for b in got + later])
    np.testing.assert_array_equal(x, scaled(images[order]))
    assert x.max() == 1.0 and x.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b['labels'] for b in got + later]), labels[order])
    # Labels follow their images: row 0 of an image holds its index, the label is index % 3.
    index = np.rint((x[:, 0, 0, 0] + 1.0) * 127.5).astype(int)
    np.testing.assert_array_equal(np.concatenate([b['labels'] for b in got + later]), index % CLASSES)

    resumed = pipelines.make_source(config, sharding.make_mesh())
    resumed.set_state(state)
    for expected, actual in zip(later, batches(resumed, 3)):
      np.testing.assert_array_equal(expected['x1'], actual['x1'])
      np.testing.assert_array_equal(expected['labels'], actual['labels'])
  finally:
    datasets.unregister('stripes_in_memory')


def test_float_arrays_pass_through_and_bad_arrays_say_what_to_pass():
  floats = np.linspace(-1, 1, 3 * 4 * 4 * 3, dtype=np.float32).reshape(3, 4, 4, 3)
  datasets.register_arrays('floats_in_memory', floats)
  try:
    source = pipelines.make_source(configs.resolve(tiny_config('floats_in_memory', num_classes=0,
                                                               batch_size=3)),
                                   sharding.make_mesh())
    x = np.asarray(source.batch(0)['x1'])
    assert sorted(map(tuple, x.reshape(3, -1))) == sorted(map(tuple, floats.reshape(3, -1)))
  finally:
    datasets.unregister('floats_in_memory')
  for images, labels, message in ((np.zeros((4, 8, 8), np.uint8), None, r'\[N, H, W, C\]'),
                                  (np.full((2, 4, 4, 1), 2.0), None, r'\[-1, 1\]'),
                                  (np.zeros((2, 4, 4, 1), np.int64), None, 'astype'),
                                  (np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, int), 'labels')):
    with pytest.raises(ValueError, match=message):
      datasets.register_arrays('bad', images, labels)
  with pytest.raises(ValueError, match='choose another name'):
    datasets.register_arrays('mnist5k', np.zeros((2, 4, 4, 1), np.uint8))


def test_a_custom_source_trains_through_the_same_pipeline():
  class Squares:
    num_classes = 2

    def __len__(self):
      return 5

    def __getitem__(self, i):
      return {'image': np.full((2, 2, 1), 50 * i, np.uint8), 'label': i % 2}

  datasets.register_dataset('squares', lambda split: Squares())
  try:
    source = pipelines.make_source(configs.resolve(tiny_config('squares', num_classes=2, batch_size=5)),
                                   sharding.make_mesh())
    b = source.batch(0)
    values = np.rint((np.asarray(b['x1'])[:, 0, 0, 0] + 1) * 127.5).astype(int)
    assert sorted(values) == [0, 50, 100, 150, 200]
    np.testing.assert_array_equal(np.asarray(b['labels']), (values // 50) % 2)
  finally:
    datasets.unregister('squares')


def test_a_tfrecord_only_set_says_how_to_reprepare(tiny_dir, tmp_path):
  version = prepare_tiny_tfds(str(tmp_path), 'tiny_tfrecord')
  info_path = os.path.join(version, 'dataset_info.json')
  info = json.load(open(info_path))
  info['fileFormat'] = 'tfrecord'                 # as TFDS's default format records it
  json.dump(info, open(info_path, 'w'))
  with pytest.raises(datasets.DatasetError) as err:
    pipelines.make_source(configs.resolve(tiny_config('tiny_tfrecord', str(tmp_path))),
                          sharding.make_mesh())
  assert "file_format='array_record'" in str(err.value) and 'tiny_tfrecord' in str(err.value)
  assert 'download_and_prepare' in str(err.value)


def test_a_class_count_that_disagrees_with_the_labels_is_one_error(tiny_dir):
  mesh = sharding.make_mesh()
  with pytest.raises(datasets.DatasetError, match=r'has 3 classes.*num_classes=3'):
    pipelines.make_source(configs.resolve(tiny_config(NAME, tiny_dir, num_classes=5)), mesh)
  datasets.register_arrays('unlabelled', np.zeros((3, 4, 4, 1), np.uint8))
  try:
    with pytest.raises(datasets.DatasetError, match="no 'label'"):
      pipelines.make_source(configs.resolve(tiny_config('unlabelled', num_classes=2)), mesh)
  finally:
    datasets.unregister('unlabelled')


def test_unknown_and_unprepared_names_say_what_exists_and_how_to_prepare(tmp_path):
  datasets.register_arrays('my_arrays', np.zeros((2, 4, 4, 1), np.uint8))
  try:
    with pytest.raises(configs.ConfigError) as err:
      configs.resolve(tiny_config('no_such_set', str(tmp_path)))
    assert "config.data.name = 'no_such_set'" in str(err.value) and 'my_arrays' in str(err.value)
  finally:
    datasets.unregister('my_arrays')
  with pytest.raises(configs.ConfigError, match='no prepared dataset at'):
    configs.resolve(tiny_config(str(tmp_path / 'missing')))
  # A TFDS catalog name passes the config check; opening it says how to prepare it, no download.
  config = configs.resolve(tiny_config('fashion_mnist', str(tmp_path), num_classes=0))
  with pytest.raises(pipelines.DatasetNotFoundError) as err:
    pipelines.make_source(config, sharding.make_mesh())
  assert ("tfds.builder('fashion_mnist'" in str(err.value) and "file_format='array_record'" in str(err.value)
          and 'not prepared' in str(err.value))


LOAD_IN_FRESH_PROCESS = """
import sys, jax, numpy as np, fmjax
from fmjax.data import datasets
assert 'stripes_run' not in datasets.registered_names()
model = fmjax.load(sys.argv[1])
x = model.sample(jax.random.PRNGKey(0), 3, steps=1, labels=np.array([0, 1, 2]))
print(tuple(x.shape), model.num_classes, bool(np.all(np.isfinite(x))))
"""


def test_a_run_on_registered_arrays_loads_without_them(tmp_path):
  images, labels = stripes()
  datasets.register_arrays('stripes_run', images[:9], labels[:9])
  try:
    main.run(tiny_config('stripes_run'), str(tmp_path / 'run'), 'train')
  finally:
    datasets.unregister('stripes_run')
  from train_testlib import env_with_devices
  result = subprocess.run([sys.executable, '-c', LOAD_IN_FRESH_PROCESS, str(tmp_path / 'run')],
                          env=env_with_devices(1), capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == f'{(3,) + SHAPE} {CLASSES} True'
