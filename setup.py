"""promot_jax: ProMoT two-stage fine-tuning for mT5 in JAX/Flax."""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Shipped with the wheel as promot_jax/_data/: the gin configs and the demo's pretrained model.
# In a checkout (or an editable install) promot_jax.resources finds them beside the package.
DATA_DIRS = {'gin': 'gin', 'demo_pretrained': os.path.join('demo', 'pretrained')}


class BuildWithData(build_py):
  """build_py that also copies gin/ and demo/pretrained/ into the built package."""

  def run(self):
    super().run()
    for name, src in DATA_DIRS.items():
      dst = os.path.join(self.build_lib, 'promot_jax', '_data', name)
      if os.path.isdir(dst):
        shutil.rmtree(dst)
      shutil.copytree(src, dst)

JAX_VERSION = '0.10.2'

setup(
    name='promot_jax',
    version='0.1.0',
    description='ProMoT (prompt tuning, then model tuning) for mT5 in JAX/Flax, t5x-compatible.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    # The example seqio tasks (tasks/ in the repository) install as `promot_tasks`.
    packages=find_packages(include=['promot_jax', 'promot_jax.*']) + ['promot_tasks'],
    package_dir={'promot_tasks': 'tasks'},
    cmdclass={'build_py': BuildWithData},
    include_package_data=True,
    install_requires=[
        f'jax=={JAX_VERSION}',
        f'jaxlib=={JAX_VERSION}',
        'flax>=0.12,<0.13',
        'optax==0.2.8',
        'orbax-checkpoint>=0.12,<0.13',
        'seqio==0.0.20',
        'tensorflow>=2.21,<2.22',
        'tensorflow-datasets>=4.9,<5',
        'gin-config>=0.5,<0.6',
        'sentencepiece>=0.2,<0.3',
        'tensorstore>=0.1.70',
        'msgpack>=1.0',
        'numpy>=1.26',
        'tensorboard>=2.20',          # clu's summary writer (TensorBoard logs in MODEL_DIR)
        'sacrebleu>=2.4',             # BLEU
        'rouge-score>=0.1.2',         # Rouge-2
        'matplotlib>=3.8,<4',         # promot report's charts
        'gcsfs>=2025.1',              # gs:// run directories (etils.epath's fsspec backend)
    ],
    extras_require={
        'test': [
            'pytest>=8',
            'pytest-xdist>=3.5',      # `make test` runs the suite in two worker processes
            'hypothesis>=6',
            'torch==2.13.0',          # CPU reference for parity checks
            'transformers>=5,<6',
            'peft>=0.21,<0.22',       # PEFT prompt tuning: `promot bench`'s reference
            'safetensors>=0.4',
            'peft>=0.21,<0.22',       # export: the prompt as a PEFT prompt-tuning adapter
            'lm-eval>=0.4.13,<0.5',   # the lm-evaluation-harness adapter
            'gcp-storage-emulator>=2024.8',   # gs:// run directories, tested on a local emulator
        ],
        'lm_eval': ['lm-eval>=0.4.13,<0.5'],   # promot lm-eval
        'tpu': [f'jax[tpu]=={JAX_VERSION}'],
    },
    entry_points={'console_scripts': ['promot=promot_jax.cli:main']},
)
