"""Tests of preprocessing, sources (TFDS mocked, arrays) and batch order."""

import itertools
import os
import threading

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from synqt_jax import errors
from synqt_jax.data import batching
from synqt_jax.data import data_config
from synqt_jax.data import prefetcher
from synqt_jax.data import preprocess
from synqt_jax.data import sources
from synqt_jax.data import tasks


# Preprocessing.


def test_imagenet_normalization_by_hand():
  pixels = np.array([[[0, 0, 0], [255, 255, 255], [10, 128, 200]]], np.uint8)
  expected = [[[-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
               [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225],
               [(10 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224,
                (200 / 255 - 0.406) / 0.225]]]
  normalized = preprocess.normalize(pixels, 'imagenet')
  assert normalized.dtype == np.float32
  np.testing.assert_allclose(normalized, expected, rtol=1e-6)
  np.testing.assert_allclose(normalized[0, 0], [-2.1179039, -2.0357141,
                                                -1.8044444], rtol=1e-6)


def test_inception_normalization():
  pixels = np.array([0, 128, 255], np.uint8)
  np.testing.assert_allclose(preprocess.normalize(pixels, 'inception'),
                             [-1., 0.5 / 127.5, 1.], rtol=1e-6)


def test_resize_is_pil_bicubic_straight_to_square():
  pixels = np.random.default_rng(0).integers(0, 256, (20, 37, 3), np.uint8)
  expected = np.asarray(Image.fromarray(pixels).resize((16, 16),
                                                       Image.BICUBIC))
  np.testing.assert_array_equal(preprocess.resize(pixels, 16), expected)
  np.testing.assert_array_equal(
      preprocess.resize(Image.fromarray(pixels), 16), expected)
  constant = np.full((5, 7, 3), 77, np.uint8)
  np.testing.assert_array_equal(preprocess.resize(constant, 9), 77)


@pytest.mark.parametrize('shape', [(20, 37), (20, 37, 1)])
def test_resize_tiles_grayscale(shape):
  gray = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
  expected = np.asarray(Image.fromarray(gray.reshape(20, 37)).convert('RGB')
                        .resize((16, 16), Image.BICUBIC))
  resized = preprocess.resize(gray, 16)
  assert resized.shape == (16, 16, 3)
  np.testing.assert_array_equal(resized, expected)


# Array sources.


def test_array_source_resizes_and_tiles():
  gray = np.random.default_rng(2).integers(0, 256, (3, 10, 12), np.uint8)
  source = sources.ArraySource(gray, [0, 1, 2], 3, image_size=8)
  image, label = source[1]
  assert (len(source), source.image_size, label) == (3, 8, 1)
  np.testing.assert_array_equal(image, preprocess.resize(gray[1], 8))


@pytest.mark.parametrize('images, labels, error, match', [
    (np.zeros((2, 4, 4, 3), np.float32), [0, 1], ValueError, 'uint8'),
    (np.zeros((2, 4, 4, 3), np.uint8), [0], ValueError, 'labels'),
    (np.zeros((2, 4, 5, 3), np.uint8), [0, 1], ValueError, 'not square'),
    (np.zeros((2, 4, 4, 3), np.uint8), [0, 5], tasks.LabelOutOfRangeError,
     r'arrays labels\[1\]: label 5 .*0\.\.2'),
])
def test_array_source_rejects_bad_input(images, labels, error, match):
  with pytest.raises(error, match=match):
    sources.ArraySource(images, np.array(labels), 3)


# Batch order.


def index_source(n, size=4):
  """Example i has label i and all pixels i, so batches show their indices."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, size, size, 3))
  return sources.ArraySource(images, np.arange(n), n)


def train(source, batch=4, steps=9, **kwargs):
  kwargs.setdefault('local_device_count', 1)
  kwargs.setdefault('process_count', 1)
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('seed', 0)
  return list(batching.train_batches(source, batch, num_steps=steps,
                                     **kwargs))


def assert_same(batches, other_batches):
  assert len(batches) == len(other_batches)
  for batch, other in zip(batches, other_batches):
    assert batch.keys() == other.keys()
    for key in batch:
      np.testing.assert_array_equal(batch[key], other[key])


def test_order_is_the_documented_function_of_seed_and_step():
  for step in range(7):
    epoch, batch = divmod(step, 3)
    order = np.random.default_rng([5, epoch]).permutation(10)
    expected = list(order[batch * 4:batch * 4 + 4])
    expected += [-1] * (4 - len(expected))
    np.testing.assert_array_equal(
        batching.train_indices(10, 4, seed=5, step=step), expected)


def test_same_seed_same_batches_other_seed_other_batches():
  source = index_source(10)
  assert_same(train(source, seed=1), train(source, seed=1))
  labels = [b['label'].tolist() for b in train(source, seed=1)]
  assert labels != [b['label'].tolist() for b in train(source, seed=2)]


@pytest.mark.parametrize('start', [1, 3, 4, 8])
def test_resuming_at_a_step_continues_the_stream(start):
  source = index_source(10)
  uninterrupted = train(source, seed=7, steps=12)
  resumed = train(source, seed=7, steps=12 - start, start_step=start)
  assert_same(resumed, uninterrupted[start:])


def test_every_example_once_per_epoch_and_padded_last_batch():
  source = index_source(10)
  batches = train(source, steps=9)   # 3 epochs of 3 steps.
  orders = []
  for epoch in range(3):
    epoch_batches = batches[3 * epoch:3 * epoch + 3]
    masks = [b['mask'].reshape(-1).tolist() for b in epoch_batches]
    assert masks == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
    labels = np.concatenate([b['label'].reshape(-1)[b['mask'].reshape(-1) > 0]
                             for b in epoch_batches])
    assert sorted(labels) == list(range(10))
    orders.append(labels.tolist())
  assert orders[0] != orders[1] != orders[2]
  last = batches[2]
  np.testing.assert_array_equal(last['label'].reshape(-1)[2:], 0)
  for batch in batches:   # Pixels hold the example's index; padding is 0.
    pixels = np.repeat(batch['label'].astype(np.uint8)[..., None], 3, -1)
    np.testing.assert_array_equal(batch['image'][:, :, 0, 0],
                                  preprocess.normalize(pixels, 'imagenet'))


def test_batch_shapes_and_dtypes_with_jax_defaults():
  batch = next(batching.train_batches(index_source(10, size=6), 4,
                                      seed=0, normalization='inception'))
  assert batch['image'].shape == (1, 4, 6, 6, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (1, 4) and batch['label'].dtype == np.int32
  assert batch['mask'].shape == (1, 4) and batch['mask'].dtype == np.float32


def test_eval_counts_every_example_once_in_order():
  source = index_source(10)
  batches = list(batching.eval_batches(source, 4, local_device_count=2,
                                       process_count=1, process_index=0))
  assert len(batches) == batching.steps_per_epoch(10, 4) == 3
  assert batches[0]['label'].shape == (2, 2)
  masks = np.concatenate([b['mask'].reshape(-1) for b in batches])
  labels = np.concatenate([b['label'].reshape(-1) for b in batches])
  assert masks.tolist() == [1] * 10 + [0] * 2
  assert labels[masks > 0].tolist() == list(range(10))


@pytest.mark.parametrize('stream', ['train', 'eval'])
def test_hosts_slices_make_up_the_global_batch(stream):
  source = index_source(13)

  def batches(**kwargs):
    if stream == 'train':
      return train(source, batch=8, steps=5, seed=3, **kwargs)
    return list(batching.eval_batches(source, 8, **kwargs))

  def flat(batch):
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}

  single = batches(process_count=1, process_index=0, local_device_count=1)
  hosts = [batches(process_count=2, process_index=i, local_device_count=2)
           for i in range(2)]
  assert hosts[0][0]['image'].shape == (2, 2, 4, 4, 3)
  for step, global_batch in enumerate(single):
    joined = {k: np.concatenate([flat(h[step])[k] for h in hosts])
              for k in global_batch}
    assert_same([joined], [flat(global_batch)])


def test_batch_must_split_over_hosts_and_devices():
  with pytest.raises(ValueError, match='Global batch 6 .* 2 processes x 2'):
    batching.train_batches(index_source(10), 6, seed=0, process_count=2,
                           process_index=0, local_device_count=2)


def test_bad_seed():
  with pytest.raises(ValueError, match='seed=-1'):
    batching.train_batches(index_source(10), 4, seed=-1)


def test_abandoned_stream_stops_its_thread():
  before = threading.active_count()
  stream = batching.train_batches(index_source(10), 2, seed=0,
                                  local_device_count=1)
  assert len(list(itertools.islice(stream, 3))) == 3
  stream.close()
  assert threading.active_count() == before


# Data config.


@pytest.mark.parametrize('overrides, field', [
    ({'source': 'gcs'}, 'data.source'),
    ({'task': 'imagenet'}, 'data.task'),
    ({'task': 'cub'}, 'data.source'),
    ({'source': 'folder', 'root': None}, 'data.root'),
    ({'image_size': 0}, 'data.image_size'),
    ({'image_size': 224.0}, 'data.image_size'),
    ({'normalization': 'vit'}, 'data.normalization'),
    ({'train_split': 'train'}, 'data.train_split'),
    ({'test_split': ''}, 'data.test_split'),
    ({'val_split': 'validation'}, 'data.val_split'),
])
def test_validate_data_config_names_the_field(overrides, field):
  config = data_config.default_data_config(**overrides)
  with pytest.raises(errors.DataConfigError, match=field):
    data_config.validate_data_config(config)


def test_validate_data_config_accepts_good_configs():
  data_config.validate_data_config(data_config.default_data_config())
  data_config.validate_data_config(data_config.default_data_config(
      task='StanfordCars', source='folder', root='/data/cars',
      train_split='train+val', val_split=None, normalization='inception'))
  config = data_config.default_data_config()
  del config['image_size']
  with pytest.raises(errors.DataConfigError,
                     match='data.image_size is missing'):
    data_config.validate_data_config(config)


# TFDS, mocked.


def image(seed, shape=(20, 30, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


# Scenes whose labels are known: (example, {task: label}).
CLEVR_SCENES = [
    ({'image': image(n), 'objects': {
        'size': np.zeros(n, np.int64),
        'pixel_coords': np.array([[5., 5., 12.]] * (n - 1) + [[5., 5., d]],
                                 np.float32)}},
     {'clevr_count': n - 3, 'clevr_dist': dist})
    for n, d, dist in [(3, 7., 0), (4, 8.2, 1), (5, 8.7, 2), (6, 9.2, 3),
                       (7, 9.7, 4), (8, 11., 5), (9, 8., 0), (10, 9., 2)]]
KITTI_SCENES = [
    ({'image': image(i), 'objects': {
        'type': np.array(types, np.int64),
        'location': np.array([[0., 1., z] for z in depths],
                             np.float32).reshape(-1, 3)}},
     {'kitti_dist': label})
    for i, (types, depths, label) in enumerate([
        ([], [], 3), ([3, 5], [4., 6.], 3), ([0], [5.], 0),
        ([1, 3], [15., 2.], 1),
        ([2], [30.], 2), ([7, 0], [1., 8.], 0)])]
DSPRITES_SCENES = [
    ({'image': image(i, (64, 64, 1)) % 2, 'label_x_position': x,
      'label_orientation': orientation},
     {'dsprites_loc': location, 'dsprites_ori': orientation_bin})
    for i, (x, location, orientation, orientation_bin) in enumerate([
        (0, 0, 0, 0), (1, 0, 4, 1), (2, 1, 5, 2), (31, 15, 39, 15),
        (17, 8, 20, 8)])]
SCENES = {'clevr_count': CLEVR_SCENES, 'clevr_dist': CLEVR_SCENES,
          'kitti_dist': KITTI_SCENES, 'dsprites_loc': DSPRITES_SCENES,
          'dsprites_ori': DSPRITES_SCENES}
NUM_MOCK_EXAMPLES = 5


def mock_tfds(task_name):
  """TFDS mocked: random examples, or known scenes for derived labels."""
  scenes = SCENES.get(task_name)
  as_data_source_fn = None
  if scenes:
    def as_data_source_fn(builder, split, **kwargs):
      del builder, split, kwargs
      return [example for example, _ in scenes]
  return tfds.testing.mock_data(
      num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE,
      as_data_source_fn=as_data_source_fn)


@pytest.mark.parametrize('task_name', tasks.VTAB_TASKS)
def test_every_vtab_task_through_mocked_tfds(task_name, tmp_path):
  task = tasks.get_task(task_name)
  size = 64 if task_name.startswith('dsprites') else 24
  config = data_config.default_data_config(
      task=task_name, root=str(tmp_path), image_size=size)
  scenes = SCENES.get(task_name)
  with mock_tfds(task_name):
    for split in tasks.VTAB_SPLITS:
      source = data_config.load_source(config, split,
                                       in_memory=split == 'train800val200')
      assert source.num_classes == task.num_classes
      assert len(source) == (len(scenes) if scenes else NUM_MOCK_EXAMPLES)
      examples = [source[i] for i in range(len(source))]
      for image_, label in examples:
        assert image_.shape == (size, size, 3) and image_.dtype == np.uint8
        assert 0 <= label < task.num_classes
      if scenes:
        assert [label for _, label in examples] == [
            labels[task_name] for _, labels in scenes]
      if task_name.startswith(('dsprites', 'smallnorb')):   # Grayscale.
        for image_, _ in examples:
          assert (image_ == image_[..., :1]).all()
      if task_name.startswith('dsprites'):   # Native size: no resampling.
        assert set(np.unique([i for i, _ in examples])) == {0, 255}
    batch = next(batching.eval_batches(source, 4, local_device_count=2))
  assert batch['image'].shape == (2, 2, size, size, 3)
  assert batch['image'].dtype == np.float32


def test_unknown_tfds_split(tmp_path):
  config = data_config.default_data_config(root=str(tmp_path))
  with pytest.raises(errors.DataConfigError, match="'validation'"):
    data_config.load_source(config, 'validation')


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  config = data_config.default_data_config(task='dtd', root=str(tmp_path))
  with pytest.raises(sources.TfdsNotPreparedError) as error:
    data_config.load_source(config, 'test')
  message = str(error.value)
  assert f'dtd:3.0.1 (task \'dtd\') is not prepared in data_dir {tmp_path}' in (
      message)
  assert (f'tfds build dtd:3.0.1 --data_dir={tmp_path} '
          '--file_format=array_record') in message
  assert (f"tfds.builder('dtd:3.0.1', data_dir='{tmp_path}', "
          "file_format='array_record').download_and_prepare()") in message
  assert isinstance(error.value, FileNotFoundError)


@pytest.mark.parametrize('task_name, needs', [
    ('resisc45', ['NWPU-RESISC45.rar', 'NWPU-RESISC45/<class name>/*.jpg']),
    ('diabetic_retinopathy', ['kaggle', '7z x train.zip.001',
                              'opencv-python-headless']),
])
def test_manual_download_steps(task_name, needs, tmp_path):
  config = data_config.default_data_config(task=task_name,
                                           root=str(tmp_path))
  with pytest.raises(sources.TfdsNotPreparedError) as error:
    data_config.load_source(config, 'train800val200')
  message = str(error.value)
  assert 'Manual download' in message
  assert os.path.join(tmp_path, 'downloads', 'manual') in message
  assert all(need in message for need in needs)


def test_tfds_dataset_prepared_as_tfrecord_says_how_to_convert(tmp_path):
  builder = tfds.builder('dtd:3.*.*', data_dir=str(tmp_path))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)   # Prepared, as tfrecord.
  config = data_config.default_data_config(task='dtd', root=str(tmp_path))
  with pytest.raises(sources.TfdsNotPreparedError,
                     match=f'tfds convert_format --dataset_version_dir='
                     f'{tmp_path}/dtd/3.0.1 --out_file_format=array_record'):
    data_config.load_source(config, 'test')


@pytest.mark.parametrize('size', [0, 1, 2])
def test_prefetched_makes_at_most_size_items_ahead(size):
  """Items are large (a cached batch of K/V): none is made beyond `size` ahead."""
  made = []

  def items():
    for i in range(6):
      made.append(i)
      yield i

  taken = []
  stream = prefetcher.prefetched(items(), size)
  for item in stream:
    taken.append(item)
    threading.Event().wait(0.3)  # Time for the thread to run ahead if it could.
    assert len(made) <= len(taken) + size
  assert taken == list(range(6))


def test_prefetched_raises_the_iterators_error_and_stops_when_closed():
  def failing():
    yield 0
    raise OSError('unreadable image')

  with pytest.raises(OSError, match='unreadable image'):
    list(prefetcher.prefetched(failing(), 2))
  stream = prefetcher.prefetched((i for i in itertools.count()), 2)
  assert next(stream) == 0
  stream.close()  # Joins the thread: it must not wait for a free slot forever.
