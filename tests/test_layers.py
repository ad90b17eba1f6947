"""The package's import structure: layers import only downwards, no circle, no `tasks`.

Every module of promot_jax is parsed (imports at module top and inside functions alike).
A module's layer is its sub-package; the order, lowest first, is LAYERS below. Also: no
`_private` name of a project module is used from another module (tests included), and
imports inside functions are only the optional heavy dependencies, marked as such.
"""

import ast
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACKAGE = os.path.join(ROOT, 'promot_jax')

# Lowest first. A module may import its own layer and the ones before it.
LAYERS = (
    ('base', ('promot_jax.tree_util', 'promot_jax.mesh', 'promot_jax.host_memory', 'promot_jax.paths',
              'promot_jax.resources')),
    ('model', ('promot_jax.model',)),
    ('checkpoints', ('promot_jax.checkpoints',)),
    ('data', ('promot_jax.data',)),
    ('eval', ('promot_jax.eval',)),
    ('train', ('promot_jax.train',)),
    ('ginconf', ('promot_jax.ginconf',)),
    ('tools', ('promot_jax.tools',)),
    ('cli', ('promot_jax.cli',)),
    ('api', ('promot_jax',)),   # promot_jax/__init__.py: the stable Python API
)
OPTIONAL = ('torch', 'transformers', 'peft', 'lm_eval', 'safetensors')
OPTIONAL_MARK = 'optional dependency'


def module_files(root=PACKAGE, package='promot_jax'):
  """{module name: path} for every .py file under `root`."""
  found = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
        module = package if rel == '__init__' else f'{package}.{rel.removesuffix(".__init__")}'
        found[module] = path
  return found


MODULES = module_files()


def layer_of(module):
  best = None
  for index, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + '.'):
        if best is None or len(prefix) > best[1]:
          best = (index, len(prefix))
  return best[0]


def imported_modules(module, path):
  """[(imported module, line, inside a function)] for every import statement of the file."""
  tree = ast.parse(open(path).read(), path)
  is_package = path.endswith('__init__.py')
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno, id(node) in in_function) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split('.')[:len(module.split('.')) - (node.level - is_package)]
        source = '.'.join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      for alias in node.names:   # `from pkg import submodule` imports the submodule
        candidate = f'{source}.{alias.name}'
        out.append((candidate if candidate in MODULES else source, node.lineno,
                    id(node) in in_function))
  return out


def project_edges():
  """{module: {imported project module: first line}}; a package import means its __init__."""
  edges = {}
  for module, path in MODULES.items():
    for target, line, _ in imported_modules(module, path):
      if target in MODULES and target != module:
        edges.setdefault(module, {}).setdefault(target, line)
  return edges


def find_cycle(edges):
  """One import circle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(edges.get(node, {})):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_every_module_has_a_layer():
  assert len(MODULES) > 40
  assert all(layer_of(m) is not None for m in MODULES)


def test_no_import_circle():
  cycle = find_cycle(project_edges())
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def test_layers_import_only_downwards():
  wrong = []
  for module, targets in project_edges().items():
    for target, line in targets.items():
      if target == 'promot_jax':   # the API package itself: only tests and users import it
        wrong.append(f'{MODULES[module]}:{line}: imports the promot_jax API package')
      elif layer_of(target) > layer_of(module):
        wrong.append(f'{MODULES[module]}:{line}: {module} ({LAYERS[layer_of(module)][0]}) '
                     f'imports {target} ({LAYERS[layer_of(target)][0]})')
  assert not wrong, '\n'.join(wrong)


def test_the_library_never_imports_the_task_modules():
  wrong = [f'{MODULES[m]}:{line}: imports {target}'
           for m, path in MODULES.items() for target, line, _ in imported_modules(m, path)
           if target.split('.')[0] in ('tasks', 'promot_tasks')]
  assert not wrong, '\n'.join(wrong)


def test_imports_inside_functions_are_only_marked_optional_dependencies():
  wrong = []
  for module, path in MODULES.items():
    lines = open(path).read().splitlines()
    for target, line, inside in imported_modules(module, path):
      if not inside:
        continue
      if target.split('.')[0] in OPTIONAL or target == 'promot_jax.eval.lm_eval_adapter':
        if OPTIONAL_MARK not in lines[line - 1]:
          wrong.append(f'{path}:{line}: optional import of {target} not marked '
                       f'"# {OPTIONAL_MARK}"')
      else:
        wrong.append(f'{path}:{line}: {target} imported inside a function')
  assert not wrong, '\n'.join(wrong)


def private_uses(path, package_names=('promot_jax', 'promot_tasks')):
  """`module._name` uses and `from module import _name` of project modules in one file."""
  tree = ast.parse(open(path).read(), path)
  aliases, found = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split('.')[0] in package_names:
          aliases[a.asname or a.name.split('.')[0]] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and \
        node.module.split('.')[0] in package_names:
      for a in node.names:
        if a.name.startswith('_') and not a.name.startswith('__'):
          found.append((node.lineno, f'{node.module}.{a.name}'))
        aliases[a.asname or a.name] = f'{node.module}.{a.name}'
  for node in ast.walk(tree):
    # `alias._name` where alias is a project module (a jax method such as a jitted
    # function's `_cache_size` is not the project's)
    if isinstance(node, ast.Attribute) and node.attr.startswith('_') and \
        not node.attr.startswith('__'):
      base = node.value
      if isinstance(base, ast.Name) and base.id in aliases:
        found.append((node.lineno, f'{ast.unparse(node.value)}.{node.attr}'))
  return found


@pytest.mark.parametrize('where', ['promot_jax', 'tasks', 'tests'])
def test_no_private_name_is_used_across_modules(where):
  wrong = []
  for dirpath, _, files in os.walk(os.path.join(ROOT, where)):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        wrong += [f'{path}:{line}: {what}' for line, what in private_uses(path)]
  assert not wrong, '\n'.join(wrong)


def test_the_checks_can_fail():
  """Each rule flags a hand-made violation (so a green run means something)."""
  assert find_cycle({'a': {'b': 1}, 'b': {'c': 1}, 'c': {'a': 1}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b': 1}, 'b': {}}) is None
  assert layer_of('promot_jax.model.transformer') < layer_of('promot_jax.train.loop')
  assert layer_of('promot_jax.cli.app') > layer_of('promot_jax.tools.plan')


def test_private_use_detection_flags_a_violation(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from promot_jax.eval import task\nfrom promot_jax.mesh import _hidden\n'
                 'task._secret(1)\n')
  assert [line for line, _ in private_uses(str(bad))] == [2, 3]
