"""promot_tasks: the example seqio tasks (fine-tuning, in-context suite, toy, synthetic).

In the repository this is tasks/; it installs as the package `promot_tasks`. Name a module in
a run file's TASK_MODULES (e.g. 'promot_tasks.finetune'); importing it registers its seqio
tasks and, through promot_jax.eval.registry, how they are scored. The library never imports
these modules itself.
"""
