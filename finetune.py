"""KR-MAE downstream tasks: paper "Fine-tuning Setup" and Tables 1-3, plus the linear-SVM protocol.

After pre-training only the 3-D path is kept (`tokenizer_3d`, `encoder_pos`, `encoder`: Eq. 3 and the KAT encoder of
Eq. 9-14 without 2-D tokens, every group visible), so `pretrain.encoder_state_dict` loads with the same names.

    Table 1  --task scan_objectnn --variant obj_bg|obj_only|pb_t50_rs   2048 points, 128 groups, 15 classes
    (extra)  --task modelnet40 [--vote]                                   1024 points,  64 groups, 40 classes
    Table 2  --task fewshot --way 5|10 --shot 10|20 --folds all           ModelNet40 episodes, mean +- std of folds
    Table 3  --task partseg                                               ShapeNetPart, instance and class mIoU
    (extra)  --task svm                                                   linear probes of frozen features

Classification head (Point-MAE):  f = [cls output ; max over the group tokens]          (B, 2D)
                                   logits = MLP(2D -> 256 -> 256 -> classes), BN, ReLU, Dropout 0.5
Segmentation head (Point-MAE):     f_i = [hidden blocks 4, 8, 12 of token i]             (B, G, 3D)
                                   global = [max_G f ; mean_G f ; Embed(category one-hot)] (B, 6D + 64)
                                   per point: [xyz ; inverse-distance mix of the 3 nearest centres' f]
                                   -> propagation MLP 3D + 3 -> 4D -> 1024                 (B, N, 1024)
                                   [propagated ; global] -> Conv1d 512 -> 256 -> part logits (B, N, parts)
Linear probes (linear_probe.py):   the literature's SVC(C = 0.01) on raw max-pooled features, a cross-validated
                                   linear SVM, 1-nearest-neighbour and a few-shot linear probe.

Point-MAE's recipe (REFERENCE sec. 8): a classification set returns ALL stored points, normalised over all of them;
training takes an FPS of 1200 (for 1024) from a random start and a fresh random 1024 of those EVERY step, then
scale-and-translate; testing takes an FPS of 1024; voting re-draws the 1024 and the augmentation on every pass.

Shapes: B batch, N points, G groups/tokens, K points per group, D width, M generic count.
Paper symbol -> name: n -> num_groups, p -> group_size, d^E -> dim, n-way m-shot -> way, shot.

Run:  python finetune.py --task scan_objectnn --variant obj_bg --checkpoint runs/pretrain/last.pth
      python finetune.py --task fewshot --way 5 --shot 10 --folds all --checkpoint runs/pretrain/last.pth
      python finetune.py --task partseg --preset tiny --data synthetic --epochs 2     (a CPU smoke run)
      python finetune.py --task modelnet40 --eval_only --checkpoint modelnet_1k.pth   (test a fine-tuned model)
      torchrun --nproc_per_node 4 finetune.py --task scan_objectnn ...   (4 GPUs; --batch_size stays the global batch)
--checkpoint also takes Point-MAE's released files (point_mae_checkpoints.py maps their keys).
Every hyperparameter is a field of `Config` and a flag; `--seeds 0,1,2` repeats a run and reports mean +- std;
`--resume` continues every run of the command from its last.pth (refused if it was started with other settings);
without it, a run folder holding a last.pth is refused unless `--overwrite` is given. Output:
<out_dir>/<task label>/summary.json and, per run, <task label>/seed<s>[_fold<f>]/ with last.pth and log.jsonl (one
JSON line per epoch, metrics in %).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import datasets
import linear_probe
import point_mae_checkpoints
import synthetic
from kat import KATransformer
from distributed import (rank_batches, seed_rank_generators, start_processes, stop_processes, summed_over_ranks,
                         sync_batchnorm)
from checkpoints import (LOCK_NAME, append_log, check_fits, check_log, folder_lock, load_checkpoint, load_resumable,
                         remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state, truncate_log)
from pretrain import (ENCODER_PREFIXES, encoder_state_dict, epoch_order, learning_rate, make_optimizer, parse_config,
                      range_checks, schedule_and_size_checks)
from tokenizer import CenterEmbedding, PointTokenizer, farthest_point_sample, gather_points

TASKS = ("scan_objectnn", "modelnet40", "fewshot", "partseg", "svm")


@dataclass
class Config:
    """KR-MAE fine-tuning and linear-SVM evaluation."""
    # --- task and data ----------------------------------------------------------------------------------------
    task: str = "scan_objectnn"     # one of TASKS
    variant: str = "obj_bg"         # ScanObjectNN: obj_bg, obj_only, pb_t50_rs (paper Table 1)
    data: str = "auto"              # "auto" (real if the data folder exists, else synthetic), "real", "synthetic"
    data_root: str = ""             # "": data/<the task's usual folder>, see DATA_ROOTS
    num_points: int = 1024          # Point-MAE: 1024 (ModelNet40); TASK_DEFAULTS: 2048 (ScanObjectNN, ShapeNetPart)
    num_groups: int = 64            # n; Point-MAE: 64 (ModelNet40), 128 (ScanObjectNN, ShapeNetPart)
    group_size: int = 32            # p; Point-MAE: 32
    synthetic_train_size: int = 2048  # built-in synthetic shapes: training set size (synthetic.py's default)
    synthetic_test_size: int = 512    # built-in synthetic shapes: test set size (synthetic.py's default)
    way: int = 5                    # few-shot n (paper Table 2: 5 or 10)
    shot: int = 10                  # few-shot m (paper Table 2: 10 or 20)
    fold: int = 0                   # few-shot episode 0..9
    folds: str = ""                 # "all" (folds 0..9, paper Table 2) or "0,3": several episodes, mean +- std
    queries: int = 20               # few-shot test shapes per class (Point-BERT protocol: 20); synthetic episodes only
    # --- backbone (must match the pre-training) ---------------------------------------------------------------
    dim: int = 384                  # d^E; Point-MAE: 384
    depth: int = 12                 # Point-MAE: 12
    num_heads: int = 6              # Point-MAE: 6
    drop_path: float = 0.1          # Point-MAE fine-tuning: stochastic depth 0 -> 0.1
    checkpoint: str = ""            # pretrain.py's last.pth, a fine-tuned last.pth, or an official Point-MAE file
                                    # (pretrain.pth, a fine-tuned classifier, part_seg.pth); "": from scratch
    fps_skip_near_origin: bool = False  # FPS never picks points within 1e-3 (squared) of the origin, as Point-MAE's
                                        # CUDA kernel: for exact parity with its checkpoints (tokenizer.py)
    # --- optimisation (Point-MAE fine-tuning) -------------------------------------------------------------------
    epochs: int = 300               # Point-MAE: 300 (few-shot: 150)
    batch_size: int = 32            # Point-MAE: 32 (part segmentation: 16)
    lr: float = 5e-4                # Point-MAE: AdamW 5e-4 (part segmentation: 2e-4)
    min_lr: float = 1e-6            # Point-MAE: cosine floor 1e-6
    weight_decay: float = 0.05      # Point-MAE: 0.05
    warmup_epochs: int = 10         # Point-MAE: 10
    grad_clip: float = 10.0         # Point-MAE: gradient norm clip 10
    # Options for a pre-trained encoder with few labels (ours; Point-MAE uses none: the defaults switch them off).
    layer_decay: float = 1.0        # lr of the pre-trained 3-D path x decay^(depth - i) for block i (BEiT / MAE's
                                    # layer-wise decay), x decay^(depth + 1) for the tokenizer; 1: off
    freeze_epochs: int = 0          # the 3-D path at lr 0 for the first N epochs: the new head and class token train
                                    # alone first (LP-FT); 0: off
    trunc_normal_head: bool = False  # a new head from a checkpoint gets the from-scratch truncated normal (std 0.02)
                                     # instead of PyTorch's default init (Point-MAE's)
    eval_every: int = 1             # test every this many epochs (Point-MAE: 1); the last epoch is always tested
    vote: bool = False              # also report accuracy with logits averaged over augmented passes ("voted")
    vote_passes: int = 10           # Point-MAE: 10 augmented passes
    fewshot_head_classes: int = 40  # Point-MAE: a 40-way head (cls_dim 40) for every n-way episode
    probe_shots: int = 10           # --task svm: labelled shapes per class of the few-shot linear probe
    probe_draws: int = 20           # --task svm: seeded draws of the few-shot probe (mean +- std over them)
    # --- run ----------------------------------------------------------------------------------------------------
    out_dir: str = "runs/finetune"
    resume: bool = False            # continue every run of this command from its last.pth (finished runs are read back)
    overwrite: bool = False         # start afresh in run folders that hold an earlier run's last.pth (else refused)
    seed: int = 0
    seeds: str = ""                 # "0,1,2": one run per seed, then mean +- std (overrides --seed)
    device: str = "auto"            # "auto", "cpu", "cuda", "cuda:1", ...
    amp: bool = True                # bf16 autocast on CUDA (ignored on the CPU)
    num_workers: int = 4            # DataLoader workers
    progress: bool = True           # tqdm progress bar
    log_every: int = 50             # read the summed loss off the device every N steps and at epoch end (bar,
                                    # non-finite check): no host sync at the other steps; NaN is caught <= N steps late
    preset: str = ""                # "tiny": pretrain.py's tiny model on small data, a CPU smoke run
    eval_only: bool = False         # test --checkpoint (a fine-tuned model, ours or Point-MAE's) without training,
                                    # with and without voting: <out_dir>/<task label>_eval/summary.json


# Per-task defaults (Point-MAE's fine-tuning configurations) override the dataclass; a preset overrides these;
# flags given on the command line override everything.
TASK_DEFAULTS = {
    "scan_objectnn": dict(num_points=2048, num_groups=128),  # Point-MAE: 2048 points, 128 groups
    "modelnet40": dict(),
    "fewshot": dict(epochs=150),  # Point-MAE few-shot: 150 epochs
    "partseg": dict(num_points=2048, num_groups=128, lr=2e-4, batch_size=16),  # Point-MAE segmentation
    "svm": dict(),
}
# "tiny" mirrors pretrain.PRESETS["tiny"] (dim 96, depth 4, heads 4, 32 groups of 16, 512 points) so that a tiny
# pre-training checkpoint loads.
PRESETS = {
    "tiny": dict(num_points=512, num_groups=32, group_size=16, dim=96, depth=4, num_heads=4, batch_size=16,
                 epochs=3, warmup_epochs=1, synthetic_train_size=256, synthetic_test_size=128, num_workers=0),
}
# Where each task looks when --data_root is not given (datasets.py's readers also accept the parent folders).
DATA_ROOTS = {"scan_objectnn": "data/ScanObjectNN", "modelnet40": "data/modelnet40_normal_resampled",
              "fewshot": "data/ModelNetFewshot", "svm": "data/modelnet40_normal_resampled",
              "partseg": "data/shapenetcore_partanno_segmentation_benchmark_v0_normal"}
DATA_LAYOUTS = {"scan_objectnn": datasets.SCANOBJECTNN_LAYOUT, "modelnet40": datasets.MODELNET40_LAYOUT,
                "fewshot": datasets.FEWSHOT_LAYOUT, "svm": datasets.MODELNET40_LAYOUT,
                "partseg": datasets.SHAPENETPART_LAYOUT}
# The settings that define a run: a resumed (or read-back) run must have been started with these same values.
RUN_SETTINGS = ("checkpoint", "task", "variant", "data", "data_root", "num_points", "num_groups", "group_size",
                "synthetic_train_size", "synthetic_test_size", "way", "shot", "fold", "queries", "dim", "depth",
                "num_heads", "drop_path", "epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs",
                "grad_clip", "eval_every", "fewshot_head_classes", "fps_skip_near_origin", "seed", "layer_decay",
                "freeze_epochs", "trunc_normal_head")
# The settings --eval_only compares with those a fine-tuned checkpoint of this project was trained with: the model's
# shape and the test set it was tested on.
EVAL_SETTINGS = ("task", "variant", "data", "synthetic_test_size", "num_points", "num_groups", "group_size", "dim",
                 "depth", "num_heads", "way", "shot", "fold", "queries", "fewshot_head_classes",
                 "fps_skip_near_origin")


def build_config(argv=None):
    """Flags -> Config: the task's defaults first, then --preset, then the explicit flags."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--task", default=Config.task)
    task = pre_parser.parse_known_args(argv)[0].task
    if task not in TASKS:
        raise SystemExit(f"--task must be one of {TASKS}, got {task!r}.")
    # parse_config applies presets[--preset] as defaults; "" (no preset) gets the task's defaults alone.
    presets = {name: {**TASK_DEFAULTS[task], **values} for name, values in {"": {}, **PRESETS}.items()}
    return parse_config(Config, argv, presets)


