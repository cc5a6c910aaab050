"""Users' own Python files that fmjax runs: experiment files (`--config=FILE`) and
registration files (`python -m fmjax.data.latents build --register=FILE`).

An error raised inside such a file is the user's to fix, so it is reported in one line that
names the file, the line in it and the error, instead of the importer's traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import traceback
import types


def run(path: str, prefix: str = 'fmjax_user_file') -> types.ModuleType:
  """Executes the Python file `path` as a fresh module (named from `prefix` and the file's
  absolute path, so two files never share a module) and returns it. Errors propagate."""
  digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(f'{prefix}_{digest}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def describe_error(path: str, error: BaseException) -> str:
  """'FILE line N: Type: message' for `error` raised while running the file `path`."""
  return f'{location(path, error)}: {error_text(error)}'


def location(path: str, error: BaseException) -> str:
  """'FILE line N': the last line of `error`'s traceback inside the file `path` (a syntax
  error's own line), or just 'FILE' when the traceback never entered it."""
  target = os.path.realpath(path)
  if isinstance(error, SyntaxError) and error.filename and os.path.realpath(error.filename) == target:
    return f'{path} line {error.lineno}'
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.realpath(frame.filename) == target]
  return f'{path} line {lines[-1]}' if lines else path


def error_text(error: BaseException) -> str:
  """'Type: message' on one line."""
  return f"{type(error).__name__}: {' '.join(str(error).split()) or '(no message)'}"
