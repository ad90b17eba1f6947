"""Checks that turn gin's silent or noisy failures into one line naming the file and line.

Gin accepts any new macro (`TRAIN_STPES = 10` simply defines a macro nobody reads) and its
syntax errors are multi-line tracebacks (an unclosed bracket surfaces as a tokenizer error
with no file name). These checks run before anything is built or written:

- `check_syntax`: walks the include tree of the gin files; a missing include or an unclosed
  or mismatched bracket is reported with its file and line.
- `format_gin_error`: any other gin parse error as one line.
- `check_unread_macros` (after parsing): a macro that no binding and no other macro
  references is a typo or a leftover; name the closest macro that is read.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import tokenize
from typing import Iterable, Optional, Sequence

import gin.config as gin_config

_INCLUDE = re.compile(r"""^\s*include\s+(['"])(?P<path>.+?)\1\s*(#.*)?$""")
_OPEN, _CLOSE = '([{', ')]}'


def resolve_include(path: str, search_paths: Sequence[str]) -> Optional[str]:
  """The file gin would open for `path` (it tries each search path as a prefix), or None."""
  for prefix in ('', *search_paths):
    candidate = os.path.join(prefix, path)
    if os.path.isfile(candidate):
      return candidate
  return None


def include_tree(gin_files: Sequence[str], search_paths: Sequence[str]) -> list[str]:
  """Every file the gin files include (depth first, each once); a missing include is an error."""
  seen: list[str] = []

  def visit(path: str) -> None:
    if os.path.abspath(path) in map(os.path.abspath, seen):
      return
    seen.append(path)
    with open(path, encoding='utf-8', errors='replace') as f:
      lines = f.read().splitlines()
    for lineno, line in enumerate(lines, 1):
      m = _INCLUDE.match(line)
      if not m:
        continue
      found = resolve_include(m.group('path'), search_paths)
      if found is None:
        raise ValueError(f'Bad gin include: {path} line {lineno}: include {m.group("path")!r} not found (looked '
                         f'in {", ".join(search_paths)}){_close_gin_file(m.group("path"), search_paths)}')
      visit(found)

  for f in gin_files:
    found = resolve_include(f, search_paths)
    if found is not None:
      visit(found)
  return seen


def _close_gin_file(path: str, search_paths: Sequence[str]) -> str:
  known = set()
  for root in search_paths:
    if os.path.isdir(root) and os.path.abspath(root) != os.path.abspath('.'):
      for d, _, files in os.walk(root):
        known.update(os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith('.gin'))
  close = difflib.get_close_matches(path, sorted(known), n=1)
  return f'; did you mean {close[0]!r}?' if close else ''


def bracket_error(path: str, text: str) -> Optional[str]:
  """'FILE line N: ...' for the first unclosed or mismatched bracket in a gin file, else None.

  Gin files tokenize like Python (strings, comments, brackets), so Python's tokenizer finds
  brackets outside strings and comments.
  """
  stack: list[tuple[str, int]] = []
  try:
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
      if tok.type != tokenize.OP:
        continue
      if tok.string in _OPEN:
        stack.append((tok.string, tok.start[0]))
      elif tok.string in _CLOSE:
        want = _OPEN[_CLOSE.index(tok.string)]
        if not stack or stack[-1][0] != want:
          opened = f" (the open {stack[-1][0]!r} is on line {stack[-1][1]})" if stack else ''
          return f'{path} line {tok.start[0]}: {tok.string!r} closes nothing{opened}'
        stack.pop()
  except tokenize.TokenError:
    pass  # end of file inside a bracket: reported from the stack below
  except (SyntaxError, IndentationError):
    return None  # not a bracket problem: gin's own parser reports it
  if stack:
    char, lineno = stack[-1]
    return f'{path} line {lineno}: {char!r} is never closed'
  return None


def check_syntax(gin_files: Sequence[str], bindings: Sequence[str],
                 search_paths: Sequence[str]) -> list[str]:
  """Missing includes and unbalanced brackets, with file and line; returns the files read."""
  files = include_tree(gin_files, search_paths)
  for path in files:
    with open(path, encoding='utf-8', errors='replace') as f:
      problem = bracket_error(path, f.read())
    if problem:
      raise ValueError(f'Bad gin syntax: {problem}.')
  for binding in bindings:
    problem = bracket_error('binding', binding)
    if problem:
      raise ValueError(f'Bad gin syntax in --gin.{binding}: {problem.split(": ", 1)[1]}.')
  return files


def format_gin_error(error: BaseException, files: Sequence[str]) -> str:
  """One line from gin's multi-line parse errors: 'FILE line N: what' where gin says it."""
  if isinstance(error, SyntaxError) and error.filename and error.lineno:
    name = next((f for f in files if os.path.basename(f) == os.path.basename(error.filename)),
                error.filename)
    what = (error.msg or '').strip().splitlines()
    return f'Bad gin syntax: {name} line {error.lineno}: {what[-1].strip() if what else error}'
  text = ' '.join(line.strip() for line in str(error).strip().splitlines() if line.strip())
  return f'Bad gin configuration ({", ".join(files) or "bindings"}): {text}'


# ---------------------------------------------------------------------------- macros


def macro_usage() -> tuple[set[str], set[str], set[str]]:
  """(defined, referenced, definitions) over gin's parsed config.

  definitions: macros whose value is a configurable (`MODEL_TUNING = @stages.model_tuning()`);
  they name an object a run may or may not use (a stage file's stage), so they are never
  reported as unread.
  """
  defined, referenced, definitions = set(), set(), set()
  for (scope, selector), params in gin_config._CONFIG.items():  # gin keeps no public view
    if selector == 'gin.macro':
      defined.add(scope)
      value = params.get('value')
      if isinstance(value, gin_config.ConfigurableReference) and not _is_macro_ref(value):
        definitions.add(scope)
  for ref in gin_config.iterate_references(gin_config._CONFIG):
    if _is_macro_ref(ref):
      referenced.add('/'.join(ref.scopes))
  return defined, referenced, definitions


def _is_macro_ref(ref) -> bool:
  return ref.selector == 'gin.macro'


def unread_macros(read_by_code: Iterable[str] = ()) -> list[str]:
  """Macros set but read by no binding, no other macro and no code (`read_by_code`)."""
  defined, referenced, definitions = macro_usage()
  return sorted(defined - referenced - definitions - set(read_by_code))


def where_set(name: str, files: Sequence[str], bindings: Sequence[str]) -> str:
  """'--gin.NAME=...' or 'FILE line N': the last place that sets macro NAME (gin's winner)."""
  pattern = re.compile(rf'^\s*{re.escape(name)}\s*=')
  for binding in reversed(list(bindings)):
    if pattern.match(binding):
      return f'--gin.{binding.strip()}'
  for path in reversed(list(files)):
    with open(path, encoding='utf-8', errors='replace') as f:
      hits = [i for i, line in enumerate(f.read().splitlines(), 1) if pattern.match(line)]
    if hits:
      return f'{path} line {hits[-1]}'
  return 'the gin configuration'


def _set_only_in(name: str, files: Sequence[str], bindings: Sequence[str],
                 directories: Sequence[str]) -> bool:
  """Whether macro NAME is set only by files under `directories` (not by a flag or another file)."""
  if not directories:
    return False
  pattern = re.compile(rf'^\s*{re.escape(name)}\s*=')
  if any(pattern.match(b) for b in bindings):
    return False
  roots = tuple(os.path.join(os.path.abspath(d), '') for d in directories)
  for path in files:
    with open(path, encoding='utf-8', errors='replace') as f:
      sets = any(pattern.match(line) for line in f.read().splitlines())
    if sets and not os.path.abspath(path).startswith(roots):
      return False
  return True


def check_unread_macros(files: Sequence[str], bindings: Sequence[str],
                        read_by_code: Iterable[str] = (),
                        building_blocks: Sequence[str] = ()) -> None:
  """Raise a one-line ValueError naming every macro nothing reads and its closest read one.

  A macro set only by a building-block file (`building_blocks`: directories of model and stage
  files) is left alone when nothing reads it: the run replaced the binding that read it (e.g.
  `config.T5Config.scan_layers = True` instead of `SCAN_LAYERS = True`).
  """
  unread = [name for name in unread_macros(read_by_code)
            if not _set_only_in(name, files, bindings, building_blocks)]
  if not unread:
    return
  _, referenced, _ = macro_usage()
  known = sorted(referenced | set(read_by_code))
  parts = []
  for name in unread:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
    hint = f'; did you mean {close[0]}?' if close else ''
    parts.append(f'{name} (set in {where_set(name, files, bindings)}{hint})')
  it = 'them' if len(parts) > 1 else 'it'
  raise ValueError(f'Unknown gin macro{"s" if len(parts) > 1 else ""}: {", ".join(parts)}. No '
                   f'binding or other macro reads {it}, so gin would ignore {it}; fix the name '
                   f'or remove {it}.')
