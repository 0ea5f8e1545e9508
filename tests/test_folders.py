"""Tests of prepared folders in each layout, generated in tmp_path; errors."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from synqt_jax import folders
from synqt_jax import input_pipeline
from synqt_jax import tasks

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
  return input_pipeline.default_data_config(
      source='folder', task=task, root=str(root), image_size=image_size,
      **overrides)


def test_noah_lists(tmp_path):
  task_dir = make_noah_task(tmp_path)
  split = folders.read_split(str(tmp_path), CIFAR, 'train800')
  assert len(split) == 6
  assert split.labels.tolist() == [0, 7, 14, 21, 28, 35]
  assert split.paths[1] == os.path.join(task_dir, 'images/train800/000001.png')
  assert split.origins[1] == os.path.join(task_dir, 'train800.txt') + ':2'

  source = input_pipeline.load_source(folder_config(tmp_path), 'test')
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
  source = input_pipeline.load_source(
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
  source = input_pipeline.load_source(
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
  source = input_pipeline.load_source(folder_config(tmp_path), 'test')
  cached = input_pipeline.load_source(folder_config(tmp_path), 'test',
                                      in_memory=True)
  assert isinstance(cached, input_pipeline.ArraySource)
  batches = list(input_pipeline.eval_batches(source, 4, local_device_count=1))
  cached_batches = list(input_pipeline.eval_batches(cached, 4,
                                                    local_device_count=1))
  for batch, cached_batch in zip(batches, cached_batches, strict=True):
    for key in batch:
      np.testing.assert_array_equal(batch[key], cached_batch[key])


# Errors: each names the file or value and the fix.


def test_missing_root(tmp_path):
  with pytest.raises(folders.FolderNotFoundError,
                     match=f'data.root .*{tmp_path}/nowhere.* not a directory'):
    input_pipeline.load_source(folder_config(tmp_path / 'nowhere'), 'test')


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
    input_pipeline.load_source(folder_config(tmp_path), 'test')
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
  source = input_pipeline.load_source(folder_config(tmp_path), 'test')
  with pytest.raises(folders.CorruptImageError,
                     match=f'Cannot decode image {corrupt}.*test.txt:2'):
    source[1]
  with pytest.raises(folders.CorruptImageError, match=corrupt):
    list(input_pipeline.eval_batches(source, 2, local_device_count=1))
  with pytest.raises(folders.CorruptImageError, match=corrupt):
    input_pipeline.cache_in_memory(source)


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
  with pytest.raises(input_pipeline.DataConfigError,
                     match="data.task: .*'cifr'.*Did you mean 'cifar100'"):
    input_pipeline.load_source(folder_config(tmp_path, task='cifr'), 'test')
