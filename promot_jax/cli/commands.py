"""The `promot` command line: every subcommand's arguments, and which function runs it.

Only argparse here: a command's module is imported when that command runs (`handler`,
'module:function', resolved by cli.app), so `promot info` does not load TensorFlow and
`promot --help` answers at once.
"""

from __future__ import annotations

import argparse


def add_gin_arguments(parser: argparse.ArgumentParser,
                      gin_file_help: str = 'gin run file (repeatable)') -> None:
  """--gin_file (repeatable, required) and --gin_search_paths for a subcommand.

  `--gin.NAME=VALUE` overrides are taken out of the command line before argparse runs.
  """
  parser.add_argument('--gin_file', action='append', required=True, help=gin_file_help)
  parser.add_argument('--gin_search_paths', action='append', default=None,
                      help='comma-separated directories where --gin_file and `include` are also '
                           'looked up (after the current directory and the shipped gin/)')


def add_local_pod_arguments(parser: argparse.ArgumentParser) -> None:
  """--local_processes / --local_devices: rehearse a multi-host run on this machine."""
  parser.add_argument('--local_processes', type=int, default=None,
                      help='run as this many local CPU processes joined by jax.distributed (a '
                           'pod rehearsal; process 0 logs here, the others to MODEL_DIR/logs)')
  parser.add_argument('--local_devices', type=int, default=1,
                      help='with --local_processes: CPU devices per process (default 1)')


def without_local_pod_arguments(argv: list) -> list:
  """`argv` less --local_processes / --local_devices and their values."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg in ('--local_processes', '--local_devices'):
      skip = True
    elif not arg.startswith(('--local_processes=', '--local_devices=')):
      out.append(arg)
  return out


def _command(subparsers, handler: str, name: str, **kwargs) -> argparse.ArgumentParser:
  """A subcommand's parser; `handler` ('module:function') runs it."""
  parser = subparsers.add_parser(name, **kwargs)
  parser.set_defaults(handler=handler)
  return parser


def build_parser() -> argparse.ArgumentParser:
  """Every subcommand's arguments; `handler` names the function that runs it."""
  parser = argparse.ArgumentParser(prog='promot', description='ProMoT two-stage fine-tuning in JAX.')
  sub = parser.add_subparsers(dest='command', required=True)

  for name, text in (('run', 'run every stage of a gin run file in order'),
                     ('train', 'run one stage of a gin run file')):
    p = _command(sub, 'promot_jax.cli.run_cmd:run', name,
                 help=text, description=text + '. Gin overrides: --gin.NAME=VALUE.')
    add_gin_arguments(p)
    add_local_pod_arguments(p)
    if name == 'train':
      p.add_argument('--stage', default='__first__', help='stage name (default: the first one)')

  p = _command(sub, 'promot_jax.cli.run_cmd:smoke', 'smoke',
               help='build a model, attach a prompt, run a forward pass')
  p.add_argument('--model', default='mt5_small', help='named config (default mt5_small)')
  p.add_argument('--checkpoint', default=None, help='load weights from a checkpoint instead')
  p.add_argument('--prompt_length', type=int, default=100)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--input_length', type=int, default=64)
  p.add_argument('--target_length', type=int, default=16)
  p.add_argument('--decode_length', type=int, default=8)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default=None, help='also write the summary to this JSON file')

  p = _command(sub, 'promot_jax.cli.run_cmd:convert', 'convert',
               help='HF / t5x weights -> promot_jax checkpoint')
  p.add_argument('--from', default='auto', choices=['auto', 'hf', 't5x', 'orbax'])
  p.add_argument('--src', required=True, help='HF model dir, t5x checkpoint dir (local or gs://)')
  p.add_argument('--dst', required=True, help='output directory')
  p.add_argument('--model', default=None, help='named config or gin model file the weights must match (optional)')
  p.add_argument('--overwrite', action='store_true')

  for add in (add_eval, add_plan, add_demo, add_report, add_bench, add_export, add_diagnose,
              add_lm_eval):
    add(sub)

  p = _command(sub, 'promot_jax.cli.run_cmd:info', 'info',
               help='print a checkpoint\'s tree, shapes and parameter count')
  p.add_argument('path')
  p.add_argument('--full', action='store_true', help='list every layer')
  p.add_argument('--json', action='store_true', help='machine-readable output')
  return parser


