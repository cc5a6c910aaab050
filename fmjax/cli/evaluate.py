"""--mode=eval: the few-step evaluation (fmjax.evaluation) of a trained checkpoint."""

from __future__ import annotations

import jax

from fmjax import logging_utils, train, train_state, trained_runs
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
    # Sharded onto the training mesh (a pod evaluates without gathering the parameters on one
    # host), after checking the saved config against this one: only the run-mode fields may
    # differ.
    restored = trained_runs.restore_run(workdir, config.train.restore_step,
                                        abstract_state=setup.abstract_state, config=config,
                                        also_safe=RUN_MODE_FIELDS)
    step = restored.step
    logger = logging_utils.MetricsLogger(workdir, config.train.num_steps, step, jsonl=False)
    logger.info('fmjax: --mode=eval with the ' + train_state.describe_weights(
        tuple(config.optim.ema_decays), config.eval.ema_index, step,
        bool(config.optim.get('ema_warmup'))) + '.')
    results = evaluate(restored.state, step, logger, final=True)
    logger.close()
  return results