# ---------------------------------------------------------------------------------------------------------------
# Models: the pre-trained 3-D path plus a task head
# ---------------------------------------------------------------------------------------------------------------
class PointEncoder(nn.Module):
    """The 3-D path kept after pre-training, under pretrain.KRMAE's attribute names (its weights load as they are)."""

    def __init__(self, num_groups=64, group_size=32, dim=384, depth=12, num_heads=6, drop_path=0.1,
                 skip_near_origin=False):
        super().__init__()
        self.tokenizer_3d = PointTokenizer(num_groups=num_groups, group_size=group_size, dim=dim,
                                           skip_near_origin=skip_near_origin)  # Eq. (3)
        self.encoder_pos = CenterEmbedding(dim=dim)
        self.encoder = KATransformer(dim=dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path)


def init_head(module):
    """Point-MAE's initialisation when training from scratch: truncated normal std 0.02, zero biases, for every Linear
    and Conv1d of `module`. A head fine-tuned from a checkpoint keeps PyTorch's default initialisation instead, as
    in Point-MAE, whose truncated-normal init runs only when no checkpoint is given (see run_finetune)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d)):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Classifier(PointEncoder):
    """Point-MAE's classification model: [cls ; group tokens] -> encoder -> [cls output ; max] -> MLP."""

    def __init__(self, num_classes, **backbone):
        super().__init__(**backbone)
        dim = self.encoder.norm.normalized_shape[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # NOTE(unspecified): named *pos_embed so pretrain.parameter_groups exempts it from weight decay, as cls_token.
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # Point-MAE: std 0.02
        nn.init.trunc_normal_(self.cls_pos_embed, std=0.02)
        # Point-MAE: 2D -> 256 -> 256 -> classes, BN + ReLU + Dropout 0.5 after each hidden layer.
        self.head = nn.Sequential(nn.Linear(2 * dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                  nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                  nn.Linear(256, num_classes))  # (B, 2D) -> (B, classes), PyTorch's default init

    def forward(self, points):
        tokens, centers, _ = self.tokenizer_3d(points)  # (B, G, D), (B, G, 3)  Eq. (3)
        batch_size = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch_size, -1, -1), tokens], dim=1)  # (B, 1 + G, D)
        pos = torch.cat([self.cls_pos_embed.expand(batch_size, -1, -1), self.encoder_pos(centers)],
                        dim=1)  # (B, 1 + G, D)
        encoded = self.encoder(x, pos)  # (B, 1 + G, D)
        feature = torch.cat([encoded[:, 0], encoded[:, 1:].max(dim=1).values], dim=1)  # (B, 2D)
        return self.head(feature)  # (B, classes)


def interpolate_from_centers(points, centers, features, k=3):
    """Inverse-distance weighting of the k nearest centres (PointNet++ feature propagation), as one batched matmul:
    points (B, N, 3), centers (B, G, 3), features (B, G, C) -> (B, N, C)."""
    squared = torch.cdist(points.float(), centers.float()).pow(2)  # (B, N, G)
    nearest_squared, nearest = squared.topk(k, dim=2, largest=False)  # (B, N, k), (B, N, k)
    weights = 1.0 / (nearest_squared + 1e-8)  # PointNet++: 1 / squared distance
    weights = weights / weights.sum(dim=2, keepdim=True)  # (B, N, k), rows sum to 1
    # A sparse (B, N, G) mixing matrix with k weights per row; multiplying it gathers and mixes in one step.
    mixing = torch.zeros_like(squared).scatter_(2, nearest, weights)  # (B, N, G)
    return torch.bmm(mixing.to(features.dtype), features)  # (B, N, C)


