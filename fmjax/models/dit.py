"""DiT (Peebles & Xie 2023, "Scalable diffusion models with transformers") with two-time conditioning.

Patchify by a strided convolution, a fixed 2-D sin-cos position embedding (no learned one),
transformer blocks with adaLN-Zero conditioning (Sec. 3.2: shift/scale/gate regressed from
the conditioning vector, gates and the final layer zero-initialized), and an unpatchify.
The sizes of Table 1 (B/2, L/2, XL/2: 130M / 458M / 675M parameters for 256x256 images as
32x32x4 VAE latents) are the presets; the output predicts the flow-map velocity only (no
learned sigma), with the same channels as the input.

Flow-map specifics, as in MeanFlow (Geng et al. 2025, Sec. 4): two timestep embedders,
one per time input ((s, t) or (t, t - s)), summed with the label embedding (null label
`num_classes` for classifier-free guidance). Timestep embedders run in float32 whatever
`dtype` is. The attention implementation is selectable ('naive' | 'blockwise'); the
blockwise one is memory-efficient under `jax.jvp` and its gradients (fmjax.models.attention).
`qk_norm=True` normalizes queries and keys per head (off by default).

Rematerialization (`remat`: 'none', 'dots' or 'block', fmjax.models.remat): each transformer
block runs under `jax.checkpoint` with a saving policy. 'dots' keeps the outputs of the linear
layers and recomputes norms, modulation, activations and attention; 'block' keeps only each
block's input. Values, gradients and parameters are the same under every policy
(tests/test_remat.py); only memory and time change (benchmarks/memory_plan.py --remat).

Scanned blocks (`scan_blocks=True`): the blocks' parameters are stored stacked along a leading
depth axis (one DiTBlock module whose arrays are [depth, ...]) and the forward pass is one
`jax.lax.scan` over them, so XLA compiles one block body instead of `depth` copies (the
"scan over layers" of large-model JAX trainers): compile time falls with the depth, and under
FSDP only the block being computed is gathered (benchmarks/memory_plan.py --blocks). Without
remat the scanned step holds more temporaries than the unrolled one (each block's residuals are
materialized as loop outputs); with `remat` it holds far fewer, on XLA:CPU. The function
and its initialization are the same as the unrolled network's (a network built with the same
seed holds the same numbers, stacked: tests/test_scan_blocks.py); the parameter tree is not, so a
run's checkpoints load only with the setting they were written with (`stack_block_params` and
`unstack_block_params` convert a parameter tree between the two; reward fine-tuning converts a
base run of the other layout itself, fmjax.from_config.base_params_layout). Remat applies to the
scan body.

Mixed precision (`dtype=jnp.bfloat16`): parameters stay float32 (`param_dtype`); times, their
embeddings and the conditioning MLP run in float32 (a jvp in time differentiates through
sin(1000 t), which bfloat16's 8-bit mantissa would ruin), and the conditioning vector is cast
to the compute dtype only where it enters the blocks; LayerNorm / RMSNorm statistics and the
attention softmax are float32 (flax's norms, fmjax.models.attention); the output comes back in
the input's dtype, so flow maps, jvp tangents of the map and the loss stay float32.
tests/test_mixed_precision.py bounds the bfloat16 step's loss and gradient against float32.
"""

from __future__ import annotations

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from fmjax import conditioning
from fmjax.models import attention as attention_lib
from fmjax.models import embeddings
from fmjax.models import guidance_embedding as guidance_lib
from fmjax.models.remat import block_caller, pure_block, remat_policy

_zeros = nnx.initializers.zeros_init()
_xavier = nnx.initializers.xavier_uniform()

_LATENT = dict(image_size=32, in_channels=4, patch_size=2)
PRESETS = {
    'DiT-B/2': dict(**_LATENT, hidden=768, depth=12, num_heads=12),
    'DiT-L/2': dict(**_LATENT, hidden=1024, depth=24, num_heads=16),
    'DiT-XL/2': dict(**_LATENT, hidden=1152, depth=28, num_heads=16),
    # DiT-S/2 for CIFAR-size pixels or small latents (Table 1's smallest width).
    'DiT-S/2': dict(**_LATENT, hidden=384, depth=12, num_heads=6),
    # For tests and CPU smoke runs.
    'DiT-tiny': dict(image_size=8, in_channels=3, patch_size=2, hidden=32, depth=2, num_heads=2,
                     time_frequency_dim=32),
}


