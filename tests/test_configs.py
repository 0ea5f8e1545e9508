"""The configs: every task's reference values, and bad fields caught before compute."""
import os
import re
import subprocess
import sys

import pytest

from configs import fgvc
from configs import tiny
from configs import vtab1k
from synqt_jax import errors
from synqt_jax.config import validation as config_validation
from synqt_jax.data import tasks
from synqt_jax.models import methods
from synqt_jax.models import vit as models_vit
from synqt_jax.training import optimizer
from synqt_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_vtab_task_has_a_config_with_the_reference_values():
  assert set(vtab1k.HPARAMS) == set(tasks.VTAB_TASKS)
  for task in tasks.VTAB_TASKS:
    config = vtab1k.get_config(task)
    config_validation.validate(config)
    assert config.data.task == task
    synqt = config.synqt
    assert (synqt.token_nums, synqt.attn_scale, synqt.ffn_scale,
            synqt.feat_scale) == vtab1k.HPARAMS[task]
    assert config.optim.to_dict() == dict(
        name='adamw', optax={}, lr=1e-3, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8, batch_size=64,
        epochs=50, warmup_epochs=10, min_lr=1e-6)
    assert (synqt.dropout, synqt.drop_path, synqt.head_drop_path) == (
        0.1, 0.1, 0.3)
    assert config.seed == 42 and config.eval_every_epochs == 10
    assert config.data.normalization == 'imagenet'
    assert config.data.image_size == 224


def test_reference_names_and_aliases_select_vtab_tasks():
  assert vtab1k.get_config('cifar').data.task == 'cifar100'
  assert vtab1k.get_config('kitti').synqt.token_nums == 16
  assert vtab1k.get_config('svhn_cropped').synqt.ffn_scale == 1.0
  with pytest.raises(ValueError, match='fgvc.py'):
    vtab1k.get_config('cub200')


@pytest.mark.parametrize('task', tasks.FGVC_TASKS)
def test_fgvc_configs_read_prepared_folders(task, tmp_path):
  config = fgvc.get_config(task)
  with pytest.raises(errors.DataConfigError, match='data.root'):
    config_validation.validate(config)  # The folder must be given.
  config.data.root = str(tmp_path)
  config_validation.validate(config)
  assert (config.data.source, config.data.train_split) == ('folder',
                                                           'train+val')


def test_tiny_config_is_valid_once_the_workdir_is_filled_in(tmp_path):
  config = train.resolve_workdir_paths(tiny.get_config(), tmp_path)
  assert config.checkpoint.source == os.path.join(tmp_path, 'tiny_vit.npz')
  assert config.data.root == os.path.join(tmp_path, 'tiny_data')
  config_validation.validate(config)


