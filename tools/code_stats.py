"""Size and shape of the package, for before/after comparisons of a restructuring.

Prints: lines per package (fmjax/ and each sub-package, .py files, all lines), the 10 longest
functions (by source lines, nested functions counted on their own), and the places that validate
a steering option: `raise` statements under an `if` and `need(...)` checks whose condition names
one of STEERING_OPTIONS (a syntactic count, so a helper called from three places counts once).

  python tools/code_stats.py            # from the repository root
  python tools/code_stats.py --json     # the same numbers as JSON
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEERING_OPTIONS = ('temperature', 'guidance_scale', 'guidance_stop', 'keep_jacobian',
                    'num_particles', 'lookahead', 'langevin', 'best_of', 'ess_threshold')


def python_files(top='fmjax'):
  for folder, _, files in os.walk(os.path.join(ROOT, top)):
    for name in sorted(files):
      if name.endswith('.py'):
        yield os.path.join(folder, name)


def lines_per_package():
  counts = collections.Counter()
  for path in python_files():
    rel = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, '.')
    with open(path) as f:
      counts[rel] += sum(1 for _ in f)
  return dict(sorted(counts.items()))


def longest_functions(n=10):
  found = []
  for path in python_files():
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        found.append((node.end_lineno - node.lineno + 1, f'{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}'))
  return sorted(found, reverse=True)[:n]


def _mentions(node, names):
  text = ast.unparse(node)
  return any(name in text for name in names)


def steering_validations():
  places = []
  for path in python_files():
    with open(path) as f:
      tree = ast.parse(f.read())
    rel = os.path.relpath(path, ROOT)
    for node in ast.walk(tree):
      if isinstance(node, ast.If) and any(isinstance(s, ast.Raise) for s in node.body):
        if _mentions(node.test, STEERING_OPTIONS):
          places.append(f'{rel}:{node.lineno}')
      elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'need'
            and node.args and _mentions(node.args[0], STEERING_OPTIONS)):
        places.append(f'{rel}:{node.lineno}')
  return places


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args(argv)
  stats = {'lines_per_package': lines_per_package(),
           'longest_functions': longest_functions(),
           'steering_validations': steering_validations()}
  if args.json:
    print(json.dumps(stats, indent=1))
    return
  print('lines per package:')
  for name, count in stats['lines_per_package'].items():
    print(f'  {name:28s} {count:6d}')
  print(f"  {'total':28s} {sum(stats['lines_per_package'].values()):6d}")
  print('10 longest functions:')
  for length, where in stats['longest_functions']:
    print(f'  {length:4d}  {where}')
  print(f"places that validate a steering option: {len(stats['steering_validations'])}")
  for where in stats['steering_validations']:
    print(f'  {where}')


if __name__ == '__main__':
  main()
