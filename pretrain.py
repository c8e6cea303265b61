"""Pre-training: the loop for any --method (KR-MAE, Point-MAE and the peers), on one GPU, the CPU or torchrun.

Paper section "Pre-training Setup". The model of each method is in the file named after it (kr_mae.py: the KR-MAE
pipeline of Figure 1 and its objective, Eq. 15-16; joint_mae.py, i2p_mae.py, crossalignnet.py); this script reads
the settings, builds the model, and runs: each step draws a batch, the model returns its losses, AdamW steps; each
epoch writes a log line, a checkpoint and a reconstruction picture. The plumbing is in util/ (the flags, the
checkpoint file, the optimizer and schedule, the weights, several processes).

Run:  python pretrain.py --epochs 300                    (paper configuration, ShapeNet55 if on disk)
      python pretrain.py --preset tiny --epochs 2         (a CPU smoke run on the built-in synthetic shapes)
      python pretrain.py --method joint_mae               (a peer method: joint_mae, i2p_mae, crossalignnet, point_mae)
      python pretrain.py --resume runs/pretrain/last.pth  (continue exactly where a run stopped, in that folder)
      python pretrain.py --init_from pretrain.pth         (start from Point-MAE's released encoder and decoder)
      torchrun --nproc_per_node 4 pretrain.py             (4 GPUs, DistributedDataParallel: --batch_size stays the
                                                           global batch, split evenly over the processes)
A fresh run into a folder that holds a last.pth is refused unless --overwrite is given.
Every hyperparameter is a field of `Config` below and a flag: `--lr=5e-4`, `--no-use_2d`, `--masking random`.
In main(), a comment starting `[method]` marks a line that matters for some methods only; the rest is the same
for every --method.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import crossalignnet
import datasets
import i2p_mae
import joint_mae
import kr_mae
import linear_probe
import synthetic
from util import distributed
from util.checkpoints import (LOCK_NAME, check_fits, check_log, folder_lock, load_resumable, remove_stale_temporaries,
                              rng_state, save_checkpoint, set_rng_state, stop_if_not_finite, write_log_line)
from util.config import PRETRAIN_PRESETS, parse_config, range_checks, schedule_and_size_checks
from util.distributed import (data_parallel, rank_loader, seed_generators, seed_rank_generators, start_processes,
                              summed_over_ranks, sync_batchnorm)
from util.optim import epoch_order, learning_rate, make_optimizer, set_learning_rate
from util.weights import cast_frozen_towers, initialise_from, load_trainable_state, trainable_state

# --method -> the file that owns its settings (Settings, DEFAULTS, PAPER_SETTINGS), its checks and its model.
METHODS = {"kr_mae": kr_mae, "point_mae": kr_mae, "joint_mae": joint_mae, "i2p_mae": i2p_mae,
           "crossalignnet": crossalignnet}


@dataclass
class Loop:
    """The loop's own settings: the method, the data, the optimisation and the run."""
    # --- method -----------------------------------------------------------------------------------------------
    method: str = "kr_mae"          # METHODS: kr_mae (this paper), point_mae (= --no-use_2d --masking random),
                                    # joint_mae, i2p_mae, crossalignnet (the files of those names); each file's
                                    # DEFAULTS set its architecture
    matched: bool = False           # every method at Point-MAE's points, mask ratio, batch and schedule (only the
                                    # method differs); without it each method gets its paper's (PAPER_SETTINGS)
    # --- data -----------------------------------------------------------------------------------------------
    data: str = "auto"              # "auto" (ShapeNet55 if data_root exists, else synthetic), "shapenet55", "synthetic"
    data_root: str = "data/ShapeNet55-34"  # Point-BERT's layout, see datasets.py
    num_points: int = 1024          # paper "Pre-training Setup": 1,024 points per object
    augment: bool = True            # Point-MAE's scale-and-translate of every batch (CrossAlignNet: none)
    synthetic_size: int = 4096      # shapes per epoch when training on the built-in synthetic shapes
    # --- optimisation (Point-MAE) ---------------------------------------------------------------------------
    epochs: int = 300               # Point-MAE: 300
    batch_size: int = 128           # Point-MAE: 128
    lr: float = 1e-3                # Point-MAE: AdamW 1e-3
    min_lr: float = 1e-6            # Point-MAE: cosine floor 1e-6
    weight_decay: float = 0.05      # Point-MAE: 0.05
    warmup_epochs: int = 10         # Point-MAE: 10
    grad_clip: float = 0.0          # gradient norm clip, 0: none (Point-MAE clips only when fine-tuning, at 10)
    # --- run --------------------------------------------------------------------------------------------------
    init_from: str = ""             # start from a pre-training checkpoint's 3-D encoder, decoder and reconstruction
                                    # head: an official Point-MAE pretrain.pth or a last.pth of this script
    out_dir: str = "runs/pretrain"
    resume: str = ""                # path of a checkpoint to continue from, in its own folder (unless --out_dir)
    overwrite: bool = False         # start afresh in an out_dir that holds an earlier run's last.pth (else refused)
    seed: int = 0
    device: str = "auto"            # "auto", "cpu", "cuda", "cuda:1", ...
    amp: bool = True                # bf16 autocast on CUDA (ignored on the CPU)
    compile: bool = False           # torch.compile the whole model (forward and backward) for the training step
    compile_mode: str = "default"   # torch.compile's mode: "default", "reduce-overhead" (CUDA graphs) or
                                    # "max-autotune" (CUDA graphs and searched GEMM kernels)
    num_workers: int = 4            # DataLoader workers
    picture_every: int = 10         # write a reconstruction PNG every this many epochs (0: never)
    svm_every: int = 0              # linear probes (linear_probe.py) on synthetic shapes every N epochs (0: never)
    progress: bool = True           # tqdm progress bar
    log_every: int = 50             # read the summed loss terms off the device every N steps and at epoch end (bar,
                                    # non-finite check): no host sync at the other steps; NaN is caught <= N steps late
    preset: str = ""                # "tiny": a model and data small enough for a CPU smoke run in about a minute


