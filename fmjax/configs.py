"""Default experiment configuration and its validation.

Every experiment in `experiments/` starts from `base_config()` and changes what it needs.
`resolve(config)` runs once per run, after the command-line overrides and before anything else:
it fills every option of the chosen rule and network and validates the whole config, so the
config that trains, and that config.json and the checkpoints record, is every value in force.
An option's value comes from four sources, each over the one before it:
  1. the rule's / network's / steering method's own default (fmjax.losses.RULES and the rule's
     builder; a network preset over its constructor; fmjax.steering.methods' options classes;
     for every other field, base_config below),
  2. the experiment's default for that name (config.loss_defaults[RULE] /
     config.model_defaults[NETWORK]; it applies only when that rule or network is chosen),
  3. the value the experiment file sets,
  4. the command line (--config.section.key=VALUE).
The option fields of config.loss, config.model and config.steer are generated from those
registries (so a rule registered by an experiment file has command-line fields too), which is
why this module imports them; everything else here is plain data.
The field names here are a public interface (users override them on the command line as
`--config.section.key=VALUE`): rename nothing without a deprecation path.

Sections:
  seed                  one integer from which every PRNG key is derived (fold_in by step)
  interpolant           'linear' | 'trigonometric'
  data                  the target: toy ('gaussian', 'gmm', 'checkerboard', 'rings'), an image
                        set ('mnist5k', 'mnist', 'cifar10', any prepared TFDS set, a folder
                        path, arrays registered in memory) or a latent dataset (any name ending
                        in '_latents', built by `python -m fmjax.data.latents build`); the
                        names are those of fmjax.data.datasets
  autoencoder           latent runs: the folder of the VAE (diffusers layout) whose latents the
                        flow map learns; evaluation and `fmjax.load(...).sample` decode with it
  model                 the network: `name` (a family or preset of fmjax.models) and its options
  model_defaults        an experiment's network options per model name (under explicit values)
  flow_map              the parameterization of X_{s,t} (fmjax.flow_maps.make)
  loss                  `name` picks the rule of fmjax.losses; the other keys are its options
  loss_defaults         an experiment's rule options per rule name (under explicit values)
  teacher               a trained workdir whose velocity distills into the flow map, optionally
                        under classifier-free guidance (or, for the reward fine-tuning rules,
                        the frozen base model they start from)
  finetune              reward fine-tuning (loss.name 'reward_distill' | 'reward_backprop'):
                        reward, its center / std, temperature lambda, regularization, steps
  optim                 optax optimizer, warmup + schedule, clipping, EMA decays
  train                 the budget and the cadence of logging, evaluation and checkpoints
  sharding              the device mesh (data x fsdp) and the FSDP size rule
  eval                  the few-step sweep run at eval time
  sample                --mode=sample: how many samples, how many steps
  steer                 --mode=steer: reward-steered sampling (method, reward, temperature, ...)
"""

from __future__ import annotations

import copy
import dataclasses
import weakref

import ml_collections
import numpy as np
from ml_collections import config_dict

from fmjax import flow_maps, interpolants, losses, models, samplers
from fmjax.data import datasets as _datasets
# The dataset names live in fmjax.data.datasets (one registry); re-exported under their old names.
from fmjax.data.datasets import IMAGE_DATASETS, LATENT_SUFFIX, TOY_DATASETS, is_latent_dataset
from fmjax.models import attention as _attention
from fmjax.models import remat as _remat
from fmjax.models import embeddings
from fmjax.steering import finetune as _finetune
from fmjax.steering import methods as _methods
from fmjax.steering import rewards as _rewards