def hidden_blocks(depth):
    """The encoder blocks the segmentation head reads: Point-MAE's 4, 8, 12 of 12 (0-based 3, 7, 11).
    NOTE(unspecified): for another depth we take the blocks at 1/3, 2/3 and 3/3 of it (depth 4: 1, 2, 4)."""
    return tuple(max(0, depth * part // 3 - 1) for part in (1, 2, 3))


class PartSegmenter(PointEncoder):
    """Point-MAE's part segmentation model (REFERENCE sec. 7-8) on the pre-trained 3-D path, in its layer order:
    features of 3 encoder blocks -> feature propagation to every point ([xyz ; interpolated], MLP 3D + 3 -> 4D ->
    1024) -> [propagated ; global] -> Conv1d 512 -> 256 -> part logits."""

    def __init__(self, num_categories, num_parts, **backbone):
        super().__init__(**backbone)
        dim = self.encoder.norm.normalized_shape[0]
        self.hidden = hidden_blocks(len(self.encoder.blocks))
        self.num_categories = num_categories
        # Point-MAE: a 64-d embedding of the category one-hot (Conv1d 16 -> 64 without bias, BN, LeakyReLU 0.2).
        self.category_embed = nn.Sequential(nn.Linear(num_categories, 64, bias=False), nn.BatchNorm1d(64),
                                            nn.LeakyReLU(0.2))
        # Point-MAE's feature propagation (PointNet++): [xyz ; interpolated 3D features] (3D + 3 = 1155 channels)
        # -> Conv1d 4D (1536) -> Conv1d 1024, each with BN + ReLU.
        self.propagation = nn.Sequential(nn.Conv1d(3 * dim + 3, 4 * dim, 1), nn.BatchNorm1d(4 * dim),
                                         nn.ReLU(inplace=True), nn.Conv1d(4 * dim, 1024, 1), nn.BatchNorm1d(1024),
                                         nn.ReLU(inplace=True))
        in_channels = 1024 + 2 * 3 * dim + 64  # propagated + global (max, mean, category): 3392 at D = 384
        self.head = nn.Sequential(nn.Conv1d(in_channels, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                  nn.Dropout(0.5),  # Point-MAE: dropout 0.5 after the first layer
                                  nn.Conv1d(512, 256, 1), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                                  nn.Conv1d(256, num_parts, 1))

    def forward(self, points, category):
        num_points = points.shape[1]
        tokens, centers, _ = self.tokenizer_3d(points)  # (B, G, D), (B, G, 3)  Eq. (3)
        _, hidden = self.encoder(tokens, self.encoder_pos(centers), return_hidden=self.hidden)  # 3 x (B, G, D)
        features = torch.cat(hidden, dim=2)  # (B, G, 3D)
        one_hot = F.one_hot(category, self.num_categories).to(features.dtype)  # (B, categories)
        global_feature = torch.cat([features.max(dim=1).values, features.mean(dim=1),
                                    self.category_embed(one_hot).to(features.dtype)], dim=1)  # (B, 6D + 64)
        per_point = interpolate_from_centers(points, centers, features)  # (B, N, 3D)
        propagated = torch.cat([points.to(features.dtype), per_point], dim=2)  # (B, N, 3 + 3D), Point-MAE's order
        propagated = self.propagation(propagated.transpose(1, 2))  # (B, 1024, N)
        x = torch.cat([propagated, global_feature[:, :, None].expand(-1, -1, num_points)], dim=1)  # (B, 1024+6D+64, N)
        return self.head(x).transpose(1, 2)  # (B, N, parts)


def load_pretrained(model, path, cfg, whole_model=False):
    """Load a checkpoint into `model`: this project's (pre-training or fine-tuned) or an official Point-MAE file
    (pre-training, classifier or part segmentation; point_mae_checkpoints.py maps its keys). Its 3-D path must fit.
    A fine-tuned checkpoint's task head (class token, head, ...) loads too when ALL of it fits this task; otherwise
    the head starts fresh, and that is said. whole_model=True (--eval_only) requires every tensor of the model.
    Counts the weights do not show (the number of heads) come from the flags. Returns True when the head loaded."""
    layout, state, saved = point_mae_checkpoints.project_state(load_checkpoint(path), path)
    if whole_model and "task" in saved:  # --eval_only of a run of ours: the model and test set it was tested on
        differing = [f"--{name} {saved[name]!r} there, {getattr(cfg, name)!r} here" for name in EVAL_SETTINGS
                     if name in saved and saved[name] != getattr(cfg, name)]
        if differing:
            raise ValueError(f"{path!r} was fine-tuned with other settings than this command: "
                             f"{'; '.join(differing)}. Pass its settings to evaluate it.")
    encoder = encoder_state_dict(state)
    if not encoder:
        raise ValueError(f"Checkpoint {path!r} ({layout} layout) holds no parameter starting with {ENCODER_PREFIXES}; "
                         f"expected pretrain.py's or finetune.py's last.pth or an official Point-MAE checkpoint.")
    own = model.state_dict()
    for name, value in encoder.items():
        if name in own and own[name].shape != value.shape:
            raise ValueError(f"Checkpoint {path!r} ({layout} layout) does not fit this model: parameter {name} has "
                             f"shape {tuple(value.shape)} in the checkpoint but {tuple(own[name].shape)} here. Pass "
                             f"the checkpoint's --dim/--depth/--num_heads (or its --preset).")
    if saved.get("num_heads", cfg.num_heads) != cfg.num_heads:  # same shapes, different meaning
        raise ValueError(f"Checkpoint {path!r} was trained with {saved['num_heads']} heads but this model has "
                         f"{cfg.num_heads}; pass --num_heads {saved['num_heads']}.")
    # The task head: every tensor of the model outside the 3-D path (cls_token, cls_pos_embed, head.*; part
    # segmentation: category_embed.*, propagation.*, head.*).
    head_names = [name for name in own if not name.startswith(ENCODER_PREFIXES)]
    head_missing = [name for name in head_names if name not in state]
    head_misfit = [f"{name} {tuple(state[name].shape)} there, {tuple(own[name].shape)} here" for name in head_names
                   if name in state and state[name].shape != own[name].shape]
    head_fits = not head_missing and not head_misfit
    if whole_model and not head_fits:
        found = (f"tensors of a different shape ({'; '.join(head_misfit[:3])}: fine-tuned for another task or "
                 f"number of classes?)" if head_misfit else
                 f"no task head ({len(head_missing)} tensors missing, e.g. {head_missing[:3]}: a pre-training "
                 f"checkpoint?)")
        raise ValueError(f"--eval_only needs a model fine-tuned for --task {cfg.task}; checkpoint {path!r} ({layout} "
                         f"layout) has {found}.")
    loaded = {**encoder, **({name: state[name] for name in head_names} if head_fits else {})}
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing_encoder = [name for name in missing if name.startswith(ENCODER_PREFIXES)]
    if missing_encoder or unexpected:
        raise ValueError(f"Checkpoint {path!r} ({layout} layout) does not fit this model: encoder parameters missing "
                         f"from it {missing_encoder[:6]} (of {len(missing_encoder)}), unexpected in it "
                         f"{unexpected[:6]} (of {len(unexpected)}). Was it trained with another --depth?")
    if not head_names:  # --task svm: the encoder alone has no head, so a pre-training file fits it trivially
        head_text = "alone (this model has no task head)"
    elif head_fits:
        head_text = "and the task head it was fine-tuned with"
    elif len(head_missing) < len(head_names):
        mismatch = "; ".join((head_misfit or head_missing)[:2])
        head_text = f"only: its task head does not fit this task ({mismatch}), a new one is trained"
    else:
        head_text = f"only; new, trained from scratch: {sorted({name.split('.')[0] for name in missing})}"
    print(f"loaded {path} ({layout} layout): {len(loaded)} tensors, the 3-D path {head_text}; --num_heads "
          f"{cfg.num_heads} from the flags")
    return head_fits and bool(head_names)


# ---------------------------------------------------------------------------------------------------------------
# Metrics and the linear SVM (pure functions)
# ---------------------------------------------------------------------------------------------------------------
def class_mean_accuracy(predictions, labels, num_classes):
    """Mean over the classes present in `labels` of each class's accuracy (ScanObjectNN's mAcc)."""
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).float()  # (classes,)
    total = torch.bincount(labels, minlength=num_classes).float()  # (classes,)
    return (correct[total > 0] / total[total > 0]).mean().item()


def part_category_table(part_ranges, device=None):
    """part_ranges[c] = (first part label, number of parts) of category c (the readers' convention, contiguous
    ranges) -> the owner category of every part label, (parts,)."""
    owner = torch.full((max(first + count for first, count in part_ranges),), -1, dtype=torch.long, device=device)
    for category, (first, count) in enumerate(part_ranges):  # 16 categories: a loop over a table, not over data
        owner[first:first + count] = category
    return owner  # (parts,)


def restrict_to_category(logits, category, part_ranges):
    """Predicted part of every point among the parts of its shape's known category (Point-MAE's evaluation):
    logits (B, N, parts), category (B,) -> (B, N) long."""
    owner = part_category_table(part_ranges, logits.device)  # (parts,)
    allowed = owner[None, :] == category[:, None]  # (B, parts)
    return logits.float().masked_fill(~allowed[:, None, :], float("-inf")).argmax(dim=2)  # (B, N)


def part_miou(logits_or_pred, target, category, part_ranges):
    """Part segmentation metrics (REFERENCE sec. 1): logits (B, N, parts) or predictions (B, N), target (B, N),
    category (B,). Logits are first restricted to the category's parts. For each shape, the IoU of each part of
    its category (1 when the part is absent from both prediction and truth), averaged over those parts.
    Returns (instance mIoU = mean over shapes, class mIoU = mean over categories of their shapes' mean,
    per-shape mIoU (B,))."""
    predictions = (restrict_to_category(logits_or_pred, category, part_ranges) if logits_or_pred.is_floating_point()
                   else logits_or_pred)  # (B, N)
    owner = part_category_table(part_ranges, target.device)  # (parts,)
    num_shapes, num_parts, num_categories = target.shape[0], owner.numel(), len(part_ranges)
    # Counts per (shape, part) by one bincount over shape * parts + label: no loop over shapes or parts.
    shape_offset = torch.arange(num_shapes, device=target.device)[:, None] * num_parts  # (B, 1)
    target_index = (target + shape_offset).flatten()  # (B*N,)
    size = num_shapes * num_parts
    intersection = torch.bincount(target_index, weights=(predictions == target).flatten().float(), minlength=size)
    target_count = torch.bincount(target_index, minlength=size).float()  # (B*parts,)
    predicted_count = torch.bincount((predictions + shape_offset).flatten(), minlength=size).float()  # (B*parts,)
    union = predicted_count + target_count - intersection  # (B*parts,)
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))  # absent in both: 1
    iou = iou.reshape(num_shapes, num_parts)  # (B, parts)
    belongs = (owner[None, :] == category[:, None]).float()  # (B, parts): the parts of each shape's category
    shape_miou = (iou * belongs).sum(dim=1) / belongs.sum(dim=1)  # (B,)
    category_sum = torch.zeros(num_categories, device=target.device).index_add_(0, category, shape_miou)
    category_count = torch.bincount(category, minlength=num_categories).float()  # (categories,)
    present = category_count > 0
    class_miou = (category_sum[present] / category_count[present]).mean()
    return shape_miou.mean().item(), class_miou.item(), shape_miou


