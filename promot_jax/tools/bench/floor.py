"""A train step's matmul floor: how long its matrix products alone take on this CPU.

Every dot of the compiled step (its optimized HLO, dots inside fusions included) is rebuilt as
a stand-alone jitted `lax.dot_general` on random operands of the same shapes, dimension
numbers and element type, and timed here (median of `repeats` calls after a warm-up); the
floor is the sum over the step's dots. `step / floor` then says how far the step is from doing
nothing but its products at the rate this CPU reaches on those very shapes, so a slow shape
(the output head's [tokens, 512] x [512, 250112]) raises the floor instead of counting as
overhead. Operand layouts are not reproduced (the stand-alone operands are row-major), and
each timed call includes one dispatch (tens of microseconds: it matters only for tiny
models). A dot inside a loop (scanned layers) runs an unknown number of times: the floor is
then not computed.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{\s*$')
_PARAM = re.compile(r'([\w.\-]+): (\w+)\[([\d,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$')
_ARRAY = re.compile(r'^(\w+)\[([\d,]*)\]')
_OPERANDS = re.compile(r'^([^)]*)\)')
_CALLEE = re.compile(r'\b(calls|to_apply|body|condition)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_DIMS = re.compile(r'\b(lhs_batch_dims|rhs_batch_dims|lhs_contracting_dims|rhs_contracting_dims)'
                   r'=\{([\d,]*)\}')


def _shape(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(',') if d)


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot of a compiled program: operand shapes, dimension numbers, element type."""
  dtype: str
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_contracting: tuple[int, ...]
  rhs_contracting: tuple[int, ...]
  lhs_batch: tuple[int, ...] = ()
  rhs_batch: tuple[int, ...] = ()

  @property
  def flops(self) -> int:
    """2 x (output elements) x (contracted length)."""
    batch = int(np.prod([self.lhs[d] for d in self.lhs_batch]))
    k = int(np.prod([self.lhs[d] for d in self.lhs_contracting]))
    m = int(np.prod([n for d, n in enumerate(self.lhs)
                     if d not in self.lhs_contracting and d not in self.lhs_batch]))
    n = int(np.prod([s for d, s in enumerate(self.rhs)
                     if d not in self.rhs_contracting and d not in self.rhs_batch]))
    return 2 * batch * m * n * k


def dots_of_hlo(text: str) -> Optional[list[Dot]]:
  """Every dot the program runs, once per execution; None when a dot sits inside a loop."""
  shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
  callees: dict[str, list[tuple[str, str]]] = {}
  dots: dict[str, list[Dot]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      entry = current if line.startswith('ENTRY') else entry
      callees[current], dots[current] = [], []
      for name, dtype, dims in _PARAM.findall(header.group(2)):
        shapes[name] = (dtype, _shape(dims))
      continue
    inst = _INSTRUCTION.match(line)
    if not inst or current is None:
      continue
    name, kind, op, rest = inst.groups()
    array = _ARRAY.match(kind)
    if array:    # tuple-typed instructions (while, tuple) have no operand shape to keep
      shapes[name] = (array.group(1), _shape(array.group(2)))
    callees[current] += _CALLEE.findall(rest)
    for group in _BRANCHES.findall(rest):
      callees[current] += [('branch', c.strip().lstrip('%')) for c in group.split(',')]
    if op == 'dot':
      operands = [o.strip().split(' ')[-1].lstrip('%')
                  for o in _OPERANDS.match(rest).group(1).split(',')]
      dims_of = {k: _shape(v) for k, v in _DIMS.findall(rest)}
      (ltype, lhs), (_, rhs) = shapes[operands[0]], shapes[operands[1]]
      dots[current].append(Dot(ltype, lhs, rhs, dims_of.get('lhs_contracting_dims', ()),
                               dims_of.get('rhs_contracting_dims', ()),
                               dims_of.get('lhs_batch_dims', ()),
                               dims_of.get('rhs_batch_dims', ())))
  if entry is None:
    raise ValueError('No ENTRY computation in the HLO text.')
  found: list[Dot] = []

  def walk(computation: str, in_loop: bool) -> bool:
    if in_loop and dots.get(computation):
      return False
    found.extend(dots.get(computation, []))
    return all(walk(callee, in_loop or kind in ('body', 'condition'))
               for kind, callee in callees.get(computation, []))

  return found if walk(entry, False) else None


def time_dot(dot: Dot, repeats: int = 5) -> float:
  """Median seconds of one stand-alone call of `dot` on random operands."""
  rng = np.random.default_rng(0)
  dtype = {'f32': jnp.float32, 'bf16': jnp.bfloat16, 'f16': jnp.float16}.get(dot.dtype,
                                                                             jnp.float32)
  lhs = jnp.asarray(rng.standard_normal(dot.lhs, np.float32), dtype)
  rhs = jnp.asarray(rng.standard_normal(dot.rhs, np.float32), dtype)
  numbers = ((dot.lhs_contracting, dot.rhs_contracting), (dot.lhs_batch, dot.rhs_batch))
  fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers))
  jax.block_until_ready(fn(lhs, rhs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(lhs, rhs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_floor(compiled, repeats: int = 5) -> Optional[dict]:
  """{'dots', 'distinct_shapes', 'dot_flops', 'floor_s', 'gflops'} of a compiled step, or None
  when its dots cannot be counted (a dot inside a loop)."""
  dots = dots_of_hlo(compiled.as_text())
  if dots is None:
    return None
  seconds = {d: time_dot(d, repeats) for d in sorted(set(dots), key=lambda d: -d.flops)}
  floor_s = sum(seconds[d] for d in dots)
  flops = sum(d.flops for d in dots)
  return {'dots': len(dots), 'distinct_shapes': len(seconds), 'dot_flops': flops,
          'floor_s': floor_s, 'gflops': flops / floor_s / 1e9 if floor_s else None}
