"""The optimisation of both scripts (Point-MAE's): the learning rate, AdamW and its parameter groups, the epoch order;
finetune.py's --layer_decay / --freeze_epochs groups (layer_scale, scaled_optimizer).

Each is a pure function of (seed, epoch, step) or of the model, so a resumed run needs no scheduler or sampler state.
"""
import math

import torch

from util.weights import ENCODER_PREFIXES


def learning_rate(step, total_steps, warmup_steps, base_lr, min_lr):
    """Linear warm-up then cosine decay to min_lr, a pure function of the step (so resuming needs no state).

    NOTE(deviation): Point-MAE uses timm's CosineLRScheduler stepped once per EPOCH, warming up from 1e-6 and
    counting the cosine from epoch 0; we step per batch, warm up from base_lr / warmup_steps and run the cosine
    over the steps after the warm-up, a smoother schedule with the same end points (docs/REFERENCE.md sec. 8)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_learning_rate(optimizer, lr, frozen=False):
    """This step's learning rate into every AdamW group: lr times the group's "lr_scale" (scaled_optimizer's; 1 for
    make_optimizer's groups), and 0 for the groups of the pre-trained 3-D path while `frozen` (--freeze_epochs)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0) * (0.0 if frozen and group.get("encoder") else 1.0)


def parameter_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms (all 1-D parameters) and learned tokens/positions."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue  # the frozen CLIP tower
        skip = parameter.ndim <= 1 or name.endswith("token") or "pos_embed" in name
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, cfg, device):
    """Point-MAE's AdamW. On CUDA the fused implementation: one kernel for all parameters instead of a loop of
    per-tensor kernels and a host read of every parameter's step counter; the same update rule (its last bits may
    differ from the loop's)."""
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device.type == "cuda")


def epoch_order(num_samples, seed, epoch):
    """The shuffled sample order of an epoch: a pure function of (seed, epoch), so resuming needs no sampler state."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def layer_scale(name, depth, decay):
    """--layer_decay: the learning-rate factor of one parameter of the fine-tuning model, by its depth in the
    pre-trained 3-D path (BEiT's layer ids): the tokenizer and the centre embedding decay^(depth + 1), encoder block i
    (0-based) decay^(depth - i), the encoder's final norm and every new part (class token, head) 1."""
    if name.startswith(("tokenizer_3d.", "encoder_pos.")):
        return decay ** (depth + 1)
    if name.startswith("encoder.blocks."):
        return decay ** (depth - int(name.split(".")[2]))
    return 1.0


def scaled_optimizer(model, optimizer, cfg):
    """The AdamW of `optimizer` (its weight-decay groups and settings) with each group split by learning-rate factor
    (layer_scale) and by whether it belongs to the pre-trained 3-D path ("encoder", which --freeze_epochs holds
    at lr 0); the loop multiplies the schedule's lr by each group's "lr_scale"."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    depth = len(model.encoder.blocks)
    groups = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = names[id(parameter)]
            key = (group["weight_decay"], layer_scale(name, depth, cfg.layer_decay), name.startswith(ENCODER_PREFIXES))
            groups.setdefault(key, []).append(parameter)
    return torch.optim.AdamW([{"params": params, "weight_decay": decay, "lr_scale": scale, "encoder": encoder}
                              for (decay, scale, encoder), params in groups.items()], lr=cfg.lr,
                             fused=bool(optimizer.defaults.get("fused")))
