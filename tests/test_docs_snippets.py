"""The code blocks of README.md and docs/*.md run as pasted.

Every fenced block needs a language (```bash, ```python, ```text, ...). Each ```bash / ```sh /
```shell block must pass `bash -n`, each ```python block `compile()`, and the commands in shell
blocks are checked without running them: `python -m MODULE` names a module that exists,
`python FILE` / `bash FILE` a file of the repository, `make TARGET` a Makefile target, every
`--flag` of a script or module is defined in its source, and every `--config=experiments/...`
command's `--config.X` overrides are parsed and resolved exactly as `fmjax.main` does
(unknown keys, wrong types and unknown rule or network options fail here).

An HTML comment on the line just above a fence (invisible on GitHub) says what else to do:

  <!-- test: run -->                       run the block
  <!-- test: run; replace 'OLD' 'NEW' -->   run it with every OLD replaced by NEW (tiny step
                                           counts); several `; replace` clauses may follow, and
                                           each OLD must occur in the block
  <!-- test: skip, REASON -->              parse only, with the reason (a fragment, too slow)

Every ```python block needs one of the two (a fragment must say so). Blocks marked run of one
file run in order in one shared temporary directory (so a training block's run feeds the eval
and `fmjax.load` blocks after it); `experiments/` and `benchmarks/` are linked into it, `python`
is this interpreter, and shell blocks run under `bash -e`. Only cheap sequences are marked run
(the whole test takes about a minute of CPU time); the rest are parse-only.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELLS = ('bash', 'sh', 'shell')
FENCE = re.compile(r'^(\s*)(`{3,}|~{3,})\s*([\w+-]*)')
MARKER = re.compile(r'^\s*<!--\s*test:\s*(.*?)\s*-->\s*$')
RUN_TIMEOUT_S = 600   # per block: a hang fails with the block named instead of stalling CI
LINKED = ('experiments', 'benchmarks')


def doc_files() -> list[str]:
  files = ['README.md'] + sorted(glob.glob('docs/*.md', root_dir=ROOT)) + sorted(
      glob.glob('docs/**/*.md', root_dir=ROOT, recursive=True))
  return sorted(set(files), key=files.index)


@dataclasses.dataclass
class Block:
  path: str          # relative to the repository root
  line: int          # 1-based line of the opening fence
  lang: str
  code: str
  action: str = ''   # '', 'run' or 'skip'
  reason: str = ''
  replacements: tuple = ()
  error: str = ''    # a malformed marker

  @property
  def where(self) -> str:
    return f'{self.path}:{self.line}'


def parse_marker(text: str, block: Block) -> None:
  clauses = [c.strip() for c in text.split(';')]
  head = clauses[0]
  if head == 'run':
    block.action = 'run'
  elif re.match(r'skip\b', head):
    block.action = 'skip'
    block.reason = re.sub(r'^skip[\s,:]*', '', head)
    if not block.reason:
      block.error = 'a skip marker needs a reason: <!-- test: skip, WHY -->'
  else:
    block.error = f'unknown test marker {text!r} (use run or skip, REASON)'
    return
  replacements = []
  for clause in clauses[1:]:
    words = shlex.split(clause)
    if len(words) != 3 or words[0] != 'replace' or block.action != 'run':
      block.error = f"bad clause {clause!r}: only run takes `; replace 'OLD' 'NEW'`"
      return
    replacements.append((words[1], words[2]))
  block.replacements = tuple(replacements)


def extract_blocks(path: str) -> tuple[list[Block], list[str]]:
  """The fenced blocks of one file, and problems found outside them (unfenced commands)."""
  lines = open(os.path.join(ROOT, path), encoding='utf-8').read().split('\n')
  blocks, problems = [], []
  i = 0
  while i < len(lines):
    match = FENCE.match(lines[i])
    if not match:
      # A command in an indented (unfenced) block is not checked: fence it.
      if re.match(r'^ {4,}(python3? -m |python3? \S+\.py|bash \S+\.sh)', lines[i]):
        problems.append(f'{path}:{i + 1}: a command outside a fenced block; put it in a ```bash '
                        'block so that it is checked')
      elif re.match(r'^ {4,}(import \w|from [\w.]+ import )', lines[i]):
        problems.append(f'{path}:{i + 1}: Python code outside a fenced block; put it in a '
                        '```python block so that it is checked')
      i += 1
      continue
    indent, fence, lang = match.groups()
    end = i + 1
    while end < len(lines) and not lines[end].strip().startswith(fence):
      end += 1
    if end == len(lines):
      problems.append(f'{path}:{i + 1}: unclosed code fence')
      break
    body = [l[len(indent):] if l.startswith(indent) else l for l in lines[i + 1:end]]
    block = Block(path, i + 1, lang.lower(), '\n'.join(body) + '\n')
    marker = MARKER.match(lines[i - 1]) if i > 0 else None
    if marker:
      parse_marker(marker.group(1), block)
    blocks.append(block)
    i = end + 1
  return blocks, problems


def all_blocks() -> list[Block]:
  return [b for path in doc_files() for b in extract_blocks(path)[0]]


def runnable_code(block: Block) -> str:
  code = block.code
  for old, new in block.replacements:
    if old not in code:
      raise AssertionError(f'{block.where}: the test marker replaces {old!r}, which the block no '
                           'longer contains; update the marker')
    code = code.replace(old, new)
  return code


# ------------------------------------------------------------------ static checks of commands

def shell_commands(code: str) -> list[list[str]]:
  """The simple commands of a shell block: continuations joined, comments dropped, split on
  `;`, `&&`, `||` and `|`, leading VAR=value assignments removed."""
  joined = re.sub(r'\\\n', ' ', code)
  commands = []
  for line in joined.split('\n'):
    try:
      lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
      lexer.whitespace_split = True
      lexer.commenters = '#'
      words = list(lexer)
    except ValueError:
      continue   # bash -n reports it
    current = []
    for word in words + [';']:
      if word and set(word) <= set(';&|'):
        while current and re.match(r'^[A-Za-z_]\w*=', current[0]):
          current.pop(0)
        if current:
          commands.append(current)
        current = []
      else:
        current.append(word)
  return commands


def module_source(module: str) -> str | None:
  try:
    spec = importlib.util.find_spec(module)
  except ModuleNotFoundError:
    return None
  if spec is None or not spec.origin:
    return None
  if spec.submodule_search_locations:   # a package run with -m: its __main__
    main = os.path.join(spec.submodule_search_locations[0], '__main__.py')
    return open(main).read() if os.path.exists(main) else ''
  return open(spec.origin).read()


def flag_defined(flag: str, source: str) -> bool:
  """Whether the script's source defines --flag (argparse or absl)."""
  name = re.escape(flag)
  return bool(re.search(rf"""['"]-{{0,2}}{name}['"]""", source))