def sincos_2d_position_embedding(dim: int, grid_size: int) -> np.ndarray:
  """Fixed [grid_size^2, dim] embedding: half the channels encode the row, half the column (MAE/DiT)."""
  if dim % 4:
    raise ValueError(f'The 2-D sin-cos position embedding needs hidden % 4 == 0, got {dim}.')
  omega = 1.0 / 10_000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                           np.arange(grid_size, dtype=np.float64), indexing='ij')

  def one_axis(pos):
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


class TimestepEmbedder(nnx.Module):
  """Sinusoidal features of scale * t -> Linear -> SiLU -> Linear (DiT's TimestepEmbedder).

  DiT embeds integer steps 0..999; scale 1000 maps t in [0, 1] onto the same range. Run it
  in float32 (or wider): the DiT passes dtype = promote_types(compute dtype, float32).
  """

  def __init__(self, hidden: int, frequency_dim: int = 256, *, scale: float = 1000.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.frequency_dim, self.scale = frequency_dim, scale
    std = nnx.initializers.normal(0.02)   # DiT initializes the embedding MLP with std 0.02
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=std, rngs=rngs)
    self.linear0 = nnx.Linear(frequency_dim, hidden, **kw)
    self.linear1 = nnx.Linear(hidden, hidden, **kw)

  def __call__(self, t):
    return self.linear1(nnx.silu(self.linear0(embeddings.sinusoidal_embedding(t, self.frequency_dim, scale=self.scale))))


def _stack_trees(trees):
  """Pytrees of one structure -> one pytree of their leaves stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_modules(modules):
  """One module of the shared structure whose arrays are the modules' arrays stacked on axis 0."""
  graphdef, _ = nnx.split(modules[0])
  return nnx.merge(graphdef, _stack_trees([nnx.state(m) for m in modules]))


def scan_stacked_blocks(stacked, h, c, remat: str):
  """h after every block of `stacked` (a DiTBlock whose arrays are [depth, ...]) in order: one
  `jax.lax.scan`, so the compiled program holds one block body whatever the depth.

  The body is pure (the layer's arrays in, nnx.merge inside), as in block_caller, and is
  checkpointed under the policy `remat` names, with prevent_cse=False: the scan already keeps XLA
  from merging the recomputation with the original (jax.checkpoint's documentation advises this
  setting inside scans), and the guard would only block other optimizations.
  """
  policy = remat_policy(remat)
  graphdef, state = nnx.split(stacked)
  layer = pure_block(graphdef)
  if policy is not None:
    layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
  h, _ = jax.lax.scan(lambda h, state: (layer(state, h, c), None), h, state)
  return h


def stack_block_params(params, depth: int):
  """A parameter tree of the unrolled DiT (blocks 0..depth-1) -> the scanned DiT's (`scan_blocks=True`).

  `params`: a nested dict (nnx.to_pure_dict of the model's state, or a checkpoint's params) with
  the blocks under 'blocks' with keys 0..depth-1; the rest is returned unchanged.
  """
  blocks = params['blocks']
  missing = [i for i in range(depth) if i not in blocks and str(i) not in blocks]
  if missing:
    raise ValueError(f'stack_block_params: blocks {missing} are missing from the parameters; is the '
                     f"tree already stacked (keys: {sorted(map(str, blocks))[:6]})?")
  layers = [blocks[i] if i in blocks else blocks[str(i)] for i in range(depth)]
  return {**params, 'blocks': _stack_trees(layers)}


def unstack_block_params(params):
  """The inverse of stack_block_params: the scanned DiT's parameter tree -> the unrolled DiT's."""
  depths = {np.shape(a)[0] for a in jax.tree.leaves(params['blocks'])}
  if len(depths) != 1:
    raise ValueError(f'unstack_block_params: the blocks\' arrays disagree on the leading (depth) axis: '
                     f'{sorted(depths)}; is the tree stacked?')
  (depth,) = depths
  return {**params, 'blocks': {i: jax.tree.map(lambda a: a[i], params['blocks']) for i in range(depth)}}


def modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nnx.Module):
  """Pre-LN transformer block with adaLN-Zero (Peebles & Xie 2023, Fig. 3)."""

  def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0, *, attend,
               qk_norm: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ln = dict(use_bias=False, use_scale=False, epsilon=1e-6, **kw)
    self.num_heads, self.attend = num_heads, attend
    self.norm1 = nnx.LayerNorm(hidden, **ln)
    self.qkv = nnx.Linear(hidden, 3 * hidden, kernel_init=_xavier, **kw)
    # QK-normalization (Dehghani et al. 2023, arXiv 2302.05442, Sec. 3.1.1: LayerNorm of
    # queries and keys; here RMSNorm per head with a learned scale, as SD3 / Lumina use):
    # bounds the attention logits, which grow in large models and under jvp tangents.
    # Off by default: a network without it has exactly the parameters it had before.
    head_dim = hidden // num_heads
    self.q_norm = nnx.RMSNorm(head_dim, epsilon=1e-6, **kw) if qk_norm else None
    self.k_norm = nnx.RMSNorm(head_dim, epsilon=1e-6, **kw) if qk_norm else None
    self.proj = nnx.Linear(hidden, hidden, kernel_init=_xavier, **kw)
    self.norm2 = nnx.LayerNorm(hidden, **ln)
    mlp_hidden = int(hidden * mlp_ratio)
    self.fc1 = nnx.Linear(hidden, mlp_hidden, kernel_init=_xavier, **kw)
    self.fc2 = nnx.Linear(mlp_hidden, hidden, kernel_init=_xavier, **kw)
    self.adaln = nnx.Linear(hidden, 6 * hidden, kernel_init=_zeros, **kw)

  def __call__(self, x, c):
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaln(nnx.silu(c)), 6, axis=-1)
    h = self.qkv(modulate(self.norm1(x), shift1, scale1))
    x = x + gate1[:, None, :] * self.proj(self._attention(h))
    h = self.fc2(nnx.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)), approximate=True))
    return x + gate2[:, None, :] * h

  def _attention(self, qkv):
    if self.q_norm is None:
      return attention_lib.multi_head_self_attention(qkv, self.num_heads, self.attend)
    b, n, c3 = qkv.shape
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, c3 // (3 * self.num_heads)), 3, axis=2)
    q, k = self.q_norm(q[:, :, 0]), self.k_norm(k[:, :, 0])
    return self.attend(q, k, v[:, :, 0]).reshape(b, n, c3 // 3)


class DiT(nnx.Module):
  """net(s, t, x, labels) for x of shape [batch, image_size, image_size, in_channels] (NHWC)."""

  def __init__(self, *, image_size: int = 32, in_channels: int = 4, patch_size: int = 2,
               hidden: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
               num_classes: int = 0, time_conditioning: str = 's_t', time_frequency_dim: int = 256,
               time_scale: float = 1000.0, guidance_conditioning: bool = False, velocity_head: bool = False,
               attention: str = 'naive', attention_options: dict | None = None,
               qk_norm: bool = False, remat: str = 'none', scan_blocks: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f'image_size {image_size} is not a multiple of patch_size {patch_size}.')
    embeddings.two_time_inputs(0.0, 0.0, time_conditioning)   # validates the name early
    remat_policy(remat)   # validates the policy name early
    self.remat, self.scan_blocks, self.depth = remat, bool(scan_blocks), depth
    self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
    self.num_classes, self.time_conditioning, self.dtype = num_classes, time_conditioning, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    attend = attention_lib.attention_fn(attention, **(attention_options or {}))
    self.patch_embed = nnx.Conv(in_channels, hidden, (patch_size, patch_size), strides=patch_size,
                                padding='VALID', kernel_init=_xavier, **kw)
    self.grid = image_size // patch_size
    self.hidden = hidden
    time_kw = dict(scale=time_scale, dtype=jnp.promote_types(dtype, jnp.float32), param_dtype=param_dtype,
                   rngs=rngs)
    self.time_embed_a = TimestepEmbedder(hidden, time_frequency_dim, **time_kw)
    self.time_embed_b = TimestepEmbedder(hidden, time_frequency_dim, **time_kw)
    self.label_embedding = (nnx.Embed(num_classes + 1, hidden, dtype=time_kw['dtype'], param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
                            if num_classes else None)
    # iMF's guidance inputs (omega, interval), added to c; absent (no params) when off.
    self.guidance_embedding = (guidance_lib.GuidanceEmbedding(hidden, time_frequency_dim, **time_kw)
                               if guidance_conditioning else None)
    blocks = [DiTBlock(hidden, num_heads, mlp_ratio, attend=attend, qk_norm=qk_norm, **kw) for _ in range(depth)]
    # Scanned: built as the unrolled blocks (the same draws from rngs), then stacked.
    self.blocks = stack_modules(blocks) if self.scan_blocks else nnx.List(blocks)
    self.final_norm = nnx.LayerNorm(hidden, use_bias=False, use_scale=False, epsilon=1e-6, **kw)
    self.final_adaln = nnx.Linear(hidden, 2 * hidden, kernel_init=_zeros, **kw)
    self.final_linear = nnx.Linear(hidden, patch_size * patch_size * in_channels, kernel_init=_zeros, **kw)
    # iMF's auxiliary velocity head: its own final adaLN and linear layer (absent when off).
    self.velocity_adaln = nnx.Linear(hidden, 2 * hidden, kernel_init=_zeros, **kw) if velocity_head else None
    self.velocity_linear = (nnx.Linear(hidden, patch_size * patch_size * in_channels, kernel_init=_zeros, **kw)
                            if velocity_head else None)

  def embed(self, s, t, labels, batch: int):
    """The float32 conditioning vector c = emb_a + emb_b + emb_label (+ emb_guidance), [batch, hidden]."""
    labels, guidance = conditioning.split(labels)
    guidance_lib.check_inputs(guidance, self.guidance_embedding is not None, 'DiT')
    s, t = embeddings.broadcast_times(s, t, batch)
    a, b = embeddings.two_time_inputs(s, t, self.time_conditioning)
    c = self.time_embed_a(a) + self.time_embed_b(b)
    if self.label_embedding is not None:
      if labels is None:
        labels = jnp.full((batch,), self.num_classes, jnp.int32)
      c = c + self.label_embedding(labels)
    if self.guidance_embedding is not None:
      c = c + self.guidance_embedding(guidance, batch)
    return c

  def __call__(self, s, t, x, labels=None, *, head: str = 'average'):
    """The network's output; head='velocity' the auxiliary velocity head's, head='both' the pair
    (average, velocity) from one pass of the trunk."""
    guidance_lib.check_head(head, self.velocity_linear is not None, 'DiT')
    if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
      raise ValueError(f'DiT expects NHWC inputs [batch, {self.image_size}, {self.image_size}, '
                       f'{self.in_channels}], got {x.shape}.')
    b, p, g = x.shape[0], self.patch_size, self.grid
    c = self.embed(s, t, labels, b).astype(self.dtype)
    h = self.patch_embed(x.astype(self.dtype)).reshape(b, g * g, -1)
    # A fixed embedding, built as a compile-time constant (kept out of params so no optimizer moves it).
    h = h + jnp.asarray(sincos_2d_position_embedding(self.hidden, g), self.dtype)[None]
    if self.scan_blocks:
      h = scan_stacked_blocks(self.blocks, h, c, self.remat)
    else:
      call = block_caller(self.remat)
      for block in self.blocks:
        h = call(block, h, c)
    h = self.final_norm(h)

    def output(adaln, linear):
      shift, scale = jnp.split(adaln(nnx.silu(c)), 2, axis=-1)
      y = linear(modulate(h, shift, scale))
      # Unpatchify: [b, g*g, p*p*C] -> [b, g*p, g*p, C].
      y = y.reshape(b, g, g, p, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5)
      return y.reshape(b, g * p, g * p, self.in_channels).astype(x.dtype)

    average = lambda: output(self.final_adaln, self.final_linear)
    velocity = lambda: output(self.velocity_adaln, self.velocity_linear)
    return {'average': average, 'velocity': velocity,
            'both': lambda: (average(), velocity())}[head]()
