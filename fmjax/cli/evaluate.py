"""--mode=eval: the few-step evaluation (fmjax.evaluation) of a trained checkpoint."""

from __future__ import annotations

import jax

from fmjax import checkpointing, logging_utils, train, train_state
from fmjax.cli import RUN_MODE_FIELDS
from fmjax.evaluation import evaluator


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Restores WORKDIR's checkpoint (config.train.restore_step, else the latest) and runs the
  few-step evaluation on it."""
  setup = train.Setup(config, workdir)
  config = setup.config
  evaluate = evaluator.Evaluator(config, workdir, setup.mesh, setup.source, setup.interpolant,
                                 setup.flow_map, autoencoder=setup.autoencoder)
  evaluate.check_ready()
  with jax.set_mesh(setup.mesh):
    manager = checkpointing.make_manager(workdir, read_only=True)
    try:
      step = checkpointing.choose_step(manager, workdir, config.train.restore_step)
      if step is None:
        raise checkpointing.CheckpointError(
            f'No checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first with --mode=train.')
      restored = checkpointing.restore(manager, workdir, step, setup.abstract_state, config,
                                       also_safe=RUN_MODE_FIELDS)
    finally:
      manager.close()
    logger = logging_utils.MetricsLogger(workdir, config.train.num_steps, step, jsonl=False)
    logger.info('fmjax: --mode=eval with the ' + train_state.describe_weights(
        tuple(config.optim.ema_decays), config.eval.ema_index, step,
        bool(config.optim.get('ema_warmup'))) + '.')
    results = evaluate(restored.state, step, logger, final=True)
    logger.close()
  return results