@pytest.mark.parametrize('field,value,message', [
    ('method', 'prompt', 'config.method'),
    ('optim.lr', -1.0, 'config.optim.lr'),
    ('optim.min_lr', 1.0, 'config.optim.min_lr'),
    ('optim.b2', 1.0, 'config.optim.b2'),
    ('optim.batch_size', 0, 'config.optim.batch_size'),
    ('optim.epochs', 0, 'config.optim.epochs'),
    ('optim.warmup_epochs', 60, 'config.optim.warmup_epochs'),
    ('optim.warmup_epochs', 50, 'config.optim.warmup_epochs'),  # Nothing left to decay.
    ('synqt.token_nums', 0, 'config.synqt.token_nums'),
    ('synqt.dropout', 1.0, 'config.synqt.dropout'),
    ('train.feature_cache', 'gpu', 'config.train.feature_cache'),
    ('train.cache_dtype', 'float16', 'config.train.cache_dtype'),
    ('synqt.image_path_memory', 'remat', 'config.synqt.image_path_memory'),
    ('synqt.kv_dtype', 'float16', 'config.synqt.kv_dtype'),
    ('eval_every_epochs', 0, 'config.eval_every_epochs'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints'),
    ('seed', -1, 'config.seed'),
    ('dtype', 'float16', 'config.dtype'),
    ('backbone_dtype', 'float16', 'config.backbone_dtype'),
    ('checkpoint.source', '', 'config.checkpoint.source'),
    ('data.normalization', 'none', 'data.normalization'),
    ('data.task', 'cifar1000', 'data.task'),
])
def test_bad_fields_are_named(field, value, message):
  config = vtab1k.get_config('cifar100')
  section, _, name = field.rpartition('.')
  target = config[section] if section else config
  target[name] = value
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    config_validation.validate(config)


@pytest.mark.parametrize('change,fix', [
    ({'synqt.image_path_memory': 'recompute'}, "synqt.image_path_memory='keep_kv'"),
    ({'train.feature_cache': 'host'}, "train.cache_dtype='bfloat16'"),
])
def test_bfloat16_kv_only_where_keep_kv_holds_them(change, fix):
  config = vtab1k.get_config('cifar100')
  config.synqt.kv_dtype = 'bfloat16'
  config_validation.validate(config)  # keep_kv online: fine.
  for field, value in change.items():
    section, name = field.split('.')
    config[section][name] = value
  with pytest.raises(config_validation.ConfigError,
                     match=r"config\.synqt\.kv_dtype='bfloat16'.*" + re.escape(fix)):
    config_validation.validate(config)


def test_bfloat16_backbone_only_where_the_backbone_is_frozen():
  config = vtab1k.get_config('cifar100')
  config.backbone_dtype = 'bfloat16'
  for method in ('synqt', 'lora', 'linear'):
    config.method = method
    config_validation.validate(config)
  config.method = 'full'
  with pytest.raises(config_validation.ConfigError,
                     match=r"config\.backbone_dtype='bfloat16'; expected 'float32' "
                     r"with method='full' \(it trains the backbone"):
    config_validation.validate(config)


def test_batches_must_split_over_the_devices():
  config = vtab1k.get_config('dtd')
  config_validation.validate_device_split(config, 8)
  with pytest.raises(config_validation.ConfigError,
                     match=r'config\.optim\.batch_size=64; expected a multiple '
                     'of the 3 devices'):
    config_validation.validate_device_split(config, 3)


def test_method_factory():
  vit = models_vit.ViTConfig(32, 2, 2, 64, 8, 32)
  method = methods.from_config(vtab1k.get_config('eurosat'), vit)
  assert isinstance(method, methods.SynQT)
  assert method.config.num_classes == 10 and method.config.token_nums == 16
  config = vtab1k.get_config('eurosat')
  config.method = 'prompt'
  with pytest.raises(ValueError, match="method='prompt'"):
    methods.from_config(config, vit)


def launch_tiny(workdir, *overrides):
  """launch.py on configs/tiny.py with `overrides`, to its end."""
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'launch.py'),
       '--config', os.path.join(REPO, 'configs', 'tiny.py'),
       '--workdir', str(workdir), *overrides],
      capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_launch_rejects_a_bad_override_before_any_compute(tmp_path):
  workdir = tmp_path / 'run'
  result = launch_tiny(workdir, '--config.optim.warmup_epochs=11')
  assert result.returncode != 0
  assert 'config.optim.warmup_epochs=11' in result.stderr
  assert not workdir.exists()


def test_launch_takes_the_checkpoint_alias_with_one_warning(tmp_path):
  """--config.checkpoint.* (the backbone's old name) sets config.backbone.*."""
  workdir = tmp_path / 'run'
  result = launch_tiny(workdir, '--config.checkpoint.source=')
  assert result.returncode != 0
  warnings = [line for line in result.stderr.splitlines()
              if 'deprecated' in line]
  assert len(warnings) == 1 and '--config.backbone.source' in warnings[0]
  assert ("Error: config.backbone.source='' (also written "
          'config.checkpoint.source); expected') in result.stderr
  assert not workdir.exists()


def test_every_optim_field_reaches_the_optimizer_or_is_refused(tmp_path):
  """sgd takes weight_decay (added to the gradient); a b1/b2/eps it has no
  use for, set away from AdamW's default, is one line, nothing written."""
  config = vtab1k.get_config('cifar100')
  config.optim.name, config.optim.weight_decay = 'sgd', 0.01
  config_validation.validate(config)
  assert optimizer.describe(config.optim) == (
      'optax.chain(optax.add_decayed_weights(0.01), optax.sgd())')
  config.optim.b1 = 0.5
  with pytest.raises(ValueError, match=r'config\.optim\.b1=0\.5: optax\.sgd '
                     r'takes no b1; leave it at 0\.9'):
    config_validation.validate(config)
  workdir = tmp_path / 'run'
  result = launch_tiny(workdir, '--config.optim.name=sgd',
                       '--config.optim.eps=0.001')
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if 'Error' in line]
  assert errors == ['Error: config.optim.eps=0.001: optax.sgd takes no eps; '
                    "leave it at 1e-08, or choose an optimizer that does "
                    "(e.g. optim.name='adamw')."], result.stderr
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()
