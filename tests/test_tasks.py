"""Tests of the task registry: names, classes, TFDS splits, label functions."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from synqt_jax.data import tasks

# From docs/data.md: task -> (classes, full TFDS split sizes, test size).
VTAB = {
    'caltech101': (102, {'train': 3060, 'test': 6084}, 6084),
    'cifar100': (100, {'train': 50000, 'test': 10000}, 10000),
    'dtd': (47, {'train': 1880, 'validation': 1880, 'test': 1880}, 1880),
    'oxford_flowers102': (
        102, {'train': 1020, 'validation': 1020, 'test': 6149}, 6149),
    'oxford_iiit_pet': (37, {'train': 3680, 'test': 3669}, 3669),
    'svhn': (10, {'train': 73257, 'test': 26032, 'extra': 531131}, 26032),
    'sun397': (397, {'train': 76128, 'validation': 10875, 'test': 21750},
               21750),
    'patch_camelyon': (
        2, {'train': 262144, 'validation': 32768, 'test': 32768}, 32768),
    'eurosat': (10, {'train': 27000}, 5400),
    'resisc45': (45, {'train': 31500}, 6300),
    'diabetic_retinopathy': (
        5, {'train': 35126, 'validation': 10906, 'test': 42670}, 42670),
    'clevr_count': (8, {'train': 70000, 'validation': 15000, 'test': 15000},
                    15000),
    'clevr_dist': (6, {'train': 70000, 'validation': 15000, 'test': 15000},
                   15000),
    'dmlab': (6, {'train': 65550, 'validation': 22628, 'test': 22735}, 22735),
    'kitti_dist': (4, {'train': 6347, 'validation': 423, 'test': 711}, 711),
    'dsprites_loc': (16, {'train': 737280}, 73728),
    'dsprites_ori': (16, {'train': 737280}, 73728),
    'smallnorb_azi': (18, {'train': 24300, 'test': 24300}, 12150),
    'smallnorb_ele': (9, {'train': 24300, 'test': 24300}, 12150),
}
FGVC = {'cub200': 200, 'nabirds': 555, 'oxford_flowers': 102,
        'stanford_dogs': 120, 'stanford_cars': 196}


def test_registry_has_the_19_vtab_and_5_fgvc_tasks():
  assert set(tasks.VTAB_TASKS) == set(VTAB)
  assert set(tasks.FGVC_TASKS) == set(FGVC)
  for name, (num_classes, _, _) in VTAB.items():
    assert tasks.get_task(name).num_classes == num_classes
    assert set(tasks.get_task(name).tfds_splits) == set(tasks.VTAB_SPLITS)
  for name, num_classes in FGVC.items():
    assert tasks.get_task(name).num_classes == num_classes


@pytest.mark.parametrize('alias, name', [
    ('cifar', 'cifar100'), ('CIFAR100', 'cifar100'), ('kitti', 'kitti_dist'),
    ('svhn_cropped', 'svhn'), ('clevr_count', 'clevr_count'),
    ('dsprites_loc', 'dsprites_loc'), ('smallnorb_azi', 'smallnorb_azi'),
    ('diabetic_retinopathy_detection', 'diabetic_retinopathy'),
    ('CUB', 'cub200'), ('CUB_200_2011', 'cub200'), ('nabirds', 'nabirds'),
    ('OxfordFlowers', 'oxford_flowers'), ('fgvc_flowers', 'oxford_flowers'),
    ('oxford_flowers102', 'oxford_flowers102'),
    ('Stanford-dogs', 'stanford_dogs'), ('StanfordCars', 'stanford_cars'),
])
def test_aliases(alias, name):
  assert tasks.get_task(alias).name == name


def test_unknown_task_lists_valid_names_and_suggests_one():
  with pytest.raises(tasks.UnknownTaskError) as error:
    tasks.get_task('cifar1000')
  message = str(error.value)
  assert "'cifar1000'" in message and "Did you mean 'cifar100'?" in message
  assert all(name in message for name in tasks.VTAB_TASKS + tasks.FGVC_TASKS)
  assert isinstance(error.value, ValueError)


@pytest.mark.parametrize('name', sorted(VTAB))
def test_tfds_split_sizes(name, tmp_path):
  """The split expressions select the table's numbers of examples."""
  _, full_sizes, test_size = VTAB[name]
  template = tfds.core.ShardedFileTemplate(
      data_dir=str(tmp_path), dataset_name=name, filetype_suffix='array_record')
  split_dict = tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0,
                          filename_template=template.replace(split=split))
      for split, size in full_sizes.items()])
  sizes = {split: split_dict[expression].num_examples
           for split, expression in tasks.get_task(name).tfds_splits.items()}
  assert sizes == {'train800': 800, 'val200': 200, 'train800val200': 1000,
                   'test': test_size}