_TIME_FIELD_TYPES = {'name': str, 'mean': float, 'std': float, 'eps': float}   # of TimeDistribution


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults: a small 2-D toy run that trains in seconds on a CPU."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.interpolant = 'linear'

  c.data = ml_collections.ConfigDict()
  c.data.name = 'gmm'
  c.data.dim = config_dict.placeholder(int)   # toy targets: dimension of x (None: the columns of
                                               # data.means when given, else 2)
  # Gaussian mixture (config.data.name = 'gmm'): K x D means, K stds, K weights. Empty means
  # draws a random layout of `num_components` components from `data.seed`.
  c.data.means = ml_collections.FieldReference(None, field_type=object)
  c.data.stds = ml_collections.FieldReference(None, field_type=object)
  c.data.weights = ml_collections.FieldReference(None, field_type=object)
  c.data.num_components = 8
  c.data.seed = 0
  c.data.scale = 1.0                # gaussian: std; checkerboard / rings: overall size
  c.data.on_device = True           # toy targets: sample inside a jitted function on device
  c.data.data_dir = ''              # image sets: TFDS data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.split = 'train'
  c.data.num_classes = 0            # > 0: class-conditional training (labels fed to the network)
  c.data.shuffle_seed = 0
  c.data.worker_count = 0           # grain worker processes: only 0 (reads run in threads, read_threads)
  # Image and latent sets whose decoded examples take at most this many GiB (per process) are
  # read into memory once at start instead of decoded on every read (0 = never).
  c.data.in_memory_gib = 2.0
  # grain threads that read examples ahead of the training step. Their per-example work is Python
  # (the GIL): 4 read mnist5k latents about 2.7x faster than grain's default of 16 on 2 cores.
  c.data.read_threads = 4

  # Latent datasets: the autoencoder folder (diffusers layout: config.json +
  # diffusion_pytorch_model.safetensors, e.g. stabilityai/sd-vae-ft-ema) that encoded them. Its
  # digest must match the one the dataset was built with; samples are decoded with it for FID,
  # pictures and `fmjax.load(...).sample`.
  c.autoencoder = ''

  # The network: a family ('mlp', 'unet', 'dit') or a preset of fmjax.models (e.g.
  # 'unet-cifar10', 'DiT-B/2'). Every option of every family is a field; None = not set, i.e.
  # model_defaults[name], else the preset's value, else the constructor's default. Options of
  # other families must stay None. Input sizes and classes come from the data.
  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'
  c.model.time_conditioning = 's_t'
  c.model.dtype = 'float32'
  for key, kind in models.option_types().items():
    c.model[key] = config_dict.placeholder(kind)
  # An experiment's defaults per network name, under the command line's values.
  c.model_defaults = ml_collections.ConfigDict({'mlp': {'hidden': 256, 'depth': 4, 'time_dim': 64}})

  c.flow_map = ml_collections.ConfigDict()
  c.flow_map.parameterization = 'displacement'
  c.flow_map.sigma_data = 0.5

  # The training rule `name` of fmjax.losses and every option some rule understands; None =
  # not set, i.e. loss_defaults[name], else the rule's own default (fmjax.losses.RULES, then
  # CommonOptions and the rule's builder). Options the rule does not understand must stay None.
  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'lsd'
  for key, kind in losses.option_types().items():
    c.loss[key] = (ml_collections.ConfigDict({f.name: config_dict.placeholder(_TIME_FIELD_TYPES[f.name])
                                              for f in dataclasses.fields(kind)})
                   if kind is losses.TimeDistribution else config_dict.placeholder(kind))
  # An experiment's defaults per rule, under the command line's values: e.g. the toy configs'
  # {'meanflow': {'weighting': 'none'}} (set_toy_rule).
  c.loss_defaults = ml_collections.ConfigDict()

  c.teacher = ml_collections.ConfigDict()
  c.teacher.workdir = ''            # distillation rules: a trained fmjax workdir
  c.teacher.step = -1               # -1 = latest checkpoint
  # Distillation rules: the teacher's velocity under classifier-free guidance of this scale,
  # b_null + w (b_c - b_null) (1 = unguided). The student learns the guided model and samples it
  # in one evaluation per step at eval.guidance_scale = 1. Needs a class-conditional teacher
  # trained with label dropout.
  c.teacher.guidance_scale = 1.0

  # Reward fine-tuning toward q ∝ p exp(r / temperature), p the base model of teacher.workdir
  # (fmjax.steering.finetune); read only when loss.name is 'reward_distill' or 'reward_backprop'.
  c.finetune = ml_collections.ConfigDict()
  # The reward, by name (fmjax.steering.rewards.NAMES, built by rewards.from_config, as for
  # config.steer): 'quadratic': -|x - center|^2 / (2 std^2); 'one_sided': -x_0^2 1[x_0 < 0];
  # 'classifier': log p(target_class | x) of the classifier in classifier_dir.
  c.finetune.reward = 'quadratic'
  c.finetune.center = ml_collections.FieldReference(0.0, field_type=object)   # scalar or one example's shape
  c.finetune.std = 1.0
  c.finetune.temperature = 1.0      # lambda
  c.finetune.steps = 1              # sampler steps of base and fine-tuned maps (1..8)
  c.finetune.regularization = 1.0   # reward_backprop: rho of (lambda rho / 2)|x - x_base|^2
  c.finetune.candidates = 4         # reward_distill: base samples per training row
  c.finetune.inner = 'lsd'          # reward_distill: 'lsd' | 'esd' | 'psd' | 'flow_matching'
  c.finetune.classifier_dir = ''    # reward = 'classifier': a trained classifier's folder
  c.finetune.target_class = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adam'             # 'adam' | 'adamw' | 'radam'
  c.optim.learning_rate = 1e-3
  c.optim.schedule = 'constant'     # 'constant' | 'cosine' | 'linear', after the warmup
  c.optim.warmup_steps = 100
  c.optim.final_lr_fraction = 0.0   # cosine / linear decay end point
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0           # global-norm clipping; 0 disables it
  c.optim.ema_decays = (0.999,)     # one EMA copy of the network parameters per decay
  # EMA warm-up: update t uses min(decay, (1 + t) / (10 + t)) (fmjax.train_state.ema_decay_at), so
  # a short run's EMA follows the run instead of staying near its start. None = the rule's
  # default: on for the reward fine-tuning rules (runs of a few hundred steps), off for every other.
  c.optim.ema_warmup = config_dict.placeholder(bool)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2000
  c.train.batch_size = 256          # global batch, over all processes
  c.train.microbatches = 1          # k > 1: each update accumulates gradients over k slices of the batch
  c.train.log_every = 100
  c.train.eval_every = 0            # 0 = only at the end
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3      # keep the last N ...
  c.train.keep_every = 0            # ... and every K-th step forever (0 = none)
  c.train.async_checkpointing = True
  c.train.max_nonfinite_in_a_row = 10
  c.train.restore_step = -1         # resume (or eval / sample) from this saved step (-1 = latest)
  c.train.loss_log_file = True      # append every logged step's metrics to WORKDIR/metrics.jsonl

  c.sharding = ml_collections.ConfigDict()
  c.sharding.data = -1              # size of the data axis (-1 = all devices left)
  c.sharding.fsdp = 1               # size of the FSDP axis (parameters and optimizer state)
  c.sharding.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated

  c.eval = ml_collections.ConfigDict()
  c.eval.at_end = True              # run the few-step sweep after the last step
  c.eval.num_samples = 2000
  c.eval.steps = (1, 2, 4, 8)       # few-step sweep of the flow map on a uniform grid
  c.eval.ema_index = 0              # which EMA copy to evaluate (-1 = raw parameters)
  c.eval.reference_samples = 2000
  c.eval.grid_size = 8              # image sets: the sample grid is grid_size x grid_size
  c.eval.guidance_scale = 1.0
  # (start, end) in fmjax time where a guidance-conditioned network (model.guidance_conditioning,
  # iMF) applies eval.guidance_scale; other networks ignore it.
  c.eval.guidance_interval = (0.0, 1.0)
  # The ODE baseline on the learned velocity v_{t,t}, at matching and larger NFE (budgets a
  # method cannot meet exactly, e.g. 1 NFE for Heun, are skipped).
  c.eval.ode_method = 'euler'       # 'euler' | 'heun' | 'midpoint' | 'rk4'
  c.eval.ode_nfe = (1, 2, 4, 8, 16, 32, 64)
  # Toy targets with an exact map (gaussian, gmm): (s, t) pairs for the one-jump RMSE.
  c.eval.exact_pairs = ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.25, 0.75), (0.9, 1.0))
  # Image sets: FID with the standard Inception network (fmjax.evaluation.fid).
  c.eval.fid = True                 # False: sample grids only, no Inception weights needed
  c.eval.fid_num_samples = 50_000   # generated samples per sampler (50k for reported numbers)
  c.eval.fid_batch_size = 250       # global generation + feature batch
  c.eval.fid_reference = ''         # .npz of fmjax.evaluation.reference_stats ('' = the cache's
                                    # fid_stats/<data.name>_<data.split>.npz)
  c.eval.fid_reference_samples = 0  # shown in the reference command (0 = the whole split)
  c.eval.inception_weights = ''     # '' = the prepare_inception cache
  # 'inception': FID during the sweep. 'deferred': the sweep writes each sampler's uint8 images
  # to WORKDIR/eval_images/step_<N>/ and computes no features (a machine without the Inception
  # weights, e.g. an accelerator with no network); score them elsewhere with
  # python -m fmjax.evaluation.reference_batches REF.npz WORKDIR/eval_images/step_<N>/*.npz.
  c.eval.fid_features = 'inception'
  c.eval.decode_dtype = 'float32'   # latent runs: the decoder's compute dtype ('bfloat16' is faster)
  c.eval.progress_every = 30.0      # seconds between FID progress lines (samples done, images/s)
  # Precision and recall (Kynkaanniemi et al. 2019, k = 3) when the reference file holds images
  # (an ADM reference batch): of the first this many samples per sampler (0 = off).
  c.eval.precision_recall_samples = 10_000
  # Class-conditional image sets: a trained digit classifier (fmjax.steering.classifier) judges
  # every sampler's samples: the share classified with probability >= classifier_confidence as
  # the requested label, and the total-variation distance of the predicted-class histogram from
  # the requested one ('' = off).
  c.eval.classifier_dir = ''
  c.eval.classifier_confidence = 0.9

  c.sample = ml_collections.ConfigDict()   # --mode=sample
  c.sample.num_samples = ml_collections.FieldReference(64)   # as config.steer.num_samples
  # The old name of num_samples, kept as an alias: one shared value, so setting either sets both
  # (saved config.json files and commands that name config.sample.num keep working).
  c.sample.num = c.sample.get_ref('num_samples')
  c.sample.steps = 1

  # --mode=steer: sample the tilted law q ∝ p exp(r / temperature) (fmjax.steering; docs/steering.md).
  c.steer = ml_collections.ConfigDict()
  # Each run writes WORKDIR/steer/NAME/ (NAME: config.steer.name, or one made of the method and
  # the options in force, so runs with other options never overwrite each other).
  c.steer.name = ''
  c.steer.method = 'guidance'       # 'best_of_n' | 'guidance' | 'smc' (fmjax.steering.methods.METHODS)
  # fmjax.steering.rewards.NAMES (as config.finetune.reward): 'quadratic' (-|x - center|^2 /
  # (2 std^2)) | 'one_sided' (-x_0^2 1[x_0 < 0]) | 'classifier' (log p(target_class | x))
  c.steer.reward = 'quadratic'
  c.steer.num_samples = 1000
  c.steer.steps = 8                 # flow-map steps (guidance, smc) / base sampler steps (best_of_n)
  # The methods' options with their defaults, one field per name (fmjax.steering.methods: the
  # options dataclasses document and check them): temperature (lambda > 0), num_particles (smc:
  # particles per group; best_of_n: the N), select (best_of_n: 'importance' | 'argmax'),
  # lookahead ('flow_map' | 'denoiser' | 'naive'), keep_jacobian, guidance_scale, guidance_stop
  # (no guidance at times >= this), schedule ('constant' | 'linear'), ess_threshold (smc).
  for name, default in _methods.config_fields().items():
    c.steer[name] = default
  c.steer.center = ml_collections.FieldReference(0.0, field_type=object)   # scalar or [D]
  c.steer.std = 1.0                 # quadratic reward's sigma
  c.steer.classifier_dir = ''       # reward = 'classifier': a trained classifier's folder
  c.steer.target_class = 0
  # Class-conditional runs: the class every steered sample is drawn from (-1: the null label,
  # i.e. unconditional samples); unconditional runs take -1 only.
  c.steer.label = -1
  c.steer.seed = 0
  return c


