"""fmjax's import structure: every module imports first, and the math layer imports only downward.

1. Every module of the package (package __init__ files included), imported FIRST in a fresh
   interpreter, must succeed. An import cycle among fmjax modules shows only to a program that
   enters the cycle at the wrong module (it then sees the other module half-initialized:
   AttributeError or ImportError "partially initialized module"), so each module gets an
   interpreter of its own in which no fmjax module was imported before it. A subprocess per
   module would cost seconds each (jax, flax, optax and orbax take ~10 s to import on a busy
   machine), so one fresh subprocess imports the third-party libraries that fmjax modules import
   at module level, and no fmjax module, then forks one child per fmjax module; the child imports
   that module and reports its traceback on a pipe. Preloading third-party code cannot hide a
   cycle: a cycle is among fmjax modules, and in every child all of fmjax is still unimported.
   The parent only imports (it never runs a jax computation), so no jax backend threads exist
   when it forks; each child that needs a backend starts its own.

2. The layer rule, checked statically on module-level imports (imports inside functions are
   allowed: that is how a math module reaches system code only when asked to): the math layer
   (pure functions of arrays) never imports the system layer (configs, training loop,
   checkpoints, evaluation, data pipelines).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]

# The pure-math modules: interpolants, flow maps, training rules, samplers, steering, toy data,
# networks. A name covers the module and everything under it.
MATH_LAYER = ('fmjax.interpolants', 'fmjax.flow_maps', 'fmjax.losses', 'fmjax.samplers',
              'fmjax.steering', 'fmjax.data.toy', 'fmjax.models', 'fmjax.conditioning')
# Modules under MATH_LAYER that are training-system glue, and so may import the system layer.
SYSTEM_GLUE = {
    # A command-line program that trains the classifier behind the classifier reward.
    'fmjax.steering.train_classifier',
}
SYSTEM_LAYER = ('fmjax.configs', 'fmjax.train', 'fmjax.main', 'fmjax.api', 'fmjax.from_config',
                'fmjax.trained_runs', 'fmjax.checkpointing', 'fmjax.cli', 'fmjax.evaluation',
                'fmjax.data.pipelines', 'fmjax.data.datasets', 'fmjax.logging_utils',
                'fmjax.plotting', 'fmjax.benchmarking', 'fmjax.train_state', 'fmjax.sharding')
# (math module, system module) pairs allowed despite the rule, each with its reason. None today:
# keep it that way; move the shared piece down into the math layer instead.
ALLOWED_UPWARD_IMPORTS: dict[tuple[str, str], str] = {}


def package_modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted name -> file of every module of the fmjax package under `root` (a repository root)."""
  modules = {}
  for path in sorted((root / 'fmjax').rglob('*.py')):
    parts = list(path.relative_to(root).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    modules['.'.join(parts)] = path
  return modules


def _is_under(module: str, prefixes) -> bool:
  return any(module == p or module.startswith(p + '.') for p in prefixes)


def _module_level_import_nodes(tree: ast.Module):
  """The import statements that run when the module is imported: everywhere except inside a
  function body (class bodies, if/try blocks at module level included)."""
  stack = list(tree.body)
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      continue
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    stack.extend(ast.iter_child_nodes(node))


def module_level_imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
  """(imported module, line) for each module-level import of `source` (the module `module`).

  `from a import b` gives both a and a.b (b may be a submodule); relative imports are resolved.
  """
  package = module if is_package else module.rpartition('.')[0]
  found = []
  for node in _module_level_import_nodes(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
      continue
    base = node.module or ''
    if node.level:
      anchor = package.split('.')[:len(package.split('.')) - (node.level - 1)]
      base = '.'.join(anchor + ([base] if base else []))
    found.append((base, node.lineno))
    found += [(f'{base}.{alias.name}', node.lineno) for alias in node.names]
  return found


def layer_violations(root: pathlib.Path) -> list[str]:
  """'math -> system (file:line)' for each module-level import of the system layer by the math
  layer under `root`, less ALLOWED_UPWARD_IMPORTS."""
  violations = []
  for module, path in package_modules(root).items():
    if not _is_under(module, MATH_LAYER) or module in SYSTEM_GLUE:
      continue
    imports = module_level_imports(path.read_text(), module, path.name == '__init__.py')
    for imported, line in imports:
      if _is_under(imported, SYSTEM_LAYER) and (module, imported) not in ALLOWED_UPWARD_IMPORTS:
        violations.append(f'{module} -> {imported} ({path.relative_to(root)}:{line})')
  return violations


# ------------------------------------------------- the fork harness (runs in a fresh subprocess)


def _preload_third_party(modules: dict[str, pathlib.Path]) -> None:
  """Runs every module-level, non-fmjax, absolute import statement of the package."""
  statements = set()
  for module, path in modules.items():
    for node in _module_level_import_nodes(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [] if node.level else [node.module])
      if names and not any(n == 'fmjax' or n.startswith('fmjax.') or n == '__future__'
                           for n in names):
        statements.add(ast.unparse(node))
  for statement in sorted(statements):
    try:
      exec(statement, {})   # pylint: disable=exec-used
    except ImportError:
      pass   # an optional dependency: the child meets the same absence as a fresh interpreter


def _import_in_child(module: str, root: pathlib.Path) -> tuple[int, str]:
  """Forks; the child imports `module` first and exits 0, or 1 with its traceback on a pipe."""
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:   # the child
    os.close(read_end)
    code, message = 0, ''
    try:
      loaded = importlib.import_module(module)
      where = pathlib.Path(loaded.__file__).resolve()
      if root.resolve() not in where.parents:
        code, message = 1, f'imported {where}, not the package under {root}'
    except BaseException:   # pylint: disable=broad-except
      code, message = 1, traceback.format_exc()
    with os.fdopen(write_end, 'w') as pipe:
      pipe.write(message)
    os._exit(code)   # pylint: disable=protected-access
  os.close(write_end)
  with os.fdopen(read_end) as pipe:
    message = pipe.read()
  _, status = os.waitpid(pid, 0)
  return os.waitstatus_to_exitcode(status), message


def import_each_first(root: pathlib.Path) -> dict:
  """{'checked': [module, ...], 'failures': {module: traceback}} for the package under `root`.
  Run it in a fresh interpreter (this file's __main__ does)."""
  modules = package_modules(root)
  _preload_third_party(modules)
  preloaded = sorted(m for m in sys.modules if m == 'fmjax' or m.startswith('fmjax.'))
  if preloaded:
    raise RuntimeError(f'preloading third-party libraries imported fmjax modules {preloaded}')
  failures = {}
  for module in modules:
    code, message = _import_in_child(module, root)
    if code != 0:
      failures[module] = message or f'exit status {code}'
  return {'checked': list(modules), 'failures': failures}


# ------------------------------------------------------------------------------------ tests


def test_every_module_imports_first_in_a_fresh_interpreter(tmp_path):
  report = tmp_path / 'imports.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  done = subprocess.run([sys.executable, __file__, str(REPO), str(report)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  result = json.loads(report.read_text())
  expected = list(package_modules(REPO))
  assert result['checked'] == expected and len(expected) > 50, (result['checked'], expected)
  assert not result['failures'], '\n\n'.join(
      f'import {module} (first) failed:\n{message}' for module, message in result['failures'].items())


def test_math_layer_does_not_import_system_layer():
  assert layer_violations(REPO) == []


def test_layer_check_sees_an_upward_import():
  # The rule's own check: the import forms that reach fmjax.configs are all seen, at module
  # level and in a class body, and an import inside a function is not.
  source = ('import jax\nfrom fmjax import configs\nimport fmjax.train as t\n'
            'from ..evaluation import fid\nclass A:\n  from fmjax.sharding import mesh\n'
            'def f():\n  from fmjax import api\n')
  imports = {name for name, _ in module_level_imports(source, 'fmjax.losses.base')}
  assert {'fmjax.configs', 'fmjax.train', 'fmjax.evaluation.fid', 'fmjax.sharding.mesh'} <= imports
  assert not any(name.startswith('fmjax.api') for name in imports)
  assert all(_is_under(name, SYSTEM_LAYER) for name in
             ('fmjax.configs', 'fmjax.train', 'fmjax.evaluation.fid', 'fmjax.sharding.mesh'))
  assert not _is_under('fmjax.train_state_extra', ('fmjax.train',))


if __name__ == '__main__':
  # The fresh interpreter of test_every_module_imports_first...: argv = repository root, report.
  package_root = pathlib.Path(sys.argv[1])
  sys.path[0] = str(package_root)   # the package root, not this script's folder (tests/)
  pathlib.Path(sys.argv[2]).write_text(json.dumps(import_each_first(package_root)))
