"""The plumbing of pretrain.py and finetune.py (not a paper section): what every run needs, kept out of the loops.

  config.py       a dataclass of settings -> command-line flags (its comments -> --help), the presets, the checks
                  both scripts share
  checkpoints.py  the checkpoint file written safely, the safe loader, the random generators' state, the log, the
                  non-finite-loss stop, the same-run check of a resume
  distributed.py  several processes with torchrun (DistributedDataParallel), a pure function of (seed, rank, epoch)
  optim.py        the learning-rate schedule, AdamW and its parameter groups, the epoch order
  weights.py      which tensors a checkpoint keeps and loads: the encoder, --init_from, finetune.py's --checkpoint
"""
