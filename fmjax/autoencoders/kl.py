"""SD-VAE: diffusers' `AutoencoderKL` as a Flax NNX module, channels last, and its config.

The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, "High-resolution image
synthesis with latent diffusion models", Sec. 3 and App. G), layer for layer as diffusers 0.42
builds it (`models/autoencoders/autoencoder_kl.py`, `Encoder` / `Decoder` of
`models/autoencoders/vae.py`, and the blocks they use):

  encoder  conv_in 3x3 -> per level a DownEncoderBlock2D (`layers_per_block` ResnetBlock2D, then
           a stride-2 3x3 conv after zero padding of one row/column at the bottom/right only,
           except at the last level) -> UNetMidBlock2D (resnet, single-head self-attention,
           resnet) -> GroupNorm -> SiLU -> conv_out 3x3 to 2 * latent_channels moments
  decoder  conv_in 3x3 -> UNetMidBlock2D -> per level, widest first, an UpDecoderBlock2D
           (`layers_per_block + 1` resnets, then nearest x2 and a 3x3 conv, except at the last
           level) -> GroupNorm -> SiLU -> conv_out 3x3
  ResnetBlock2D  x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 `conv_shortcut` on x
           when the width changes; every GroupNorm has eps 1e-6 and `norm_num_groups` groups
  attention  GroupNorm -> q, k, v linear maps (one head of the full width, scale 1/sqrt(C)) ->
           softmax -> output linear -> + input (rescale_output_factor 1)
  quant_conv (1x1, 2L -> 2L) after the encoder and post_quant_conv (1x1, L -> L) before the
  decoder, each optional; the posterior (diffusers' DiagonalGaussianDistribution): mean, logvar
  = the two channel halves of the moments, logvar clamped to [-30, 20], std = exp(logvar / 2).

Images and latents are NHWC. `dtype` is the compute dtype (bfloat16 halves the activation
memory); parameters stay `param_dtype` (float32). GroupNorm statistics, the attention softmax
and the posterior are float32 whatever `dtype` is. Parameter names mirror diffusers' module
names, so `fmjax.autoencoders.loading` maps a diffusers checkpoint onto them mechanically.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

DOWN_BLOCK = 'DownEncoderBlock2D'
UP_BLOCK = 'UpDecoderBlock2D'
# diffusers' activation table maps both names to torch.nn.SiLU.
SILU_NAMES = ('silu', 'swish')
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
GROUP_NORM_EPS = 1e-6

# config.json fields of diffusers' AutoencoderKL that do not change the network: accepted, not kept.
IGNORED_FIELDS = ('sample_size', 'force_upcast', '_class_name', '_diffusers_version', '_name_or_path',
                  '_use_default_values')


class ConfigError(ValueError):
  """An AutoencoderKL config field that is unknown or has a value this implementation lacks."""


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """The fields of diffusers' AutoencoderKL config that define the network, with its defaults.

  Defaults are diffusers' `AutoencoderKL.__init__` defaults, so a config.json without a field
  means what it means to diffusers; `AutoencoderConfig.sd_vae()` is Stable Diffusion's VAE.
  The block types default to one DownEncoderBlock2D / UpDecoderBlock2D per level.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  down_block_types: tuple[str, ...] | None = None
  up_block_types: tuple[str, ...] | None = None

  def __post_init__(self):
    def fail(field, why):
      raise ConfigError(f'AutoencoderKL config field `{field}` = {getattr(self, field)!r}: {why}')

    levels = self.block_out_channels
    if isinstance(levels, (list, tuple)):
      object.__setattr__(self, 'block_out_channels', levels := tuple(levels))
    if not (isinstance(levels, tuple) and levels and all(_is_int(c) and c > 0 for c in levels)):
      fail('block_out_channels', 'must be a non-empty list of positive ints.')
    for name in ('in_channels', 'out_channels', 'latent_channels', 'layers_per_block', 'norm_num_groups'):
      if not (_is_int(getattr(self, name)) and getattr(self, name) > 0):
        fail(name, 'must be a positive int.')
    bad = [c for c in levels if c % self.norm_num_groups]
    if bad:
      fail('norm_num_groups', f'must divide every entry of block_out_channels {list(levels)} '
                              f'(GroupNorm over {bad} channels).')
    for name, kind in (('down_block_types', DOWN_BLOCK), ('up_block_types', UP_BLOCK)):
      value = getattr(self, name)
      if value is None:
        value = (kind,) * len(levels)
      if isinstance(value, (list, tuple)):
        object.__setattr__(self, name, value := tuple(value))
      if not isinstance(value, tuple) or any(v != kind for v in value):
        fail(name, f'only {kind} blocks are supported (SD-VAE\'s architecture).')
      if len(value) != len(levels):
        fail(name, f'has {len(value)} blocks for {len(levels)} block_out_channels; they must match.')
    if self.act_fn not in SILU_NAMES:
      fail('act_fn', 'only silu (swish) is supported.')
    if not (isinstance(self.scaling_factor, (int, float)) and not isinstance(self.scaling_factor, bool)
            and self.scaling_factor > 0):
      fail('scaling_factor', 'must be a positive number.')
    if self.shift_factor not in (None, 0, 0.0) or isinstance(self.shift_factor, bool):
      fail('shift_factor', 'only None or 0 is supported (latents = scaling_factor * posterior sample, '
                           'as SD-VAE; shifted latents are another convention).')
    for name in ('latents_mean', 'latents_std'):
      if getattr(self, name) is not None:
        fail(name, 'only None is supported (per-channel latent statistics are another convention).')
    for name in ('use_quant_conv', 'use_post_quant_conv', 'mid_block_add_attention'):
      if not isinstance(getattr(self, name), bool):
        fail(name, 'must be true or false.')

  @classmethod
  def sd_vae(cls, **overrides) -> AutoencoderConfig:
    """Stable Diffusion's VAE (stabilityai/sd-vae-ft-mse and -ft-ema): f = 8, 4 latent channels."""
    fields = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                  norm_num_groups=32, scaling_factor=0.18215)
    return cls(**{**fields, **overrides})

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any], source: str = '') -> AutoencoderConfig:
    """From a diffusers config.json dict: unknown fields are refused, IGNORED_FIELDS dropped."""
    where = f' in {source}' if source else ''
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known - set(IGNORED_FIELDS))
    if unknown:
      raise ConfigError(f'Unknown AutoencoderKL config field(s) {unknown}{where}; this implementation '
                        f'knows {sorted(known)} and ignores {list(IGNORED_FIELDS)}.')
    if fields.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
      raise ConfigError(f'AutoencoderKL config field `_class_name` = {fields["_class_name"]!r}{where}: '
                        'only AutoencoderKL is supported.')
    try:
      return cls(**{k: v for k, v in fields.items() if k in known})
    except ConfigError as e:
      raise ConfigError(f'{e}{where}') from None

  def to_dict(self) -> dict[str, Any]:
    """diffusers' config.json fields (JSON types), without `_class_name`."""
    out = dataclasses.asdict(self)
    for k, v in out.items():
      if isinstance(v, tuple):
        out[k] = list(v)
    return out

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# Layers.


