"""Tests of prepared folders in each layout, generated in tmp_path; errors."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from synqt_jax import demo
from synqt_jax import errors
from synqt_jax.data import batching
from synqt_jax.data import data_config
from synqt_jax.data import folders
from synqt_jax.data import sources
from synqt_jax.data import tasks
from synqt_jax.testing import random_vit
from synqt_jax.weights import export
from training_runs import REPO
from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import launch_env

CIFAR = tasks.get_task('cifar100')


def write_image(path, seed, mode='RGB'):
  """A small random image; the format follows the extension."""
  pixels = np.random.default_rng(seed).integers(0, 256, (9, 13, 3), np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).convert(mode).save(path)


def expected_pixels(path, size):
  """The reference's preprocessing before ToTensor: PIL RGB, bicubic."""
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB').resize((size, size), Image.BICUBIC))


def write_list(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(''.join(line + '\n' for line in lines))


def write_json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)


def make_noah_task(root, folder='cifar', sizes=(('train800', 6), ('test', 5))):
  """NOAH layout: <root>/<folder>/<split>.txt with 'images/... label' lines."""
  for split, size in sizes:
    lines = []
    for i in range(size):
      name = f'images/{split}/{i:06d}.{"png" if i % 2 else "jpg"}'
      write_image(os.path.join(root, folder, name), seed=i,
                  mode='L' if i == 3 else 'RGB')
      lines.append(f'{name} {(7 * i) % 100}')
    write_list(os.path.join(root, folder, f'{split}.txt'), lines)
  return os.path.join(root, folder)


def folder_config(root, task='cifar', image_size=16, **overrides):
  return data_config.default_data_config(
      source='folder', task=task, root=str(root), image_size=image_size,
      **overrides)


def test_noah_lists(tmp_path):
  task_dir = make_noah_task(tmp_path)
  split = folders.read_split(str(tmp_path), CIFAR, 'train800')
  assert len(split) == 6
  assert split.labels.tolist() == [0, 7, 14, 21, 28, 35]
  assert split.paths[1] == os.path.join(task_dir, 'images/train800/000001.png')
  assert split.origins[1] == os.path.join(task_dir, 'train800.txt') + ':2'

  source = data_config.load_source(folder_config(tmp_path), 'test')
  assert (len(source), source.num_classes, source.name) == (
      5, 100, 'cifar100:test')
  for i in range(5):
    image, label = source[i]
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    np.testing.assert_array_equal(image, expected_pixels(split_path(
        task_dir, 'test', i), 16))
    assert label == (7 * i) % 100


def split_path(task_dir, split, i):
  return os.path.join(task_dir, f'images/{split}/{i:06d}.'
                      f'{"png" if i % 2 else "jpg"}')


def test_task_directory_under_any_of_its_names_or_as_root(tmp_path):
  task_dir = make_noah_task(tmp_path, folder='cifar100')
  assert len(folders.read_split(str(tmp_path), CIFAR, 'test')) == 5
  assert len(folders.read_split(task_dir, CIFAR, 'test')) == 5


def test_split_concatenation(tmp_path):
  make_noah_task(tmp_path, sizes=(('train800', 3), ('val200', 2)))
  split = folders.read_split(str(tmp_path), CIFAR, 'train800+val200')
  assert len(split) == 5 and split.labels.tolist() == [0, 7, 14, 0, 7]


def test_synqt_json(tmp_path):
  task_dir = tmp_path / 'dtd'
  items = []
  for i in range(4):
    write_image(str(task_dir / 'images' / f'c{i}' / f'{i}.png'), seed=i)
    items.append({f'c{i}/{i}.png': 46 - i})
  write_json(str(task_dir / 'train800val200.json'), items)
  source = data_config.load_source(
      folder_config(tmp_path, task='dtd', image_size=8), 'train800val200')
  assert [source[i][1] for i in range(4)] == [46, 45, 44, 43]
  np.testing.assert_array_equal(
      source[2][0], expected_pixels(str(task_dir / 'images/c2/2.png'), 8))


@pytest.mark.parametrize('task, image_dir', [
    ('cub200', 'images'), ('nabirds', 'images'), ('oxford_flowers', ''),
    ('stanford_dogs', 'Images'), ('stanford_cars', '')])
