"""`python -m promot_jax.cli ARGS` runs the `promot` command (how `promot` re-executes itself
with huge pages, and how a local pod rehearsal starts its processes)."""

import sys

from promot_jax.cli.app import main

sys.exit(main())