def parse_fmjax_config(argv: list[str]) -> None:
  """Parses and resolves --config / --config.X exactly as fmjax.main does (no run)."""
  from absl import flags
  from ml_collections import config_flags
  from fmjax import configs
  args = ['prog'] + [a for a in argv if re.match(r'^--config(\.|=)', a)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment file', flag_values=values,
                                  lock_config=True, sys_argv=args)
  cwd = os.getcwd()
  os.chdir(ROOT)   # experiment paths are relative to the repository root
  try:
    values(args)
    configs.resolve(values.config)
  finally:
    os.chdir(cwd)


def check_command(words: list[str]) -> list[str]:
  """Problems of one shell command (empty if none)."""
  problems = []
  program, args = words[0], words[1:]
  if program in ('python', 'python3'):
    if args[:1] == ['-m'] and len(args) > 1:
      module, rest = args[1], args[2:]
      source = module_source(module)
      if source is None:
        return [f'no module {module!r}']
    elif args[:1] == ['-c']:
      return problems
    elif args and args[0].endswith('.py'):
      module, rest = args[0], args[1:]
      if not os.path.exists(os.path.join(ROOT, args[0])):
        return [f'no file {args[0]!r} in the repository']
      source = open(os.path.join(ROOT, args[0])).read()
    else:
      return problems
    flag_names = [re.match(r'--(no)?([\w.-]+)', a).group(2) for a in rest if re.match(r'--\w', a)]
    for name in flag_names:
      if not name.startswith('config.') and not flag_defined(name, source):
        problems.append(f'{module} defines no flag --{name}')
    config = [a for a in rest if a.startswith('--config=')]
    if config and '...' not in config[0] and '/' in config[0]:
      try:
        parse_fmjax_config(rest)
      except Exception as e:   # noqa: BLE001 -- every parse or resolve error is the finding
        problems.append(f'its --config options fail: {type(e).__name__}: {str(e).strip()[:300]}')
  elif program == 'bash' and args and args[0].endswith('.sh'):
    if not os.path.exists(os.path.join(ROOT, args[0])):
      problems.append(f'no file {args[0]!r} in the repository')
  elif program == 'make':
    makefile = open(os.path.join(ROOT, 'Makefile')).read()
    for target in args:
      if not target.startswith('-') and '=' not in target and not re.search(
          rf'^{re.escape(target)}\s*:', makefile, re.M):
        problems.append(f'the Makefile has no target {target!r}')
  return problems


