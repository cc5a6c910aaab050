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


def check_same_network(net_init: Callable, base: finetune.BaseModel) -> None:
  """Raises ConfigError unless config.model's network (net_init) has the base model's parameter
  shapes: reward fine-tuning starts from the base parameters."""
  expected = jax.eval_shape(net_init, jax.random.PRNGKey(0))
  shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)
  if (jax.tree.structure(expected) != jax.tree.structure(base.params)
      or shapes(expected) != shapes(base.params)):
    raise configs.ConfigError(
        'config.model builds a network of another shape than the base model in '
        'config.teacher.workdir; fine-tuning starts from its parameters: use its model options '
        '(see its config.json).')


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
