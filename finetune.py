"""Fine-tuning and the linear probes: the loop of the downstream tasks, paper "Fine-tuning Setup" and Tables 1-3.

This script sets up each task's data and model, then runs the loop: each step resamples a batch (Point-MAE's recipe),
each epoch tests and writes a log line and a checkpoint. The models and measures are in downstream.py, the probes in
linear_probe.py, the plumbing in util/.

    Table 1  --task scan_objectnn --variant obj_bg|obj_only|pb_t50_rs   2048 points, 128 groups, 15 classes
    (extra)  --task modelnet40 [--vote]                                   1024 points,  64 groups, 40 classes
    Table 2  --task fewshot --way 5|10 --shot 10|20 --folds all           ModelNet40 episodes, mean +- std of folds
    Table 3  --task partseg                                               ShapeNetPart, instance and class mIoU
    (extra)  --task svm                                                   linear probes of frozen features

Shapes: B batch, N points, M stored points. Paper -> name: n -> num_groups, p -> group_size, n-way m-shot -> way, shot.

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
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import datasets
import linear_probe
import synthetic
from downstream import (Classifier, PartSegmenter, backbone_arguments, init_head, init_new_parts, test_pass,
                        training_points)
from util.checkpoints import (LOCK_NAME, check_fits, check_log, check_same_run, folder_lock, load_resumable,
                              remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state, stop_if_not_finite,
                              write_log_line)
from util.config import FINETUNE_PRESETS, parse_config, parse_list, range_checks, schedule_and_size_checks
from util.distributed import (data_parallel, rank_loader, seed_generators, seed_rank_generators, start_processes,
                              stop_processes, summed_over_ranks, sync_batchnorm)
from util.optim import epoch_order, learning_rate, make_optimizer, scaled_optimizer, set_learning_rate
from util.weights import load_pretrained

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


# Per-task defaults (Point-MAE's fine-tuning configurations) override the dataclass; a preset (util/config.py)
# overrides these; flags given on the command line override everything.
TASK_DEFAULTS = {
    "scan_objectnn": dict(num_points=2048, num_groups=128),  # Point-MAE: 2048 points, 128 groups
    "modelnet40": dict(),
    "fewshot": dict(epochs=150),  # Point-MAE few-shot: 150 epochs
    "partseg": dict(num_points=2048, num_groups=128, lr=2e-4, batch_size=16),  # Point-MAE segmentation
    "svm": dict(),
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

def build_config(argv=None):
    """Flags -> Config: the task's defaults first, then --preset, then the explicit flags."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--task", default=Config.task)
    task = pre_parser.parse_known_args(argv)[0].task
    if task not in TASKS:
        raise SystemExit(f"--task must be one of {TASKS}, got {task!r}.")
    # presets[--preset] are the defaults, after the task's; "" (no preset): the task's defaults alone.
    return parse_config(Config, argv, {name: {**TASK_DEFAULTS[task], **values}
                                       for name, values in {"": {}, **FINETUNE_PRESETS}.items()})


# ---------------------------------------------------------------------------------------------------------------
# Data: the real readers of datasets.py, or the built-in synthetic shapes of synthetic.py
# ---------------------------------------------------------------------------------------------------------------
# ScanObjectNN variant -> the synthetic variant that imitates it (synthetic.py): none, clutter, clutter + cut/tilt.
SYNTHETIC_VARIANT = {"obj_only": "clean", "obj_bg": "background", "pb_t50_rs": "perturbed"}
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
            train, test = synthetic.synthetic_episode(cfg.way, cfg.shot, cfg.fold, cfg.num_points, cfg.queries)
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
        stored = cfg.num_points * (synthetic.STORED_FACTOR if cfg.task in ("modelnet40", "svm") else 1)
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
# One run: fine-tuning (classification, few-shot, part segmentation) or the linear SVM
# ---------------------------------------------------------------------------------------------------------------
def task_label(cfg):
    """runs/finetune/<label>/seed<s>[_fold<f>]: scan_objectnn_obj_bg, fewshot_5way_10shot, partseg_synthetic, ..."""
    label = cfg.task + (f"_{cfg.variant}" if cfg.task == "scan_objectnn" else "")
    label += f"_{cfg.way}way_{cfg.shot}shot" if cfg.task == "fewshot" else ""
    return label + ("_synthetic" if cfg.data == "synthetic" else "")


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
            init_new_parts(model)  # --trunc_normal_head: a new head gets the from-scratch initialisation
    elif not cfg.checkpoint:
        init_head(model)  # Point-MAE from scratch: truncated normal std 0.02, zero biases
    return model


