"""Methods by name with their own config sections, the optimizer from the config,
and `config.backbone` with its deprecated alias `config.checkpoint`."""
import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import pytest

from configs import common
from configs import tiny
from synqt_jax.config import fields as config_fields
from synqt_jax.config import validation as config_validation
from synqt_jax.models import baselines
from synqt_jax.models import methods
from synqt_jax.models import vit as models_vit
from synqt_jax.training import optimizer
from synqt_jax.training import train
from synqt_jax.weights import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT = models_vit.ViTConfig(32, 2, 2, 64, 8, 32)  # width, depth, heads, mlp, patch, image


def trainable_count(method):
  """Counted from shapes (`jax.eval_shape`): nothing is allocated."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  backbone = jax.eval_shape(models_vit.VisionTransformer(VIT).init,
                            jax.random.PRNGKey(0), images)['params']
  return methods.trainable_count(jax.eval_shape(
      method.init, jax.random.PRNGKey(0), {'backbone': backbone}, images))


@pytest.mark.parametrize('name,cls', [('linear', baselines.LinearProbe),
                                      ('full', baselines.FullFineTune),
                                      ('lora', baselines.LoRA),
                                      ('synqt', methods.SynQT)])
def test_every_registered_method_is_built_by_name(name, cls):
  config = common.get_config()
  config.method = name
  config_validation.validate(config)
  method = methods.from_config(config, VIT)
  assert isinstance(method, cls)
  assert methods.REGISTRY[name].reads_cached_kv == (name in ('linear', 'synqt'))


def test_an_unknown_method_is_one_clear_error():
  with pytest.raises(ValueError, match=r"^method='prompt'; expected one of "
                                       r"\('linear', 'synqt', 'lora', 'full'\)\.$"):
    methods.create('prompt', VIT, 10, common.get_config())


def test_lora_rank_and_alpha_and_drop_paths_come_from_the_config():
  config = common.get_config()
  config.method = 'lora'
  counts = {}
  for rank in (4, 8):
    config.lora.rank = rank
    counts[rank] = trainable_count(methods.from_config(config, VIT))
  # 2 blocks x (query, value) x (a: D x r, b: r x D); the head is 32 x 100 + 100.
  assert counts == {r: 2 * 2 * 2 * 32 * r + 3300 for r in (4, 8)}
  config.lora.alpha, config.lora.drop_path = 2.0, 0.2
  method = methods.from_config(config, VIT)
  assert (method.rank, method.alpha, method.drop_path) == (8, 2.0, 0.2)
  config.method, config.full.drop_path = 'full', 0.25
  assert methods.from_config(config, VIT).drop_path == 0.25


@pytest.mark.parametrize('field,value', [('lora.rank', 0), ('lora.alpha', -1.0),
                                         ('lora.drop_path', 1.0),
                                         ('full.drop_path', -0.1)])
def test_a_method_checks_its_own_section(field, value):
  config = common.get_config()
  config.method = field.split('.')[0]
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_validation.ConfigError,
                     match=rf'^config\.{field}={value!r}; expected'):
    config_validation.validate(config)


def test_export_metadata_holds_the_method_section_by_name():
  config = common.get_config()
  config.method = 'lora'
  config.lora.rank = 4
  meta = export.metadata(config)['config']
  assert meta['method'] == 'lora' and meta['lora']['rank'] == 4
  assert 'synqt' not in meta and 'checkpoint' not in meta
  rebuilt = config_fields.from_dict(meta)
  assert methods.from_config(rebuilt, VIT).rank == 4


def test_an_older_export_config_names_the_backbone_checkpoint():
  old = {'method': 'synqt', 'checkpoint': {'source': 'a.npz'},
         'data': {'task': 'eurosat'}}
  config = config_fields.from_dict(old)
  assert config.backbone.source == 'a.npz'
  config.checkpoint.source = 'b.npz'  # The alias writes the backbone too.
  assert config.backbone.source == 'b.npz'


def optimizer_steps(tx, steps=4):
  """The parameters after `steps` updates of `tx` on fixed random gradients."""
  rng = np.random.default_rng(0)
  params = {'w': rng.standard_normal((3, 4)).astype(np.float32)}
  state = tx.init(params)
  for _ in range(steps):
    grads = {'w': rng.standard_normal((3, 4)).astype(np.float32)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params['w']


@pytest.mark.parametrize('name,extra,want', [
    ('adamw', {}, lambda lr, o: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                            weight_decay=o.weight_decay)),
    # Without a weight_decay argument of their own, the decay is added to
    # the gradient first (torch.optim.SGD's weight_decay), not dropped.
    ('adam', {}, lambda lr, o: optax.chain(
        optax.add_decayed_weights(o.weight_decay),
        optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps))),
    ('sgd', {'momentum': 0.9}, lambda lr, o: optax.chain(
        optax.add_decayed_weights(o.weight_decay),
        optax.sgd(lr, momentum=0.9))),
])
def test_the_optimizer_is_optax_by_name_with_the_config_kwargs(name, extra,
                                                               want):
  config = common.get_config()
  config.optim.name = name
  config.optim.optax = extra
  config.optim.weight_decay = 0.05
  config_validation.validate(config)
  schedule = optimizer.learning_rate_schedule(config.optim, 2)
  ours = optimizer_steps(optimizer.create(config.optim, schedule))
  np.testing.assert_array_equal(ours,
                                optimizer_steps(want(schedule, config.optim)))
  others = {'adamw': 'adam', 'adam': 'sgd', 'sgd': 'adamw'}
  config.optim.name = others[name]
  config.optim.optax = {}
  assert not np.allclose(
      ours, optimizer_steps(optimizer.create(config.optim, schedule)))


@pytest.mark.parametrize('field,value,message', [
    ('name', 'adamx', r"config\.optim\.name='adamx'; expected the name of an "
                      'optax optimizer'),
    ('name', 'softmax_cross_entropy', 'config.optim.name'),
    ('optax', {'momentom': 0.9},
     r"config\.optim\.optax=.*'momentom'.*keyword arguments of optax\.adamw"),
])
def test_bad_optimizer_fields_are_named(field, value, message):
  config = common.get_config()
  config.optim[field] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate(config)


def parse_config_flags(monkeypatch, *args):
  """configs/tiny.py through config_flags, locked, as launch.py reads it."""
  argv = ['prog', f'--config={os.path.join(REPO, "configs", "tiny.py")}', *args]
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides here.
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', lock_config=True,
                                           flag_values=values)
  values(argv)
  return holder.value, config_flags.get_override_values(values['config'])


def test_the_checkpoint_alias_sets_the_backbone_from_the_command_line(
    monkeypatch):
  old, overrides = parse_config_flags(
      monkeypatch, '--config.checkpoint.source=/x.npz',
      '--config.checkpoint.cache_dir=/cache')
  new, _ = parse_config_flags(monkeypatch, '--config.backbone.source=/x.npz',
                              '--config.backbone.cache_dir=/cache')
  assert old.backbone.source == '/x.npz' and old.backbone.cache_dir == '/cache'
  assert (config_fields.without_aliases(old.to_dict()) ==
          config_fields.without_aliases(new.to_dict()))
  assert config_fields.deprecation(list(overrides)[0]) == (
      '--config.checkpoint.source is deprecated: it sets '
      'config.backbone.source; write --config.backbone.source instead.')
  assert config_fields.deprecation('backbone.source') is None
  resolved = train.resolve_workdir_paths(tiny.get_config(), '/run')
  assert resolved.checkpoint.source == resolved.backbone.source == (
      '/run/tiny_vit.npz')


def test_the_prepare_hook_must_be_a_function():
  config = tiny.get_config()
  config.prepare = 'synqt_jax.demo.no_such_function'
  with pytest.raises(config_validation.ConfigError, match=r'config\.prepare='):
    config_validation.validate(train.resolve_workdir_paths(config, '/run'))
