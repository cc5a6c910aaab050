"""Autoencoder kinds by config.json `_class_name`: `load(folder)` reads the folder with its kind's loader.

An autoencoder folder holds a `config.json` whose `_class_name` names its kind (diffusers writes
it, and `fmjax.autoencoders.save` writes 'AutoencoderKL'); a folder whose config.json has no
`_class_name` is an AutoencoderKL, and so is one without config.json (the AutoencoderKL loader's
error then says what such a folder holds). A kind is registered with its loader:

  def load_my_autoencoder(folder, *, dtype, mesh, batch_size):
    return MyAutoencoder(...)                     # satisfies AutoencoderProtocol
  fmjax.autoencoders.register('MyAutoencoder', load_my_autoencoder)
  vae = fmjax.autoencoders.load(folder)           # config.json: {"_class_name": "MyAutoencoder"}

Every loaded object is checked against `AutoencoderProtocol` (the members that the latent
builder, training, evaluation and `fmjax.load` use) before it is returned, so a loader that
returns an incomplete object fails at load time with the missing members named, not later in a
run. Registrations live in this process: register in the experiment file or script that loads.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Protocol, runtime_checkable

from fmjax.autoencoders import kl, loading

DEFAULT_CLASS_NAME = loading.CLASS_NAME     # 'AutoencoderKL': folders without a `_class_name`
LOADER_KEYWORDS = ('dtype', 'mesh', 'batch_size')


class UnknownAutoencoderError(kl.ConfigError):
  """config.json's `_class_name` names no registered autoencoder kind."""


class AutoencoderProtocolError(TypeError, ValueError):
  """A loader returned an object without members that fmjax uses (see AutoencoderProtocol).

  Also a ValueError, so callers that report a bad autoencoder folder (e.g. --config.autoencoder)
  report this too."""


@runtime_checkable
class AutoencoderProtocol(Protocol):
  """What fmjax uses of a loaded autoencoder (`fmjax.autoencoders.Autoencoder` is one).

  Images are NHWC in [-1, 1]; latents NHWC. A latent model trains on z = scaling_factor *
  (mean + std * eps) with (mean, std) = encode(images), and its samples are decoded as
  decode(z / scaling_factor). Not required, but `Autoencoder` also has `encode_fn` /
  `decode_fn` (pure versions of encode / decode) and `image_shape` (the inverse of latent_shape).
  `isinstance(obj, AutoencoderProtocol)` works, but on Python 3.11 it reads every member (so
  `Autoencoder.digest` hashes the weights); `missing_members(obj)` reads none and names the gaps.
  """

  #: Its configuration; only `config.in_channels` (channels of the images it encodes) is read.
  config: Any
  #: The pytree `decode_scaled_fn` takes as its first argument (may be empty, e.g. {}).
  params: Any

  @property
  def scaling_factor(self) -> float:
    """The factor latents are multiplied by before a model trains on them (SD-VAE: 0.18215)."""

  @property
  def downsample_factor(self) -> int:
    """Image height / latent height (and width / width); it must divide the image size."""

  @property
  def digest(self) -> str:
    """A string that changes when the weights or config do: latent datasets and runs record it,
    and a run refuses an autoencoder whose digest is not its dataset's."""

  def latent_shape(self, image_shape_hwc) -> tuple[int, int, int]:
    """(h, w, latent_channels) that `encode` gives for images of shape (H, W, in_channels)."""

  def encode(self, images) -> tuple[Any, Any]:
    """(mean, std) of the posterior, numpy float32 [N, h, w, c], of images [N, H, W, in_channels]."""

  def decode(self, latents) -> Any:
    """Images numpy float32 [N, H, W, C] of latents [N, h, w, c] (not times scaling_factor)."""

  def decode_scaled_fn(self, params, scaled_latents) -> Any:
    """Images of scaled latents z as a jax function (jitted by callers): D(z / scaling_factor)."""


def protocol_members() -> tuple[str, ...]:
  """The names AutoencoderProtocol requires, in the order it declares them."""
  names = list(AutoencoderProtocol.__annotations__)
  names += [n for n, v in vars(AutoencoderProtocol).items()
            if not n.startswith('_') and (callable(v) or isinstance(v, property))]
  return tuple(names)


# Members read through another member: (owner, attribute).
NESTED_MEMBERS = (('config', 'in_channels'),)
# The members that are called (the protocol's methods).
_METHODS = tuple(n for n, v in vars(AutoencoderProtocol).items()
                 if inspect.isfunction(v) and not n.startswith('_'))


def _static(obj, name: str):
  """obj.name without running a property (`Autoencoder.digest` hashes every weight)."""
  return inspect.getattr_static(obj, name)


def missing_members(obj) -> list[str]:
  """The AutoencoderProtocol members `obj` lacks ('NAME' or 'NAME (not callable)'), [] if none.

  Looked up without calling properties, so an expensive `digest` is not computed here.
  """
  missing = []
  for name in protocol_members():
    try:
      value = _static(obj, name)
    except AttributeError:
      missing.append(name)
      continue
    if isinstance(value, (staticmethod, classmethod)):   # as found in the class body
      value = value.__func__
    if name in _METHODS and not callable(value):
      missing.append(f'{name} (not callable)')
  for owner, attribute in NESTED_MEMBERS:
    if owner not in missing:
      try:
        _static(getattr(obj, owner), attribute)
      except AttributeError:
        missing.append(f'{owner}.{attribute}')
  return missing


