"""Analytic FLOP counts of the DiT and U-Net, and of each training rule's step, from shapes.

Why analytic: XLA:GPU's cost analysis leaves out the GEMMs it hands to cuBLAS, so it cannot
give an MFU; XLA:CPU's count (every op lowered by XLA) is the cross-check at small sizes
(tests/test_flops.py).

What is counted (per example): every matmul and convolution at 2 FLOPs per multiply-add
(`nnx.Linear`, `nnx.Conv`, read from the built module's shapes; convolution taps on the
zero padding are not counted), and the two attention
matmuls, q k^T and P v, 4 N^2 C for N tokens and C channels. Left out: normalizations,
activations, softmax, residual adds (a few FLOPs per activation element against hundreds per
element in the matmuls) and the optimizer update (a few dozen FLOPs per parameter, once per
step, not per example). So the count is a lower bound of XLA:CPU's, within a few percent at
realistic widths.

Derivative multiples, per example, with F = F_lin + F_att the forward:
  backward of a forward (grads of params and input)        2 F
  jvp tangent on top of the primal                          T = F_lin + 2 F_att
    (a matmul's tangent dx W costs one matmul; attention's tangent needs dq k^T, q dk^T,
     dP v and P dv, two per primal attention matmul)
  reverse mode through a jvp (primal and tangent graphs)    2 (F + T)
  a stopped forward (a target)                              F
Rule step costs per row, off-diagonal / diagonal (the diagonal rows are flow matching, 3 F):
  flow_matching   -            / 3F
  lsd             3(F + T) + F / 3F        (jvp with backprop through its tangent, stopped target)
  meanflow        3F + T       / 3F        (jvp, gradient through the primal only)
  meanflow+cfg    + 1 or 2 F   / + F       (stopped null pass; conditional one too if kappa != 0)
  imf             3F + T + F   / 3F(+F)    (the model's own velocity as the tangent: one more pass)
  imf, guidance   3F + T + 2F  / 3F + F    (guidance_conditioning: omega drawn per row, so the
    conditioning                            stopped v_c and v_u passes run on every row)
    + velocity head  + 3H      / + 3H      (H: the head's output layers; it shares the trunk
                                            pass at the row's own inputs, head='both')
  sct             3F + T       / -
For an MLP (F_att = 0) these give lsd 7/3 = 2.33, meanflow 4/3, imf 5/3, sct 4/3 times flow
matching, as XLA:CPU counts in docs/bench/loss_cost_mlp_cpu.md (2.334, 1.340, 1.672, 1.339).
"""

from __future__ import annotations

import dataclasses

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Forward:
  """Forward FLOPs per example: matmuls and convolutions (linear) and attention matmuls."""
  linear: float
  attention: float
  head: float = 0.0   # the auxiliary velocity head's own output layers (iMF), when present

  @property
  def total(self) -> float:
    return self.linear + self.attention

  @property
  def tangent(self) -> float:
    """Extra FLOPs of a jvp's tangent on top of its primal (see the module docstring)."""
    return self.linear + 2.0 * self.attention


def linear_flops(layer: nnx.Linear, tokens: int) -> float:
  return 2.0 * tokens * layer.in_features * layer.out_features


