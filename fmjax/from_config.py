"""From a config to the pieces of a run: network, flow map, interpolant, training rule and
autoencoder (fmjax.trained_runs opens a trained run with them).

Shared by the training loop and `fmjax.load`, so a loaded model is built exactly as it was
trained. Network parameters are kept as plain nested dicts with string keys (what Orbax
stores); the NNX graph definition is rebuilt from the config and closed over by `apply`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fmjax import configs, flow_maps, interpolants, losses, models
from fmjax.steering import finetune, rewards


def _to_str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _to_str_keys(v) for k, v in tree.items()}
  return tree


def _to_nnx_keys(tree):
  # nnx.List entries are keyed by int; Orbax and JSON want strings.
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _to_nnx_keys(v)
            for k, v in tree.items()}
  return tree


def network_options(config: ml_collections.ConfigDict) -> dict:
  """The options of config.model's family in force (configs.model_in_force fills them)."""
  model = configs.model_in_force(config)
  return {k: v for k, v in model.items() if k in models.option_types() and v is not None}


def _module_factory(config: ml_collections.ConfigDict, example_shape, num_classes: int):
  """A function rngs -> NNX module for config.model, through the fmjax.models registry."""
  m = config.model
  options = network_options(config)
  return lambda rngs: models.build(m.name, example_shape=tuple(example_shape), num_classes=num_classes,
                                   time_conditioning=m.time_conditioning, dtype=jnp.dtype(m.dtype),
                                   rngs=rngs, **options)


def build_network(config: ml_collections.ConfigDict, example_shape, num_classes: int
                  ) -> tuple[Callable[[jax.Array], Any], Callable[..., jax.Array]]:
  """(init(key) -> params, apply(params, s, t, x, labels) -> like x) for config.model."""
  factory = _module_factory(config, example_shape, num_classes)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
  # The MLP takes flat vectors: image inputs are flattened and the output reshaped back.
  flatten = models.family_of(config.model.name) == 'mlp' and len(example_shape) > 1

  def init(key):
    return _to_str_keys(nnx.split(factory(nnx.Rngs(key)))[1].to_pure_dict())

  def apply(params, s, t, x, labels=None, **kwargs):
    # kwargs reach the module: the U-Net's dropout key (`key=`) in training.
    module = nnx.merge(graphdef, _to_nnx_keys(params))
    if flatten:   # (head='both' returns a pair: each is reshaped)
      out = module(s, t, x.reshape(x.shape[0], -1), labels, **kwargs)
      return jax.tree.map(lambda y: y.reshape(x.shape), out)
    return module(s, t, x, labels, **kwargs)

  return init, apply


def build_flow_map(config: ml_collections.ConfigDict, apply, interpolant):
  return flow_maps.make(config.flow_map.parameterization, apply, interpolant,
                        sigma_data=config.flow_map.sigma_data)


def build_interpolant(config: ml_collections.ConfigDict):
  return interpolants.get(config.interpolant)


