"""Several processes: `torchrun --nproc_per_node N pretrain.py ...` (and finetune.py) with DistributedDataParallel.

What pretrain.py and finetune.py need to train on N processes (GPUs, or CPU processes with gloo) exactly as one
process trains on the same global batch:
  start_processes       join the process group, pick this rank's device; a single process is left untouched
  rank_batches          this rank's share of every global batch, cut from the epoch order all ranks compute alike
  seed_generators       a run's random generators at its start, seeded alike on every rank
  seed_rank_generators  each rank's random generators, a pure function of (seed, rank, epoch)
  sync_batchnorm        every BatchNorm over the global batch (nn.SyncBatchNorm on GPUs, CPUSyncBatchNorm on the CPU)
  OnlyTheLossBackward   the model as DDP sees it: only `loss` carries gradients
  summed_over_ranks     per-rank sums of the logged terms -> sums over all ranks
  data_parallel         what the training step calls: the model, or DDP around it under torchrun
  rank_loader           an epoch's DataLoader of this rank's share of every global batch
Test on the CPU: `python -m pytest -q tests/test_distributed.py` (gloo, 2 processes).
"""
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def select_device(name):
    """'auto' -> CUDA when available, else the CPU."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))



def start_processes(cfg):
    """-> (rank, world_size, device). Launched by torchrun with more than one process (WORLD_SIZE > 1 in the
    environment), this process joins the process group (NCCL on GPUs, gloo on the CPU) and takes the GPU of its
    LOCAL_RANK. Otherwise it returns (0, 1, select_device(cfg.device)) and nothing else happens: a single process,
    torchrun --nproc_per_node 1 included, runs exactly as without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, select_device(cfg.device)
    # --batch_size stays the global batch (the learning rate and the schedule are tuned for it): each rank takes an
    # equal share of it.
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch_size {cfg.batch_size} is the global batch, split evenly over the {world_size} "
                         f"processes, so it must be a multiple of {world_size}; got {cfg.batch_size}, which leaves "
                         f"{cfg.batch_size % world_size} over.")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"Under torchrun each process takes the GPU of its LOCAL_RANK: --device must be auto, cuda "
                         f"or cpu, got {cfg.device!r}.")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a caller (a test) may have joined it already
        dist.init_process_group("nccl" if use_cuda else "gloo")  # reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    return rank, world_size, device


def rank_batches(order, batch_size, rank, world_size):
    """This rank's share of an epoch's order, for a DataLoader of batch_size / world_size: global batch b is
    order[b * B : (b + 1) * B] (B = --batch_size, the last partial batch dropped, as one process does) and rank r
    takes its r-th slice of B / world_size shapes. So the ranks' step-b batches together are exactly the batch one
    process takes at step b; with one process this is order[: steps * B]."""
    local_batch, steps = batch_size // world_size, len(order) // batch_size
    return [order[step * batch_size + rank * local_batch + i] for step in range(steps) for i in range(local_batch)]


