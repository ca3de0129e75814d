"""nanotune.lifecycle: one training run's life, shared by every train_*.py: the recipe's loop decides when, these
keep it safe.

run.py         Run: the device and processes, the --out folder, the log, the divergence rule, checkpoints, Ctrl-C
step.py        the pieces of an optimizer step: learning-rate schedule, optimizer, gradient clip, DDP and compile
checkpoint.py  what a run saves of its model, and the checkpoints it resumes from
folder.py      what a model folder holds beside its weights (tokenizer, generation config, chat template)
outdir.py      the --out folder: refused when it holds another run, locked while this one runs
tracking.py    --tracker: the metrics mirrored to TensorBoard or Weights & Biases
(What a run tells, metrics.jsonl and the progress output, is nanotune/metrics.py: every long phase uses it.)
"""
