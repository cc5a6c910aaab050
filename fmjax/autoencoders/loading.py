"""diffusers AutoencoderKL folders <-> `Autoencoder`: read and write the published weight layout.

A folder is what diffusers' `AutoencoderKL.save_pretrained(folder, safe_serialization=True)`
writes and what the Hub publishes for stabilityai/sd-vae-ft-mse and sd-vae-ft-ema (and the
`vae/` subfolder of Stable Diffusion pipelines): `config.json` and
`diffusion_pytorch_model.safetensors`. Tensors are read with the `safetensors` package's numpy
API (no torch) and converted: PyTorch module paths to `kl.AutoencoderKL`'s NNX paths (its
modules are named like diffusers', up to the renames in `_RENAMES`), conv weights OIHW -> HWIO,
linear weights [out, in] -> [in, out], GroupNorm `weight` -> `scale`, every dtype -> float32.
Older checkpoints (diffusers' deprecated `AttentionBlock`) name the attention `query` / `key` /
`value` / `proj_attn`; they are renamed as diffusers itself does on load, and 1x1-conv shaped
weights of those names are squeezed to linear maps.

Every tensor of the file must be used exactly once and every parameter must be found with its
shape; otherwise `AutoencoderLoadError` names the tensors. `save` writes the same layout back
(diffusers' tensor names, PyTorch layouts, float32), so `load(save(...))` is exact and
`diffusers.AutoencoderKL.from_pretrained(folder)` reads what `save` wrote.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import safetensors.numpy

from fmjax.autoencoders import kl
from fmjax.autoencoders import vae as vae_lib

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
CLASS_NAME = 'AutoencoderKL'

# NNX attribute -> diffusers module path (diffusers wraps these in a one-element ModuleList).
_RENAMES = {'downsampler': 'downsamplers.0.conv', 'upsampler': 'upsamplers.0.conv',
            'attention': 'attentions.0', 'to_out': 'to_out.0'}
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_LEGACY_ATTENTION = re.compile(r'(.*\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)')
_LEGACY_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_SHOWN = 8   # tensors listed per category in an error message


class AutoencoderLoadError(ValueError):
  """The folder's tensors do not match the network its config.json describes."""


class AutoencoderNotFoundError(FileNotFoundError):
  """The folder or one of its two files is missing."""


def _folder_contract(folder: str) -> str:
  return (f'an AutoencoderKL folder holds {CONFIG_NAME} and {WEIGHTS_NAME}, as diffusers\' '
          f'save_pretrained(folder, safe_serialization=True) writes them (e.g. the files of '
          f'stabilityai/sd-vae-ft-mse, or the vae/ subfolder of a Stable Diffusion pipeline)')


# ---------------------------------------------------------------------------------------------
# Names and layouts.


def diffusers_name(path: tuple) -> str:
  """The diffusers state-dict name of an NNX parameter path (e.g. ('encoder', 'conv_in', 'kernel'))."""
  *modules, leaf = path
  return '.'.join([_RENAMES.get(str(m), str(m)) for m in modules] + [_LEAVES[leaf]])


