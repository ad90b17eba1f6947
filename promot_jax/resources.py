"""Where the files shipped with promot_jax live: the gin configs and the demo's pretrained model.

A wheel carries them inside the package (promot_jax/_data/, copied by setup.py's build step);
a checkout or an editable install reads them from the repository (gin/, demo/pretrained/).
"""

from __future__ import annotations

import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = {'gin': 'gin', 'demo_pretrained': os.path.join('demo', 'pretrained')}


def data_dir(name: str) -> str:
  """The directory of shipped data `name` ('gin' or 'demo_pretrained')."""
  if name not in _CHECKOUT:
    raise ValueError(f'Unknown shipped data {name!r}; choose one of {sorted(_CHECKOUT)}.')
  packaged = os.path.join(_PACKAGE, '_data', name)
  if os.path.isdir(packaged):
    return packaged
  return os.path.join(os.path.dirname(_PACKAGE), _CHECKOUT[name])


def gin_dir() -> str:
  """The shipped gin configs (models/, stages/, runs/, eval/, promot.gin)."""
  return data_dir('gin')


def demo_pretrained_dir() -> str:
  """The demo's pretrained tiny T5 (an orbax checkpoint)."""
  return data_dir('demo_pretrained')