def _taps(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
  """(kernel taps that land inside the input, summed over output positions; output size) on
  one axis. 'SAME' zero-pads: taps on the padding multiply zeros and are not counted (XLA's
  count leaves them out too; it matters at 8x8, where a 3x3 convolution has 1/4 of its taps
  on the border)."""
  if padding == 'VALID':
    out = (size - kernel) // stride + 1
    return out * kernel, out
  out = -(-size // stride)
  pad_before = max((out - 1) * stride + kernel - size, 0) // 2
  taps = sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride + k - pad_before < size)
  return taps, out


def conv_flops(layer: nnx.Conv, size: int) -> tuple[float, int]:
  """(FLOPs, output size) of a square 'SAME' or 'VALID' strided convolution on size x size."""
  kernel = tuple(layer.kernel_size)
  strides = layer.strides
  stride = strides if isinstance(strides, int) else (tuple(strides or (1,))[0])
  padding = layer.padding if isinstance(layer.padding, str) else 'SAME'
  taps, out = _taps(size, kernel[0], stride or 1, padding)
  return 2.0 * taps * taps * layer.in_features * layer.out_features, out


def attention_flops(tokens: int, channels: int) -> float:
  """q k^T and P v over all heads: 2 N^2 C each."""
  return 4.0 * tokens * tokens * channels


def dit_forward(module) -> Forward:
  """Per-example forward FLOPs of a `fmjax.models.dit.DiT` (built or abstract)."""
  lin, _ = conv_flops(module.patch_embed, module.image_size)
  n = module.grid * module.grid
  for name in ('time_embed_a', 'time_embed_b'):
    emb = getattr(module, name)
    lin += linear_flops(emb.linear0, 1) + linear_flops(emb.linear1, 1)
  if getattr(module, 'guidance_embedding', None) is not None:   # iMF's omega and interval
    emb = module.guidance_embedding
    lin += linear_flops(emb.linear0, 1) + linear_flops(emb.linear1, 1)
  att = 0.0
  # Scanned blocks are one module with stacked arrays; its layers' static shapes are one block's.
  blocks = [module.blocks] * module.depth if getattr(module, 'scan_blocks', False) else module.blocks
  for block in blocks:
    lin += linear_flops(block.adaln, 1)   # per example: the conditioning vector
    lin += sum(linear_flops(getattr(block, k), n) for k in ('qkv', 'proj', 'fc1', 'fc2'))
    att += attention_flops(n, block.proj.out_features)
  lin += linear_flops(module.final_adaln, 1) + linear_flops(module.final_linear, n)
  head = 0.0
  if getattr(module, 'velocity_linear', None) is not None:
    head = linear_flops(module.velocity_adaln, 1) + linear_flops(module.velocity_linear, n)
  return Forward(lin, att, head)


def _resblock(block, size: int) -> tuple[float, float, int]:
  """(linear, attention, output size) of a U-Net ResBlock on size x size inputs."""
  if block.resample == 'down':
    size //= 2
  elif block.resample == 'up':
    size *= 2
  lin = conv_flops(block.conv0, size)[0] + conv_flops(block.conv1, size)[0]
  lin += linear_flops(block.affine, 1)
  if block.skip is not None:
    lin += conv_flops(block.skip, size)[0]
  att = 0.0
  if block.num_heads:
    tokens = size * size
    lin += linear_flops(block.qkv, tokens) + linear_flops(block.proj, tokens)
    att = attention_flops(tokens, block.proj.out_features)
  return lin, att, size


def unet_forward(module) -> Forward:
  """Per-example forward FLOPs of a `fmjax.models.unet.UNet` (built or abstract)."""
  size = module.image_size
  lin = linear_flops(module.map_layer0, 1) + linear_flops(module.map_layer1, 1)
  lin += conv_flops(module.conv_in, size)[0]
  att = 0.0
  for block in list(module.encoder) + list(module.decoder):
    block_lin, block_att, size = _resblock(block, size)
    lin, att = lin + block_lin, att + block_att
  lin += conv_flops(module.conv_out, size)[0]
  head = 0.0
  if getattr(module, 'velocity_conv_out', None) is not None:
    head = conv_flops(module.velocity_conv_out, size)[0]
  return Forward(lin, att, head)


def forward(module) -> Forward:
  """Per-example forward FLOPs of a DiT or U-Net module."""
  from fmjax.models import dit, unet
  if isinstance(module, dit.DiT):
    return dit_forward(module)
  if isinstance(module, unet.UNet):
    return unet_forward(module)
  raise TypeError(f'No analytic FLOP count for {type(module).__name__}; DiT and UNet only.')


RULE_COSTS = ('flow_matching', 'lsd', 'meanflow', 'imf', 'sct')


def rule_row_costs(rule: str, fwd: Forward, *, guidance: bool = False, kappa: float = 0.0,
                   labels: bool = True, guidance_conditioning: bool = False,
                   velocity_head: bool = False) -> tuple[float, float]:
  """(off-diagonal row, diagonal row) FLOPs of `rule`'s step per example (module docstring).

  guidance: MeanFlow / iMF in-target guidance (omega != 1 or kappa != 0) on labelled data.
  guidance_conditioning, velocity_head: iMF with the guidance scale as a network input (the
  rule option of that name) and with the auxiliary velocity head (velocity_head_weight > 0).
  """
  if rule not in RULE_COSTS:
    raise ValueError(f'No FLOP model for rule {rule!r}; choose one of {RULE_COSTS}.')
  if (guidance_conditioning or velocity_head) and rule != 'imf':
    raise ValueError(f'guidance_conditioning and velocity_head are iMF options, not {rule!r}.')
  if velocity_head and not guidance_conditioning:
    raise ValueError('velocity_head is implemented with guidance_conditioning only (fmjax.losses.imf).')
  f, t = fwd.total, fwd.tangent
  fm = 3.0 * f
  if rule == 'flow_matching':
    return fm, fm
  if rule == 'lsd':
    return 3.0 * (f + t) + f, fm
  if guidance_conditioning:
    # fmjax.losses.imf: off-diagonal v_c and v_u (one stopped pass of 2 rows), the jvp and the
    # primal's backward; diagonal: the prediction with its backward and the stopped v_u. The
    # head, when on, shares the trunk pass at each row's own inputs (head='both'): only its
    # output layers' forward and backward are extra. (v_c, v_u read the head: f includes it.)
    head = 3.0 * fwd.head if velocity_head else 0.0
    return 3.0 * f + t + 2.0 * f + head, fm + f + head
  guided = guidance and labels
  if rule in ('meanflow', 'imf'):
    improved = rule == 'imf'
    off = 3.0 * f + t
    if guided and (kappa != 0.0 or improved):
      off += 2.0 * f          # conditional and null passes, batched together
    elif guided:
      off += f                # the null pass only
    elif improved:
      off += f                # the model's own velocity, the tangent
    return off, fm + (f if guided else 0.0)
  return 3.0 * f + t, fm     # sct


def step_flops(rule: str, fwd: Forward, batch: int, diagonal_fraction: float, **options) -> float:
  """FLOPs of one training step of `batch` examples (n_diag rows rounded as fmjax.losses does)."""
  from fmjax.losses import base
  n_diag = base.num_diagonal(batch, diagonal_fraction)
  off, diag = rule_row_costs(rule, fwd, **options)
  return (batch - n_diag) * off + n_diag * diag


# Peak dense bfloat16 tensor-core FLOP/s (no sparsity), by `jax.Device.device_kind` substring.
# Sources: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM 989.4 TFLOPS bf16 dense = half the
# 1,979 "with sparsity"; H100 PCIe 756 TFLOPS; H100 NVL 835 TFLOPS) and NVIDIA H200 datasheet
# (H200 SXM 989 TFLOPS, H200 NVL 835 TFLOPS dense). Order matters: first match wins.
PEAK_BF16 = (
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('H200 NVL', 835e12),
    ('H100', 989.4e12),
    ('H200', 989.4e12),
)


def peak_bf16_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of a device kind, or None if unknown (CPU, other GPUs)."""
  for key, peak in PEAK_BF16:
    if key.lower() in device_kind.lower():
      return peak
  return None