# ---------------------------------------------------------------------------------------------------------------
# Data: the real readers of datasets.py, or the built-in synthetic shapes of synthetic.py
# ---------------------------------------------------------------------------------------------------------------
# ScanObjectNN variant -> the synthetic variant that imitates it (synthetic.py): none, clutter, clutter + cut/tilt.
SYNTHETIC_VARIANT = {"obj_only": "clean", "obj_bg": "background", "pb_t50_rs": "perturbed"}
# Synthetic stand-ins of ModelNet40 (which stores 8192 points) store this many times num_points per shape.
STORED_FACTOR = 2


def pool_size(num_points, stored):
    """Point-MAE's FPS pool before the random pick: 1200 points for 1024 (4800 for 4096), never more than stored
    (so ScanObjectNN's 2048 of 2048 keeps every point): ceil(N * 1200 / 1024), capped at the stored count."""
    return min(stored, math.ceil(num_points * 1200 / 1024))


def training_points(points, num_points, skip_near_origin=False):
    """Point-MAE's per-step resampling of a training batch: all stored points (B, M, 3) -> FPS of pool_size points
    from a random start -> a fresh random num_points of them -> (B, N, 3). Point-MAE shuffles the stored points
    and starts its FPS at index 0, which is a random start; it draws ONE random subset for the whole batch
    (np.random.choice(pool, N, replace=False)), as here. A new subset every step: no two epochs see the same points."""
    batch_size, stored, _ = points.shape
    pool = pool_size(num_points, stored)
    if pool < stored:  # FPS of all stored points would only reorder them
        start = torch.randint(stored, (batch_size,), device=points.device)  # (B,) random FPS start
        points = gather_points(points, farthest_point_sample(points, pool, start, skip_near_origin))  # (B, pool, 3)
    chosen = torch.randperm(pool, device=points.device)[:num_points]  # (N,) one subset for the batch
    return points[:, chosen]  # (B, N, 3)


def test_points(points, num_points, skip_near_origin=False):
    """Point-MAE's test input: FPS of num_points of all stored points from index 0 (for its FPS-ordered 8192-point
    cache, the first num_points). (B, M, 3) -> (B, N, 3); nothing random, every epoch tests the same points."""
    if points.shape[1] == num_points:
        return points
    return gather_points(points, farthest_point_sample(points, num_points, None, skip_near_origin))  # (B, N, 3)


def vote_points(points, num_points, passes, generator, skip_near_origin=False):
    """Point-MAE's voting inputs: FPS of pool_size points from index 0, then for each pass a fresh random
    num_points of them and a scale-and-translate. (B, M, 3) -> list of `passes` tensors (B, N, 3)."""
    pool = pool_size(num_points, points.shape[1])
    if pool < points.shape[1]:
        points = gather_points(points, farthest_point_sample(points, pool, None, skip_near_origin))  # (B, pool, 3)
    inputs = []
    for _ in range(passes):  # 10 passes, each a whole batch
        chosen = torch.randperm(pool, generator=generator)[:num_points].to(points.device)  # (N,)
        inputs.append(datasets.scale_and_translate(points[:, chosen], generator))  # (B, N, 3)
    return inputs


def synthetic_episode(way, shot, fold, num_points, queries=20, pool=1000):
    """An n-way m-shot episode of the synthetic shapes, a pure function of (way, shot, fold, num_points):
    `way` of the 12 classes, `shot` training shapes of each (train split) and `queries` test shapes of each
    (test split), labelled 0..way-1. SyntheticShapes labels sample i with i % 12: shape j of class c is c + 12 j.
    Each shape stores 2 * num_points points, from which training resamples (see training_points)."""
    num_classes = len(synthetic.SYNTHETIC_CATEGORIES)
    if way > num_classes:
        raise ValueError(f"The synthetic shapes have {num_classes} classes; a {way}-way episode is impossible.")
    # NOTE(unspecified): the episode depends on (way, shot, fold) only, like Point-BERT's fixed episode files.
    rng = np.random.default_rng([way, shot, fold])
    classes = rng.choice(num_classes, way, replace=False)  # (way,) the episode's classes, in label order
    episode = []
    for split, count in (("train", shot), ("test", queries)):
        shapes = synthetic.SyntheticShapes(split, STORED_FACTOR * num_points, size=num_classes * pool, seed=0)
        index = classes[:, None] + num_classes * rng.choice(pool, (way, count), replace=False)  # (way, count)
        points = torch.stack([shapes[i][0] for i in index.flatten().tolist()])  # (way * count, 2N, 3)
        labels = torch.arange(way).repeat_interleave(count)  # (way * count,): class k of the episode -> k
        episode.append(torch.utils.data.TensorDataset(points, labels))
    return episode  # [train, test]