# class_name -> loader(folder, *, dtype, mesh, batch_size). The lone built-in: diffusers' layout.
KINDS: dict[str, Callable] = {DEFAULT_CLASS_NAME: loading.load}


def registered() -> tuple[str, ...]:
  """The registered `_class_name`s, sorted."""
  return tuple(sorted(KINDS))


def _how_to_register() -> str:
  return ('register one before loading: fmjax.autoencoders.register(CLASS_NAME, loader), '
          'loader(folder, *, dtype, mesh, batch_size) returning an object with the members of '
          f'fmjax.autoencoders.AutoencoderProtocol ({", ".join(protocol_members())})')


def register(class_name: str, loader: Callable, *, replace: bool = False) -> None:
  """Makes `load` read folders whose config.json `_class_name` is `class_name` with `loader`.

  loader(folder, *, dtype, mesh, batch_size) returns the autoencoder (see AutoencoderProtocol;
  `load` checks it). dtype, mesh and batch_size are what the caller of `load` passed (defaults
  'float32', None, None); a loader may ignore those it has no use for. Registering a name again
  needs replace=True.
  """
  if not isinstance(class_name, str) or not class_name:
    raise ValueError(f'An autoencoder class name must be a non-empty string, got {class_name!r}.')
  if not callable(loader):
    raise ValueError(f'register({class_name!r}): loader must be a function '
                     f'loader(folder, *, dtype, mesh, batch_size), got {loader!r}.')
  _check_loader_signature(class_name, loader)
  if class_name in KINDS and not replace:
    raise ValueError(f'Autoencoder kind {class_name!r} is already registered; pick another '
                     'name (or replace=True).')
  KINDS[class_name] = loader


def _check_loader_signature(class_name: str, loader: Callable) -> None:
  """A loader that cannot take the folder and the three keywords fails here, not at load time."""
  try:
    inspect.signature(loader).bind('folder', **{k: None for k in LOADER_KEYWORDS})
  except TypeError as e:
    raise ValueError(f'register({class_name!r}): the loader must accept loader(folder, *, dtype, '
                     f'mesh, batch_size) (add **unused_options for those it ignores): {e}.') from None
  except ValueError:   # no signature to inspect (some builtins): trust it
    pass


def unregister(class_name: str) -> None:
  """Forgets a registered kind (no error when it is not registered); AutoencoderKL stays."""
  if class_name == DEFAULT_CLASS_NAME:
    raise ValueError(f'{DEFAULT_CLASS_NAME} is built in and cannot be unregistered; '
                     'register(..., replace=True) replaces its loader.')
  KINDS.pop(class_name, None)


def kind_of(folder) -> str:
  """The kind of an autoencoder folder: its config.json `_class_name`, AutoencoderKL without one.

  Reads config.json only. A missing folder or config.json gives AutoencoderKL, whose loader
  says what the folder must hold. Raises kl.ConfigError for a config.json that is not a JSON
  object, and UnknownAutoencoderError for a `_class_name` that is not registered.
  """
  config_path = os.path.join(os.fspath(folder), loading.CONFIG_NAME)
  if not os.path.isfile(config_path):
    return DEFAULT_CLASS_NAME
  fields = loading.read_config_fields(config_path)
  name = fields.get('_class_name', DEFAULT_CLASS_NAME)
  if not isinstance(name, str):
    raise kl.ConfigError(f'{config_path}: `_class_name` must be a string, got {name!r}.')
  if name not in KINDS:
    raise UnknownAutoencoderError(
        f'{config_path}: `_class_name` = {name!r} is not a registered autoencoder kind '
        f'(registered: {list(registered())}); {_how_to_register()}.')
  return name


def load(folder, *, dtype='float32', mesh=None, batch_size: int | None = None):
  """The autoencoder of `folder`, read by the loader registered for its config.json `_class_name`.

  Args:
    folder: the folder (for a Stable Diffusion pipeline, its vae/ subfolder).
    dtype: compute dtype, for AutoencoderKL 'float32' or 'bfloat16' (the weights stay float32).
    mesh: where `encode` / `decode` run (AutoencoderKL default: one axis over the local devices).
    batch_size: images per compiled call of `encode` / `decode` (AutoencoderKL: 8 per device).
  Raises:
    AutoencoderNotFoundError (a FileNotFoundError): no folder, config.json or weights file.
    kl.ConfigError (a ValueError): config.json is not a JSON object, has an unknown field or an
      unsupported value; UnknownAutoencoderError (one of them) for an unregistered
      `_class_name`, raised before any weights are read.
    AutoencoderLoadError (a ValueError): missing, unused or misshapen tensors.
    AutoencoderProtocolError (a TypeError and ValueError): the loader's object lacks members
      fmjax uses (named).
  """
  folder = os.fspath(folder)
  kind = kind_of(folder)
  autoencoder = KINDS[kind](folder, dtype=dtype, mesh=mesh, batch_size=batch_size)
  missing = missing_members(autoencoder)
  if missing:
    raise AutoencoderProtocolError(
        f'The loader registered for `_class_name` {kind!r} returned a {type(autoencoder).__name__} '
        f'for {folder} that lacks {", ".join(missing)}: fmjax uses every member of '
        f'fmjax.autoencoders.AutoencoderProtocol ({", ".join(protocol_members())}, and '
        f'{", ".join(".".join(m) for m in NESTED_MEMBERS)}); add the missing ones to the class.')
  return autoencoder