@dataclass
class Config(crossalignnet.Settings, i2p_mae.Settings, joint_mae.Settings, kr_mae.Settings, Loop):
    """KR-MAE pre-training (python pretrain.py --help lists every flag with its source)."""
    # The fields, merged: Loop's above, then kr_mae.Settings (the 3-D tokens, 2-D branch, masking and backbone that
    # every method builds on), then each peer's own (joint_*, i2p_*, cal_*), each with its source in its file.


def build_config(argv=None):
    """Flags -> Config: the dataclass defaults, then --method's DEFAULTS (and its PAPER_SETTINGS unless --matched),
    then --preset, then a --resume checkpoint's settings; flags given on the command line win."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--method", default=Config.method)
    pre_parser.add_argument("--matched", action=argparse.BooleanOptionalAction, default=Config.matched)
    known = pre_parser.parse_known_args(argv)[0]
    if known.method not in METHODS:
        raise SystemExit(f"--method must be one of {tuple(METHODS)}, got {known.method!r}.")
    module = METHODS[known.method]
    method = {**module.DEFAULTS[known.method], **({} if known.matched else module.PAPER_SETTINGS.get(known.method, {}))}
    return parse_config(Config, argv, {name: {**method, **values}
                                       for name, values in {"": {}, **PRETRAIN_PRESETS}.items()})


def image_patch_size(cfg):
    """The patch side --image_size must be a multiple of: CLIP's tower (KR-MAE's 2-D branch, I2P-MAE's teacher): 16
    for a random tower (random_tower_spec), the number after the '/' of a ViT name ('ViT-B/16' -> 16, 'ViT-L/14' ->
    14), 1 for a local file (the tower checks it itself); CrossAlignNet: 16; 1 for Joint-MAE (its own check, with
    --joint_patch_size) and for a method without images."""
    if cfg.method == "crossalignnet":
        return 16  # crossalignnet.py's patch_size
    if not (cfg.method == "i2p_mae" or cfg.method == "kr_mae" and cfg.use_2d):
        return 1
    if cfg.clip_random_tower:
        return 16
    name = cfg.clip_model.rsplit("/", 1)[-1].split("@")[0]  # 'ViT-L/14@336px' -> '14'
    return int(name) if "/" in cfg.clip_model and name.isdigit() else 1


# The numeric settings' allowed values (check_config): name, test of (value, cfg), the allowed values in words.
# The settings of the shared schedule (epochs, warm-up, batch, groups, learning rates) are in schedule_and_size_checks.
RANGES = [
    ("num_points", lambda value, cfg: value >= 1, "at least 1"),
    ("synthetic_size", lambda value, cfg: value >= 1, "at least 1"),
    ("num_views", lambda value, cfg: value >= 1, "at least 1"),
    ("image_size", lambda value, cfg: value >= 16 and value % image_patch_size(cfg) == 0,
     lambda cfg: f"at least 16 and a multiple of the image patch size ({image_patch_size(cfg)})"),
    ("masking_heads", lambda value, cfg: value >= 1 and cfg.dim % value == 0, "a divisor of --dim ({cfg.dim})"),
    ("policy_weight", lambda value, cfg: value >= 0, "0 or more"),
    ("dim", lambda value, cfg: value >= 1, "at least 1"),
    ("depth", lambda value, cfg: value >= 1, "at least 1"),
    ("num_heads", lambda value, cfg: value >= 1 and cfg.dim % value == 0, "a divisor of --dim ({cfg.dim})"),
    ("decoder_depth", lambda value, cfg: value >= 1, "at least 1"),
    ("decoder_heads", lambda value, cfg: value >= 1 and cfg.dim % value == 0, "a divisor of --dim ({cfg.dim})"),
    ("drop_path", lambda value, cfg: 0 <= value < 1, "a probability in [0, 1)"),
    ("weight_decay", lambda value, cfg: value >= 0, "0 or more"),
    ("grad_clip", lambda value, cfg: value >= 0, "0 (no clipping) or more"),
    ("min_lr", lambda value, cfg: value <= cfg.lr, "at most --lr ({cfg.lr})"),
    ("joint_weight_3d", lambda value, cfg: value >= 0, "0 or more"),
    ("joint_weight_2d", lambda value, cfg: value >= 0, "0 or more"),
    ("joint_weight_cross", lambda value, cfg: value >= 0, "0 or more"),
    ("i2p_weight_2d", lambda value, cfg: value >= 0, "0 or more"),
    ("cal_image_depth", lambda value, cfg: value >= 1, "at least 1"),
    ("cal_gsa_depth", lambda value, cfg: value >= 1, "at least 1"),
    ("seed", lambda value, cfg: 0 <= value < 2 ** 32, "in [0, 2^32) (numpy's seeds)"),
    ("num_workers", lambda value, cfg: value >= 0, "0 or more"),
    ("picture_every", lambda value, cfg: value >= 0, "0 (never) or more"),
    ("svm_every", lambda value, cfg: value >= 0, "0 (never) or more"),
]


def check_config(cfg):
    """Refuse, before any work, every setting that would fail late or quietly do something else than asked
    (--epochs 0 wrote nothing); each method file checks its own fields. Raises ValueError naming the flag and its
    value (FileNotFoundError for a --data_root that does not exist)."""
    checks = schedule_and_size_checks(cfg) + range_checks(cfg, RANGES) + [
        (cfg.data in ("auto", "shapenet55", "synthetic"),
         f"--data must be 'auto', 'shapenet55' or 'synthetic', got {cfg.data!r}."),
        (cfg.method in METHODS, f"--method must be one of {tuple(METHODS)}, got {cfg.method!r}."),
        (cfg.log_every >= 1, f"--log_every must be at least 1 (read the losses every N steps), got {cfg.log_every}."),
        (not cfg.init_from or cfg.method in ("kr_mae", "point_mae"),
         f"--init_from loads Point-MAE's encoder and decoder into --method kr_mae or point_mae; --method "
         f"{cfg.method} has another decoder."),
    ]
    checks += kr_mae.check(cfg)  # the backbone, 2-D branch and masking fields, which every method builds on
    if METHODS.get(cfg.method, kr_mae) is not kr_mae:
        checks += METHODS[cfg.method].check(cfg)  # the peer's own fields
    for passed, message in checks:
        if not passed:
            raise ValueError(message)
    # A data_root other than the default is a request for real data: a mistyped one must not train on the synthetic
    # shapes instead (the default folder, when absent, falls back to them, announced by build_dataset).
    if cfg.data == "auto" and cfg.data_root != Config.data_root and not os.path.isdir(cfg.data_root):
        raise FileNotFoundError(f"--data_root {cfg.data_root!r} does not exist. Expected ShapeNet55 in Point-BERT's "
                                f"layout: {datasets.SHAPENET55_LAYOUT} Leave --data_root out (or pass --data "
                                f"synthetic) to pre-train on the built-in synthetic shapes.")


def build_model(cfg):
    """--method -> its pre-training model (its file's build). Each one has the 3-D path finetune.py keeps
    (tokenizer_3d, encoder_pos, encoder, under these names) and returns a dict with `loss`, each of its terms as
    `loss_*` (all logged), and what the reconstruction picture reads (centers, neighborhoods, visible_index,
    masked_index, predicted)."""
    return METHODS[cfg.method].build(cfg)


def build_dataset(cfg):
    """ShapeNet55 when it is on disk (or asked for), else the built-in synthetic shapes, announced loudly."""
    if cfg.data == "shapenet55" or (cfg.data == "auto" and os.path.isdir(cfg.data_root)):
        return datasets.ShapeNet55(cfg.data_root, split="train", num_points=cfg.num_points)
    print("=" * 100 + f"\nNo ShapeNet55 at {cfg.data_root!r}: pre-training on the BUILT-IN SYNTHETIC SHAPES "
          f"({cfg.synthetic_size} per epoch). Pass --data_root for real data.\n" + "=" * 100)
    return synthetic.SyntheticShapes(split="train", num_points=cfg.num_points, size=cfg.synthetic_size, seed=cfg.seed)


def compile_model(model, cfg):
    """What the training step calls: the model itself, or with --compile the whole model through torch.compile, whose
    forward graph (one graph, no breaks, for every method) and the backward built from it are compiled together.
    The optimizer stays outside (fused on CUDA). The weights are shared, so checkpoints, pictures and probes go on
    using `model` itself (its state-dict names carry no `_orig_mod.` prefix)."""
    if not cfg.compile:
        return model
    return torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def synthetic_probes(model, cfg, device, use_bf16, train_size=512, test_size=256):
    """A progress signal during pre-training: the linear probes of linear_probe.py (cross-validated SVM, literature
    SVM, 1-NN) on the frozen 3-D features of fixed clean synthetic shapes (512 train / 256 test, seeded by
    cfg.seed). The model's train/eval mode is restored afterwards (extract_features does it)."""
    train, test = (synthetic.SyntheticShapes(split, cfg.num_points, size=size, seed=cfg.seed)
                   for split, size in (("train", train_size), ("test", test_size)))
    features = linear_probe.features_for_probes(model, train, test, min(cfg.batch_size, 128), device, use_bf16)
    probes = linear_probe.probe_all(*features, seed=cfg.seed)
    return {"svm_accuracy": probes["cross_validated"]["test_accuracy"], "svm_C": probes["cross_validated"]["C"],
            "literature_svm_accuracy": probes["literature"]["test_accuracy"],
            "nearest_neighbour_accuracy": probes["nearest_neighbour"]}


# ---------------------------------------------------------------------------------------------------------------
# The reconstruction picture
# ---------------------------------------------------------------------------------------------------------------
def draw_clouds(panels, path, size=256):
    """Draw a row of point clouds (title, points (M, 3) numpy, colour) side by side, seen from a fixed oblique view."""
    from PIL import Image, ImageDraw

    angle_y, angle_x = math.radians(35), math.radians(-25)
    rotate_y = np.array([[math.cos(angle_y), 0, math.sin(angle_y)], [0, 1, 0], [-math.sin(angle_y), 0, math.cos(angle_y)]])
    rotate_x = np.array([[1, 0, 0], [0, math.cos(angle_x), -math.sin(angle_x)], [0, math.sin(angle_x), math.cos(angle_x)]])
    image = Image.new("RGB", (size * len(panels), size + 20), "white")
    pen = ImageDraw.Draw(image)
    for column, (title, layers) in enumerate(panels):
        pen.text((column * size + 6, 4), title, fill="black")
        for points, colour in layers:
            seen = points @ (rotate_x @ rotate_y).T  # (M, 3)
            for x, y in seen[:, :2]:
                u, v = column * size + size / 2 + x * size * 0.4, 20 + size / 2 - y * size * 0.4
                pen.rectangle([u - 1, v - 1, u + 1, v + 1], fill=colour)
    image.save(path)


def reconstruction_picture(model, points, path):
    """Input cloud, the visible groups, and visible groups + predicted masked groups, for the first shape."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(points[:1])
    model.train(was_training)
    centers, neighborhoods = out["centers"][0], out["neighborhoods"][0]  # (G, 3), (G, K, 3)
    visible = (neighborhoods[out["visible_index"][0]] + centers[out["visible_index"][0], None]).reshape(-1, 3)
    predicted = (out["predicted"][0].float() + centers[out["masked_index"][0], None]).reshape(-1, 3)
    visible, predicted = visible.cpu().numpy(), predicted.cpu().numpy()
    draw_clouds([("input", [(points[0].cpu().numpy(), (40, 40, 40))]),
                 ("visible groups", [(visible, (30, 90, 200))]),
                 ("visible + reconstructed", [(visible, (30, 90, 200)), (predicted, (220, 60, 30))])], path)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def main(cfg):
    """Check the settings, start the processes, then train holding the run folder's lock (rank 0 holds it)."""
    check_config(cfg)
    # One process: (0, 1, the --device). Under torchrun: this process's rank, the number of processes, its GPU.
    rank, world_size, device = start_processes(cfg)
    with folder_lock(os.path.join(cfg.out_dir, LOCK_NAME), f"run folder {cfg.out_dir!r}", enabled=rank == 0):
        return train(cfg, rank, world_size, device)


def train(cfg, rank, world_size, device):
    # --- setup: output folder, device, precision, seeds -------------------------------------------------------------
    is_main = rank == 0  # rank 0 alone prints, and writes the log, the pictures and the checkpoint
    checkpoint_path = os.path.join(cfg.out_dir, "last.pth")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if not cfg.resume and not cfg.overwrite and os.path.isfile(checkpoint_path):
        raise FileExistsError(f"{cfg.out_dir!r} holds an earlier run ({checkpoint_path!r}); a fresh run would replace "
                              f"its checkpoint and log. Pass --resume {checkpoint_path} to continue it, --overwrite to "
                              f"replace it, or another --out_dir.")
    if is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        remove_stale_temporaries(checkpoint_path)  # left by a kill during a checkpoint write; last.pth itself is whole
    use_bf16 = cfg.amp and device.type == "cuda"  # bf16 needs no loss scaler
    seed_generators(cfg.seed)  # torch, numpy, random; the same on every rank: the same initial weights

    # --- data ---------------------------------------------------------------------------------------------------
    dataset = build_dataset(cfg)
    steps_per_epoch = len(dataset) // cfg.batch_size  # drop the last partial batch, as Point-MAE
    if steps_per_epoch == 0:
        raise ValueError(f"The dataset has {len(dataset)} shapes, fewer than one batch of {cfg.batch_size}.")
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if is_main:
        print(f"device {device}, bf16 {use_bf16}, {len(dataset)} shapes, {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps, {num_visible_text(cfg)}"
              + (f", {world_size} processes of {cfg.batch_size // world_size} shapes a step" if world_size > 1 else ""))

    # --- model and optimizer --------------------------------------------------------------------------------------
    model = build_model(cfg)  # the --method's file builds it
    if world_size > 1:
        model = sync_batchnorm(model, device)  # BatchNorm statistics over the global batch, as one process
    model = model.to(device)
    if is_main:
        print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M")
    if cfg.init_from and not cfg.resume:  # [method] kr_mae, point_mae: Point-MAE's encoder, decoder and head
        initialise_from(model, cfg.init_from)  # (a resumed run already holds what it loaded at its start)
    if use_bf16:  # [method] kr_mae, i2p_mae: their frozen CLIP towers stored in bf16 once
        cast_frozen_towers(model, torch.bfloat16)
    optimizer = make_optimizer(model, cfg, device)  # Point-MAE's AdamW; fused on CUDA

    # Two fixed shapes for the reconstruction picture (drawn before resuming: reading may use the RNG).
    picture_points = torch.stack([dataset[i][0] for i in range(2)]).to(device)  # (2, N, 3), fixed shapes
    if is_main:
        print(f"method {cfg.method} ({'matched settings' if cfg.matched else 'its paper settings'}): "
              f"{cfg.num_points} points, mask ratio {cfg.mask_ratio}, batch {cfg.batch_size}")

    # --- resume ---------------------------------------------------------------------------------------------------
    start_epoch = 0
    if cfg.resume:
        checkpoint = load_resumable(cfg.resume, "pretrain.py")
        changed = {name: (value, getattr(cfg, name)) for name, value in checkpoint["config"].items()
                   if name not in ("resume", "progress", "overwrite") and getattr(cfg, name, None) != value}
        check_fits(trainable_state(model), checkpoint["model"], cfg.resume, changed, "A resumed run continues the "
                   f"model it saved: leave those flags out, or start a new run from its weights with --init_from.")
        load_trainable_state(model, checkpoint["model"])  # the un-wrapped model's names, whatever the world size
        optimizer.load_state_dict(checkpoint["optimizer"])
        if world_size == 1:  # several ranks re-derive their generators at every epoch start (below)
            set_rng_state(checkpoint["rng"])
        start_epoch = checkpoint["epoch"] + 1
        if is_main:
            print(f"resumed from {cfg.resume} at epoch {start_epoch}"
                  + (f"; settings changed since: {changed}" if changed else ""))
    # The step runs through DDP under torchrun (util/distributed.py); `model` itself serves everything else.
    train_model = data_parallel(model, device, world_size, only_the_loss=True)
    train_model = compile_model(train_model, cfg)  # --compile: after DDP, which then splits the graph at its buckets
    if is_main:
        check_log(log_path, start_epoch)  # a broken log is found now, not after an epoch

    # --- the loop -------------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if world_size > 1:
            seed_rank_generators(cfg.seed, rank, epoch)  # resumable at any world size (its NOTE)
        order = epoch_order(len(dataset), cfg.seed, epoch)  # the same global order on every rank
        loader = rank_loader(dataset, order, cfg.batch_size, rank, world_size, cfg.num_workers, device)
        # Every scalar the model returns (loss terms, statistics), summed on the device since the epoch began, in
        # float64. Read off the device only every --log_every steps and at the end of the epoch: no host sync at
        # the other steps.
        sums, names, last_read_step, started = None, [], epoch * steps_per_epoch - 1, time.time()
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not cfg.progress or not is_main, leave=False)
        for batch_index, batch in enumerate(bar):
            step = epoch * steps_per_epoch + batch_index
            lr = learning_rate(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
            set_learning_rate(optimizer, lr)
            points = batch[0].to(device, non_blocking=True)  # (B, N, 3), B = this rank's share of --batch_size
            if cfg.augment:  # Point-MAE: a random scale and translation per shape and axis
                points = datasets.scale_and_translate(points)  # (B, N, 3)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = train_model(points)  # the --method's losses: loss, loss_rec, loss_policy, loss_2d, ...
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()  # under DDP: the gradients averaged over the ranks = those of the global batch
            if cfg.grad_clip > 0:  # off by default: Point-MAE's pre-training does not clip
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if not torch.isfinite(grad_norm):  # a host sync per step, only with --grad_clip: skips a bad update
                    raise FloatingPointError(f"Non-finite gradient norm at epoch {epoch}, step {step}; weights not "
                                             f"updated.")
            optimizer.step()
            # Every scalar the model returns: loss, its terms loss_rec, loss_policy, loss_2d, ..., and statistics such
            # as I2P-MAE's masking_entropy.
            names = [name for name, value in out.items() if torch.is_tensor(value) and value.ndim == 0]
            terms = torch.stack([out[name].detach().float() for name in names]).double()  # (T,)
            sums = terms if sums is None else sums + terms  # (T,)
            if (batch_index + 1) % cfg.log_every and batch_index + 1 < steps_per_epoch:
                continue
            # --- every --log_every steps and at epoch end: read the sums (over all ranks), check, show ------------
            totals = dict(zip(names, summed_over_ranks(sums, world_size).tolist()))  # the one host sync
            stop_if_not_finite(totals, epoch, last_read_step + 1, step, cfg.log_every,
                               last_good=checkpoint_path if epoch > start_epoch else cfg.resume)
            bar.set_postfix(**{name.replace("loss_", ""): f"{value / (batch_index + 1) / world_size:.4f}"
                               for name, value in totals.items()}, lr=f"{lr:.2e}")  # the epoch's means so far
            last_read_step = step

        # --- end of epoch: log line, checkpoint, picture, optional SVM (rank 0) -----------------------------------
        record = {"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "lr": lr,  # means over steps and ranks
                  **{name: value / steps_per_epoch / world_size for name, value in totals.items()},
                  "seconds": round(time.time() - started, 2)}
        if not is_main:
            continue  # the other ranks go on to the next epoch; their first all-reduce there waits for rank 0
        snapshot = rng_state()  # the probes and the picture below must not change the training's random stream
        if cfg.svm_every and (epoch + 1) % cfg.svm_every == 0:
            record.update(synthetic_probes(model, cfg, device, use_bf16))  # accuracies in %, as finetune.py
        if cfg.picture_every and ((epoch + 1) % cfg.picture_every == 0 or epoch + 1 == cfg.epochs):
            reconstruction_picture(model, picture_points, os.path.join(cfg.out_dir, f"reconstruction_{epoch:03d}.png"))
        set_rng_state(snapshot)
        print(json.dumps(record))
        write_log_line(log_path, record, start_epoch)  # the first epoch of a run replaces the lines it redoes
        save_checkpoint(checkpoint_path, {"model": trainable_state(model), "optimizer": optimizer.state_dict(),
                                          "config": dataclasses.asdict(cfg), "epoch": epoch,
                                          "step": (epoch + 1) * steps_per_epoch, "rng": snapshot})
    return model


def num_visible_text(cfg):
    num_masked = int(cfg.mask_ratio * cfg.num_groups)
    return f"{cfg.num_groups} groups: {cfg.num_groups - num_masked} visible, {num_masked} masked"


if __name__ == "__main__":
    config = build_config(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one copy of the settings
        print(json.dumps(dataclasses.asdict(config)))
    main(config)
    distributed.stop_processes()  # leaves the process group main() joined under torchrun