def resolve_data(cfg):
    """'auto' -> 'real' when the task's data folder exists, else 'synthetic', announced loudly. A --data_root given
    but missing is an error: a mistyped path must not run on the synthetic shapes."""
    root = cfg.data_root or DATA_ROOTS[cfg.task]
    if cfg.data in ("real", "synthetic"):
        return cfg.data
    if cfg.data != "auto":
        raise ValueError(f"--data must be 'auto', 'real' or 'synthetic', got {cfg.data!r}.")
    if os.path.exists(root):
        return "real"
    if cfg.eval_only:  # a fine-tuned --checkpoint (an official one: a real data set's classes or parts) is tested
        # on the data it was fine-tuned for, never silently on the synthetic stand-ins
        raise FileNotFoundError(f"--eval_only tests --checkpoint {cfg.checkpoint!r} on the test set of --task "
                                f"{cfg.task}, but there is no data set at {root!r}, and the fallback to the built-in "
                                f"synthetic shapes is refused here: a checkpoint fine-tuned on the real data set does "
                                f"not fit their classes or parts. Pass --data_root (expected layout: "
                                f"{DATA_LAYOUTS[cfg.task]}) or, for a checkpoint fine-tuned on the synthetic shapes, "
                                f"--data synthetic.")
    if cfg.data_root:
        raise FileNotFoundError(f"--data_root {cfg.data_root!r} does not exist. Expected layout for --task {cfg.task}: "
                                f"{DATA_LAYOUTS[cfg.task]} Leave --data_root out (or pass --data synthetic) to run on "
                                f"the built-in synthetic shapes.")
    print("=" * 100 + f"\nNo data set at {root!r}: running --task {cfg.task} on the BUILT-IN SYNTHETIC SHAPES. "
          f"These numbers say nothing about the paper's tables. Pass --data_root for real data.\n" + "=" * 100)
    return "synthetic"


def build_datasets(cfg):
    """Train and test sets of the task, and what the model needs to know about them. Classification sets return
    ALL stored points (ModelNet40: 8192, ScanObjectNN: 2048); the num_points the model reads are picked per batch
    by training_points / test_points, as in Point-MAE."""
    root = cfg.data_root or DATA_ROOTS[cfg.task]
    synthetic_data = cfg.data == "synthetic"
    if cfg.task == "scan_objectnn" and cfg.variant not in SYNTHETIC_VARIANT:
        raise ValueError(f"--variant must be one of {sorted(SYNTHETIC_VARIANT)}, got {cfg.variant!r}.")
    if cfg.task == "fewshot":
        if synthetic_data:
            train, test = synthetic_episode(cfg.way, cfg.shot, cfg.fold, cfg.num_points, cfg.queries)
        else:
            train, test = (datasets.ModelNetFewShot(root, cfg.way, cfg.shot, cfg.fold, split, cfg.num_points)
                           for split in ("train", "test"))
        # Point-MAE keeps a 40-way head (cls_dim 40) for every episode; labels stay 0..way-1.
        return dict(train=train, test=test, num_classes=max(cfg.way, cfg.fewshot_head_classes))
    if synthetic_data:
        # NOTE(unspecified): the synthetic sets use data seed 0 whatever --seed is: one fixed benchmark for all runs.
        # The ModelNet40 and SVM stand-ins store 2 * num_points per shape (ModelNet40 stores 8192) so that the
        # per-step FPS resampling has points to choose from; the scan-like variants store num_points (as 2048).
        variant = SYNTHETIC_VARIANT[cfg.variant] if cfg.task == "scan_objectnn" else "clean"
        stored = cfg.num_points * (STORED_FACTOR if cfg.task in ("modelnet40", "svm") else 1)
        train, test = (synthetic.SyntheticShapes(split, stored, size=size, seed=0, variant=variant)
                       for split, size in (("train", cfg.synthetic_train_size), ("test", cfg.synthetic_test_size)))
    elif cfg.task == "scan_objectnn":
        train, test = (datasets.ScanObjectNN(root, cfg.variant, split, num_points=cfg.num_points)
                       for split in ("train", "test"))
    elif cfg.task == "partseg":
        train, test = (datasets.ShapeNetPart(root, split, cfg.num_points) for split in ("train", "test"))
    else:  # modelnet40 and svm
        train, test = (datasets.ModelNet40(root, split, cfg.num_points) for split in ("train", "test"))
    sets = dict(train=train, test=test, num_classes=train.num_classes)
    if cfg.task == "partseg":  # SyntheticShapes and ShapeNetPart both describe their parts
        sets.update(part_ranges=train.part_ranges, num_parts=train.num_parts)
    return sets


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, sets, device, use_bf16, num_points, vote_passes=0, generator=None):
    """Test metrics in %: accuracy and class-mean accuracy, or instance / class mIoU and point accuracy.
    Classification reads test_points (FPS of num_points); vote_passes > 0: logits averaged over that many
    vote_points passes (Point-MAE's "voting": a fresh random subset of its FPS pool and a scale-and-translate)."""
    model.eval()
    segmentation = "part_ranges" in sets
    skip = model.tokenizer_3d.skip_near_origin  # the test points are picked by the model's own FPS variant
    outputs, targets, categories = [], [], []
    for batch in loader:
        points = batch[0].to(device)  # (B, M, 3) all stored points (segmentation: N)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if segmentation:
                category = batch[1].to(device)  # (B,)
                outputs.append(restrict_to_category(model(points, category), category, sets["part_ranges"]).cpu())
                targets.append(batch[2])
                categories.append(batch[1])
            elif vote_passes:
                passes = [model(inputs).float() for inputs in vote_points(points, num_points, vote_passes, generator, skip)]
                outputs.append(torch.stack(passes).mean(dim=0).cpu())  # (B, classes)
                targets.append(batch[1])
            else:
                outputs.append(model(test_points(points, num_points, skip)).float().cpu())  # (B, classes)
                targets.append(batch[1])
    target = torch.cat(targets)
    if segmentation:
        predictions = torch.cat(outputs)  # (M, N)
        instance_miou, class_miou, _ = part_miou(predictions, target, torch.cat(categories), sets["part_ranges"])
        point_accuracy = (predictions == target).float().mean().item()
        return {"instance_miou": 100 * instance_miou, "class_miou": 100 * class_miou,
                "point_accuracy": 100 * point_accuracy}
    predictions = torch.cat(outputs).argmax(dim=1)  # (M,)
    return {"accuracy": 100 * (predictions == target).float().mean().item(),
            "class_accuracy": 100 * class_mean_accuracy(predictions, target, sets["num_classes"])}


# ---------------------------------------------------------------------------------------------------------------
# One run: fine-tuning (classification, few-shot, part segmentation) or the linear SVM
# ---------------------------------------------------------------------------------------------------------------
def task_label(cfg):
    """runs/finetune/<label>/seed<s>[_fold<f>]: scan_objectnn_obj_bg, fewshot_5way_10shot, partseg_synthetic, ..."""
    label = cfg.task + (f"_{cfg.variant}" if cfg.task == "scan_objectnn" else "")
    label += f"_{cfg.way}way_{cfg.shot}shot" if cfg.task == "fewshot" else ""
    return label + ("_synthetic" if cfg.data == "synthetic" else "")


def backbone_arguments(cfg):
    return dict(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=cfg.dim, depth=cfg.depth,
                num_heads=cfg.num_heads, drop_path=cfg.drop_path, skip_near_origin=cfg.fps_skip_near_origin)


def run_svm(cfg, device, run_dir):
    """Linear probes of frozen features (no fine-tuning), ModelNet40 train -> test or the synthetic shapes: the
    literature's SVM, the cross-validated SVM, 1-nearest-neighbour and the few-shot linear probe (linear_probe.py).
    Each shape is read as at test time: FPS of num_points of its stored points (Point-MAE's 1024)."""
    use_bf16 = cfg.amp and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    sets = build_datasets(cfg)
    model = PointEncoder(**backbone_arguments(cfg))
    if cfg.checkpoint:
        load_pretrained(model, cfg.checkpoint, cfg)
    else:
        init_head(model)  # Point-MAE's from-scratch initialisation of the whole encoder
        print("No --checkpoint: the features come from a RANDOMLY INITIALISED encoder (a baseline only).")
    model.to(device)
    features = linear_probe.features_for_probes(model, sets["train"], sets["test"], cfg.batch_size, device, use_bf16,
                                                cfg.num_workers, prepare=lambda points: test_points(points, cfg.num_points,
                                                                                         cfg.fps_skip_near_origin))
    probes = linear_probe.probe_all(*features, shots=cfg.probe_shots, draws=cfg.probe_draws, seed=cfg.seed)
    print(linear_probe.format_probes(probes))
    result = {"seed": cfg.seed, **flatten_probes(probes)}
    with open(os.path.join(run_dir, "log.jsonl"), "w") as handle:
        handle.write(json.dumps({**result, "probes": probes}) + "\n")
    return result