def run_finetune(cfg, device, run_dir, rank=0, world_size=1):
    """One fine-tuning run (one seed, one few-shot fold), flat: data, model, optimizer, resume, loop. Under torchrun
    (world_size > 1) every rank trains on its share of each global batch (as pretrain.py); rank 0 alone tests, prints
    and writes the log and the checkpoint, and returns the metrics."""
    # --- setup ------------------------------------------------------------------------------------------------
    is_main = rank == 0
    use_bf16 = cfg.amp and device.type == "cuda"  # bf16 needs no loss scaler
    seed_generators(cfg.seed)  # torch, numpy, random; the same on every rank: the same initial head
    checkpoint_path, log_path = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "log.jsonl")
    name = f"[{task_label(cfg)} seed {cfg.seed}" + (f" fold {cfg.fold}]" if cfg.task == "fewshot" else "]")
    if is_main:
        remove_stale_temporaries(checkpoint_path)  # left by a kill during a checkpoint write; last.pth itself is whole
    resuming = cfg.resume and os.path.isfile(checkpoint_path)
    checkpoint = load_resumable(checkpoint_path, "finetune.py", [field.name for field in dataclasses.fields(Config)]
                                ) if resuming else None
    if resuming:
        check_same_run(checkpoint["config"], cfg, RUN_SETTINGS, checkpoint_path)

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
    test_loader = torch.utils.data.DataLoader(sets["test"], batch_size=cfg.batch_size, shuffle=False,
                                              num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    if is_main:
        print(f"{name} {len(sets['train'])} training / {len(sets['test'])} test shapes, {steps_per_epoch} steps/epoch"
              + (f", {world_size} processes of {cfg.batch_size // world_size} shapes a step" if world_size > 1 else ""))

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
    train_model = data_parallel(model, device, world_size)  # DDP under torchrun; `model` itself is tested and saved
    if is_main:
        check_log(log_path, start_epoch)  # a broken log is found now, not after an epoch

    # --- the loop -------------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if world_size > 1:
            seed_rank_generators(cfg.seed, rank, epoch)  # resumable at any world size (its NOTE)
        order = epoch_order(len(sets["train"]), cfg.seed, epoch)  # the same global order on every rank
        loader = rank_loader(sets["train"], order, cfg.batch_size, rank, world_size, cfg.num_workers, device)
        # Summed on the device since the epoch began; read every --log_every steps and at the end of the epoch only.
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # (loss, correct, labelled)
        last_read_step, started = epoch * steps_per_epoch - 1, time.time()
        bar = tqdm(loader, desc=f"{name} epoch {epoch}", disable=not cfg.progress or not is_main, leave=False)
        for batch_index, batch in enumerate(bar):
            step = epoch * steps_per_epoch + batch_index
            lr = learning_rate(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
            set_learning_rate(optimizer, lr, frozen=epoch < cfg.freeze_epochs)  # --freeze_epochs: the 3-D path waits
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
            loss_sum, correct, seen = summed_over_ranks(sums, world_size).tolist()  # the one host sync
            loss_sum /= world_size  # the sum over the steps of the global batch's loss
            stop_if_not_finite({"loss": loss_sum}, epoch, last_read_step + 1, step, cfg.log_every,
                               last_good=checkpoint_path if epoch > start_epoch or resuming else "", run=f"{name} ")
            last_read_step = step
            bar.set_postfix(loss=f"{loss_sum / (batch_index + 1):.4f}", lr=f"{lr:.2e}")

        # --- end of epoch: test, log line, checkpoint (rank 0) --------------------------------------------------------
        if not is_main:
            continue  # rank 0 tests and writes; the others wait for it at their next step's all-reduce
        snapshot = rng_state()
        record = {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "lr": lr, "loss": loss_sum / steps_per_epoch,
                  "train_accuracy": 100 * correct / max(seen, 1)}
        test_text = "not tested this epoch"
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:  # the last epoch is always tested
            metrics = test_pass(model, test_loader, sets, device, use_bf16, cfg.num_points, cfg.seed)  # its NOTE
            if metrics[main_metric] > best.get(main_metric, -1.0):
                best["epoch"] = epoch
            # NOTE(unspecified): "best" = each metric's maximum over the tested epochs on the test set, as Point-MAE
            # reports (the data sets have no validation split); the final epoch's numbers are reported as "last".
            best.update({key: max(value, best.get(key, -1.0)) for key, value in metrics.items()})
            record.update({**metrics, **{f"best_{key}": value for key, value in best.items()}})
            test_text = " ".join(f"{key} {value:.2f}%" for key, value in metrics.items())
            test_text += f" | best {main_metric} {best[main_metric]:.2f}% (epoch {best['epoch'] + 1})"
        record["seconds"] = round(time.time() - started, 2)
        print(f"{name} epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} "
              f"train {record['train_accuracy']:.2f}% | {test_text} | {record['seconds']} s")
        write_log_line(log_path, record, start_epoch)  # the first epoch of a run replaces the lines it redoes
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
        voted = test_pass(model, test_loader, sets, device, use_bf16, cfg.num_points, cfg.seed, cfg.vote_passes)
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
    result = {"seed": cfg.seed, "fold": cfg.fold,  # run_finetune's test pass
              **test_pass(model, test_loader, sets, device, use_bf16, cfg.num_points, cfg.seed)}
    if cfg.task != "partseg":  # Point-MAE's voting, as run_finetune's --vote
        voted = test_pass(model, test_loader, sets, device, use_bf16, cfg.num_points, cfg.seed, cfg.vote_passes)
        result.update({f"voted_{key}": value for key, value in voted.items()})
    print(f"[{task_label(cfg)} seed {cfg.seed}] {len(sets['test'])} test shapes: "
          + " ".join(f"{key} {value:.2f}%" for key, value in result.items() if key not in ("seed", "fold")))
    with open(os.path.join(run_dir, "eval.json"), "w") as handle:
        json.dump({**result, "checkpoint": cfg.checkpoint}, handle, indent=1)
    return result


# The numeric settings' allowed values (check_config, util/config.range_checks): name, test of (value, cfg), the allowed
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
        (not (cfg.vote or cfg.eval_only) or cfg.vote_passes >= 1, f"--vote_passes must be at least 1, got "
                                                                  f"{cfg.vote_passes}."),
        (not cfg.folds or cfg.task == "fewshot", f"--folds selects few-shot episodes; it does not apply to --task "
                                                 f"{cfg.task}."),
        (cfg.eval_every >= 1, f"--eval_every must be at least 1 (test every N epochs), got {cfg.eval_every}."),
        (cfg.log_every >= 1, f"--log_every must be at least 1 (read the loss every N steps), got {cfg.log_every}."),
        (cfg.way >= 1 and cfg.shot >= 1, f"--way and --shot must be at least 1, got {cfg.way} and {cfg.shot}."),
        (not cfg.eval_only or cfg.checkpoint, "--eval_only tests a fine-tuned model: pass it with --checkpoint."),
        (not cfg.eval_only or cfg.task != "svm", "--eval_only tests a fine-tuned model; --task svm trains none "
                                                 "(it already only evaluates --checkpoint)."),
        (not cfg.eval_only or not cfg.resume, "--eval_only trains nothing, so there is nothing to --resume."),
        (int(os.environ.get("WORLD_SIZE", "1")) == 1 or not (cfg.eval_only or cfg.task == "svm"),
         f"--eval_only and --task svm train nothing, so they run as one process: use python finetune.py, not "
         f"torchrun with {os.environ.get('WORLD_SIZE')} processes."),
    ] + schedule_and_size_checks(cfg) + range_checks(cfg, RANGES)  # schedule, groups vs points, every number
    for passed, message in checks:
        if not passed:
            raise ValueError(message)


def main(cfg):
    # --- setup: settings, data source, device, the runs (seeds x folds) ---------------------------------------
    check_config(cfg)
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
            raise FileExistsError(f"{taken[0]!r} holds an earlier run ({len(taken)} of the {len(runs)} runs of this "
                                  f"command have one); a fresh run would replace its checkpoint and log. Pass --resume to "
                                  f"continue (finished runs are read back), --overwrite to replace them, or another "
                                  f"--out_dir.")
        if is_main:
            print(f"task {task_label(cfg)}, data {cfg.data} ({cfg.data_root or DATA_ROOTS[cfg.task]}), device {device}, "
                  f"bf16 {cfg.amp and device.type == 'cuda'}, {cfg.num_points} points -> {cfg.num_groups} groups of "
                  f"{cfg.group_size}, seeds {seeds}" + (f", folds {folds}" if cfg.task == "fewshot" else "")
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
                results.append(linear_probe.run_svm(run_cfg, device, run_dir, build_datasets(run_cfg)))
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
            unitless = key.endswith("_C") or key in ("effective_rank", "participation_ratio", "mean_cosine")
            unit = "" if unitless else " %"
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