def add_eval(subparsers) -> None:
  """`promot eval`."""
  text = ('evaluate checkpoints: the fine-tuned task with its prompt, in-context tasks without')
  p = _command(subparsers, 'promot_jax.cli.eval_cmd:command', 'eval',
               help=text, description=text + '. Gin overrides: '
                            '--gin.NAME=VALUE (e.g. --gin.MAX_EVAL_EXAMPLES=32).')
  add_gin_arguments(p, 'eval gin file, e.g. eval/promot_rte.gin (repeatable)')
  p.add_argument('--checkpoint', action='append', default=None,
                 help='checkpoint dir (params/ + promot.json), a MODEL_DIR/<stage> dir (its kept '
                      'checkpoint), a MODEL_DIR (each stage\'s kept checkpoint) or pretrained '
                      'weights; local or gs://; repeatable; replaces CHECKPOINTS')
  p.add_argument('--out_dir', default=None, help='overrides OUT_DIR')
  p.add_argument('--all_checkpoints', action='store_true',
                 help='for a stage dir or MODEL_DIR: every complete checkpoint, not only the kept one')
  add_local_pod_arguments(p)


def add_plan(subparsers) -> None:
  text = ('compile a run\'s stages for a TPU topology (no TPU needed): memory per device, FLOPs, '
          'best-case step time')
  p = _command(subparsers, 'promot_jax.tools.plan:command', 'plan',
               help=text, description=text + '. Gin overrides: --gin.NAME=VALUE.')
  add_gin_arguments(p)
  p.add_argument('--topology', default='v4-64',
                 help='v4-N / v5p-N (N TensorCores), v5e-N / v5litepod-N / v6e-N (N chips), or cpu '
                      '(default v4-64)')
  p.add_argument('--stage', default=None, help='plan one stage (default: every stage)')
  p.add_argument('--mesh', default=None, help='DATA,MODEL (default: devices/NUM_PARTITIONS, NUM_PARTITIONS)')
  p.add_argument('--search', action='store_true', help='try (data, model) splits and batch sizes')
  p.add_argument('--batch_sizes', default=None, help='with --search: e.g. 32,64,128 (default BATCH_SIZE)')
  p.add_argument('--max_model', type=int, default=16, help='with --search: largest model axis tried')
  p.add_argument('--skip_decode', action='store_true', help='do not compile the greedy decode')
  p.add_argument('--eval', action='store_true',
                 help="plan `promot eval`'s decode instead of training: the checkpoint restored "
                      'on the run\'s mesh, beam search with the cache, the prompt attached')
  p.add_argument('--eval_batch', type=int, default=32, help='with --eval: EVAL_BATCH_SIZE (32)')
  p.add_argument('--eval_lengths', default='1024,128',
                 help="with --eval: the suite's longest input and decode length (1024,128)")
  p.add_argument('--beam_size', type=int, default=4, help='with --eval: 1 = greedy (default 4)')
  p.add_argument('--restore_dtype', default=None, help="with --eval: RESTORE_DTYPE, e.g. bfloat16")
  p.add_argument('--hbm_gib', type=float, default=None, help='override the HBM budget per device')
  p.add_argument('--peak_tflops', type=float, default=None, help='override the peak per device')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')


def add_demo(subparsers) -> None:
  """`promot demo`."""
  text = ('the main job: format specialization and ProMoT reproduced offline on a tiny T5 '
          '(synthetic tasks), with a report')
  p = _command(subparsers, 'promot_jax.tools.demo:command', 'demo',
               help=text, description=text + '.')
  p.add_argument('--out_dir', default='out/demo', help='where everything goes (default out/demo)')
  p.add_argument('--pretrain', action='store_true',
                 help='pretrain the tiny model from scratch instead of using demo/pretrained')
  p.add_argument('--pretrained', default=None,
                 help='start from this pretrained checkpoint instead of demo/pretrained')
  p.add_argument('--ship', action='store_true',
                 help='with --pretrain: copy the new pretrained model to demo/pretrained')
  p.add_argument('--methods', default='', metavar='M[,M]',
                 help='also run these (comma-separated): lora (LoRA-ProMoT), multitask '
                      '(multi-task ProMoT); each adds about as much time as ProMoT')
  p.add_argument('--seeds', type=int, default=1,
                 help='fine-tune with seeds 0..N-1 (default 1); the report is their mean, with '
                      'every seed\'s numbers')
  p.add_argument('--redo', action='store_true',
                 help='remake parts of OUT_DIR made by other code or settings (default: refuse)')
  p.add_argument('--quick', action='store_true', help='a few steps of everything (a smoke test)')


