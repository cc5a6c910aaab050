"""experiments/mnist.py's GPU presets (issue 11, item 4): they validate, evaluate what the issue
asks (flow maps at 1, 2, 4 steps, the flow-matching baseline's ODE at 8-64 NFE, 5,000 samples),
and the CPU recipes of the README are unchanged. The tiny path of the whole script is
`TINY=1 bash benchmarks/gpu_mnist_fid.sh` (minutes on a CPU, not run here)."""

import importlib.util
import os

import pytest

from fmjax import configs
from fmjax.evaluation import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mnist_config(arg):
  path = os.path.join(ROOT, 'experiments', 'mnist.py')
  spec = importlib.util.spec_from_file_location('mnist', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def points(config):
  return [(s.family, s.nfe) for s in plan.plan_from_config(config)]


@pytest.mark.parametrize('rule', ['lsd', 'meanflow'])
def test_flow_map_presets(rule):
  c = configs.resolve(mnist_config(f'{rule},unet,h100'))
  configs.validate(c)
  assert points(c) == [('flow_map', 1), ('flow_map', 2), ('flow_map', 4)]
  assert (c.eval.fid_num_samples, c.data.num_classes, c.model.name) == (5000, 10, 'unet')
  assert c.train.num_steps == 5000 and c.optim.ema_decays == (0.999,)


def test_flow_matching_baseline_preset_and_tiny():
  c = configs.resolve(mnist_config('flow_matching,unet,h100'))
  configs.validate(c)
  assert points(c) == [('ode', 8), ('ode', 16), ('ode', 32), ('ode', 64)]
  tiny = configs.resolve(mnist_config('flow_matching,unet,tiny'))
  configs.validate(tiny)
  assert points(tiny) == [('ode', 8), ('ode', 16)] and tiny.train.num_steps == 3


def test_default_recipes_unchanged_and_bad_size():
  default, mlp = mnist_config('lsd'), mnist_config('lsd,mlp')
  assert default.train.num_steps == 20_000 and default.eval.fid_num_samples == 50_000
  assert mlp.train.num_steps == 4000 and mlp.eval.fid_num_samples == 300
  with pytest.raises(ValueError, match='h100'):
    mnist_config('lsd,unet,h200')
  with pytest.raises(ValueError, match='U-Net presets'):
    mnist_config('lsd,mlp,h100')
