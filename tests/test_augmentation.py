"""VPT's FGVC augmentation (issue 18): the views, their seeding, resume, the cache refusal."""
import os
import signal
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest

from configs import fgvc
from synqt_jax.config import validation as config_validation
from synqt_jax.data import augment
from synqt_jax.data import batching
from synqt_jax.data import preprocess
from synqt_jax.data import sources
from synqt_jax.data import tasks
from synqt_jax.training import train
from training_runs import REPO
from training_runs import compilation_cache  # pylint: disable=unused-import
from training_runs import final_params
from training_runs import read_metrics
from training_runs import reproducible
from training_runs import tiny_config


def test_shorter_side_resize_keeps_the_aspect_ratio_and_the_centre():
  # 300 x 200 (W x H): the shorter side becomes 256, the longer 384.
  x = np.linspace(0, 255, 300).astype(np.uint8)
  image = np.repeat(np.repeat(x[None, :, None], 200, 0), 3, 2)
  out = preprocess.resize_shorter_side(image, 256)
  assert out.shape == (256, 256, 3)
  want = np.asarray(Image.fromarray(image).resize((384, 256), Image.BILINEAR))
  np.testing.assert_array_equal(out, want[:, 64:320])
  # The horizontal ramp is still one: columns, not rows, change.
  assert (out[0] == out[-1]).all() and out[0, 0, 0] < out[0, -1, 0]


def ramp_source(n=6, size=37):
  """Images whose pixels say where they are: (row, column, example)."""
  rows, cols = np.mgrid[:size, :size]
  images = np.stack([np.stack([rows * 6, cols * 6, np.full_like(rows, i)], -1)
                     for i in range(n)]).astype(np.uint8)
  return augment.CropFlipSource(
      sources.ArraySource(images, np.arange(n) % 2, 2), 32)


def test_centre_and_random_crops_are_windows_of_the_stored_image():
  source = ramp_source()
  image, label = source[3]
  assert image.shape == (32, 32, 3) and label == 1
  assert (image[0, 0, 0], image[0, 0, 1]) == (2 * 6, 2 * 6)  # (37 - 32) // 2.
  flips, offsets = 0, set()
  for seed in range(40):
    view, _ = source.augmented(3, np.random.default_rng(seed))
    flipped = view[0, 0, 1] > view[0, -1, 1]
    flips += flipped
    view = view[:, ::-1] if flipped else view
    top, left = view[0, 0, 0] // 6, view[0, 0, 1] // 6
    np.testing.assert_array_equal(view, source._source[3][0][
        top:top + 32, left:left + 32])
    offsets.add((top, left))
  assert 10 < flips < 30 and len(offsets) > 10


def batches(source, start_step, num_steps, seed=0):
  return [b['image'] for b in batching.train_batches(
      source, 4, seed=seed, start_step=start_step, num_steps=num_steps,
      normalization='inception', local_device_count=1, process_count=1,
      process_index=0)]


def test_views_are_a_function_of_seed_step_and_example():
  source = ramp_source()
  stream = batches(source, 0, 6)
  np.testing.assert_array_equal(batches(source, 4, 2), stream[4:])
  # Epoch 1 (steps 2, 3) shows the same examples as epoch 0 in new views.
  assert not np.array_equal(stream[0], stream[2])
  assert not np.array_equal(batches(source, 0, 1, seed=1)[0], stream[0])
  # Two hosts' halves of a global batch are the one host's batch.
  halves = [next(iter(batching.train_batches(
      source, 4, seed=0, start_step=5, num_steps=1,
      normalization='inception', local_device_count=1, process_count=2,
      process_index=i)))['image'] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves, 1), stream[5])


@pytest.mark.parametrize('task', tasks.FGVC_TASKS)
def test_fgvc_configs_augment_and_refuse_the_feature_cache(task, tmp_path):
  config = fgvc.get_config(task)
  config.data.root = str(tmp_path)
  config_validation.validate(config)
  assert config.data.augmentation == 'vpt'
  assert (config.optim.epochs, config.optim.warmup_epochs,
          config.optim.batch_size) == (100, 10, 128)
  config.train.feature_cache = 'host'
  with pytest.raises(config_validation.ConfigError,
                     match='holds one fixed view of each image'):
    config_validation.validate(config)


def sigterm_at_step(workdir, step):
  """A thread that sends this process SIGTERM once metrics.jsonl shows `step`."""
  def watch():
    path = os.path.join(workdir, 'metrics.jsonl')
    while not (os.path.exists(path) and any(
        m['step'] >= step for m in read_metrics(workdir))):
      time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGTERM)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


def test_augmented_training_resumes_bit_identical(tmp_path, compilation_cache):
  del compilation_cache
  config = tiny_config(**{'data.augmentation': 'vpt', 'optim.epochs': 2})
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, whole)
  thread = sigterm_at_step(resumed, 5)
  assert train.train_and_evaluate(config, resumed) is None  # Preempted.
  thread.join()
  train.train_and_evaluate(config, resumed)
  jax.tree.map(np.testing.assert_array_equal, final_params(resumed),
               final_params(whole))
  assert reproducible(read_metrics(resumed)) == reproducible(
      read_metrics(whole))


def test_notebook_draws_a_batch_of_augmented_views(tmp_path):
  from test_notebooks import figures, run_notebook  # pylint: disable=g-import-not-at-top
  notebook = run_notebook('fgvc_augmentation.ipynb',
                          dict(INSTALL=False, REPO_DIR=REPO, IMAGE_SIZE=64),
                          tmp_path, {})
  assert figures(notebook) == 1