def loss_options(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """The options of config.loss's rule in force (configs.resolve fills them; None = not the
  rule's option), with the guidance row `null_label` = num_classes for class-conditional data."""
  loss = configs.resolve(config).loss
  understood = set(losses.valid_options(loss.name)) | set(losses.rule_spec(loss.name).fixed)
  options = {k: (v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v)
             for k, v in loss.items() if k in understood}
  if num_classes and options.get('null_label') is None:
    options['null_label'] = num_classes
  return options


def uses_dropout(config: ml_collections.ConfigDict) -> bool:
  return float(network_options(config).get('dropout') or 0.0) > 0.0


def build_rule(config: ml_collections.ConfigDict, flow_map, interpolant, num_classes: int,
               teacher=None):
  """fmjax.losses.make(config.loss.name, ...) with the rule's options in force."""
  options = loss_options(config, num_classes)
  if config.loss.name in finetune.RULE_NAMES:
    options['finetune'] = finetune_options(config)
  return losses.make(config.loss.name, flow_map, interpolant, teacher=teacher, **options)


def finetune_options(config: ml_collections.ConfigDict) -> finetune.FinetuneOptions:
  """config.finetune as the fine-tuning rules' FinetuneOptions (reward built from its name)."""
  f = config.finetune
  reward = rewards.from_config(f)   # the same factory and names as --mode=steer
  return finetune.FinetuneOptions(reward, temperature=float(f.temperature), steps=int(f.steps),
                                  regularization=float(f.regularization),
                                  candidates=int(f.candidates), inner=f.inner)


def base_params_layout(net_init: Callable, base: finetune.BaseModel) -> Callable[[Any], Any]:
  """How reward fine-tuning's starting point is made from the base model's parameters: a
  function params -> params that returns them as they are, or, when config.model's network
  (net_init) differs from the base run's only in config.model.scan_blocks, with the DiT
  blocks stacked or unstacked (`models.dit.stack_block_params` / `unstack_block_params`).
  Called inside the jitted initialization, so the conversion runs sharded on the devices.

  Raises ConfigError before any training when no conversion gives the network's shapes.
  """
  expected = jax.eval_shape(net_init, jax.random.PRNGKey(0))
  for convert in (lambda params: params, _block_layout_of(expected, base.params)):
    try:
      if convert is not None and _same_shapes(expected, jax.eval_shape(convert, base.params)):
        return convert
    except (ValueError, KeyError, TypeError):   # a tree the conversion does not apply to
      pass
  raise configs.ConfigError(
      'config.model builds a network of another shape than the base model in '
      'config.teacher.workdir; fine-tuning starts from its parameters: use its model options '
      '(see its config.json).')


def _same_shapes(a, b) -> bool:
  shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
  return jax.tree.structure(a) == jax.tree.structure(b) and shapes(a) == shapes(b)


def _block_layout_of(expected, params):
  """The conversion of `params` to the DiT block layout of `expected` (stacked or one entry per
  block), or None when the two are not DiT trees of different layouts."""
  if not (isinstance(expected, dict) and isinstance(params, dict)
          and isinstance(expected.get('blocks'), dict) and isinstance(params.get('blocks'), dict)):
    return None
  per_block = lambda tree: bool(tree['blocks']) and all(str(k).isdigit() for k in tree['blocks'])
  if per_block(params) and not per_block(expected):
    return lambda p: models.dit.stack_block_params(p, len(p['blocks']))
  if per_block(expected) and not per_block(params):
    # String keys, as the unrolled network's tree holds them.
    return lambda p: _to_str_keys(models.dit.unstack_block_params(p))
  return None


def load_autoencoder(config: ml_collections.ConfigDict, dtype: str | None = None):
  """The run's autoencoder (config.autoencoder, `fmjax.autoencoders.load`), or None when unset.

  dtype: the decoder's compute dtype (default config.eval.decode_dtype). A folder that is
  missing or damaged is a ConfigError naming it, raised before any training.
  """
  folder = config.get('autoencoder') or ''
  if not folder:
    return None
  from fmjax import autoencoders   # pylint: disable=import-outside-toplevel
  try:
    return autoencoders.load(folder, dtype=dtype or config.eval.get('decode_dtype', 'float32'))
  except (OSError, ValueError) as e:
    raise configs.ConfigError(f'config.autoencoder = {folder!r}: {e}') from None


def check_autoencoder(autoencoder, latent_info: dict | None, what: str) -> None:
  """Raises ConfigError unless `autoencoder` is the one that encoded the latents described by
  `latent_info` (a latent dataset's record, or a trained run's): same digest, same scaling.
  Nothing is checked against old-format latents, which record no autoencoder."""
  if autoencoder is None or not latent_info or not latent_info.get('autoencoder_digest'):
    return
  if latent_info['autoencoder_digest'] != autoencoder.digest:
    raise configs.ConfigError(
        f'config.autoencoder ({autoencoder.digest}) is not the autoencoder that encoded {what} '
        f"({latent_info['autoencoder_digest']}, from {latent_info.get('autoencoder_folder', '?')}); "
        'latents of one VAE decode to nonsense with another: set --config.autoencoder to that '
        'folder, or rebuild the latents with this one (python -m fmjax.data.latents build).')
  scale = latent_info.get('scaling_factor')
  if scale is not None and abs(float(scale) - float(autoencoder.scaling_factor)) > 1e-12:
    raise configs.ConfigError(
        f'{what} was scaled by {scale}, but config.autoencoder scales by '
        f'{autoencoder.scaling_factor}; use the same autoencoder config.')