def test_fgvc_json(tmp_path, task, image_dir):
  """Class ids become 0..C-1 in sorted order, the same in every split."""
  class_ids = {'train': [42, 5, 17, 5], 'val': [17, 42], 'test': [5, 42]}
  for split, ids in class_ids.items():
    data = {}
    for i, class_id in enumerate(ids):
      name = f'{class_id:03d}.cls/{split}_{i}.jpg'
      write_image(os.path.join(tmp_path, image_dir, name), seed=i)
      data[name] = class_id
    write_json(os.path.join(tmp_path, f'{split}.json'), data)
  task = tasks.get_task(task)
  labels = {split: folders.read_split(str(tmp_path), task, split).labels
            for split in ('train', 'val', 'test', 'train+val')}
  assert labels['train'].tolist() == [2, 0, 1, 0]
  assert labels['val'].tolist() == [1, 2]
  assert labels['test'].tolist() == [0, 2]
  assert labels['train+val'].tolist() == [2, 0, 1, 0, 1, 2]
  source = data_config.load_source(
      folder_config(tmp_path, task=task.name, image_size=8, train_split='train',
                    test_split='test', val_split='val'), 'test')
  np.testing.assert_array_equal(source[1][0], expected_pixels(
      os.path.join(tmp_path, image_dir, '042.cls/test_1.jpg'), 8))


def test_fgvc_under_a_vpt_folder_name(tmp_path):
  write_image(str(tmp_path / 'CUB_200_2011' / 'images' / 'a.jpg'), seed=0)
  write_json(str(tmp_path / 'CUB_200_2011' / 'test.json'), {'a.jpg': 1})
  split = folders.read_split(str(tmp_path), tasks.get_task('CUB'), 'test')
  assert split.labels.tolist() == [0]


def test_stream_and_cache_of_a_folder_split_agree(tmp_path):
  make_noah_task(tmp_path, sizes=(('test', 7),))
  source = data_config.load_source(folder_config(tmp_path), 'test')
  cached = data_config.load_source(folder_config(tmp_path), 'test',
                                   in_memory=True)
  assert isinstance(cached, sources.ArraySource)
  batches = list(batching.eval_batches(source, 4, local_device_count=1))
  cached_batches = list(batching.eval_batches(cached, 4,
                                              local_device_count=1))
  for batch, cached_batch in zip(batches, cached_batches, strict=True):
    for key in batch:
      np.testing.assert_array_equal(batch[key], cached_batch[key])


# Errors: each names the file or value and the fix.


def test_missing_root(tmp_path):
  with pytest.raises(folders.FolderNotFoundError,
                     match=f'data.root .*{tmp_path}/nowhere.* not a directory'):
    data_config.load_source(folder_config(tmp_path / 'nowhere'), 'test')


def test_missing_split_file_lists_what_is_there(tmp_path):
  make_noah_task(tmp_path)
  with pytest.raises(folders.FolderNotFoundError) as error:
    folders.read_split(str(tmp_path), CIFAR, 'val200')
  message = str(error.value)
  assert 'val200.txt or val200.json' in message
  assert os.path.join(tmp_path, 'cifar') in message
  assert os.path.join(tmp_path, 'cifar', 'train800.txt') in message


def test_missing_image_names_list_file_and_line(tmp_path):
  task_dir = make_noah_task(tmp_path)
  os.remove(split_path(task_dir, 'test', 2))
  os.remove(split_path(task_dir, 'test', 4))
  with pytest.raises(folders.MissingImageError) as error:
    data_config.load_source(folder_config(tmp_path), 'test')
  message = str(error.value)
  assert os.path.join(task_dir, 'test.txt') + ':3' in message
  assert split_path(task_dir, 'test', 2) in message
  assert '1 more listed images are missing' in message


def test_missing_image_in_json_names_entry(tmp_path):
  write_json(str(tmp_path / 'dtd' / 'test.json'), [{'gone.png': 1}])
  with pytest.raises(folders.MissingImageError,
                     match=r'test.json entry 1: image .*images/gone.png'):
    folders.read_split(str(tmp_path), tasks.get_task('dtd'), 'test')


def test_corrupt_image_names_the_file(tmp_path):
  task_dir = make_noah_task(tmp_path)
  corrupt = split_path(task_dir, 'test', 1)
  with open(corrupt, 'wb') as f:
    f.write(b'not a png')
  source = data_config.load_source(folder_config(tmp_path), 'test')
  with pytest.raises(folders.CorruptImageError,
                     match=f'Cannot decode image {corrupt}.*test.txt:2'):
    source[1]
  with pytest.raises(folders.CorruptImageError, match=corrupt):
    list(batching.eval_batches(source, 2, local_device_count=1))
  with pytest.raises(folders.CorruptImageError, match=corrupt):
    sources.cache_in_memory(source)