def flatten_probes(probes):
    """linear_probe.probe_all's nested result -> flat float fields, so main() can average them over seeds."""
    literature, validated, few_shot = probes["literature"], probes["cross_validated"], probes["few_shot"]
    return {"literature_svm_accuracy": float(literature["test_accuracy"]),
            "literature_svm_train_accuracy": float(literature["train_accuracy"]),
            "cv_svm_accuracy": float(validated["test_accuracy"]),
            "cv_svm_train_accuracy": float(validated["train_accuracy"]), "cv_svm_C": float(validated["C"]),
            "nearest_neighbour_accuracy": float(probes["nearest_neighbour"]),
            f"few_shot_{few_shot['shots']}_class_accuracy": float(few_shot["mean"]),
            "majority_share": float(probes["majority_share"])}


def build_model(cfg, sets, load_weights=True, whole_model=False):
    """The task's model with Point-MAE's initialisation: from a checkpoint, the pre-trained 3-D path is loaded and
    a new head keeps PyTorch's default init; from scratch, every Linear / Conv1d gets the truncated normal.
    whole_model: the checkpoint must hold the whole fine-tuned model (--eval_only)."""
    if cfg.task == "partseg":
        model = PartSegmenter(len(sets["part_ranges"]), sets["num_parts"], **backbone_arguments(cfg))
    else:
        model = Classifier(sets["num_classes"], **backbone_arguments(cfg))
    if cfg.checkpoint and load_weights:
        head_loaded = load_pretrained(model, cfg.checkpoint, cfg, whole_model)
        if cfg.trunc_normal_head and not head_loaded:
            for name, child in model.named_children():  # every part outside the 3-D path (--trunc_normal_head)
                if not f"{name}.".startswith(ENCODER_PREFIXES):
                    init_head(child)
    elif not cfg.checkpoint:
        init_head(model)  # Point-MAE from scratch: truncated normal std 0.02, zero biases
    return model


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


def run_finetune(cfg, device, run_dir, rank=0, world_size=1):
    """One fine-tuning run (one seed, one few-shot fold), flat: data, model, optimizer, resume, loop. Under torchrun
    (world_size > 1) every rank trains on its share of each global batch (as pretrain.py); rank 0 alone tests, prints
    and writes the log and the checkpoint, and returns the metrics."""
    # --- setup ------------------------------------------------------------------------------------------------
    is_main = rank == 0
    use_bf16 = cfg.amp and device.type == "cuda"  # bf16 needs no loss scaler
    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial head
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    checkpoint_path, log_path = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "log.jsonl")
    name = f"[{task_label(cfg)} seed {cfg.seed}" + (f" fold {cfg.fold}]" if cfg.task == "fewshot" else "]")
    if is_main:
        remove_stale_temporaries(checkpoint_path)  # left by a kill during a checkpoint write; last.pth itself is whole
    resuming = cfg.resume and os.path.isfile(checkpoint_path)
    checkpoint = load_resumable(checkpoint_path, "finetune.py", [field.name for field in dataclasses.fields(Config)]
                                ) if resuming else None
    if resuming:
        check_same_run(checkpoint["config"], cfg, checkpoint_path)

    # --- data ---------------------------------------------------------------------------------------------------
    sets = build_datasets(cfg)
    segmentation = cfg.task == "partseg"
    main_metric = "instance_miou" if segmentation else "accuracy"
    # NOTE(unspecified): the last partial batch is dropped (Point-MAE), also in few-shot (50 shapes: 1 step of 32).
    steps_per_epoch = len(sets["train"]) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"The training set has {len(sets['train'])} shapes, fewer than one batch of "
                         f"{cfg.batch_size}; lower --batch_size.")
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    local_batch_size = cfg.batch_size // world_size  # each rank's share of the global batch (start_processes checked)
    test_loader = torch.utils.data.DataLoader(sets["test"], batch_size=cfg.batch_size, shuffle=False,
                                              num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    if is_main:
        print(f"{name} {len(sets['train'])} training / {len(sets['test'])} test shapes, {steps_per_epoch} "
              f"steps/epoch" + (f", {world_size} processes of {local_batch_size} shapes a step" if world_size > 1
                                else ""))

    # --- model and optimizer --------------------------------------------------------------------------------------
    model = build_model(cfg, sets, load_weights=not resuming)  # a resumed run reads last.pth below
    if world_size > 1:
        model = sync_batchnorm(model, device)  # the heads' and the mini-PointNet's statistics over the global batch
    model = model.to(device)
    optimizer = make_optimizer(model, cfg, device)  # Point-MAE's AdamW; fused on CUDA (pretrain.py)
    if cfg.layer_decay != 1.0 or cfg.freeze_epochs > 0:
        optimizer = scaled_optimizer(model, optimizer, cfg)  # the same AdamW, one group per learning-rate factor

    # --- resume ---------------------------------------------------------------------------------------------------
    start_epoch, best, metrics = 0, {}, {}
    if resuming:
        check_fits(model.state_dict(), checkpoint["model"], checkpoint_path, {}, "Was it written by another version?")
        model.load_state_dict(checkpoint["model"])  # the un-wrapped model's names, whatever the world size
        optimizer.load_state_dict(checkpoint["optimizer"])
        if world_size == 1:  # several ranks re-derive their generators at every epoch start (below)
            set_rng_state(checkpoint["rng"])
        start_epoch, best, metrics = checkpoint["epoch"] + 1, checkpoint["best"], checkpoint["last"]
        if is_main:
            print(f"{name} resumed from {checkpoint_path} at epoch {start_epoch}")
    # Under torchrun the step runs through DDP (gradients averaged over the ranks); the un-wrapped `model` is tested
    # and saved. static_graph: as pretrain.py, the same parameters take part in every step.
    train_model = (DistributedDataParallel(model, static_graph=True,
                                           device_ids=[device.index] if device.type == "cuda" else None)
                   if world_size > 1 else model)
    if is_main:
        check_log(log_path, start_epoch)  # a broken log is found now, not after an epoch

    # --- the loop -------------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if world_size > 1:
            seed_rank_generators(cfg.seed, rank, epoch)  # as pretrain.py (its NOTE): resumable at any world size
        order = epoch_order(len(sets["train"]), cfg.seed, epoch)  # the same global order on every rank
        loader = torch.utils.data.DataLoader(sets["train"], batch_size=local_batch_size,
                                             sampler=rank_batches(order, cfg.batch_size, rank, world_size),
                                             drop_last=True, num_workers=cfg.num_workers,
                                             pin_memory=device.type == "cuda")
        # The loss, the correct predictions and the labelled points, summed on the device since the epoch began (in
        # float64, as Python's floats summed them before: a single process logs the same numbers). Read off the device
        # only every --log_every steps and at the end of the epoch: no host sync at the other steps.
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # (loss, correct, labelled)
        last_read_step, started = epoch * steps_per_epoch - 1, time.time()
        bar = tqdm(loader, desc=f"{name} epoch {epoch}", disable=not cfg.progress or not is_main, leave=False)
        for batch_index, batch in enumerate(bar):
            step = epoch * steps_per_epoch + batch_index
            lr = learning_rate(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
            frozen = epoch < cfg.freeze_epochs  # --freeze_epochs: the 3-D path waits
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0) * (0.0 if frozen and group.get("encoder") else 1.0)
            points = batch[0].to(device, non_blocking=True)  # (B, M, 3) all stored points (segmentation: N)
            if segmentation:  # Point-MAE: one scale U[0.8, 1.25] for all axes, then a shift U[-0.1, 0.1] per axis
                points = datasets.scale_and_shift_isotropic(points)  # (B, N, 3)
            else:  # Point-MAE: FPS pool from a random start, a fresh random num_points, then scale-and-translate
                points = datasets.scale_and_translate(training_points(points, cfg.num_points,
                                                                                   cfg.fps_skip_near_origin))  # (B, N, 3)
            target = batch[2 if segmentation else 1].to(device)  # (B, N) parts or (B,) labels
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = (train_model(points, batch[1].to(device)) if segmentation
                          else train_model(points))  # (B, [N,] classes)
            # Plain cross-entropy (Point-MAE); -1 marks clutter points without a part.
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # Point-MAE: 10
            optimizer.step()
            sums += torch.stack([loss.detach().double(), (logits.argmax(dim=-1) == target).sum().double(),
                                 (target >= 0).sum().double()])  # (3,)
            if (batch_index + 1) % cfg.log_every and batch_index + 1 < steps_per_epoch:
                continue
            # --- every --log_every steps and at epoch end: read the sums (over all ranks), check, show ------------
            # Under torchrun every rank reads at the same steps, so all see a non-finite loss at once and stop there.
            # NOTE(unspecified): as in pretrain.py, a non-finite loss is caught up to --log_every steps late and the
            # weights may have taken those steps; nothing is written after it, so the last good checkpoint stays.
            loss_sum, correct, seen = summed_over_ranks(sums, world_size).tolist()  # the one host sync
            loss_sum /= world_size  # the sum over the steps of the global batch's loss
            if not math.isfinite(loss_sum):
                advice = (f"the last good checkpoint {checkpoint_path!r} is untouched: resume with a lower --lr."
                          if epoch > start_epoch or resuming else  # this run has written (or resumed) a checkpoint
                          "no checkpoint of this run was written yet (one is written at the end of every epoch): "
                          "lower --lr and start again.")
                raise FloatingPointError(f"{name} the loss became {loss_sum} at epoch {epoch}, at a step from "
                                         f"{last_read_step + 1} to {step} (the loss is read every --log_every "
                                         f"{cfg.log_every} steps); the weights may have taken up to "
                                         f"{step - last_read_step} steps since, so nothing more is written; {advice}")
            last_read_step = step
            bar.set_postfix(loss=f"{loss_sum / (batch_index + 1):.4f}", lr=f"{lr:.2e}")

        if not is_main:
            continue  # rank 0 tests and writes; the others wait for it at their next step's all-reduce

        # --- end of epoch: test, log line, checkpoint (rank 0) --------------------------------------------------------
        snapshot = rng_state()
        record = {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "lr": lr, "loss": loss_sum / steps_per_epoch,
                  "train_accuracy": 100 * correct / max(seen, 1)}
        test_text = "not tested this epoch"
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:  # the last epoch is always tested
            # NOTE(unspecified): the test pass draws from its own seeded stream (ShapeNetPart resamples its points
            # on every access), so every epoch sees the same test points and testing never shifts the training's
            # stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                metrics = evaluate(model, test_loader, sets, device, use_bf16, cfg.num_points)
            if metrics[main_metric] > best.get(main_metric, -1.0):
                best["epoch"] = epoch
            # NOTE(unspecified): "best" = each metric's maximum over the tested epochs on the test set, as Point-MAE
            # reports (the data sets have no validation split); the final epoch's numbers are reported as "last".
            best.update({key: max(value, best.get(key, -1.0)) for key, value in metrics.items()})
            record.update(metrics)
            record.update({f"best_{key}": value for key, value in best.items()})
            test_text = " ".join(f"{key} {value:.2f}%" for key, value in metrics.items())
            test_text += f" | best {main_metric} {best[main_metric]:.2f}% (epoch {best['epoch'] + 1})"
        record["seconds"] = round(time.time() - started, 2)
        print(f"{name} epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} "
              f"train {record['train_accuracy']:.2f}% | {test_text} | {record['seconds']} s")
        if epoch == start_epoch:  # as pretrain.py: an earlier run's log is replaced only once this run has an epoch
            truncate_log(log_path, start_epoch)
        append_log(log_path, record)
        save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "config": dataclasses.asdict(cfg), "epoch": epoch,
                                          "step": (epoch + 1) * steps_per_epoch, "rng": snapshot, "best": best,
                                          "last": metrics})

    # --- results: best over epochs, last epoch, optional voting -----------------------------------------------------
    result = {"seed": cfg.seed, "fold": cfg.fold, **{f"best_{key}": value for key, value in best.items()},
              **{f"last_{key}": value for key, value in metrics.items()}}
    if not is_main:
        return result  # the metrics are rank 0's
    if cfg.vote and not segmentation:
        # NOTE(unspecified): voting reads the final model (not the best epoch's) with one seeded vote, no
        # best-of-many repetition; it is always reported under the name "voted".
        generator = torch.Generator().manual_seed(cfg.seed)
        voted = evaluate(model, test_loader, sets, device, use_bf16, cfg.num_points, cfg.vote_passes, generator)
        result.update({f"voted_{key}": value for key, value in voted.items()})
        print(f"{name} voted ({cfg.vote_passes} augmented passes): "
              + " ".join(f"{key} {value:.2f}%" for key, value in voted.items()))
    return result


