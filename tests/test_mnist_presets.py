"""experiments/mnist.py's GPU presets: they validate, evaluate the planned few-step table
(flow maps at 1, 2, 4 steps, the flow-matching baseline's ODE at 8-64 NFE, 5,000 samples),
and the CPU recipes of the README are unchanged. The tiny path of the whole script is
`TINY=1 bash benchmarks/gpu_mnist_fid.sh` (minutes on a CPU, not run here)."""

import importlib.util
import os

import pytest

from fmjax import configs
from fmjax.evaluation import sweep_samplers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mnist_config(arg):
  path = os.path.join(ROOT, 'experiments', 'mnist.py')
  spec = importlib.util.spec_from_file_location('mnist', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def points(config):
  return [(s.family, s.nfe) for s in sweep_samplers.specs_from_config(config)]


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


def test_cpu_preset():
  """The CPU-size U-Net: the same 5,000-sample plan, the baseline's ODE at 8, 16 and 32 NFE."""
  c = configs.resolve(mnist_config('lsd,unet,cpu'))
  configs.validate(c)
  assert points(c) == [('flow_map', 1), ('flow_map', 2), ('flow_map', 4)]
  baseline = configs.resolve(mnist_config('flow_matching,unet,cpu'))
  configs.validate(baseline)
  assert points(baseline) == [('ode', 8), ('ode', 16), ('ode', 32)]
  assert (c.eval.fid_num_samples, c.eval.fid_batch_size, c.train.num_steps, c.train.batch_size) == (
      5000, 100, 2000, 64)
  assert c.model_defaults.unet.model_channels == 32


def test_default_recipes_unchanged_and_bad_size():
  default, mlp = mnist_config('lsd'), mnist_config('lsd,mlp')
  assert default.train.num_steps == 20_000 and default.eval.fid_num_samples == 50_000
  assert mlp.train.num_steps == 4000 and mlp.eval.fid_num_samples == 300
  with pytest.raises(ValueError, match='h100'):
    mnist_config('lsd,unet,h200')
  with pytest.raises(ValueError, match='U-Net presets'):
    mnist_config('lsd,mlp,h100')


def test_fid_table_from_workdirs(tmp_path, capsys):
  import json
  import sys
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import mnist_fid_table
  ref = {'dataset': 'mnist5k', 'split': 'train+test', 'count': 5000}
  runs = {'lsd': {'few_step': {'1': {'fid': 12.345}, '4': {'fid': 6.0}}, 'ode': {}},
          'flow_matching': {'few_step': {}, 'ode': {'8': {'fid': 30.0}, '64': {'fid': None}}}}
  for rule, res in runs.items():
    wd = tmp_path / f'mnist_{rule}'
    wd.mkdir()
    (wd / 'final_metrics.json').write_text(json.dumps(dict(res, fid_reference=ref,
                                                           fid_num_samples=5000)))
  (tmp_path / 'mnist_meanflow').mkdir()   # a failed run: named, not fatal
  mnist_fid_table.main(['--device', 'H100', str(tmp_path / 'mnist_flow_matching'),
                        str(tmp_path / 'mnist_lsd'), str(tmp_path / 'mnist_meanflow')])
  out = capsys.readouterr().out
  assert '| NFE | flow_matching ODE | lsd flow map |' in out
  assert '| 1 |  | 12.35 |' in out and '| 4 |  | 6.00 |' in out
  assert '| 8 | 30.00 |  |' in out and '| 64 |  |  |' in out   # null FID -> empty cell
  assert 'mnist_meanflow: no final_metrics.json' in out and 'vs mnist5k/train+test (5000' in out


def test_quality_table_reads_the_pixel_chains_evaluations(tmp_path):
  """The script's mnist_quality.md: one row per evaluation JSON it keeps in OUT/eval, MeanFlow
  and the baseline's Heun run included, and the goal line from LSD and the 32-NFE rows."""
  import json
  import subprocess
  import sys
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import mnist_latent_table

  def row(nfe, steps, fid, share, method=None):
    return {'nfe': nfe, 'steps': steps, 'fid': fid, 'num_samples': 5000, 'confident_share': share,
            'class_tv': 0.2, **({'method': method} if method else {})}
  evals = {'lsd': {'few_step': {'1': row(1, 1, 60.0, 0.5), '4': row(4, 4, 44.0, 0.6)}},
           'meanflow': {'few_step': {'1': row(1, 1, 70.0, 0.4)}},
           'flow_matching_euler': {'ode': {'32': row(32, 32, 40.0, 0.7, 'euler')}},
           'flow_matching_heun': {'ode': {'32': row(32, 16, 50.0, 0.7, 'heun')}}}
  for name, results in evals.items():
    (tmp_path / f'{name}.json').write_text(json.dumps(results))
  text, goal = mnist_latent_table.table(str(tmp_path), 'lmd')
  assert '| MeanFlow | 1-step map | 1 | 70.00 | 40.0 % | 0.200 | 5000 |' in text
  assert '| flow matching | ODE heun, 16 steps | 32 | 50.00 | 70.0 % |' in text
  # The goal's reference is the best 32-NFE row (Euler's 40), not Heun's.
  assert goal['lsd_1step_ratio'] == pytest.approx(1.5) and goal['lsd_4step_ratio'] == pytest.approx(1.1)
  subprocess.run(['bash', '-n', os.path.join(ROOT, 'benchmarks', 'gpu_mnist_fid.sh')], check=True)