def test_label_out_of_range_names_value_file_line_and_range(tmp_path):
  task_dir = make_noah_task(tmp_path)
  write_list(os.path.join(task_dir, 'test.txt'),
             ['images/test/000000.jpg 3', 'images/test/000001.png 100'])
  with pytest.raises(tasks.LabelOutOfRangeError) as error:
    folders.read_split(str(tmp_path), CIFAR, 'test')
  message = str(error.value)
  assert f'{task_dir}/test.txt:2' in message
  assert 'label 100' in message and '0..99' in message


def test_fgvc_with_more_class_ids_than_classes(tmp_path):
  write_json(str(tmp_path / 'train.json'),
             {f'{i}.jpg': 1000 + i for i in range(121)})
  with pytest.raises(tasks.LabelOutOfRangeError,
                     match=r"'120.jpg' \(class id 1120\).*"
                     r"label 120 .*0\.\.119"):
    folders.read_split(str(tmp_path), tasks.get_task('stanford_dogs'), 'train')


@pytest.mark.parametrize('line', ['images/a.jpg', 'images/a.jpg seven'])
def test_malformed_list_line(tmp_path, line):
  write_list(str(tmp_path / 'cifar' / 'test.txt'), ['', line])
  with pytest.raises(folders.SplitFileError,
                     match=f"test.txt:2: expected .*{line}"):
    folders.read_split(str(tmp_path), CIFAR, 'test')


@pytest.mark.parametrize('content, match', [
    ('[{"a.png": 1', 'not valid JSON'),
    ('[{"a.png": 1, "b.png": 2}]', 'entry 1: expected a one-key object'),
    ('[{"a.png": "x"}]', 'entry 1: expected'),
    ('3', 'expected a JSON list'),
])
def test_malformed_json(tmp_path, content, match):
  os.makedirs(tmp_path / 'cifar')
  (tmp_path / 'cifar' / 'test.json').write_text(content)
  with pytest.raises(folders.SplitFileError, match=f'test.json.*{match}'):
    folders.read_split(str(tmp_path), CIFAR, 'test')


def test_empty_split(tmp_path):
  write_list(str(tmp_path / 'cifar' / 'test.txt'), [])
  with pytest.raises(folders.SplitFileError, match='test.txt lists no images'):
    folders.read_split(str(tmp_path), CIFAR, 'test')


def test_list_and_json_for_one_split_is_ambiguous(tmp_path):
  make_noah_task(tmp_path)
  write_json(str(tmp_path / 'cifar' / 'test.json'), [])
  with pytest.raises(folders.SplitFileError, match='test.txt and .*test.json'):
    folders.read_split(str(tmp_path), CIFAR, 'test')


def test_unknown_task(tmp_path):
  with pytest.raises(errors.DataConfigError,
                     match="data.task: .*'cifr'.*Did you mean 'cifar100'"):
    data_config.load_source(folder_config(tmp_path, task='cifr'), 'test')


# --- Your own data: ImageFolder and free-named list folders. ---

ANIMALS = ('cat', 'dog', 'zebra')  # Sorted: labels 0, 1, 2.


def make_image_folder(root, splits=(('train', 4), ('test', 2)), classes=ANIMALS,
                      size=None):
  """<root>/<split>/<class>/<i>.png|jpg; `size`: class-coloured images of that side."""
  rng = np.random.default_rng(0)
  for split, count in splits:
    for label, name in enumerate(classes):
      for i in range(count):
        path = os.path.join(root, split, name, f'{i}.{"png" if i % 2 else "JPG"}')
        if size is None:
          write_image(path, seed=10 * label + i)
        else:
          os.makedirs(os.path.dirname(path), exist_ok=True)
          Image.fromarray(demo.class_images([label], len(classes), size, rng)[0]).save(
              path)
  return str(root)


def test_image_folder_labels_are_sorted_class_names(tmp_path):
  root = make_image_folder(tmp_path / 'animals')
  os.makedirs(tmp_path / 'animals' / 'train' / 'dog' / 'notes')
  (tmp_path / 'animals' / 'train' / 'dog' / 'readme.txt').write_text('not an image')
  config = folder_config(root, task='animals', train_split='train', val_split=None)
  split = folders.read_split(root, data_config.task_of(config), 'train')
  assert split.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
  assert split.paths[5] == os.path.join(root, 'train', 'dog', '1.png')
  assert data_config.num_classes(config) == 3
  assert data_config.class_names(config) == list(ANIMALS)
  source = data_config.load_source(config, 'test')
  assert (len(source), source.num_classes, source.name) == (6, 3, 'animals:test')
  image, label = source[5]
  assert label == 2
  np.testing.assert_array_equal(image, expected_pixels(
      os.path.join(root, 'test', 'zebra', '1.png'), 16))