def add_report(subparsers) -> None:
  """`promot report`."""
  text = 'the paper-shaped table and charts from promot eval results'
  p = _command(subparsers, 'promot_jax.tools.report:command', 'report',
               help=text, description=text + '.')
  p.add_argument('results', nargs='+', help="results.json files (or their dirs); 'LABEL=PATH' "
                 'names the method column')
  p.add_argument('--out_dir', default='.', help='where report.md/.png/.json go (default: .)')


def add_bench(subparsers) -> None:
  """`promot bench`."""
  text = 'time train steps, decoding and the input pipeline (vs transformers)'
  p = _command(subparsers, 'promot_jax.tools.bench:command', 'bench',
               help=text, description=text + '.')
  p.add_argument('--config', default='mt5_small', choices=['mt5_small', 'quick'],  # bench.common.PRESETS
                 help='named shapes (default mt5_small: batch 8, inputs 128, targets 16)')
  p.add_argument('--quick', action='store_true', help="the tiny 'quick' config (for tests)")
  p.add_argument('--no-hf', dest='no_hf', action='store_true',
                 help='skip transformers / PEFT (promot_jax only)')
  p.add_argument('--sections', default='train,decode,data', help='comma list of sections')
  p.add_argument('--isolate', action='store_true',
                 help='time each train and decode workload in a process of its own, still '
                      'round-robin (in one process they slow each other down)')
  p.add_argument('--profile', action='store_true', help='also break a step down by phase')
  for name in ('batch', 'inputs', 'targets', 'prompt_length', 'repeats'):
    p.add_argument(f'--{name}', type=int, default=None)
  p.add_argument('--json', default=None, help='write every figure to this JSON file')


def add_export(subparsers) -> None:
  """`promot export`."""
  text = 'export a checkpoint to Hugging Face MT5 (+ the prompt as a PEFT adapter)'
  p = _command(subparsers, 'promot_jax.tools.export:command', 'export',
               help=text, description=text + '.')
  p.add_argument('--to', default='hf', choices=['hf'], help='target format')
  p.add_argument('--checkpoint', required=True,
                 help='checkpoint dir, or MODEL_DIR/<stage> (its kept checkpoint)')
  p.add_argument('--out', required=True, help='output directory for the HF model')
  p.add_argument('--adapter_out', default=None,
                 help='PEFT adapter directory (default OUT/prompt_adapter)')
  p.add_argument('--no_adapter', action='store_true', help='do not write the prompt adapter')
  p.add_argument('--overwrite', action='store_true', help='replace non-empty output directories')


def add_diagnose(subparsers) -> None:
  """`promot diagnose`."""
  text = 'cosine between real and target-shuffled ("format") gradients of the last decoder layer'
  p = _command(subparsers, 'promot_jax.tools.diagnose:command', 'diagnose',
               help=text, description=text + '. Gin overrides: '
                            '--gin.NAME=VALUE (e.g. --gin.BATCH_SIZE=32).')
  add_gin_arguments(
      p, 'run file giving the task, feature lengths and BATCH_SIZE (repeatable)')
  p.add_argument('--checkpoint', action='append', required=True,
                 help='checkpoint dir or MODEL_DIR/<stage> (its kept checkpoint); repeatable')
  p.add_argument('--split', default='train', help='task split (default train)')
  p.add_argument('--num_batches', type=int, default=4, help='batches summed (default 4)')
  p.add_argument('--layer', type=int, default=-1, help='decoder layer (default -1: the last)')
  p.add_argument('--with_prompt', default='auto', choices=['auto', 'yes', 'no'],
                 help='attach the prompt (auto: when the checkpoint holds one)')
  p.add_argument('--seed', type=int, default=0, help='data order and permutation seed')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')


def add_lm_eval(subparsers) -> None:
  """`promot lm-eval`."""
  text = 'run lm-evaluation-harness with a promot_jax checkpoint (--model promot)'
  p = _command(subparsers, 'promot_jax.cli.lm_eval_cmd:command', 'lm-eval',
               help=text, description=text + '. Arguments after '
                            '`lm-eval` are lm-eval\'s own, e.g. run --model promot --model_args '
                            'checkpoint=DIR,with_prompt=true --tasks NAME.')
  p.add_argument('lm_eval_args', nargs=argparse.REMAINDER,
                 help="lm-eval's command line, starting with its subcommand (run, ls, validate)")