class _Layers:
  """The keyword arguments every layer of one network shares."""

  def __init__(self, groups, dtype, param_dtype, precision, rngs):
    self.groups, self.dtype, self.precision = groups, dtype, precision
    self.kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def norm(self, channels: int) -> nnx.GroupNorm:
    # Two-pass variance (flax's fast E[x^2] - E[x]^2 loses digits against PyTorch's GroupNorm);
    # flax reduces in float32 for bfloat16 inputs.
    return nnx.GroupNorm(channels, num_groups=self.groups, epsilon=GROUP_NORM_EPS,
                         use_fast_variance=False, **self.kw)

  def conv(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding='SAME') -> nnx.Conv:
    if padding == 'SAME':   # PyTorch's padding = kernel // 2 on every side
      padding = ((kernel // 2, kernel // 2),) * 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding,
                    precision=self.precision, **self.kw)

  def linear(self, cin: int, cout: int) -> nnx.Linear:
    return nnx.Linear(cin, cout, precision=self.precision, **self.kw)


class ResnetBlock(nnx.Module):
  """diffusers' ResnetBlock2D without a time embedding (temb_channels None, dropout 0)."""

  def __init__(self, cin: int, cout: int, layers: _Layers):
    self.norm1, self.conv1 = layers.norm(cin), layers.conv(cin, cout)
    self.norm2, self.conv2 = layers.norm(cout), layers.conv(cout, cout)
    self.conv_shortcut = layers.conv(cin, cout, kernel=1) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return skip + h


class Attention(nnx.Module):
  """The mid block's attention: one head over all channels, GroupNorm first, residual after."""

  def __init__(self, channels: int, layers: _Layers):
    self.group_norm = layers.norm(channels)
    self.to_q, self.to_k = layers.linear(channels, channels), layers.linear(channels, channels)
    self.to_v, self.to_out = layers.linear(channels, channels), layers.linear(channels, channels)
    self.precision = layers.precision

  def __call__(self, x):
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    # Scores and softmax in float32 (diffusers' upcast_softmax); the products in the compute dtype.
    s = jnp.einsum('bqc,bkc->bqk', q, k, precision=self.precision,
                   preferred_element_type=jnp.float32) / math.sqrt(c)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum('bqk,bkc->bqc', p.astype(v.dtype), v, precision=self.precision,
                   preferred_element_type=jnp.float32).astype(v.dtype)
    return x + self.to_out(o).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """UNetMidBlock2D: resnet, (attention), resnet; output_scale_factor 1."""

  def __init__(self, channels: int, add_attention: bool, layers: _Layers):
    self.resnets = nnx.List([ResnetBlock(channels, channels, layers) for _ in range(2)])
    self.attention = Attention(channels, layers) if add_attention else None

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class DownBlock(nnx.Module):
  """DownEncoderBlock2D: resnets, then (unless last) Downsample2D(use_conv, padding=0)."""

  def __init__(self, cin: int, cout: int, num_layers: int, downsample: bool, layers: _Layers):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, layers) for i in range(num_layers)])
    self.downsampler = layers.conv(cout, cout, stride=2, padding='VALID') if downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsampler is not None:
      # diffusers pads (left 0, right 1, top 0, bottom 1) before a stride-2 conv without padding.
      x = self.downsampler(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
    return x


class UpBlock(nnx.Module):
  """UpDecoderBlock2D: resnets, then (unless last) nearest x2 upsampling and a 3x3 conv."""

  def __init__(self, cin: int, cout: int, num_layers: int, upsample: bool, layers: _Layers):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, layers) for i in range(num_layers)])
    self.upsampler = layers.conv(cout, cout) if upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsampler is not None:
      x = self.upsampler(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    return x


class Encoder(nnx.Module):
  def __init__(self, config: AutoencoderConfig, layers: _Layers):
    widths = config.block_out_channels
    self.conv_in = layers.conv(config.in_channels, widths[0])
    self.down_blocks = nnx.List([
        DownBlock(widths[max(i - 1, 0)], c, config.layers_per_block, i < len(widths) - 1, layers)
        for i, c in enumerate(widths)])
    self.mid_block = MidBlock(widths[-1], config.mid_block_add_attention, layers)
    self.conv_norm_out = layers.norm(widths[-1])
    self.conv_out = layers.conv(widths[-1], 2 * config.latent_channels)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, config: AutoencoderConfig, layers: _Layers):
    widths = tuple(reversed(config.block_out_channels))
    self.conv_in = layers.conv(config.latent_channels, widths[0])
    self.mid_block = MidBlock(widths[0], config.mid_block_add_attention, layers)
    self.up_blocks = nnx.List([
        UpBlock(widths[max(i - 1, 0)], c, config.layers_per_block + 1, i < len(widths) - 1, layers)
        for i, c in enumerate(widths)])
    self.conv_norm_out = layers.norm(widths[-1])
    self.conv_out = layers.conv(widths[-1], config.out_channels)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """vae.encode(images) -> (mean, std); vae.decode(latents) -> images; NHWC, outputs float32.

  `precision` is passed to every conv, linear map and attention product; float32 callers who
  want PyTorch's float32 numbers on GPUs pass `jax.lax.Precision.HIGHEST` (JAX's default lets
  float32 convolutions use TF32 there).
  """

  def __init__(self, config: AutoencoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               precision=None, rngs: nnx.Rngs):
    self.config, self.dtype = config, dtype
    layers = _Layers(config.norm_num_groups, dtype, param_dtype, precision, rngs)
    self.encoder = Encoder(config, layers)
    self.decoder = Decoder(config, layers)
    lat = config.latent_channels
    self.quant_conv = layers.conv(2 * lat, 2 * lat, kernel=1) if config.use_quant_conv else None
    self.post_quant_conv = layers.conv(lat, lat, kernel=1) if config.use_post_quant_conv else None

  def moments(self, images):
    """The 2 * latent_channels posterior moments (mean, then unclamped logvar), compute dtype."""
    self._check(images, self.config.in_channels, 'images', 'in_channels')
    h = self.encoder(images.astype(self.dtype))
    return self.quant_conv(h) if self.quant_conv is not None else h

  def encode(self, images):
    """(mean, std) of the diagonal Gaussian posterior, float32 [B, H/f, W/f, latent_channels]."""
    mean, logvar = jnp.split(self.moments(images).astype(jnp.float32), 2, axis=-1)
    logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
    return mean, jnp.exp(0.5 * logvar)

  def decode(self, latents):
    """Images float32 [B, H*f, W*f, out_channels] of latents (not multiplied by scaling_factor)."""
    self._check(latents, self.config.latent_channels, 'latents', 'latent_channels')
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    """The reconstruction decode(mean) of images."""
    return self.decode(self.encode(images)[0])

  @staticmethod
  def _check(x, channels, what, field):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f'AutoencoderKL expects {what} NHWC [batch, height, width, {channels}] '
                       f'({field}), got shape {tuple(x.shape)}.')
