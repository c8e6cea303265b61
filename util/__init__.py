"""The plumbing of pretrain.py and finetune.py (not a paper section): what every run needs, kept out of the loops.

  checkpoints.py  the checkpoint file written safely, the safe loader, the random generators' state, the log
  distributed.py  several processes with torchrun (DistributedDataParallel), a pure function of (seed, rank, epoch)
"""
