"""A DDPM++ U-Net (EDM's `SongUNet`) with two-time conditioning, for 28x28 and 32x32 images.

The architecture follows DDPM++ as configured by EDM (Karras et al. 2022, "Elucidating the
design space of diffusion-based generative models", Table 7 and `training/networks.py`):
residual blocks with GroupNorm-SiLU-conv, additive embedding injection, skip scaling by
1/sqrt(2), average-pool down / nearest up resampling with a 1x1 projected skip,
self-attention at the 16x16 resolution (64 channels per head), dropout, zero-initialized
last convolutions. The 'cifar10' preset (128 channels, multipliers 2-2-2, 4 blocks per
level) is the ~56M-parameter network that EDM and the consistency-model papers (ECT,
sCM) use on CIFAR-10.

Flow-map specifics: the network sees two times, (s, t) or (t, t - s), each embedded by
sinusoidal features in float32 and mixed by a float32 MLP (times and their embeddings
stay float32 whatever `dtype` is: `jax.jvp` in time differentiates through them; the
features are of `time_scale * t`, 1000 t as DDPM/EDM's VP noise level). Labels
use an embedding with a null row `num_classes` for classifier-free guidance.

Dropout is explicit: pass `key=` to `__call__` (or to the functional `apply`) to drop;
without a key the network is deterministic, which is what the jvp rules need unless the
same key is used for every evaluation that must agree.

Rematerialization (`remat`: 'none', 'dots' or 'block', fmjax.models.remat): each residual
block (with its attention) runs under `jax.checkpoint`; 'dots' keeps the convolutions' and
dense layers' outputs and recomputes GroupNorm, SiLU, dropout and attention, 'block' keeps
only the block's inputs. The dropout key is a block input, so the recomputation drops the
same units. Values and gradients are the same under every policy (tests/test_remat.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fmjax import conditioning
from fmjax.models import attention as attention_lib
from fmjax.models import embeddings
from fmjax.models import guidance_embedding as guidance_lib
from fmjax.models.remat import block_caller, remat_policy

_SKIP_SCALE = math.sqrt(0.5)
_zeros = nnx.initializers.zeros_init()
_xavier = nnx.initializers.xavier_uniform()

PRESETS = {
    # EDM's DDPM++ CIFAR-10 configuration (Karras et al. 2022, Table 7; dropout 0.13 there).
    'cifar10': dict(image_size=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                    num_res_blocks=4, attn_resolutions=(16,), dropout=0.13),
    # MNIST-size: 28 -> 14 -> 7, attention at 14x14.
    'mnist': dict(image_size=28, in_channels=1, model_channels=64, channel_mult=(1, 2, 2),
                  num_res_blocks=2, attn_resolutions=(14,), dropout=0.1),
    # For tests and CPU smoke runs: every code path (down, up, attention, labels) at 8x8.
    'tiny': dict(image_size=8, in_channels=3, model_channels=16, channel_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(4,), channels_per_head=8, emb_mult=2),
}


def group_norm(channels: int, dtype, param_dtype, rngs) -> nnx.GroupNorm:
  # EDM: min(32, C // 4) groups, eps 1e-6; flax computes the statistics in float32.
  return nnx.GroupNorm(channels, num_groups=min(32, channels // 4), epsilon=1e-6, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout with an explicit key; the identity when key is None or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def downsample(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nnx.Module):
  """EDM's UNetBlock in its DDPM++ setting (adaptive_scale=False, resample_proj=True)."""

  def __init__(self, cin: int, cout: int, emb_channels: int, *, resample: str | None = None,
               attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0,
               attend=attention_lib.naive_attention, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resample, self.dropout_rate, self.attend = resample, dropout, attend
    self.norm0 = group_norm(cin, dtype, param_dtype, rngs)
    self.conv0 = nnx.Conv(cin, cout, (3, 3), kernel_init=_xavier, **kw)
    self.affine = nnx.Linear(emb_channels, cout, kernel_init=_xavier, **kw)
    self.norm1 = group_norm(cout, dtype, param_dtype, rngs)
    self.conv1 = nnx.Conv(cout, cout, (3, 3), kernel_init=_zeros, **kw)
    self.skip = (nnx.Conv(cin, cout, (1, 1), kernel_init=_xavier, **kw)
                 if cin != cout or resample else None)
    self.num_heads = max(1, cout // channels_per_head) if attention else 0
    if attention:
      self.norm2 = group_norm(cout, dtype, param_dtype, rngs)
      self.qkv = nnx.Linear(cout, 3 * cout, kernel_init=_xavier, **kw)
      self.proj = nnx.Linear(cout, cout, kernel_init=_zeros, **kw)

  def _resample(self, x):
    if self.resample == 'down':
      return downsample(x)
    if self.resample == 'up':
      return upsample(x)
    return x

  def __call__(self, x, emb, key=None):
    orig = x
    h = self.conv0(self._resample(nnx.silu(self.norm0(x))))
    h = nnx.silu(self.norm1(h + self.affine(emb)[:, None, None, :]))
    h = self.conv1(dropout(h, self.dropout_rate, key))
    skip = self.skip(self._resample(orig)) if self.skip is not None else orig
    x = (h + skip) * _SKIP_SCALE
    if self.num_heads:
      b, hh, ww, c = x.shape
      qkv = self.qkv(self.norm2(x)).reshape(b, hh * ww, 3 * c)
      a = attention_lib.multi_head_self_attention(qkv, self.num_heads, self.attend)
      x = (self.proj(a).reshape(b, hh, ww, c) + x) * _SKIP_SCALE
    return x


class UNet(nnx.Module):
  """net(s, t, x, labels) for images x of shape [batch, height, width, channels] (NHWC)."""

  def __init__(self, *, image_size: int = 32, in_channels: int = 3, out_channels: int | None = None,
               model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2),
               num_res_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
               channels_per_head: int = 64, dropout: float = 0.0, emb_mult: int = 4,
               num_classes: int = 0, time_conditioning: str = 's_t', time_scale: float = 1000.0,
               guidance_conditioning: bool = False, velocity_head: bool = False, attention: str = 'naive',
               attention_options: dict | None = None, remat: str = 'none', dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if image_size % 2 ** (len(channel_mult) - 1):
      raise ValueError(f'image_size {image_size} must be divisible by 2^{len(channel_mult) - 1} '
                       f'for {len(channel_mult)} levels; use fewer channel_mult entries.')
    embeddings.two_time_inputs(0.0, 0.0, time_conditioning)   # validates the name early
    remat_policy(remat)                                        # and the remat policy name
    self.remat = remat
    out_channels = out_channels or in_channels
    self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
    self.time_conditioning, self.dtype, self.model_channels = time_conditioning, dtype, model_channels
    attend = attention_lib.attention_fn(attention, **(attention_options or {}))
    emb_channels = model_channels * emb_mult
    self.time_scale = time_scale
    # float32 at least: bf16 would round the time differences a jvp in time resolves.
    f32 = dict(dtype=jnp.promote_types(dtype, jnp.float32), param_dtype=param_dtype, rngs=rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # Conditioning: [emb(a), emb(b)] (+ label) -> MLP, all float32.
    self.map_layer0 = nnx.Linear(2 * model_channels, emb_channels, kernel_init=_xavier, **f32)
    self.map_layer1 = nnx.Linear(emb_channels, emb_channels, kernel_init=_xavier, **f32)
    self.label_embedding = (nnx.Embed(num_classes + 1, 2 * model_channels, **f32)
                            if num_classes else None)
    # iMF's guidance inputs (omega, interval), added to the embedding; absent when off.
    self.guidance_embedding = (guidance_lib.GuidanceEmbedding(emb_channels, model_channels,
                                                              scale=time_scale, **f32)
                               if guidance_conditioning else None)

    block = lambda cin, cout, **o: ResBlock(
        cin, cout, emb_channels, channels_per_head=channels_per_head, dropout=dropout,
        attend=attend, **kw, **o)
    self.conv_in = nnx.Conv(in_channels, model_channels, (3, 3), kernel_init=_xavier, **kw)
    enc, skips, cout = [], [model_channels], model_channels
    for level, mult in enumerate(channel_mult):
      res = image_size >> level
      if level:
        enc.append(block(cout, cout, resample='down'))
        skips.append(cout)
      for _ in range(num_res_blocks):
        cin, cout = cout, model_channels * mult
        enc.append(block(cin, cout, attention=res in attn_resolutions))
        skips.append(cout)
    dec = []
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = image_size >> level
      if level == len(channel_mult) - 1:
        dec.append((False, block(cout, cout, attention=True)))
        dec.append((False, block(cout, cout)))
      else:
        dec.append((False, block(cout, cout, resample='up')))
      for idx in range(num_res_blocks + 1):
        cin, cout = cout + skips.pop(), model_channels * mult
        dec.append((True, block(cin, cout, attention=idx == num_res_blocks and res in attn_resolutions)))
    self.encoder = nnx.List(enc)
    self.decoder = nnx.List([b for _, b in dec])
    self.decoder_takes_skip = tuple(t for t, _ in dec)
    self.norm_out = group_norm(cout, dtype, param_dtype, rngs)
    self.conv_out = nnx.Conv(cout, out_channels, (3, 3), kernel_init=_zeros, **kw)
    # iMF's auxiliary velocity head: a second output convolution (absent when off).
    self.velocity_conv_out = (nnx.Conv(cout, out_channels, (3, 3), kernel_init=_zeros, **kw)
                              if velocity_head else None)

  def embed(self, s, t, labels, batch: int):
    """The float32 conditioning vector [batch, emb_channels] of (s, t, labels)."""
    labels, guidance = conditioning.split(labels)
    guidance_lib.check_inputs(guidance, self.guidance_embedding is not None, 'UNet')
    s, t = embeddings.broadcast_times(s, t, batch)
    a, b = embeddings.two_time_inputs(s, t, self.time_conditioning)
    emb = jnp.concatenate([
        embeddings.sinusoidal_embedding(a, self.model_channels, scale=self.time_scale),
        embeddings.sinusoidal_embedding(b, self.model_channels, scale=self.time_scale)], axis=-1)
    if self.label_embedding is not None:
      if labels is None:
        labels = jnp.full((batch,), self.num_classes, jnp.int32)
      emb = emb + self.label_embedding(labels)
    emb = nnx.silu(self.map_layer1(nnx.silu(self.map_layer0(emb))))
    if self.guidance_embedding is not None:
      emb = emb + self.guidance_embedding(guidance, batch)
    return emb

  def __call__(self, s, t, x, labels=None, *, key=None, head: str = 'average'):
    guidance_lib.check_head(head, self.velocity_conv_out is not None, 'UNet')
    if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
      raise ValueError(f'UNet expects NHWC images [batch, {self.image_size}, {self.image_size}, '
                       f'{self.in_channels}], got {x.shape}.')
    emb = self.embed(s, t, labels, x.shape[0]).astype(self.dtype)
    keys = iter(jax.random.split(key, len(self.encoder) + len(self.decoder))) if key is not None else None
    nxt = lambda: next(keys) if keys is not None else None
    call = block_caller(self.remat)
    h = self.conv_in(x.astype(self.dtype))
    skips = [h]
    for blk in self.encoder:
      h = call(blk, h, emb, nxt())
      skips.append(h)
    for takes_skip, blk in zip(self.decoder_takes_skip, self.decoder):
      if takes_skip:
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = call(blk, h, emb, nxt())
    h = nnx.silu(self.norm_out(h))
    if head == 'both':   # (average, velocity) from one pass of the trunk
      return self.conv_out(h).astype(x.dtype), self.velocity_conv_out(h).astype(x.dtype)
    conv_out = self.velocity_conv_out if head == 'velocity' else self.conv_out
    return conv_out(h).astype(x.dtype)