def seed_generators(seed):
    """Seed torch (CPU and every GPU), numpy and random with `seed`: a run's start, the same on every rank."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def seed_rank_generators(seed, rank, epoch):
    """Seed torch (CPU and every GPU), numpy and random from (seed, rank, epoch): each rank draws its own masks and
    augmentations, and the draws of an epoch depend on nothing but these three numbers.

    NOTE(unspecified): with several processes each rank seeds torch, numpy and random from (seed, rank, epoch) at
    every epoch start, so its masks and augmentations are its own and an epoch's draws depend on nothing else: a
    resumed run continues exactly, at any world size, and the checkpoint's RNG state (rank 0's) is only read back by
    a single process. One process keeps one stream seeded once and saved in the checkpoint."""
    derived = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])  # one uint32, well mixed
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)


class SumOverRanks(torch.autograd.Function):
    """y = the sum of x over all ranks, differentiable: the gradient of x is the sum over the ranks of the gradient
    of y (every rank's loss depends on every rank's x through y)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, for the CPU (gloo), where nn.SyncBatchNorm refuses to run (it
    needs GPU tensors): the same maths in plain torch. In training mode the mean and the (biased) variance over every
    rank's samples, two differentiable all-reduces (the backward all-reduces the gradients, so each parameter gets
    the global batch's gradient once DDP averages them); the running averages are updated with the global
    statistics (the unbiased variance), as BatchNorm does. In eval mode it is plain BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"Expected an input of shape (B, C, ...), found {tuple(x.shape)}.")

    def forward(self, x):
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)  # the running statistics: nothing to share
        axes = [0, *range(2, x.dim())]  # every axis but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # a (C,) statistic broadcast over x
        local_count = x.new_full((1,), x.numel() // x.shape[1])
        totals = SumOverRanks.apply(torch.cat([x.sum(axes), local_count]))  # (C + 1,) sums over all ranks
        count = totals[-1].detach()
        mean = totals[:-1] / count  # (C,)
        centred = x - mean.view(shape)
        variance = SumOverRanks.apply(centred.pow(2).sum(axes)) / count  # (C,) two passes: no cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * variance * count / (count - 1))
        out = centred * torch.rsqrt(variance + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def convert_to_cpu_sync_batchnorm(module):
    """nn.SyncBatchNorm.convert_sync_batchnorm's twin for CPUSyncBatchNorm: every BatchNorm of `module` replaced by
    one that keeps its parameters and buffers (the same tensors), so its state-dict names do not change."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        converted = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        return converted.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert_to_cpu_sync_batchnorm(child))
    return module


def sync_batchnorm(model, device):
    """Every BatchNorm of the model (the mini-PointNet's of Eq. 3, CrossAlignNet's and the fine-tuning heads') takes
    its statistics over the global batch, as one process over the whole batch would: nn.SyncBatchNorm on GPUs,
    CPUSyncBatchNorm (the same statistics) on the CPU. The state dict keeps its names, so a checkpoint moves between
    one process and several."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_to_cpu_sync_batchnorm(model)


class OnlyTheLossBackward(nn.Module):
    """The model for DDP, every output but `loss` detached. DDP's first step (under static_graph) counts every
    parameter an output depends on as one that gets a gradient; a term that is returned but weighted 0 (CrossAlignNet's
    loss_gsa at --cal_gsa_weight 0) would leave its parameters without one and stop the run at the next step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, points):
        out = self.model(points)
        return {name: value.detach() if torch.is_tensor(value) and name != "loss" else value
                for name, value in out.items()}


def summed_over_ranks(sums, world_size):
    """A tensor of per-rank sums -> the sums over all ranks (the tensor itself with one process)."""
    if world_size == 1:
        return sums
    sums = sums.clone()
    dist.all_reduce(sums)
    return sums


def stop_processes():
    """Leave the process group start_processes joined (nothing to do for a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model, device, world_size, only_the_loss=False):
    """What the training step calls. One process: the model itself. Under torchrun: DDP around it, which averages the
    gradients over the ranks during backward, so they are those of the global batch; the un-wrapped model serves
    everything else (tests, pictures, probes, the checkpoint). only_the_loss: DDP sees OnlyTheLossBackward(model)
    (pre-training's models return several terms). static_graph: the same parameters take part in every step, but not
    always all of them (the view selector without RVS, CrossAlignNet's GSA decoder at weight 0): DDP finds the unused
    ones once, at the first step, instead of searching the graph at every step.

    NOTE(unspecified): a loss that compares the shapes of a batch with each other sees this rank's share only:
    CrossAlignNet's InfoNCE contrasts batch_size / world_size shapes, one process the whole batch (the BatchNorms,
    synchronised, see the whole batch). Every other loss here is a mean over the shapes, the same either way."""
    if world_size == 1:
        return model
    return DistributedDataParallel(OnlyTheLossBackward(model) if only_the_loss else model, static_graph=True,
                                   device_ids=[device.index] if device.type == "cuda" else None)


def rank_loader(dataset, order, batch_size, rank, world_size, num_workers, device):
    """An epoch's DataLoader: this rank's share (batch_size / world_size shapes) of every global batch of `order`,
    the last partial batch dropped (rank_batches)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size // world_size,
                                       sampler=rank_batches(order, batch_size, rank, world_size), drop_last=True,
                                       num_workers=num_workers, pin_memory=device.type == "cuda")
