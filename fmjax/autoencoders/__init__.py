"""Autoencoders for latent diffusion: SD-VAE (diffusers' AutoencoderKL) in JAX, and a registry of kinds.

  vae = fmjax.autoencoders.load('/path/to/sd-vae-ft-mse')      # config.json + safetensors
  mean, std = vae.encode(images)                                # NHWC in [-1, 1] -> numpy
  latents = vae.scaling_factor * (mean + std * eps)             # what a latent model trains on
  images = vae.decode(latents / vae.scaling_factor)

`load` reads a folder with the loader registered for its config.json `_class_name`
(AutoencoderKL when it has none); `register('MyKind', loader)` adds a kind, and what a loader
returns must have the members of `AutoencoderProtocol` (checked at load time).

`kl` is the network (Rombach et al. 2022, layer for layer as diffusers builds it), `loading`
reads and writes diffusers' folder layout, `vae` holds the loaded object with pure
`encode_fn` / `decode_fn` for use inside a caller's `jax.jit`, `registry` maps `_class_name`s
to loaders.
"""

from __future__ import annotations

from fmjax.autoencoders.kl import AutoencoderConfig, AutoencoderKL, ConfigError
from fmjax.autoencoders.loading import (AutoencoderLoadError, AutoencoderNotFoundError, read_folder,
                                        save)
from fmjax.autoencoders.registry import (KINDS, AutoencoderProtocol, AutoencoderProtocolError,
                                         UnknownAutoencoderError, load, missing_members, register,
                                         registered, unregister)
from fmjax.autoencoders.vae import Autoencoder, init

__all__ = ['Autoencoder', 'AutoencoderConfig', 'AutoencoderKL', 'AutoencoderLoadError',
           'AutoencoderNotFoundError', 'AutoencoderProtocol', 'AutoencoderProtocolError',
           'ConfigError', 'KINDS', 'UnknownAutoencoderError', 'init', 'load', 'missing_members',
           'read_folder', 'register', 'registered', 'save', 'unregister']