_MODES = ('train', 'eval', 'sample', 'steer')
STEER_REWARDS = _rewards.NAMES       # one list for --mode=steer and fine-tuning
# Old field names kept as aliases {old: new}: both fields share one value in a fresh config
# (base_config links them); code that merges configs field by field must treat them as one.
ALIASES = {'sample.num': 'sample.num_samples'}


class ConfigError(ValueError):
  """A config that cannot run, with a message that says what to change."""


def resolve(config: ml_collections.ConfigDict, *, recorded: bool = False) -> ml_collections.ConfigDict:
  """The config with every option in force filled in, validated; `config` is not changed.

  recorded=True: a run's saved config read to load its model (fmjax.load): a loss name this
  process does not know (a user's rule registered by an experiment file that is not imported
  here) keeps its recorded, already resolved options; sampling needs only the network and
  the flow map's parameterization.

  Loss and network options: explicit value (not None) > the experiment's loss_defaults[name] /
  model_defaults[name] > the rule's / network's own defaults. data.dim: the columns of
  data.means when given, else 2. Idempotent (a resolved config resolves to itself), and
  accepts configs saved by older versions (model.kwargs, top-level MLP sizes).
  Raises ConfigError naming what to change, before any data, teacher or device work.

  Resolution runs once per run: a config this function returned, unchanged since, is returned
  as it is (main resolves the run's config; train.Setup, from_config and the evaluator receive
  it and call resolve only to accept unresolved configs from tests and notebooks).
  """
  known = _RESOLVED.get(id(config))
  if known and (not known[1] or recorded) and known[0] == _fingerprint(config):
    return config
  out = copy.deepcopy(config)
  with out.unlocked():
    _upgrade_model_section(out)
    _resolve_data(out.data)
    if not (recorded and not losses.is_registered(out.loss.name)):
      _resolve_loss(out)
    _resolve_model(out)
    _resolve_optim(out)
    _upgrade_steering_sections(out)
  validate(out)
  out.lock()
  _RESOLVED[id(out)] = (_fingerprint(out), recorded)
  weakref.finalize(out, _RESOLVED.pop, id(out), None)
  return out