def run_eval(cfg, device, run_dir):
    """--eval_only: test a fine-tuned checkpoint (this project's or Point-MAE's) without training. The test pass is
    the one a fine-tuning run makes after each epoch (same points, same seeded stream), so a run's checkpoint gives
    back the metrics that run logged at its last epoch; classification adds Point-MAE's voting, seeded as a run's."""
    use_bf16 = cfg.amp and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    sets = build_datasets(cfg)
    model = build_model(cfg, sets, whole_model=True).to(device)
    test_loader = torch.utils.data.DataLoader(sets["test"], batch_size=cfg.batch_size, shuffle=False,
                                              num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    with torch.random.fork_rng(devices=[]):  # as run_finetune's test pass
        torch.manual_seed(cfg.seed)
        result = {"seed": cfg.seed, "fold": cfg.fold,
                  **evaluate(model, test_loader, sets, device, use_bf16, cfg.num_points)}
    if cfg.task != "partseg":  # Point-MAE's voting, as run_finetune's --vote
        generator = torch.Generator().manual_seed(cfg.seed)
        voted = evaluate(model, test_loader, sets, device, use_bf16, cfg.num_points, cfg.vote_passes, generator)
        result.update({f"voted_{key}": value for key, value in voted.items()})
    print(f"[{task_label(cfg)} seed {cfg.seed}] {len(sets['test'])} test shapes: "
          + " ".join(f"{key} {value:.2f}%" for key, value in result.items() if key not in ("seed", "fold")))
    with open(os.path.join(run_dir, "eval.json"), "w") as handle:
        json.dump({**result, "checkpoint": cfg.checkpoint}, handle, indent=1)
    return result


def check_same_run(saved, cfg, path):
    """A resumed or read-back run must be the run this command describes; refuse one started with other settings
    (it would be continued, or reported, under this command's header). Fields a checkpoint lacks are not compared."""
    differing = [f"--{name} {saved[name]!r} there, {getattr(cfg, name)!r} here" for name in RUN_SETTINGS
                 if name in saved and saved[name] != getattr(cfg, name)]
    if differing:
        raise ValueError(f"{path!r} was started with other settings than this command: {'; '.join(differing)}. Pass "
                         f"its settings to continue it, --overwrite without --resume to start it again, or another "
                         f"--out_dir.")


# The numeric settings' allowed values (check_config, pretrain.range_checks): name, test of (value, cfg), the allowed
# values in words. The shared schedule (epochs, warm-up, batch, groups, learning rates) is schedule_and_size_checks'.
RANGES = [
    ("num_points", lambda value, cfg: value >= 1, "at least 1"),
    ("synthetic_train_size", lambda value, cfg: value >= 1, "at least 1"),
    ("synthetic_test_size", lambda value, cfg: value >= 1, "at least 1"),
    ("fold", lambda value, cfg: 0 <= value <= 9, "a few-shot episode 0..9 (Point-BERT's 10 folds)"),
    ("folds", lambda value, cfg: value in ("", "all") or all(0 <= fold <= 9 for fold in parse_list(value, "folds")),
     "'all' or comma-separated episodes in 0..9"),
    ("seeds", lambda value, cfg: not value or all(0 <= seed < 2 ** 32 for seed in parse_list(value, "seeds")),
     "comma-separated seeds in [0, 2^32)"),
    ("queries", lambda value, cfg: value >= 1, "at least 1"),
    ("dim", lambda value, cfg: value >= 1, "at least 1"),
    ("depth", lambda value, cfg: value >= 1, "at least 1"),
    ("num_heads", lambda value, cfg: value >= 1 and cfg.dim % value == 0, "a divisor of --dim ({cfg.dim})"),
    ("drop_path", lambda value, cfg: 0 <= value < 1, "a probability in [0, 1)"),
    ("min_lr", lambda value, cfg: value <= cfg.lr, "at most --lr ({cfg.lr})"),
    ("weight_decay", lambda value, cfg: value >= 0, "0 or more"),
    ("grad_clip", lambda value, cfg: value > 0, "positive (the gradient norm is clipped to it at every step)"),
    ("vote_passes", lambda value, cfg: value >= 1, "at least 1"),
    ("fewshot_head_classes", lambda value, cfg: cfg.task != "fewshot" or value >= cfg.way,
     "at least --way ({cfg.way}): the head's classes hold the episode's"),
    ("probe_shots", lambda value, cfg: value >= 1, "at least 1"),
    ("probe_draws", lambda value, cfg: value >= 1, "at least 1"),
    ("seed", lambda value, cfg: 0 <= value < 2 ** 32, "in [0, 2^32) (numpy's seeds)"),
    ("num_workers", lambda value, cfg: value >= 0, "0 or more"),
]


def check_config(cfg):
    """Refuse, before any work, every setting that would fail late or quietly do something else than asked.
    Raises ValueError naming the flag and its value."""
    checks = [
        (cfg.task in TASKS, f"--task must be one of {TASKS}, got {cfg.task!r}."),
        (cfg.task != "scan_objectnn" or cfg.variant in SYNTHETIC_VARIANT,
         f"--variant must be one of {sorted(SYNTHETIC_VARIANT)}, got {cfg.variant!r}."),
        (not cfg.vote or cfg.task in ("scan_objectnn", "modelnet40", "fewshot"),
         f"--vote averages classification logits; it does not apply to --task {cfg.task}."),
        (not cfg.vote or cfg.vote_passes >= 1, f"--vote_passes must be at least 1, got {cfg.vote_passes}."),
        (not cfg.folds or cfg.task == "fewshot", f"--folds selects few-shot episodes; it does not apply to --task "
                                                 f"{cfg.task}."),
        (cfg.eval_every >= 1, f"--eval_every must be at least 1 (test every N epochs), got {cfg.eval_every}."),
        (cfg.log_every >= 1, f"--log_every must be at least 1 (read the loss every N steps), got {cfg.log_every}."),
        (cfg.way >= 1 and cfg.shot >= 1, f"--way and --shot must be at least 1, got {cfg.way} and {cfg.shot}."),
        (not cfg.eval_only or cfg.checkpoint, "--eval_only tests a fine-tuned model: pass it with --checkpoint."),
        (not cfg.eval_only or cfg.task != "svm", "--eval_only tests a fine-tuned model; --task svm trains none "
                                                 "(it already only evaluates --checkpoint)."),
        (not cfg.eval_only or not cfg.resume, "--eval_only trains nothing, so there is nothing to --resume."),
        (not cfg.eval_only or cfg.vote_passes >= 1, f"--vote_passes must be at least 1, got {cfg.vote_passes}."),
    ] + schedule_and_size_checks(cfg) + range_checks(cfg, RANGES)  # schedule, groups vs points, every number
    for passed, message in checks:
        if not passed:
            raise ValueError(message)


def parse_list(text, name):
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"--{name} expects comma-separated integers such as '0,1,2', got {text!r}.") from None


