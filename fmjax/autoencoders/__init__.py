"""Autoencoders for latent diffusion: SD-VAE (diffusers' AutoencoderKL) in JAX, with its weights.

  vae = fmjax.autoencoders.load('/path/to/sd-vae-ft-mse')      # config.json + safetensors
  mean, std = vae.encode(images)                                # NHWC in [-1, 1] -> numpy
  latents = vae.scaling_factor * (mean + std * eps)             # what a latent model trains on
  images = vae.decode(latents / vae.scaling_factor)

`kl` is the network (Rombach et al. 2022, layer for layer as diffusers builds it), `loading`
reads and writes diffusers' folder layout, `vae` holds the loaded object with pure
`encode_fn` / `decode_fn` for use inside a caller's `jax.jit`.
"""

from __future__ import annotations

from fmjax.autoencoders.kl import AutoencoderConfig, AutoencoderKL, ConfigError
from fmjax.autoencoders.loading import (AutoencoderLoadError, AutoencoderNotFoundError, load,
                                        read_folder, save)
from fmjax.autoencoders.vae import Autoencoder, init

__all__ = ['Autoencoder', 'AutoencoderConfig', 'AutoencoderKL', 'AutoencoderLoadError',
           'AutoencoderNotFoundError', 'ConfigError', 'init', 'load', 'read_folder', 'save']