# ------------------------------------------------------------------ the tests

BLOCKS = all_blocks()


def test_blocks_found():
  # The extraction itself: the README's blocks are there, with their languages and markers.
  readme = [b for b in BLOCKS if b.path == 'README.md']
  assert len(readme) >= 8, [b.where for b in readme]
  assert {'bash', 'python'} <= {b.lang for b in readme}
  assert any(b.action == 'run' for b in readme)


GOOD = ('python -m fmjax.main --config=experiments/toy_gmm.py:meanflow --workdir=runs/x '
        '--mode=eval --config.loss.diagonal_fraction=0.5 --config.loss.times.name=uniform')


@pytest.mark.parametrize('command, problem', [
    (GOOD, None),
    ('python -m fmjax.no_such_module --workdir=x', "no module 'fmjax.no_such_module'"),
    (GOOD + ' --config.train.num_stepz=3', 'num_steps'),                # a misspelt key
    (GOOD + ' --config.train.num_steps=lots', 'fail'),                  # a wrong type
    (GOOD.replace(':meanflow', ':lsd') + ' --config.loss.omega=2.0', 'omega'),   # not an LSD option
    (GOOD.replace('toy_gmm', 'toy_gmmm'), 'fail'),                      # no such experiment
    (GOOD + ' --modes=eval', 'defines no flag --modes'),
    ('python benchmarks/loss_cost.py --batch 64 --repeat 1', 'defines no flag --repeat'),
    ('python benchmarks/no_such.py', 'no file'),
    ('OUT=x bash benchmarks/no_such.sh', 'no file'),
    ('make demo bnech', "no target 'bnech'"),
])
def test_command_checker(command, problem):
  # The static checks themselves, on commands with one known mistake each (and one without).
  problems = [p for words in shell_commands(command + '\n') for p in check_command(words)]
  if problem is None:
    assert problems == []
  else:
    assert len(problems) == 1 and problem in problems[0], problems