def main(cfg):
    # --- setup: settings, data source, device, the runs (seeds x folds) ---------------------------------------
    check_config(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (cfg.eval_only or cfg.task == "svm"):
        raise ValueError(f"--eval_only and --task svm train nothing, so they run as one process: use python "
                         f"finetune.py, not torchrun with {os.environ['WORLD_SIZE']} processes.")
    cfg = dataclasses.replace(cfg, data=resolve_data(cfg))
    # One process: (0, 1, the --device). Under torchrun: this process's rank, the number of processes, its GPU.
    rank, world_size, device = start_processes(cfg)
    is_main = rank == 0  # rank 0 alone prints and writes
    seeds = parse_list(cfg.seeds, "seeds") if cfg.seeds else [cfg.seed]
    folds = (list(range(10)) if cfg.folds == "all" else parse_list(cfg.folds, "folds")) if cfg.folds else [cfg.fold]
    label_dir = os.path.join(cfg.out_dir, task_label(cfg) + ("_eval" if cfg.eval_only else ""))
    runs = [(seed, fold, os.path.join(label_dir, f"seed{seed}" + (f"_fold{fold}" if cfg.task == "fewshot" else "")))
            for seed in seeds for fold in folds]
    # The label folder (summary.json and every run folder of this command) is held by one command at a time.
    with folder_lock(os.path.join(label_dir, LOCK_NAME), f"run folder {label_dir!r}", enabled=is_main):
        taken = [os.path.join(run_dir, "last.pth") for _, _, run_dir in runs
                 if os.path.isfile(os.path.join(run_dir, "last.pth"))]
        if taken and not cfg.resume and not cfg.overwrite and not cfg.eval_only:
            raise FileExistsError(f"{taken[0]!r} holds an earlier run ({len(taken)} of the {len(runs)} runs of "
                                  f"this command have one); a fresh run would replace its checkpoint and log. Pass "
                                  f"--resume to continue (finished runs are read back), --overwrite to replace them, "
                                  f"or another --out_dir.")
        if is_main:
            print(f"task {task_label(cfg)}, data {cfg.data} ({cfg.data_root or DATA_ROOTS[cfg.task]}), device "
                  f"{device}, bf16 {cfg.amp and device.type == 'cuda'}, {cfg.num_points} points -> {cfg.num_groups} "
                  f"groups of {cfg.group_size}, seeds {seeds}" + (f", folds {folds}" if cfg.task == "fewshot" else "")
                  + f", checkpoint {cfg.checkpoint or 'none (from scratch)'}, output {label_dir}")

        # --- every run, then mean +- std over them ------------------------------------------------------------------
        results = []
        for seed, fold, run_dir in runs:
            if is_main:
                os.makedirs(run_dir, exist_ok=True)
            run_cfg = dataclasses.replace(cfg, seed=seed, fold=fold)
            if cfg.eval_only:
                results.append(run_eval(run_cfg, device, run_dir))
            elif cfg.task == "svm":
                results.append(run_svm(run_cfg, device, run_dir))
            else:
                results.append(run_finetune(run_cfg, device, run_dir, rank, world_size))
        if not is_main:
            return None  # rank 0 reports
        metrics = [key for key in results[0] if key not in ("seed", "fold", "best_epoch")
                   and isinstance(results[0][key], float)]
        summary = {"task": task_label(cfg), "checkpoint": cfg.checkpoint, "eval_only": cfg.eval_only, "runs": results,
                   "num_runs": len(results)}
        for key in metrics:
            values = torch.tensor([result[key] for result in results], dtype=torch.float64)
            # NOTE(unspecified): sample standard deviation (n - 1) over seeds / folds; 0 for a single run.
            std = values.std().item() if len(values) > 1 else 0.0
            summary[key] = {"mean": values.mean().item(), "std": std}
            unit = "" if key.endswith("_C") else " %"
            print(f"{task_label(cfg)} {key}: {values.mean().item():.4g} +- {std:.2g}{unit} over {len(values)} run(s)")
        with open(os.path.join(label_dir, "summary.json"), "w") as handle:
            json.dump(summary, handle, indent=1)
        return summary


if __name__ == "__main__":
    config = build_config(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one copy of the settings
        print(json.dumps(dataclasses.asdict(config)))
    main(config)
    stop_processes()  # leaves the process group main() joined under torchrun
