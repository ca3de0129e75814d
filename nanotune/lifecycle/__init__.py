"""nanotune.lifecycle: one training run's life, shared by every train_*.py: the recipe's loop decides when, these
keep it safe.

run.py         Run: the device and processes, the --out folder, the log, divergence, checkpoints, Ctrl-C, the end
step.py        the pieces of an optimizer step: learning-rate schedule, optimizer, gradient clip, DDP and compile
metrics.py     metrics.jsonl and the progress line of the steps
divergence.py  the rule that stops a run whose loss or gradient is NaN or has exploded
checkpoint.py  what a run saves of its model, and the checkpoints it resumes from
folder.py      what a model folder holds beside its weights (tokenizer, generation config, chat template)
outdir.py      the --out folder: refused when it holds another run, locked while this one runs
tracking.py    --tracker: the metrics mirrored to TensorBoard or Weights & Biases
"""