# Configs `resolve` returned, by id(): (their JSON then, whether resolved as a record). A config
# whose JSON still matches is resolved (resolve is idempotent), so the id test cannot misfire.
_RESOLVED: dict[int, tuple[str, bool]] = {}


def _fingerprint(config) -> str:
  return config.to_json_best_effort(sort_keys=True)


def model_in_force(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.model with every network option in force (the network part of `resolve`, which
  reads only config.model and config.model_defaults)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    _upgrade_model_section(out)
    _resolve_model(out)
  return out.model


def _is_set(value) -> bool:
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return any(_is_set(v) for v in value.values())
  return value is not None


def _explicit(section, skip=()) -> dict:
  """The options of a config section that are set (nested ones: only their set fields)."""
  out = {}
  for k, v in section.items():
    if k in skip or not _is_set(v):
      continue
    out[k] = ({kk: vv for kk, vv in v.items() if vv is not None}
              if isinstance(v, (ml_collections.ConfigDict, dict)) else v)
  return out


def _defaults_for(config, section: str, name: str) -> dict:
  defaults = config.get(section) or {}
  value = defaults.get(name) or {}
  return value.to_dict() if hasattr(value, 'to_dict') else dict(value)


def _write(section: ml_collections.ConfigDict, key: str, value) -> None:
  """section[key] = value, field by field for nested options (keeps the fields' types)."""
  if isinstance(value, dict):
    if key not in section or not isinstance(section[key], ml_collections.ConfigDict):
      section[key] = ml_collections.ConfigDict()
    for k, v in value.items():
      section[key][k] = v
  else:
    section[key] = value


def _upgrade_model_section(config) -> None:
  # Configs saved before model options were fields: model.kwargs held the U-Net / DiT options
  # (in ALIASES spellings) and hidden / depth / time_dim were top-level MLP sizes.
  model = config.model
  if 'kwargs' not in model:
    return
  legacy = model.kwargs.to_dict() if hasattr(model.kwargs, 'to_dict') else dict(model.kwargs or {})
  del model['kwargs']
  if models.family_of(model.name) != 'mlp':
    for key in ('hidden', 'depth', 'time_dim'):
      if key in model:
        model[key] = None
  for key, value in legacy.items():
    model[models.ALIASES.get(key, key)] = value


def _resolve_data(data) -> None:
  if data.name == 'gmm' and data.means is not None:
    means = np.asarray(data.means, np.float64)
    if means.ndim == 2 and data.dim is None:
      data.dim = int(means.shape[1])
  if data.dim is None:
    data.dim = 2


def _resolve_loss(config) -> None:
  name = config.loss.name
  defaults = _defaults_for(config, 'loss_defaults', name)
  options = dict(defaults)
  for key, value in _explicit(config.loss, skip=('name',)).items():
    options[key] = {**options.get(key, {}), **value} if isinstance(value, dict) else value
  if config.data.num_classes > 0 and options.get('null_label') is None:
    options['null_label'] = config.data.num_classes   # the extra embedding row for guidance
  try:
    settings = losses.resolve_options(name, options)
  except ValueError as e:
    # The experiment's defaults can be the culprit as well as the command line.
    where = f' (config.loss_defaults.{name} sets {sorted(defaults)})' if defaults else ''
    raise ConfigError(f'config.loss: {e}{where}') from None
  for key in losses.option_types():
    _write(config.loss, key, settings.get(key))


def _resolve_optim(config) -> None:
  optim = config.optim
  if 'ema_warmup' not in optim:
    # A config saved before the option existed trained without warm-up; resume it that way.
    optim.ema_warmup = False
  elif optim.ema_warmup is None:
    optim.ema_warmup = config.loss.name in losses.FINETUNE_RULES


def _resolve_model(config) -> None:
  name = config.model.name
  overrides = {**_defaults_for(config, 'model_defaults', name),
               **_explicit(config.model, skip=('name', 'time_conditioning', 'dtype'))}
  try:
    _, in_force = models.options(name, **overrides)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from None
  for key in models.option_types():
    value = in_force.get(key)
    config.model[key] = tuple(value) if isinstance(value, list) else value


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that ml_collections' type checks cannot (ranges, names, combinations).

  Raises ConfigError before any device work starts.
  """
  def need(cond, msg):
    if not cond:
      raise ConfigError(msg)

  need(config.interpolant in interpolants._REGISTRY,
       f'config.interpolant = {config.interpolant!r}; choose one of {sorted(interpolants._REGISTRY)}.')
  data = config.data
  problem = _datasets.name_problem(data.name, data.data_dir)   # no data is read
  need(problem is None, f'config.data.name = {data.name!r}; {problem}')
  need(data.get('in_memory_gib', 0.0) >= 0, f"config.data.in_memory_gib = {data.get('in_memory_gib')}; "
       'give the GiB up to which a set is read into memory (0 = never).')
  need(int(data.get('worker_count', 0)) == 0, f"config.data.worker_count = {data.get('worker_count')}: "
       'reading in worker processes is not implemented; examples are read by config.data.read_threads '
       'threads in the training process (and small sets from memory, config.data.in_memory_gib).')
  need(int(data.get('read_threads', 4)) >= 1, f"config.data.read_threads = {data.get('read_threads')}; "
       'at least 1 thread reads the examples.')
  need(not config.get('autoencoder') or is_latent_dataset(data.name),
       f'config.autoencoder is set but config.data.name = {data.name!r} is not a latent dataset '
       f'(a name ending in {LATENT_SUFFIX!r}); clear --config.autoencoder for pixel data.')
  if data.name == 'gmm' and data.means is not None:
    means = np.asarray(data.means, np.float64)
    need(means.ndim == 2, f'config.data.means must be K x D, got shape {means.shape}.')
    k, d = means.shape
    need(data.dim is None or d == data.dim,
         f'config.data.means has D = {d} columns but config.data.dim = {data.dim}; '
         'set --config.data.dim to match, or leave it unset (it follows the means).')
    for field in ('stds', 'weights'):
      value = data[field]
      if value is not None:
        need(np.asarray(value).shape == (k,),
             f'config.data.{field} must have K = {k} entries (one per mean), got {np.asarray(value).shape}.')
    if data.weights is not None:
      need(np.all(np.asarray(data.weights) >= 0) and np.sum(data.weights) > 0,
           'config.data.weights must be non-negative and not all zero.')
  train = config.train
  need(train.num_steps >= 0, 'config.train.num_steps must be >= 0.')
  need(train.batch_size > 0, 'config.train.batch_size must be positive.')
  microbatches = train.get('microbatches', 1)
  need(microbatches >= 1 and train.batch_size % microbatches == 0,
       f'config.train.microbatches = {microbatches} must be >= 1 and divide config.train.batch_size = '
       f'{train.batch_size} (each update accumulates gradients over that many equal slices).')
  need(train.log_every > 0, 'config.train.log_every must be positive.')
  need(train.checkpoint_every >= 0, 'config.train.checkpoint_every must be >= 0 (0 = only at the end).')
  need(train.restore_step >= -1, 'config.train.restore_step must be a saved step, or -1 for the latest.')
  need(train.max_nonfinite_in_a_row > 0, 'config.train.max_nonfinite_in_a_row must be positive.')
  need(config.optim.name in ('adam', 'adamw', 'radam'),
       f"config.optim.name = {config.optim.name!r}; choose 'adam', 'adamw' or 'radam'.")
  lr = config.optim.learning_rate
  # A learning rate <= 0 or non-finite makes every update fail or climb the loss; say so now,
  # not after max_nonfinite_in_a_row failed updates.
  need(isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0,
       f'config.optim.learning_rate = {lr} must be a finite number > 0 (the peak rate, e.g. 1e-3).')
  need(0.0 <= config.optim.final_lr_fraction <= 1.0,
       f'config.optim.final_lr_fraction = {config.optim.final_lr_fraction} must be in [0, 1] '
       '(the end of the decay, as a share of the peak learning rate).')
  need(config.optim.warmup_steps >= 0,
       f'config.optim.warmup_steps = {config.optim.warmup_steps} must be >= 0.')
  need(config.optim.schedule in ('constant', 'cosine', 'linear'),
       f"config.optim.schedule = {config.optim.schedule!r}; choose 'constant', 'cosine' or 'linear'.")
  for d in config.optim.ema_decays:
    need(0.0 <= d < 1.0, f'config.optim.ema_decays entries must be in [0, 1), got {d}.')
  need(-1 <= config.eval.ema_index < len(config.optim.ema_decays),
       f'config.eval.ema_index = {config.eval.ema_index}, but config.optim.ema_decays keeps '
       f'{len(config.optim.ema_decays)} EMA copies; use an index below that, or -1 for the raw parameters.')
  need(config.sharding.fsdp >= 1, 'config.sharding.fsdp must be >= 1.')
  need(config.sharding.data == -1 or config.sharding.data >= 1,
       'config.sharding.data must be -1 (all devices) or >= 1.')
  need(all(int(k) >= 1 for k in config.eval.steps), 'config.eval.steps must be positive step counts.')
  need(config.eval.ode_method in samplers.ODE_METHODS,
       f'config.eval.ode_method = {config.eval.ode_method!r}; choose one of {sorted(samplers.ODE_METHODS)}.')
  need(all(int(n) >= 1 for n in config.eval.ode_nfe), 'config.eval.ode_nfe must be positive NFE budgets.')
  need(all(len(p) == 2 and 0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0 for p in config.eval.exact_pairs),
       'config.eval.exact_pairs must be (s, t) pairs of times in [0, 1].')
  interval = tuple(config.eval.get('guidance_interval', (0.0, 1.0)))
  need(len(interval) == 2 and 0.0 <= interval[0] <= interval[1] <= 1.0,
       f'config.eval.guidance_interval must be (start, end) with 0 <= start <= end <= 1, got {interval}.')
  need(config.eval.fid_num_samples >= 2, 'config.eval.fid_num_samples must be >= 2.')
  need(config.eval.fid_batch_size >= 1, 'config.eval.fid_batch_size must be positive.')
  need(config.eval.get('fid_features', 'inception') in ('inception', 'deferred'),
       f"config.eval.fid_features = {config.eval.get('fid_features')!r}; choose 'inception' (FID "
       "now) or 'deferred' (write the images; score them with python -m fmjax.evaluation.reference_batches).")
  need(config.eval.get('decode_dtype', 'float32') in ('float32', 'bfloat16'),
       f"config.eval.decode_dtype = {config.eval.get('decode_dtype')!r}; choose 'float32' or 'bfloat16'.")
  need(0.0 < config.eval.get('classifier_confidence', 0.9) <= 1.0,
       'config.eval.classifier_confidence must be a probability in (0, 1].')
  need(not config.eval.get('classifier_dir') or config.data.num_classes > 0,
       'config.eval.classifier_dir judges class-conditional samples: set config.data.num_classes, '
       'or clear the classifier.')
  need(config.eval.get('precision_recall_samples', 0) >= 0,
       'config.eval.precision_recall_samples must be >= 0 (0 = no precision/recall).')
  need(config.model.time_conditioning in embeddings.TIME_CONDITIONINGS,
       f'config.model.time_conditioning = {config.model.time_conditioning!r}; choose one of '
       f'{embeddings.TIME_CONDITIONINGS}.')
  validate_steer(config)
  try:   # building a flow map only wraps the network: checks the name without any work
    flow_maps.make(config.flow_map.parameterization, None, interpolants.get(config.interpolant))
  except ValueError as e:
    raise ConfigError(f'config.flow_map.parameterization: {e}') from None
  if config.loss.name in losses.FINETUNE_RULES:
    need(config.teacher.workdir,
         f'config.loss.name = {config.loss.name!r} fine-tunes a trained base model: set '
         '--config.teacher.workdir to its fmjax workdir.')
    need(config.teacher.get('guidance_scale', 1.0) == 1.0,
         f'config.teacher.guidance_scale guides a distillation teacher; reward fine-tuning '
         f'({config.loss.name!r}) starts from the base model as trained: set it to 1.')
  elif config.loss.name in losses.RULES:
    teacher = losses.RULES[config.loss.name].teacher
    need(teacher != 'required' or config.teacher.workdir,
         f'config.loss.name = {config.loss.name!r} distills a teacher: set --config.teacher.workdir '
         'to a trained fmjax workdir.')
    need(config.teacher.get('guidance_scale', 1.0) == 1.0 or (config.teacher.workdir and config.data.num_classes),
         f'config.teacher.guidance_scale = {config.teacher.get("guidance_scale")} guides a '
         'class-conditional teacher: set --config.teacher.workdir and config.data.num_classes, or '
         'the scale to 1.')
    need(teacher != 'none' or not config.teacher.workdir,
         f'config.loss.name = {config.loss.name!r} trains from scratch, but config.teacher.workdir '
         "is set; distill with 'lmd', 'emd', 'progressive' or 'trajectory_distillation' (or 'meanflow', 'imf', 'sct', "
         "'ect'), or clear the teacher.")
  # iMF's guidance inputs and velocity head are network outputs/inputs the rule relies on.
  need(not config.loss.get('guidance_conditioning') or config.model.get('guidance_conditioning'),
       'config.loss.guidance_conditioning = True feeds the guidance scale to the network: set '
       '--config.model.guidance_conditioning=True as well.')
  need(not config.loss.get('velocity_head_weight') or config.model.get('velocity_head'),
       'config.loss.velocity_head_weight > 0 trains an auxiliary velocity head: set '
       '--config.model.velocity_head=True as well (or the weight to 0).')
  if 'finetune' in config and config.loss.name in _finetune.RULE_NAMES:
    _validate_finetune(config, need)
  need(config.model.dtype in ('float32', 'bfloat16', 'float16'),
       f'config.model.dtype = {config.model.dtype!r}; choose float32, bfloat16 or float16.')
  # Network options whose values only the constructor would check, after the data is read.
  need(config.model.get('attention') in (None, *_attention.ATTENTION_IMPLEMENTATIONS),
       f"config.model.attention = {config.model.get('attention')!r}; choose one of "
       f'{_attention.ATTENTION_IMPLEMENTATIONS}.')
  need(config.model.get('remat') in (None, *_remat.REMAT_POLICIES),
       f"config.model.remat = {config.model.get('remat')!r}; choose one of {tuple(_remat.REMAT_POLICIES)} "
       "(what each DiT or U-Net block keeps for the backward pass: everything, the linear layers' "
       "outputs, its inputs only).")


def validate_steer(config: ml_collections.ConfigDict) -> None:
  """config.steer's values (names, ranges, the reward's parameters): one ConfigError each."""
  if 'steer' not in config:   # configs saved before --mode=steer existed
    return
  st = config.steer

  def need(cond, msg):
    if not cond:
      raise ConfigError(f'config.steer.{msg}')

  known = tuple(_methods.METHODS)   # read now: a method added to the registry counts
  need(st.method in known, f'method = {st.method!r}; choose one of {known}.')
  need(st.reward in STEER_REWARDS, f'reward = {st.reward!r}; choose one of {STEER_REWARDS}.')
  need(st.num_samples >= 1, f'num_samples = {st.num_samples} must be >= 1.')
  need(st.steps >= 1, f'steps = {st.steps} must be >= 1.')
  try:   # the method's options, checked by its dataclass: 'NAME = VALUE ...'
    options = _methods.options_from_config(st)
  except ValueError as e:
    raise ConfigError(f'config.steer.{e}') from None
  need(st.num_samples % options.group == 0,
       f'num_samples = {st.num_samples} must be a multiple of num_particles = {options.group} '
       f'({st.method} resamples within groups of num_particles).')
  if st.reward == 'quadratic':
    need(st.std > 0, f'std = {st.std} must be > 0 (the quadratic reward\'s width).')
    center = np.asarray(st.center, np.float64) if st.center is not None else None
    need(center is not None and np.all(np.isfinite(center)),
         f'center = {st.center!r} must be a number or a list of finite numbers.')
    if config.data.name in TOY_DATASETS and center.ndim > 0:
      dim = config.data.dim if config.data.dim is not None else 2
      need(center.shape == (dim,), f'center has shape {center.shape}; the data are {dim}-D: give '
           f'{dim} numbers or one scalar.')
  elif st.reward == 'classifier':
    need(bool(st.classifier_dir), "classifier_dir is empty; reward = 'classifier' needs a trained "
         'classifier\'s folder (see fmjax.steering.classifier).')
    need(st.target_class >= 0, f'target_class = {st.target_class} must be a class id >= 0.')
  need(st.get('label', -1) >= -1, f'label = {st.get("label")} must be a class id, or -1 for none.')
  name = st.get('name', '')
  need(not name or (name not in ('.', '..') and all(ch.isalnum() or ch in '._-=,+' for ch in name)),
       f'name = {name!r} must be a plain folder name (letters, digits, . _ - = , +).')


FINETUNE_REWARDS = _rewards.NAMES    # the same list as config.steer.reward


def _upgrade_steering_sections(config) -> None:
  """Configs saved before config.finetune named a classifier, or before config.sample's
  num_samples: the fields they lack, at the values those versions used (so a saved run still
  resumes and evaluates as it trained)."""
  if 'finetune' in config:
    for key, value in (('classifier_dir', ''), ('target_class', 0)):
      if key not in config.finetune:
        config.finetune[key] = value
  if 'sample' in config and 'num' in config.sample and 'num_samples' not in config.sample:
    config.sample.num_samples = config.sample.num


def _validate_finetune(config, need) -> None:
  f = config.finetune
  need(f.reward in FINETUNE_REWARDS,
       f'config.finetune.reward = {f.reward!r}; choose one of {FINETUNE_REWARDS}.')
  need(f.reward != 'classifier' or bool(f.get('classifier_dir')),
       "config.finetune.classifier_dir is empty; reward = 'classifier' needs a trained "
       "classifier's folder (see fmjax.steering.classifier).")
  need(f.std > 0, f'config.finetune.std must be > 0, got {f.std}.')
  need(f.temperature > 0, f'config.finetune.temperature (lambda) must be > 0, got {f.temperature}.')
  need(f.regularization >= 0, f'config.finetune.regularization must be >= 0, got {f.regularization}.')
  need(1 <= f.steps <= _finetune.MAX_STEPS,
       f'config.finetune.steps must be in [1, {_finetune.MAX_STEPS}], got {f.steps}.')
  need(f.candidates >= 1, f'config.finetune.candidates must be >= 1, got {f.candidates}.')
  need(f.inner in _finetune.INNER_RULES,
       f'config.finetune.inner = {f.inner!r}; choose one of {sorted(_finetune.INNER_RULES)}.')
  if f.inner == 'flow_matching' and config.loss.name == 'reward_distill':
    need(config.loss.diagonal_fraction == 1.0,
         "config.finetune.inner = 'flow_matching' trains only the diagonal: set "
         '--config.loss.diagonal_fraction=1.0.')
  center = np.asarray(f.center, np.float64)
  need(np.all(np.isfinite(center)), 'config.finetune.center must be finite numbers.')
  if config.data.name in TOY_DATASETS:
    need(center.ndim == 0 or center.shape == (config.data.dim,),
         f'config.finetune.center must be a scalar or {config.data.dim} numbers (config.data.dim), '
         f'got shape {center.shape}.')
