"""A program's matmul floor: how long its matrix products alone take on this CPU.

Every dot of the compiled step (its optimized HLO, dots inside fusions included) is rebuilt as
a stand-alone jitted `lax.dot_general` on operands of the same shapes, dimension numbers and
element type, and timed here; one measurement of the floor times each distinct shape once and
sums over the step's dots (FloorTimer). The bench takes it inside its timing rounds, between
the steps (A, B, floor A, floor B, A, B, ...), in a process of its own, and reports the
median. `step / floor` then
says how far the step is from doing nothing but its products at the rate this CPU reaches on
those very shapes, measured while the steps were, so a slow shape
(the output head's [tokens, 512] x [512, 250112]) raises the floor instead of counting as
overhead. Operand layouts are not reproduced (the stand-alone operands are row-major), and
each timed call includes one dispatch (tens of microseconds: it matters only for tiny
models). A dot inside a loop (scanned layers, a decoding loop) runs a number of times the HLO
does not say: the floor is then not computed, unless the caller knows how often the loop runs
(`loop_trips`: the bench's decoding never stops early, so its loop runs once per position).
A dot inside a conditional branch runs a data-dependent number of times (greedy decoding's
float32 fallback in model/head_select.py): no floor then either.
"""

from __future__ import annotations

import collections
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
  out_dtype: str = ''   # the result's element type where it differs (s8 x s8 -> s32)

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


def dots_of_hlo(text: str, loop_trips: Optional[int] = None) -> Optional[list[Dot]]:
  """Every dot the program runs, once per execution (a dot in a loop once per trip, given
  `loop_trips`); None when a dot sits in a loop of unknown trip count, in a loop inside a loop,
  or in a conditional branch."""
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
      out_type = array.group(1) if array else ltype
      dots[current].append(Dot(ltype, lhs, rhs, dims_of.get('lhs_contracting_dims', ()),
                               dims_of.get('rhs_contracting_dims', ()),
                               dims_of.get('lhs_batch_dims', ()),
                               dims_of.get('rhs_batch_dims', ()),
                               out_type if out_type != ltype else ''))
  if entry is None:
    raise ValueError('No ENTRY computation in the HLO text.')
  found: list[Dot] = []

  def walk(computation: str, loops: int, in_branch: bool) -> bool:
    if dots.get(computation):
      if in_branch or loops > 1 or (loops and loop_trips is None):
        return False
      found.extend(dots[computation] * (loop_trips if loops else 1))
    return all(walk(callee, loops + (kind == 'body' or kind == 'condition'),
                    in_branch or kind == 'branch')
               for kind, callee in callees.get(computation, []))

  return found if walk(entry, 0, False) else None


_TYPES = {'f32': jnp.float32, 'bf16': jnp.bfloat16, 'f16': jnp.float16, 's8': jnp.int8,
          's32': jnp.int32}


def operand(shape: tuple[int, ...], dtype, salt: int) -> jax.Array:
  """An operand made on the device: integers in [-60, 60] in a scrambled order (as int8 they
  use most of its range; as floats any value times the same), cheap to make at every call."""
  n = int(np.prod(shape))
  i = jax.lax.iota(jnp.uint32, n) * jnp.uint32(2654435761) + jnp.uint32(salt)
  return ((i >> 8) % 121).astype(jnp.int32).astype(dtype).reshape(shape) - jnp.asarray(60, dtype)


class FloorTimer:
  """Times a program's products (its `dots`, from dots_of_hlo): each call runs every distinct
  dot shape alone, `calls_per_shape` times back to back on operands made just before, and
  returns the floor those times give (each shape's median seconds times the number of dots of
  that shape). The bench calls it inside its timing rounds, between the programs it times, so
  the floor and the steps see the same machine, from a process of its own (`promot bench`:
  bench/isolate.py) so that its operands touch neither the bench's memory nor its figures."""

  def __init__(self, dots: list[Dot], calls_per_shape: int = 3):
    self.dots, self.calls_per_shape = list(dots), calls_per_shape
    self._counts = collections.Counter(self.dots)
    self._shapes = sorted(self._counts, key=lambda d: -d.flops)
    self._fns = {d: _dot_fn(d) for d in self._shapes}

  def __call__(self) -> float:
    return sum(self._counts[d] * time_shape(*self._fns[d], self.calls_per_shape)
               for d in self._shapes)


def facts(dots: list[Dot]) -> dict:
  """{'dots', 'distinct_shapes', 'dot_flops'} of a program's dots."""
  return {'dots': len(dots), 'distinct_shapes': len(set(dots)),
          'dot_flops': sum(d.flops for d in dots)}


def summary(found: Optional[dict], times: list[float]) -> Optional[dict]:
  """A program's facts (`found`, from `facts`) with 'floor_s' (the median of `times`, calls of
  the timer), 'gflops' and 'floor_times_s'; None without facts or times."""
  if not found or not times:
    return None
  floor_s = statistics.median(times)
  return dict(found, floor_s=floor_s, gflops=found['dot_flops'] / floor_s / 1e9 if floor_s
              else None, floor_times_s=list(times))


def _dot_fn(dot: Dot):
  """(the jitted stand-alone dot, a jitted maker of its two operands)."""
  if dot.dtype not in _TYPES or (dot.out_dtype and dot.out_dtype not in _TYPES):
    raise ValueError(f'No stand-alone timing for a {dot.dtype} -> {dot.out_dtype} dot.')
  dtype = _TYPES[dot.dtype]
  numbers = ((dot.lhs_contracting, dot.rhs_contracting), (dot.lhs_batch, dot.rhs_batch))
  out = _TYPES[dot.out_dtype] if dot.out_dtype else None
  fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers, preferred_element_type=out))
  make = jax.jit(lambda: (operand(dot.lhs, dtype, 0), operand(dot.rhs, dtype, 1)))
  return fn, make


def time_shape(fn, make, calls: int) -> float:
  """Median seconds of `calls` back-to-back calls of the dot `fn` on operands `make()` makes
  first (outside the timing); they are freed on return."""
  lhs, rhs = jax.block_until_ready(make())
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(lhs, rhs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_dot(dot: Dot, repeats: int = 5) -> float:
  """Median seconds of one stand-alone call of `dot` (after a warm-up call)."""
  fns = _dot_fn(dot)
  time_shape(*fns, 1)
  return time_shape(*fns, repeats)


def matmul_floor(compiled, repeats: int = 5, loop_trips: Optional[int] = None) -> Optional[dict]:
  """FloorTimer's summary of `repeats` calls after a warm-up, or None when the program's dots
  cannot be counted (dots_of_hlo)."""
  dots = dots_of_hlo(compiled.as_text(), loop_trips)
  if dots is None:
    return None
  timer = FloorTimer(dots)
  timer()
  return summary(facts(dots), [timer() for _ in range(repeats)])