def test_markers_and_bash_syntax(tmp_path):
  # Markers: run with replacements, skip with its reason; malformed ones are errors.
  doc = tmp_path / 'doc.md'
  doc.write_text("<!-- test: run; replace 'a=1' 'a=2'; replace \"b c\" 'd' -->\n```bash\necho a=1 b c\n```\n"
                 '<!-- test: skip, a fragment -->\n```python\nx = y\n```\n'
                 '<!-- test: skip -->\n```python\nx = 1\n```\n'
                 "<!-- test: skip, slow; replace 'a' 'b' -->\n```sh\ntrue\n```\n"
                 '```\nuntagged\n```\n\n    python -m fmjax.main --config=x\n\n    import jax\n')
  global ROOT
  root, ROOT = ROOT, str(tmp_path)
  try:
    blocks, problems = extract_blocks('doc.md')
  finally:
    ROOT = root
  assert [(b.line, b.lang, b.action) for b in blocks] == [
      (2, 'bash', 'run'), (6, 'python', 'skip'), (10, 'python', 'skip'), (14, 'sh', 'skip'),
      (17, '', '')]
  assert blocks[0].replacements == (('a=1', 'a=2'), ('b c', 'd'))
  assert runnable_code(blocks[0]) == 'echo a=2 d\n'
  assert blocks[1].reason == 'a fragment' and not blocks[1].error
  assert 'needs a reason' in blocks[2].error and 'only run takes' in blocks[3].error
  assert problems == ['doc.md:21: a command outside a fenced block; put it in a ```bash block '
                      'so that it is checked', 'doc.md:23: Python code outside a fenced block; '
                      'put it in a ```python block so that it is checked']
  stale = dataclasses.replace(blocks[0], replacements=(('a=3', 'a=4'),))
  with pytest.raises(AssertionError, match='doc.md:2: the test marker replaces'):
    runnable_code(stale)
  # The bug that reached the docs once: an unquoted tuple is a bash syntax error.
  bad = subprocess.run(['bash', '-n'], input="x --config.steer.center=(4.0,0.0)\n", text=True,
                       capture_output=True)
  good = subprocess.run(['bash', '-n'], input="x --config.steer.center='(4.0,0.0)'\n",
                        capture_output=True, text=True)
  assert bad.returncode != 0 and good.returncode == 0


@pytest.mark.parametrize('path', doc_files())
def test_no_unchecked_commands(path):
  problems = extract_blocks(path)[1]
  problems += [f'{b.where}: a fence without a language (use ```bash, ```python, ```text ...)'
               for b in extract_blocks(path)[0] if not b.lang]
  assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('block', [b for b in BLOCKS if b.lang in SHELLS + ('python',)],
                         ids=lambda b: b.where)
def test_block_parses(block):
  assert not block.error, f'{block.where}: {block.error}'
  if block.lang == 'python':
    assert block.action, (f'{block.where}: a python block needs <!-- test: run --> or '
                          '<!-- test: skip, REASON --> on the line above its fence')
    try:
      compile(block.code, block.where, 'exec')
    except SyntaxError as e:
      pytest.fail(f'{block.where}: python does not parse: {e}')
    return
  result = subprocess.run(['bash', '-n'], input=block.code, capture_output=True, text=True)
  assert result.returncode == 0, f'{block.where}: bash -n fails: {result.stderr.strip()}'
  problems = []
  for words in shell_commands(block.code):
    problems += [f'{block.where}: `{" ".join(words)[:80]}`: {p}' for p in check_command(words)]
  assert not problems, '\n'.join(problems)


RUN_FILES = sorted({b.path for b in BLOCKS if b.action == 'run'}, key=doc_files().index)


@pytest.mark.parametrize('path', RUN_FILES)
def test_runnable_blocks_run(path, tmp_path):
  for name in LINKED:
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  env = dict(os.environ)
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  env.setdefault('JAX_PLATFORMS', 'cpu')
  # One compilation cache for the whole sequence: the eval, sample and load blocks compile
  # the same samplers.
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / '.jax_cache')
  env['PYTHONWARNINGS'] = 'ignore::DeprecationWarning'
  for index, block in enumerate(b for b in BLOCKS if b.path == path and b.action == 'run'):
    code = runnable_code(block)
    if block.lang == 'python':
      script = tmp_path / f'block_{index}.py'
      script.write_text(code)
      command = [sys.executable, str(script)]
    else:
      script = tmp_path / f'block_{index}.sh'
      script.write_text(code)
      command = ['bash', '-e', str(script)]
    try:
      result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      pytest.fail(f'{block.where}: still running after {RUN_TIMEOUT_S} s')
    if result.returncode != 0:
      tail = '\n'.join((result.stdout + result.stderr).strip().split('\n')[-25:])
      pytest.fail(f'{block.where}: the block fails (exit status {result.returncode}); its code as '
                  f'run:\n{code}\nlast lines of its output:\n{tail}')