@pytest.mark.parametrize('name', sorted(VTAB))
def test_num_classes_agree_with_tfds_features(name, tmp_path):
  task = tasks.get_task(name)
  features = tfds.builder(task.tfds_name, data_dir=str(tmp_path)).info.features
  derived = {'clevr_count': 10 - 3 + 1, 'clevr_dist': 6, 'kitti_dist': 4}
  coarsened = {'dsprites_loc': ('label_x_position', 2),
               'dsprites_ori': ('label_orientation', 2.5),
               'smallnorb_azi': ('label_azimuth', 1),
               'smallnorb_ele': ('label_elevation', 1)}
  if name in derived:
    source_classes = derived[name]
  else:
    key, bin_width = coarsened.get(name, ('label', 1))
    source_classes = features[key].num_classes / bin_width
  assert task.num_classes == source_classes


def clevr_scene(depths):
  return {'objects': {'size': np.zeros(len(depths), np.int64),
                      'pixel_coords': np.array([[10., 20., d] for d in depths],
                                               np.float32)}}


def kitti_scene(objects):
  """objects: (type, z) pairs; types 0-2 are Car, Van, Truck."""
  return {'objects': {
      'type': np.array([t for t, _ in objects], np.int64),
      'location': np.array([[1., 2., z] for _, z in objects],
                           np.float32).reshape(-1, 3)}}


def test_clevr_count_label():
  label = tasks.get_task('clevr_count').label_fn
  assert label(clevr_scene([9., 10., 11., 12., 13.])) == 2
  assert label(clevr_scene([9.] * 3)) == 0
  assert label(clevr_scene([9.] * 10)) == 7


@pytest.mark.parametrize('closest, expected', [
    (0.5, 0), (8.0, 0), (8.0001, 1), (8.5, 1), (8.75, 2), (9.0, 2), (9.2, 3),
    (9.5, 3), (9.9, 4), (10.0, 4), (10.01, 5), (50.0, 5)])
def test_clevr_distance_bins(closest, expected):
  label = tasks.get_task('clevr_dist').label_fn
  assert label(clevr_scene([12., closest, 30.])) == expected


@pytest.mark.parametrize('objects, expected', [
    ([], 3),
    ([(3, 5.), (4, 2.), (5, 1.)], 3),         # Pedestrian, sitter, Cyclist.
    ([(0, 5.)], 0), ([(0, 8.)], 0), ([(1, 15.)], 1), ([(2, 30.)], 2),
    ([(0, 30.), (5, 1.), (1, 15.)], 1),       # Closest vehicle, not object.
    ([(0, 20.)], 1), ([(7, 4.), (0, 998.)], 2)])
def test_kitti_distance_label(objects, expected):
  assert tasks.get_task('kitti_dist').label_fn(kitti_scene(objects)) == expected


@pytest.mark.parametrize('task, key, value, expected', [
    ('dsprites_loc', 'label_x_position', 31, 15),
    ('dsprites_loc', 'label_x_position', 0, 0),
    ('dsprites_loc', 'label_x_position', 2, 1),
    ('dsprites_ori', 'label_orientation', 39, 15),
    ('dsprites_ori', 'label_orientation', 5, 2),
    ('dsprites_ori', 'label_orientation', 4, 1),
    ('smallnorb_azi', 'label_azimuth', 17, 17),
    ('smallnorb_ele', 'label_elevation', 8, 8)])
def test_attribute_labels(task, key, value, expected):
  assert tasks.get_task(task).label_fn({key: np.int64(value)}) == expected


def test_images_of_dsprites_scale_to_255():
  image = np.array([[[0], [1]]], np.uint8)
  np.testing.assert_array_equal(
      tasks.get_task('dsprites_ori').image_fn({'image': image}),
      [[[0], [255]]])


def test_check_label_names_value_place_and_range():
  assert tasks.check_label(4, 5, 'x') == 4
  with pytest.raises(tasks.LabelOutOfRangeError,
                     match=r'list.txt:3: label 5 .* 0\.\.4'):
    tasks.check_label(5, 5, 'list.txt:3')