def test_image_folder_classes_are_those_of_all_splits(tmp_path):
  """A split missing a class keeps the other classes' labels."""
  root = make_image_folder(tmp_path / 'd', splits=(('train', 1),))
  make_image_folder(tmp_path / 'd', splits=(('test', 1),), classes=('cat', 'zebra'))
  config = folder_config(root, task='d', train_split='train', val_split=None)
  task = data_config.task_of(config)
  assert folders.read_split(root, task, 'test').labels.tolist() == [0, 2]


def test_image_folder_under_a_task_directory(tmp_path):
  make_image_folder(tmp_path / 'my_pets')
  config = folder_config(tmp_path, task='my_pets', train_split='train', val_split=None)
  assert data_config.num_classes(config) == 3
  assert len(data_config.load_source(config, 'train')) == 12


def test_free_named_noah_lists_count_their_classes(tmp_path):
  write_list(str(tmp_path / 'my_birds' / 'train.txt'),
             ['a.png 0', 'b.png 4', 'c.png 1'])
  write_list(str(tmp_path / 'my_birds' / 'test.txt'), ['a.png 5', 'b.png 2'])
  for name in 'abc':
    write_image(str(tmp_path / 'my_birds' / f'{name}.png'), seed=0)
  config = folder_config(tmp_path, task='my_birds', train_split='train',
                         val_split=None)
  assert data_config.num_classes(config) == 6  # 1 + the largest label.
  assert data_config.class_names(config) is None
  assert data_config.load_source(config, 'test').num_classes == 6
  config.num_classes = 8
  assert data_config.num_classes(config) == 8
  config.num_classes = 4
  with pytest.raises(tasks.LabelOutOfRangeError, match='label 5 is outside'):
    data_config.load_source(config, 'test')


def test_a_free_task_name_with_no_data_is_one_clear_line(tmp_path):
  with pytest.raises(errors.DataConfigError,
                     match="Unknown task 'my_birds'.*Your own data: "):
    data_config.load_source(folder_config(tmp_path, task='my_birds'), 'test')


@pytest.mark.parametrize('value', [0, 1, -3, 2.5, True])
def test_bad_num_classes(tmp_path, value):
  make_noah_task(tmp_path)
  with pytest.raises(errors.DataConfigError, match='data.num_classes='):
    data_config.load_source(folder_config(tmp_path, num_classes=value), 'test')


@pytest.mark.parametrize('parent', ['', 'flat'])
def test_image_folder_split_with_no_class_directories(tmp_path, parent):
  """Images directly in train/: under data.root, or as configs/folder.py's root."""
  write_image(str(tmp_path / 'flat' / 'train' / 'a.png'), seed=0)
  config = folder_config(tmp_path / parent, task='flat', train_split='train',
                         val_split=None)
  with pytest.raises(folders.FolderNotFoundError,
                     match=r'flat/train holds images but no class directories; '
                     r'an ImageFolder split is train/<class name>/<images>'):
    data_config.load_source(config, 'train')


def test_a_task_directory_without_its_train_split_says_so(tmp_path):
  """configs/folder.py's root is the task's directory: not an unknown task."""
  root = make_image_folder(tmp_path / 'bugs', splits=(('test', 1),))
  config = folder_config(root, task='bugs', train_split='train', val_split=None)
  with pytest.raises(folders.FolderNotFoundError,
                     match="No split file train.txt or train.json, or "
                     "ImageFolder directory train/<class name>/, for task 'bugs'"):
    data_config.num_classes(config)


def test_symlinked_directories_are_followed_but_not_into_loops(tmp_path, caplog):
  """A symlink back up the tree (or into another class) would be walked again
  and again, every image under it labelled with this class."""
  root = make_image_folder(tmp_path / 'animals')
  make_image_folder(tmp_path / 'more', splits=(('cats', 2),), classes=('x',))
  train = tmp_path / 'animals' / 'train'
  os.symlink(train, train / 'cat' / 'up')  # The split: other classes in it.
  os.symlink('.', train / 'dog' / 'self')  # A loop.
  os.symlink('../zebra', train / 'dog' / 'zebra')  # Another class.
  os.symlink(tmp_path / 'more' / 'cats' / 'x', train / 'cat' / 'more')
  config = folder_config(root, task='animals', train_split='train',
                         val_split=None)
  with caplog.at_level('WARNING'):
    split = folders.read_split(root, data_config.task_of(config), 'train')
  assert split.labels.tolist() == [0] * 6 + [1] * 4 + [2] * 4
  assert split.paths[4] == str(train / 'cat' / 'more' / '0.JPG')
  skipped = sorted(record.getMessage().split()[2] for record in caplog.records
                   if record.getMessage().startswith('Not following'))
  assert skipped == [str(train / 'cat' / 'up'), str(train / 'dog' / 'self'),
                     str(train / 'dog' / 'zebra')]


