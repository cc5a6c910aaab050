"""A training run in its own process, for the tests that need a fresh JAX.

The device count is fixed by the caller's environment (JAX_NUM_CPU_DEVICES / XLA_FLAGS),
which must be set before JAX starts; pytest's own process may already have JAX up with one
device, so every device count gets its own process.

  python tests/_train_worker.py WORKDIR '{"train.num_steps": 6, ...}' [--slow_after N]
      [--dump PATH.npz] [--coordinator HOST:PORT --num_processes P --process_id I]
"""

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(overrides: dict):
  from fmjax import configs
  c = configs.base_config()
  c.data.name = 'gmm'
  c.data.means = ((-2.0, 0.0), (2.0, 1.0), (0.0, -2.0), (1.0, 2.0))
  c.data.stds = (0.3, 0.3, 0.3, 0.3)
  c.data.weights = (1.0, 1.0, 1.0, 1.0)
  c.loss.name = 'lsd'
  c.model.hidden = 16
  c.model.depth = 2
  c.model.time_dim = 8
  c.train.num_steps = 6
  c.train.batch_size = 16
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.optim.warmup_steps = 2
  c.optim.learning_rate = 3e-3
  c.optim.ema_decays = (0.9,)
  c.eval.num_samples = 64
  c.eval.steps = (1, 2)
  c.sharding.fsdp_min_size = 1
  for key, value in overrides.items():
    node = c
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = tuple(value) if isinstance(value, list) else value
  return c


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('workdir')
  parser.add_argument('overrides', nargs='?', default='{}')
  parser.add_argument('--slow_after', type=int, default=-1)
  parser.add_argument('--sigterm_at', type=int, default=-1,
                      help='process 1 (or the only one) sends itself SIGTERM when fetching this batch')
  parser.add_argument('--dump', default='')
  parser.add_argument('--eval', action='store_true', help='run the few-step evaluation at the end')
  parser.add_argument('--coordinator', default=None)
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  args = parser.parse_args()

  from fmjax import sharding
  sharding.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  import jax
  import numpy as np
  from fmjax import train
  from fmjax.data import pipelines
  from fmjax.evaluation import evaluator

  if args.slow_after >= 0:
    # Test hook: slow the host loop after a step so a SIGKILL lands mid-run, reproducibly.
    original = pipelines.ToySource.batch

    def slow_batch(self, step):
      if step >= args.slow_after:
        time.sleep(0.5)
      return original(self, step)

    pipelines.ToySource.batch = slow_batch

  if args.sigterm_at >= 0 and jax.process_index() == min(1, jax.process_count() - 1):
    # Test hook: a preemption notice that reaches one process only.
    fetch = pipelines.ToySource.batch

    def batch_then_sigterm(self, step):
      if step == args.sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return fetch(self, step)

    pipelines.ToySource.batch = batch_then_sigterm

  config = tiny_config(json.loads(args.overrides))
  captured = {}
  original_evaluate = evaluator.Evaluator.__call__

  def evaluate(self, state, step, logger, *, final):
    if final:
      captured['params'] = jax.tree.map(lambda x: np.asarray(sharding.gather_to_host(x)), state['params']['net'])
      captured['ema'] = jax.tree.map(lambda x: np.asarray(sharding.gather_to_host(x)), state['ema'][0])
    if not args.eval:
      return {'step': step}
    return original_evaluate(self, state, step, logger, final=final)

  evaluator.Evaluator.__call__ = evaluate
  results = train.train_and_evaluate(config, args.workdir)
  if args.dump and jax.process_index() == 0:
    flat = {'params/' + jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_flatten_with_path(captured['params'])[0]}
    flat.update({'ema/' + jax.tree_util.keystr(p): v
                 for p, v in jax.tree_util.tree_flatten_with_path(captured['ema'])[0]})
    np.savez(args.dump, **flat)
  print('RESULTS ' + json.dumps(results))


if __name__ == '__main__':
  main()