def _to_torch(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:                      # conv kernel HWIO -> OIHW
    return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
  if a.ndim == 2:                      # linear kernel [in, out] -> [out, in]
    return np.ascontiguousarray(a.T)
  return np.ascontiguousarray(a)


def _from_torch(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:
    return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
  if a.ndim == 2:
    return np.ascontiguousarray(a.T)
  return np.ascontiguousarray(a)


def _torch_shape(shape: tuple) -> tuple:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def layout(config: kl.AutoencoderConfig) -> dict[str, tuple[tuple, tuple]]:
  """{diffusers tensor name: (NNX path, PyTorch shape)} of every parameter of `config`."""
  return {diffusers_name(path): (path, _torch_shape(tuple(a.shape)))
          for path, a in vae_lib.flatten(vae_lib.abstract_params(config)).items()}


def to_state_dict(config: kl.AutoencoderConfig, params) -> dict[str, np.ndarray]:
  """diffusers' state dict (names, PyTorch layouts, float32 numpy) of an NNX parameter pytree."""
  flat = vae_lib.flatten(params)
  return {name: _to_torch(np.asarray(flat[path], np.float32))
          for name, (path, _) in layout(config).items()}


def from_state_dict(config: kl.AutoencoderConfig, tensors: dict[str, np.ndarray],
                    source: str = 'the state dict') -> dict:
  """The NNX parameter pytree (float32 numpy) of a diffusers state dict; every tensor used once.

  Raises AutoencoderLoadError naming the missing, unused and misshapen tensors.
  """
  expected = layout(config)
  tensors, original = _rename_legacy(tensors, expected, source)
  missing = sorted(set(expected) - set(tensors))
  unused = sorted(original[n] for n in set(tensors) - set(expected))
  misshapen, bad_dtype = [], []
  for name in sorted(set(tensors) & set(expected)):
    a, want = tensors[name], expected[name][1]
    if tuple(a.shape) != want:
      misshapen.append(f'{original[name]} {tuple(a.shape)} (expected {want})')
    elif not np.issubdtype(a.dtype, np.floating) and a.dtype.name != 'bfloat16':
      bad_dtype.append(f'{original[name]} ({a.dtype})')
  problems = [(what, items) for what, items in (
      ('missing tensors', missing), ('unused tensors', unused), ('misshapen tensors', misshapen),
      ('non-float tensors', bad_dtype)) if items]
  if problems:
    details = '; '.join(f'{len(items)} {what}: {", ".join(items[:_SHOWN])}'
                        + (', ...' if len(items) > _SHOWN else '') for what, items in problems)
    raise AutoencoderLoadError(f'{source} does not match the AutoencoderKL its config describes '
                               f'(block_out_channels {list(config.block_out_channels)}, '
                               f'layers_per_block {config.layers_per_block}): {details}.')
  return vae_lib.unflatten({path: _from_torch(np.asarray(tensors[name], np.float32))
                            for name, (path, _) in expected.items()})


def _rename_legacy(tensors: dict, expected: dict, source: str) -> tuple[dict, dict]:
  """Deprecated attention names -> current ones, as diffusers renames them on load; 1x1-conv
  shaped weights of those names squeezed to linear maps. Returns (tensors, {new name: name in
  the file})."""
  out, original = {}, {}
  for name, a in tensors.items():
    match = _LEGACY_ATTENTION.fullmatch(name)
    new = f'{match[1]}.{_LEGACY_NAMES[match[2]]}.{match[3]}' if match else name
    if new in out:   # both spellings present: one of them would be silently dropped
      raise AutoencoderLoadError(f'{source}: tensors {original[new]} and {name} are both {new}.')
    if match and a.ndim == 4 and a.shape[2:] == (1, 1) and new in expected and len(expected[new][1]) == 2:
      a = a[:, :, 0, 0]
    out[new], original[new] = a, name
  return out, original


# ---------------------------------------------------------------------------------------------
# Folders.


def read_config_fields(config_path: str) -> dict:
  """The JSON object of a config.json; kl.ConfigError when it is not valid JSON or not an object."""
  with open(config_path) as f:
    try:
      fields = json.load(f)
    except json.JSONDecodeError as e:
      raise kl.ConfigError(f'{config_path} is not valid JSON: {e}') from None
  if not isinstance(fields, dict):
    raise kl.ConfigError(f'{config_path} must hold a JSON object of autoencoder config fields.')
  return fields


def read_folder(folder) -> tuple[kl.AutoencoderConfig, dict]:
  """(config, float32 numpy parameter pytree) of a diffusers AutoencoderKL folder."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise AutoencoderNotFoundError(f'{folder}: no such folder; {_folder_contract(folder)}.')
  absent = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(folder, n))]
  if absent:
    present = sorted(os.listdir(folder))
    hint = ''
    if WEIGHTS_NAME in absent and 'diffusion_pytorch_model.bin' in present:
      hint = (' It has diffusion_pytorch_model.bin (a pickle): convert it where torch is installed, '
              'with diffusers: AutoencoderKL.from_pretrained(folder).save_pretrained(folder, '
              'safe_serialization=True).')
    elif 'vae' in present:
      hint = ' It has a vae/ subfolder: pass that.'
    raise AutoencoderNotFoundError(f'{folder}: missing {absent} (has {present[:10]}); '
                                   f'{_folder_contract(folder)}.{hint}')
  config_path = os.path.join(folder, CONFIG_NAME)
  config = kl.AutoencoderConfig.from_dict(read_config_fields(config_path), source=config_path)
  weights_path = os.path.join(folder, WEIGHTS_NAME)
  try:
    tensors = safetensors.numpy.load_file(weights_path)
  except Exception as e:   # the library raises several types for a damaged file
    raise AutoencoderLoadError(f'{weights_path} could not be read as safetensors: {e}') from e
  return config, from_state_dict(config, tensors, source=weights_path)


def load(folder, *, dtype='float32', mesh=None, batch_size: int | None = None) -> vae_lib.Autoencoder:
  """The Autoencoder of a diffusers AutoencoderKL folder (config.json + safetensors weights).

  The loader registered for `_class_name` 'AutoencoderKL': `fmjax.autoencoders.load` (the
  registry's) reads any registered kind and checks what it returns; this reads only this one.

  Args:
    folder: the folder (for a Stable Diffusion pipeline, its vae/ subfolder).
    dtype: compute dtype, 'float32' or 'bfloat16'; the weights stay float32.
    mesh: where `encode` / `decode` run (default: a one-axis mesh over the local devices).
    batch_size: images per compiled call of `encode` / `decode` (default 8 per device).
  Raises:
    AutoencoderNotFoundError (a FileNotFoundError): no folder, config.json or safetensors file.
    kl.ConfigError (a ValueError): an unknown config field or an unsupported value.
    AutoencoderLoadError (a ValueError): missing, unused or misshapen tensors.
  """
  config, params = read_folder(folder)
  return vae_lib.Autoencoder(config, params, dtype=dtype, mesh=mesh, batch_size=batch_size)


def save(folder, autoencoder: vae_lib.Autoencoder) -> str:
  """Writes config.json and diffusion_pytorch_model.safetensors in diffusers' layout; returns folder."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  fields = {'_class_name': CLASS_NAME, **autoencoder.config.to_dict()}
  with open(os.path.join(folder, CONFIG_NAME), 'w') as f:
    json.dump(fields, f, indent=2, sort_keys=True)
    f.write('\n')
  tensors = to_state_dict(autoencoder.config, jax.device_get(autoencoder.params))
  # 'pt' as diffusers / transformers write it: readers check the metadata's format.
  safetensors.numpy.save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={'format': 'pt'})
  return folder