@pytest.mark.parametrize('make, message', [
    (lambda root: os.makedirs(root / 'train' / 'emu'),
     r"Class 'emu' has no training images in .*train/emu; a class cannot be "
     r'learned without them. Add its images there, or remove .*train/emu\.'),
    (lambda root: write_image(str(root / 'test' / 'yak' / '0.png'), seed=0),
     r"Class 'yak' has no training images in .*train/yak; .* or remove "
     r'.*test/yak\.'),
], ids=['empty_directory', 'only_in_test'])
def test_a_class_without_training_images_is_refused(tmp_path, make, message):
  root = make_image_folder(tmp_path / 'animals')
  make(tmp_path / 'animals')
  config = folder_config(root, task='animals', train_split='train',
                         val_split=None)
  source = data_config.load_source(config, 'test')  # Scoring it is fine,
  with pytest.raises(folders.SplitFileError, match=message):  # training not.
    data_config.load_source(config, 'train')
  assert source.num_classes == 4


def test_a_single_class_is_refused(tmp_path):
  """It would train on nothing and score test accuracy 1.0."""
  root = make_image_folder(tmp_path / 'cats', classes=('cat',))
  config = folder_config(root, task='cats', train_split='train', val_split=None)
  with pytest.raises(folders.SplitFileError,
                     match="have only the class directory 'cat': a classifier "
                     'needs two classes or more'):
    data_config.load_source(config, 'train')
  write_list(str(tmp_path / 'ones' / 'train.txt'), ['a.png 0'])
  write_list(str(tmp_path / 'ones' / 'test.txt'), ['a.png 0'])
  with pytest.raises(folders.SplitFileError, match='have only the label 0'):
    data_config.num_classes(folder_config(
        tmp_path, task='ones', train_split='train', val_split=None))


def launch(args, cache, timeout=600):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'launch.py'), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=launch_env(cache))
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def folder_run(data_dir, workdir, cache, checkpoint_path):
  """configs/folder.py on `data_dir`, tiny and fast; returns results.json."""
  random_vit.write(checkpoint_path, width=32, depth=1, heads=2, mlp=64, patch=8,
                   image=32, classes=10, pre_logits=False, seed=0, scale=0.1)
  overrides = {'checkpoint.source': checkpoint_path, 'data.image_size': 32,
               'data.normalization': 'inception',
               'optim.batch_size': 8, 'optim.epochs': 2, 'optim.warmup_epochs': 1,
               'eval_every_epochs': 2, 'eval_batch_size': 8, 'tensorboard': False}
  launch(['--config', os.path.join(REPO, 'configs', f'folder.py:{data_dir}'),
          '--workdir', str(workdir),
          *[f'--config.{k}={v}' for k, v in overrides.items()]], cache)
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def test_image_folder_trains_through_launch_and_predict_prints_names(
    tmp_path, compilation_cache):
  data = make_image_folder(tmp_path / 'animals', splits=(('train', 8), ('test', 4)),
                           size=32)
  results = folder_run(data, tmp_path / 'run', compilation_cache,
                       str(tmp_path / 'vit.npz'))
  assert results['task'] == 'animals'
  assert 0.0 <= results['test_accuracy'] <= 1.0
  images = [os.path.join(data, 'test', name, '0.JPG') for name in ANIMALS]
  out = launch(['predict', f'--workdir={tmp_path / "run"}', '--top_k=3', *images],
               compilation_cache)
  for line, image in zip(out.strip().splitlines(), images):
    path, top = line.split('\t')
    assert path == image
    assert sorted(label.split(':')[0] for label in top.split()) == list(ANIMALS)


def test_free_named_noah_folder_trains_through_launch(tmp_path, compilation_cache):
  task_dir = str(tmp_path / 'my_shapes')
  demo.write_folder(task_dir, {'train': 24, 'test': 12}, 4, 32, seed=0)
  results = folder_run(task_dir, tmp_path / 'run', compilation_cache,
                       str(tmp_path / 'vit.npz'))
  assert results['task'] == 'my_shapes'
  assert 0.0 <= results['test_accuracy'] <= 1.0
  _, meta = export.load(str(tmp_path / 'run' / 'export.npz'))
  assert meta['config']['data']['num_classes'] == 4 and meta['class_names'] is None
