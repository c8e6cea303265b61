"""KR-MAE pre-training: the whole pipeline and its training objective.

Paper sections "Training Objective" (Eq. 15-16) and "Pre-training Setup"; this file composes every stage module:

    points --render.py (Eq. 1)--> v depth images --tokenizer.py (Eq. 2)--> 2-D patch tokens  E_2D  (B, V, P, D)
    points --tokenizer.py (Eq. 3)--> 3-D group tokens E_3D (B, G, D), centres (B, G, 3)
    rvs.py (Eq. 4-6): keep the k most reliable views                                   (B, S, P, D)
    masking.py (Eq. 7): sample the visible 3-D tokens; PMA: the patch under each visible centre  (B, S, Gv, D)
    kat.py (Eq. 9-14): encoder over the visible tokens, fused with their aligned 2-D tokens     (B, Gv, D)
    Eq. (15): P_pred = Rec(ST(T_3D^vis))   a Point-MAE decoder (mask tokens) and a Linear head  (B, Gm, K, 3)
    Eq. (16): L_R = squared-L2 Chamfer distance between each predicted and true masked group
    Eq. (8):  L_S = policy loss of the Reinforced Masking;   L_total = L_R + lambda * L_S

Paper symbol -> name here:  v -> num_views, k -> num_selected_views, n -> num_groups, p -> group_size,
d^E -> dim, rho -> mask_ratio, lambda -> policy_weight, H = W -> image_size.

Run:  python pretrain.py --epochs 300                    (paper configuration, ShapeNet55 if on disk)
      python pretrain.py --preset tiny --epochs 2         (a CPU smoke run on the built-in synthetic shapes)
      python pretrain.py --resume runs/pretrain/last.pth  (continue exactly where a run stopped, in that folder)
      python pretrain.py --init_from pretrain.pth         (start from Point-MAE's released encoder and decoder)
      torchrun --nproc_per_node 4 pretrain.py             (4 GPUs, DistributedDataParallel: --batch_size stays the
                                                           global batch, split evenly over the processes)
A fresh run into a folder that holds a last.pth is refused unless --overwrite is given.
Every hyperparameter is a field of `Config` below and a flag: `--lr=5e-4`, `--no-use_2d`, `--masking random`.
"""
import argparse
import dataclasses
import inspect
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
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import datasets
import linear_probe
import point_mae_checkpoints
import synthetic
from checkpoints import (LOCK_NAME, append_log, check_fits, check_log, folder_lock, load_checkpoint, load_resumable,
                         remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state, truncate_log)
from crossalignnet import CrossAlignNet
import distributed
from distributed import (OnlyTheLossBackward, rank_batches, seed_rank_generators, start_processes, summed_over_ranks,
                         sync_batchnorm)
from i2p_mae import I2PMAE, guided_masking, normalised_entropy
from joint_mae import JointMAE
from kat import FUSIONS, KATransformer
from masking import ReinforcedMasking, align_patches, gather_tokens, random_masking, reinforce_loss
from render import MultiViewRenderer, pixels_to_patches
from rvs import ReliableViewSelector
import tokenizer
from tokenizer import CenterEmbedding, ImagePatchTokenizer, PointTokenizer


@dataclass
class Config:
    """KR-MAE pre-training (python pretrain.py --help lists every flag with its source)."""
    # --- method -----------------------------------------------------------------------------------------------
    method: str = "kr_mae"          # METHODS: kr_mae (this paper), point_mae (= --no-use_2d --masking random),
                                    # joint_mae, i2p_mae, crossalignnet (the files of those names); METHOD_DEFAULTS
                                    # sets each one's architecture
    matched: bool = False           # every method at Point-MAE's points, mask ratio, batch and schedule (only the
                                    # method differs); without it each method gets its paper's (PAPER_SETTINGS)
    # --- data -----------------------------------------------------------------------------------------------
    data: str = "auto"              # "auto" (ShapeNet55 if data_root exists, else synthetic), "shapenet55", "synthetic"
    data_root: str = "data/ShapeNet55-34"  # Point-BERT's layout, see datasets.py
    num_points: int = 1024          # paper "Pre-training Setup": 1,024 points per object
    augment: bool = True            # Point-MAE's scale-and-translate of every batch (CrossAlignNet: none)
    synthetic_size: int = 4096      # shapes per epoch when training on the built-in synthetic shapes
    # --- 3-D tokens (Eq. 3) -----------------------------------------------------------------------------------
    num_groups: int = 64            # n; Point-MAE: 64
    group_size: int = 32            # p; Point-MAE: 32
    fps_skip_near_origin: bool = False  # FPS never picks points within 1e-3 (squared) of the origin, as Point-MAE's
                                        # CUDA kernel: for exact parity with its checkpoints (tokenizer.py)
    # --- 2-D branch (Eq. 1, 2, 4-6) ---------------------------------------------------------------------------
    use_2d: bool = True             # False: no images at all = Point-MAE (Table 4, row A)
    num_views: int = 10             # v; PointCLIP V2's 10 views
    num_selected_views: int = 3     # k; paper Table 4: best at 3
    use_rvs: bool = True            # False: k views drawn at random per shape (Table 4, row B)
    image_size: int = 112           # paper "Pre-training Setup": 112 x 112 (joint_mae: 224, its depth map)
    clip_model: str = "ViT-B/16"    # CLIP name (downloaded when online) or a local checkpoint path
    clip_random_tower: str = ""     # "width,layers,heads": a randomly initialised tower instead (tests, CPU)
    fusion: str = "aligned"         # kat.FUSIONS; paper Table 6: aligned (ours), cross, joint (self-attn), mlp
    # --- masking (Eq. 7-8) --------------------------------------------------------------------------------------
    masking: str = "reinforced"     # "reinforced" (RM), "random" (Point-MAE), "saliency" (I2P-MAE's 2D-guided
                                    # masking from KR-MAE's own views and tower; --i2p_saliency_temperature)
    mask_ratio: float = 0.6         # rho; Point-MAE: 0.6
    masking_heads: int = 6          # heads of RM's lightweight attention
    policy_weight: float = 1e-4     # lambda; NOTE(unspecified): the paper gives no value; AdaMAE uses 1e-4
    # --- backbone (Point-MAE) ---------------------------------------------------------------------------------
    dim: int = 384                  # d^E; Point-MAE: 384
    depth: int = 12                 # encoder blocks; Point-MAE: 12
    num_heads: int = 6              # Point-MAE: 6
    decoder_depth: int = 4          # Point-MAE: 4 (joint_mae: its modal-shared decoder, 2 blocks)
    decoder_heads: int = 6          # Point-MAE: 6
    drop_path: float = 0.1          # Point-MAE: stochastic depth 0 -> 0.1
    # --- optimisation (Point-MAE) ---------------------------------------------------------------------------
    epochs: int = 300               # Point-MAE: 300
    batch_size: int = 128           # Point-MAE: 128
    lr: float = 1e-3                # Point-MAE: AdamW 1e-3
    min_lr: float = 1e-6            # Point-MAE: cosine floor 1e-6
    weight_decay: float = 0.05      # Point-MAE: 0.05
    warmup_epochs: int = 10         # Point-MAE: 10
    grad_clip: float = 0.0          # gradient norm clip, 0: none (Point-MAE clips only when fine-tuning, at 10)
    # --- Joint-MAE (--method joint_mae; joint_mae.py; Guo et al., IJCAI 2023) ------------------------------------
    joint_mask_ratio_2d: float = 0.75   # Joint-MAE sec. 3: random masking of both modalities, "e.g., 75 %"
    joint_patch_size: int = 16      # Joint-MAE Eq. (2): the 2-D tokens downsample 1/16 (224 -> 14 x 14)
    joint_projection: str = "perspective"  # Eq. (1): PointCLIP's perspective depth map; "realistic": render.py
    joint_local_3d_to_2d: bool = True   # Table 6: local-aligned attention from 3-D queries to 2-D keys (False: global)
    joint_local_2d_to_3d: bool = True   # Table 6: local-aligned attention from 2-D queries to 3-D keys (False: global)
    joint_modality_3d: bool = True  # sec. 3.2: a learnable 3-D modality token M_3D (False: M_3D = 0, M_2D only)
    joint_cross_views: int = 4      # Table 8: views of the cross-reconstruction loss L_3D-2D (4); 0 drops the term
    joint_weight_3d: float = 1.0    # Eq. (7): L = L_2D + L_3D + L_3D-2D, weights 1 : 1 : 1
    joint_weight_2d: float = 1.0    # Eq. (7)
    joint_weight_cross: float = 1.0  # Eq. (7)
    # --- I2P-MAE (--method i2p_mae; i2p_mae.py; Zhang et al., CVPR 2023, official code) ----------------------------
    i2p_guided: bool = True         # 2D-guided masking (mask_2D_guided); False: random (supplement Table 1)
    i2p_saliency_temperature: float = 1.0  # softmax temperature of the saliency (official: 1, none)
    i2p_target_points: int = 8      # 2-D targets per visible token: its nearest points (official: 8 per token)
    i2p_weight_2d: float = 1.0      # loss = L_3D + L_2D (official runner: 1 : 1)
    i2p_projection: str = "orthographic"  # official proj2img (3 axis views, 5x5 sum splat); "realistic": render.py
    # --- CrossAlignNet (--method crossalignnet; crossalignnet.py; Wang et al., PeerJ CS 2025) -----------------------
    cal_image_masking: str = "complementary"  # Table 7: complementary (best), correspondence, random
    cal_gsa_weight: float = 1e-4    # lambda of Eq. (12), L = L_LMR + lambda L_GSA (Table 8 best)
    cal_contrast: str = "infonce"   # Eq. (7)-(8): symmetric cross-modal InfoNCE; "ntxent": SimCLR NT-Xent
    cal_temperature: float = 0.1    # tau of the contrastive loss (NOTE(unspecified): 0.1, as Inter-MAE)
    cal_image_depth: int = 12       # the from-scratch image transformer (inferred from Table 9's 57.69 M)
    cal_gsa_depth: int = 2          # the global semantic alignment decoder ("fewer blocks"; inferred)
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


# A preset overrides the paper defaults; flags given on the command line override the preset.
PRESETS = {
    "tiny": dict(num_points=512, synthetic_size=512, num_groups=32, group_size=16, num_views=6,
                 num_selected_views=2, image_size=64, clip_random_tower="64,2,2", masking_heads=2, dim=96,
                 depth=4, num_heads=4, decoder_depth=2, decoder_heads=4, batch_size=16, lr=1e-3, warmup_epochs=1,
                 num_workers=0, picture_every=1, cal_image_depth=4),  # CrossAlignNet's image encoder as the 3-D one
}
METHODS = ("kr_mae", "point_mae", "joint_mae", "i2p_mae", "crossalignnet")
MASKINGS = ("reinforced", "random", "saliency")  # --masking of kr_mae
# What --method sets before --preset and the flags: the parts of its architecture that differ from KR-MAE's fields.
METHOD_DEFAULTS = {
    "kr_mae": {},
    "point_mae": dict(use_2d=False, masking="random"),  # Table 4 row A: Point-MAE on this backbone
    "joint_mae": dict(image_size=224, decoder_depth=2),  # Joint-MAE sec. 4.1: 224 x 224; 2-block shared decoder
    "i2p_mae": dict(image_size=224),  # I2P-MAE: CLIP ViT-B/16 at 224 x 224 (14 x 14 patches)
    "crossalignnet": dict(image_size=224),  # CrossAlignNet: 224 x 224 images, 16 x 16 patches
}
# Each paper's own data settings, unless --matched (then Point-MAE's: 1,024 points, mask ratio 0.6, batch 128,
# 300 epochs, for every method). KR-MAE and Point-MAE use Point-MAE's.
PAPER_SETTINGS = {
    "joint_mae": dict(num_points=2048, mask_ratio=0.75),  # Joint-MAE sec. 4.1: 2,048 points; sec. 3.1: 75 %
    "i2p_mae": dict(num_points=2048, mask_ratio=0.8, batch_size=64),  # official config: 2,048 points, 0.8, 64
    "crossalignnet": dict(num_points=2048, augment=False),  # "Training": 2,048 points, no augmentation
}


def build_config(argv=None):
    """Flags -> Config: the dataclass defaults, then --method's METHOD_DEFAULTS (and its PAPER_SETTINGS unless
    --matched), then --preset, then a --resume checkpoint's settings; flags given on the command line win."""
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--method", default=Config.method)
    pre_parser.add_argument("--matched", action=argparse.BooleanOptionalAction, default=Config.matched)
    known = pre_parser.parse_known_args(argv)[0]
    if known.method not in METHODS:
        raise SystemExit(f"--method must be one of {METHODS}, got {known.method!r}.")
    method = {**METHOD_DEFAULTS[known.method], **({} if known.matched else PAPER_SETTINGS.get(known.method, {}))}
    return parse_config(Config, argv, {name: {**method, **values} for name, values in {"": {}, **PRESETS}.items()})


def parse_config(config_class, argv=None, presets=PRESETS):
    """Turn a dataclass into argparse flags (`--lr 5e-4`, `--lr=5e-4`, `--no-use_2d`), with each field's source comment
    as its help. Defaults come from the dataclass, then `--preset`, then (pretrain.py) the checkpoint of `--resume`;
    flags given on the command line win over all three."""
    comments, field_name = {}, None  # field name -> the comment after it in the dataclass, shown by --help
    for line in inspect.getsource(config_class).splitlines():
        code, _, comment = line.partition("#")
        if ":" in code and "=" in code:
            field_name = code.split(":")[0].strip()
            comments[field_name] = comment.strip().replace("%", "%%")
        elif field_name and not code.strip() and len(line) - len(line.lstrip()) > 4:  # an indented continuation
            comments[field_name] += " " + comment.strip().replace("%", "%%")
        else:
            field_name = None  # a section header or anything else ends the field's comment
    parser = argparse.ArgumentParser(description=(config_class.__doc__ or "").split("\n")[0])
    for field in dataclasses.fields(config_class):
        help_text = f"{comments.get(field.name, '')} (default: %(default)s)"
        if field.type in (bool, "bool"):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=field.default,
                                help=help_text)
        else:
            field_type = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            parser.add_argument(f"--{field.name}", type=field_type, default=field.default, help=help_text)
    known = parser.parse_known_args(argv)[0]
    if known.preset and known.preset not in presets:
        parser.error(f"unknown preset {known.preset!r}; expected one of {sorted(name for name in presets if name)}")
    parser.set_defaults(**presets.get(known.preset, {}))  # the preset replaces defaults; explicit flags still win
    resume = getattr(known, "resume", "")
    if isinstance(resume, str) and resume:
        # Continue with the run's own settings, so `--resume path` alone is enough; explicit flags still win.
        explicit = {arg.split("=")[0][2:].removeprefix("no-") for arg in (sys.argv[1:] if argv is None else argv)
                    if arg.startswith("--")}  # the settings given on the command line
        saved = load_resumable(resume, "pretrain.py", [field.name for field in dataclasses.fields(config_class)],
                               explicit)["config"]
        parser.set_defaults(**{name: value for name, value in saved.items() if name not in ("resume", "overwrite")})
        # The run continues in the checkpoint's folder, not in the out_dir its config recorded: a copied or moved
        # run folder then never writes into the original. An explicit --out_dir still wins.
        parser.set_defaults(out_dir=os.path.dirname(resume) or ".")
    return config_class(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------------------------
# Eq. (16): the squared-L2 Chamfer distance, one value per group
# ---------------------------------------------------------------------------------------------------------------
def chamfer_distance(predicted, target):
    """Eq. (16) for every group at once: predicted (M, K, 3), target (M, K', 3) -> (M,).

    mean over predicted points of the squared distance to the nearest target point, plus the same the other way.
    Point-MAE's L_R is the mean of this over all masked groups of the batch.
    """
    squared = torch.cdist(predicted.float(), target.float()).pow(2)  # (M, K, K')
    return squared.min(dim=2).values.mean(dim=1) + squared.min(dim=1).values.mean(dim=1)  # (M,)  Eq. (16)


# ---------------------------------------------------------------------------------------------------------------
# The model: every stage module, composed
# ---------------------------------------------------------------------------------------------------------------
def random_tower_spec(text):
    """'64,2,2' -> dict(width=64, layers=2, heads=2, patch_size=16) for ImagePatchTokenizer, '' -> None."""
    if not text:
        return None
    try:
        width, layers, heads = (int(value) for value in text.split(","))
    except ValueError:
        raise ValueError(f"--clip_random_tower expects 'width,layers,heads' such as '768,12,12', got {text!r}.")
    return dict(width=width, layers=layers, heads=heads, patch_size=16)


class KRMAE(nn.Module):
    """KR-MAE pre-training model (paper Figure 1). The 3-D path (`tokenizer_3d`, `encoder_pos`, `encoder`) is what
    fine-tuning keeps; everything else is used only during pre-training."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        # Eq. (3): FPS + KNN + mini-PointNet, and the encoder's centre position embedding.
        self.tokenizer_3d = PointTokenizer(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=dim,
                                           skip_near_origin=cfg.fps_skip_near_origin)
        self.encoder_pos = CenterEmbedding(dim=dim)
        # Eq. (9)-(14): the KAT encoder; without 2-D tokens it is exactly Point-MAE's encoder.
        self.encoder = KATransformer(dim=dim, depth=cfg.depth, num_heads=cfg.num_heads,
                                     drop_path_rate=cfg.drop_path, fusion=cfg.fusion)
        if cfg.use_2d:
            # Eq. (1): PointCLIP V2 rendering. NOTE(unspecified): the voxel grid has the output's size (112).
            self.renderer = MultiViewRenderer(num_views=cfg.num_views, image_size=cfg.image_size,
                                              grid_size=cfg.image_size)
            # Eq. (2): frozen CLIP ViT patch tokens -> Linear to d^E + learnable 2-D positions.
            self.tokenizer_2d = ImagePatchTokenizer(dim=dim, image_size=cfg.image_size, clip_model=cfg.clip_model,
                                                    random_tower=random_tower_spec(cfg.clip_random_tower))
            # Eq. (4)-(6): the Reliable Multi-View Selector.
            self.selector = ReliableViewSelector(dim=dim, num_selected=cfg.num_selected_views)
        if cfg.masking == "reinforced":
            self.masking = ReinforcedMasking(dim=dim, num_heads=cfg.masking_heads, mask_ratio=cfg.mask_ratio)  # Eq. (7)
        elif cfg.masking not in MASKINGS:
            raise ValueError(f"--masking must be one of {MASKINGS}, got {cfg.masking!r}.")
        elif cfg.masking == "saliency" and not cfg.use_2d:
            raise ValueError("--masking saliency reads the class attention of the 2-D views; it needs --use_2d.")
        # Eq. (15): the Standard Transformer decoder and the reconstruction head, as Point-MAE.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos = CenterEmbedding(dim=dim, trunc_normal=False)  # Point-MAE: default init there
        self.decoder = KATransformer(dim=dim, depth=cfg.decoder_depth, num_heads=cfg.decoder_heads,
                                     drop_path_rate=cfg.drop_path)
        self.reconstruction_head = nn.Linear(dim, 3 * cfg.group_size)
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # Point-MAE: truncated normal, std 0.02

    def image_tokens(self, points, centers):
        """Eq. (1)-(2): render, read patch tokens, and find the patch under every group centre in every view.
        --masking saliency also gets the tower's class attention over the patches (B, V, P), else None."""
        with torch.no_grad():
            images = self.renderer(points)  # (B, V, 3, H, W)  Eq. (1)
            pixels = self.renderer.project(points, centers)  # (B, V, G, 2)
        patch_size = self.cfg.image_size // self.tokenizer_2d.grid_size  # the tower's own patch size (16 for ViT-B/16)
        patch_index = pixels_to_patches(pixels, self.cfg.image_size, patch_size)  # (B, V, G)
        if self.cfg.masking == "saliency":
            tokens_2d, attention = self.tokenizer_2d(images, return_attention=True)  # (B, V, P, D), (B, V, P)
            return tokens_2d, patch_index, attention
        return self.tokenizer_2d(images), patch_index, None  # (B, V, P, D)  Eq. (2)

    def saliency_masking(self, attention, patch_index):
        """--masking saliency: I2P-MAE's 2D-guided masking (i2p_mae.guided_masking) on KR-MAE's own views. The
        saliency of a centre is the class attention of the patch under it, averaged over the v rendered views;
        visible tokens are drawn without replacement from softmax(saliency / tau).
        NOTE(unspecified): I2P-MAE reads a bicubic upsampling of the attention map at the centre's pixel in its 3
        views; KR-MAE aligns by patch (PMA), so we read the patch under the centre, in all v views (before RVS).
        attention (B, V, P), patch_index (B, V, G) -> visible (B, Gv), masked (B, Gm), entropy ()."""
        saliency = torch.gather(attention, 2, patch_index).mean(dim=1)  # (B, G)
        visible_index, masked_index, log_probs = guided_masking(saliency, self.cfg.mask_ratio,
                                                                self.cfg.i2p_saliency_temperature)
        return visible_index, masked_index, normalised_entropy(log_probs).mean()

    def forward(self, points):
        """points (B, N, 3) -> dict with the losses and what the reconstruction picture needs."""
        cfg = self.cfg
        batch_size = points.shape[0]
        tokens, centers, neighborhoods = self.tokenizer_3d(points)  # (B, G, D), (B, G, 3), (B, G, K, 3)  Eq. (3)
        out = {"centers": centers, "neighborhoods": neighborhoods}

        # The rendered views and their tokens first (nothing random: the masks below draw as before).
        if cfg.use_2d:
            tokens_2d, patch_index, attention = self.image_tokens(points, centers)  # (B, V, P, D), (B, V, G)

        # Reinforced Masking (Eq. 7), I2P-MAE's saliency masking, or Point-MAE's uniform random masking.
        log_probs = None
        if cfg.masking == "reinforced":
            visible_index, masked_index, log_probs = self.masking(tokens)  # (B, Gv), (B, Gm), (B, G)
        elif cfg.masking == "saliency":
            visible_index, masked_index, out["masking_entropy"] = self.saliency_masking(attention, patch_index)
        else:
            visible_index, masked_index = random_masking(batch_size, cfg.num_groups, cfg.mask_ratio, points.device)
        visible_tokens = gather_tokens(tokens, visible_index)  # (B, Gv, D)
        visible_centers = gather_tokens(centers, visible_index)  # (B, Gv, 3)
        masked_centers = gather_tokens(centers, masked_index)  # (B, Gm, 3)

        aligned_tokens_2d = None
        if cfg.use_2d:
            if cfg.use_rvs:
                selected, scores, selected_tokens_2d = self.selector(tokens, tokens_2d)  # (B, S), (B, V), (B, S, P, D)
                out["view_scores"] = scores
            else:
                # NOTE(unspecified): without RVS (Table 4, row B) we draw k of the v views at random per shape.
                selected = torch.rand(batch_size, cfg.num_views, device=points.device).argsort(dim=1)
                selected = selected[:, : cfg.num_selected_views]  # (B, S)
                selected_tokens_2d = gather_tokens(tokens_2d, selected)  # (B, S, P, D)
            out["selected_views"] = selected
            selected_patch_index = gather_tokens(patch_index, selected)  # (B, S, G)
            # Part and Masking Alignment: the patch token under each visible centre, in each selected view.
            aligned_tokens_2d = align_patches(selected_tokens_2d, selected_patch_index, visible_index)  # (B, S, Gv, D)

        # Eq. (9)-(14): KAT encoder over the visible tokens with their aligned 2-D tokens.
        encoded = self.encoder(visible_tokens, self.encoder_pos(visible_centers), aligned_tokens_2d)  # (B, Gv, D)

        # Eq. (15): decoder over [visible tokens; mask tokens], reconstruction of the masked groups.
        num_masked = masked_index.shape[1]
        decoder_input = torch.cat([encoded, self.mask_token.expand(batch_size, num_masked, -1)], dim=1)  # (B, G, D)
        decoder_pos = self.decoder_pos(torch.cat([visible_centers, masked_centers], dim=1))  # (B, G, D)
        decoded = self.decoder(decoder_input, decoder_pos)[:, -num_masked:]  # (B, Gm, D)
        predicted = self.reconstruction_head(decoded).reshape(batch_size, num_masked, cfg.group_size, 3)  # (B, Gm, K, 3)
        target = gather_tokens(neighborhoods, masked_index)  # (B, Gm, K, 3)

        # Eq. (16) per masked group. NOTE(unspecified): L_R is Point-MAE's mean over the masked groups of the batch;
        # the per-group values are the L_R^i of Eq. (8).
        token_errors = chamfer_distance(predicted.flatten(0, 1), target.flatten(0, 1)).view(batch_size, num_masked)
        loss_rec = token_errors.mean()  # Eq. (16)
        loss_policy = (reinforce_loss(log_probs, masked_index, token_errors) if log_probs is not None
                       else loss_rec.new_zeros(()))  # Eq. (8)
        loss = loss_rec + cfg.policy_weight * loss_policy  # L_total = L_R + lambda * L_S
        out.update(loss=loss, loss_rec=loss_rec, loss_policy=loss_policy, predicted=predicted,
                   visible_index=visible_index, masked_index=masked_index)
        return out


def build_model(cfg):
    """--method -> its pre-training model. Each one has the 3-D path finetune.py keeps (tokenizer_3d, encoder_pos,
    encoder, under these names) and returns a dict with `loss`, each of its terms as `loss_*` (all logged), and what
    the reconstruction picture reads (centers, neighborhoods, visible_index, masked_index, predicted)."""
    if cfg.method == "joint_mae":  # joint_mae.py, Guo et al. (IJCAI 2023), on this backbone
        return JointMAE(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=cfg.dim, depth=cfg.depth,
                        num_heads=cfg.num_heads, decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads,
                        drop_path=cfg.drop_path, mask_ratio=cfg.mask_ratio, mask_ratio_2d=cfg.joint_mask_ratio_2d,
                        image_size=cfg.image_size, patch_size=cfg.joint_patch_size, projection=cfg.joint_projection,
                        local_3d_to_2d=cfg.joint_local_3d_to_2d, local_2d_to_3d=cfg.joint_local_2d_to_3d,
                        modality_token_3d=cfg.joint_modality_3d, cross_views=cfg.joint_cross_views,
                        weight_3d=cfg.joint_weight_3d, weight_2d=cfg.joint_weight_2d,
                        weight_cross=cfg.joint_weight_cross, skip_near_origin=cfg.fps_skip_near_origin)
    if cfg.method == "i2p_mae":  # i2p_mae.py, Zhang et al. (CVPR 2023), on this backbone
        return I2PMAE(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=cfg.dim, depth=cfg.depth,
                      num_heads=cfg.num_heads, decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads,
                      drop_path=cfg.drop_path, mask_ratio=cfg.mask_ratio, image_size=cfg.image_size,
                      clip_model=cfg.clip_model, random_tower=random_tower_spec(cfg.clip_random_tower),
                      guided=cfg.i2p_guided, saliency_temperature=cfg.i2p_saliency_temperature,
                      target_points=cfg.i2p_target_points, weight_2d=cfg.i2p_weight_2d,
                      projection=cfg.i2p_projection, skip_near_origin=cfg.fps_skip_near_origin)
    if cfg.method == "crossalignnet":  # crossalignnet.py, Wang et al. (PeerJ CS 2025), on this backbone
        return CrossAlignNet(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=cfg.dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, decoder_depth=cfg.decoder_depth,
                             decoder_heads=cfg.decoder_heads, gsa_depth=cfg.cal_gsa_depth,
                             image_depth=cfg.cal_image_depth, image_heads=cfg.num_heads, drop_path=cfg.drop_path,
                             mask_ratio=cfg.mask_ratio, image_size=cfg.image_size,
                             image_masking=cfg.cal_image_masking, contrast=cfg.cal_contrast,
                             temperature=cfg.cal_temperature, gsa_weight=cfg.cal_gsa_weight,
                             skip_near_origin=cfg.fps_skip_near_origin)
    return KRMAE(cfg)  # kr_mae, and point_mae (= no 2-D branch, random masking)


ENCODER_PREFIXES = ("tokenizer_3d.", "encoder_pos.", "encoder.")


def encoder_state_dict(model_state):
    """The 3-D path that fine-tuning keeps: tokenizer_3d.*, encoder_pos.*, encoder.* (the decoder is dropped).

    The MLP fusion of Table 6 row A (`fusion_mlp`, kat.py) acts only on 2-D tokens, which fine-tuning does not
    have, so its weights are dropped too; the other fusions share all their weights with the 3-D path."""
    return {name: value for name, value in model_state.items()
            if name.startswith(ENCODER_PREFIXES) and ".fusion_mlp." not in name}


# What --init_from copies: the parts Point-MAE's pre-training model has (REFERENCE sec. 7).
POINT_MAE_PREFIXES = ENCODER_PREFIXES + ("mask_token", "decoder_pos.", "decoder.", "reconstruction_head.")


def initialise_from(model, path):
    """--init_from: copy a pre-training checkpoint's 3-D encoder, decoder and reconstruction head into `model` (an
    official Point-MAE pretrain.pth, whose keys point_mae_checkpoints.py maps, or a last.pth of this script); the
    parts Point-MAE lacks (2-D branch, view selector, masking policy) keep their fresh initialisation. Every one of
    those parameters must be in the file with this model's shape; what was loaded is printed and returned."""
    layout, state, _ = point_mae_checkpoints.project_state(load_checkpoint(path), path)
    if layout not in (point_mae_checkpoints.PRETRAIN, point_mae_checkpoints.OURS):
        raise ValueError(f"--init_from {path!r} is a {layout} checkpoint; it needs a pre-training one (Point-MAE's "
                         f"pretrain.pth or a last.pth of pretrain.py): a fine-tuned model has no decoder.")
    own = model.state_dict()
    wanted = [name for name in own if name.startswith(POINT_MAE_PREFIXES) and ".fusion_mlp." not in name]
    missing = [name for name in wanted if name not in state]
    misfit = [f"{name} {tuple(state[name].shape)} there, {tuple(own[name].shape)} here" for name in wanted
              if name in state and state[name].shape != own[name].shape]
    extra = [name for name in state if name.startswith(POINT_MAE_PREFIXES) and ".fusion_mlp." not in name
             and name not in own]
    if missing or misfit or extra:
        raise ValueError(f"--init_from {path!r} ({layout} layout) does not fit this model: "
                         + "; ".join(text for text in (
                             f"missing from it: {missing[:4]} (of {len(missing)})" if missing else "",
                             f"other shapes: {misfit[:3]} (of {len(misfit)})" if misfit else "",
                             f"in it but not here: {extra[:4]} (of {len(extra)})" if extra else "") if text)
                         + ". Pass its --dim/--depth/--decoder_depth/--group_size (Point-MAE's: 384, 12, 4, 32).")
    model.load_state_dict({name: state[name] for name in wanted}, strict=False)
    fresh = sorted({name.split(".")[0] for name, parameter in model.named_parameters()
                    if parameter.requires_grad and name not in wanted})
    print(f"--init_from {path} ({layout} layout): loaded {len(wanted)} tensors (3-D encoder, decoder, reconstruction "
          f"head); starting fresh: {fresh or 'nothing'}; attention heads from --num_heads {model.cfg.num_heads}, "
          f"--decoder_heads {model.cfg.decoder_heads}")
    return wanted


# ---------------------------------------------------------------------------------------------------------------
# Optimisation helpers, shared with finetune.py
# ---------------------------------------------------------------------------------------------------------------
def learning_rate(step, total_steps, warmup_steps, base_lr, min_lr):
    """Linear warm-up then cosine decay to min_lr, a pure function of the step (so resuming needs no state).

    NOTE(deviation): Point-MAE uses timm's CosineLRScheduler stepped once per EPOCH, warming up from 1e-6 and
    counting the cosine from epoch 0; we step per batch, warm up from base_lr / warmup_steps and run the cosine
    over the steps after the warm-up, a smoother schedule with the same end points (REFERENCE sec. 8)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


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


def cast_frozen_towers(model, dtype):
    """Store the frozen CLIP towers' matrices in `dtype` once (CLIP's own recipe, tokenizer.cast_frozen_tower), so
    that under bf16 autocast they are not re-cast at every call: KR-MAE's `tokenizer_2d.visual`, I2P-MAE's
    `teacher.visual`. Their outputs change only by the rounding that autocast already applied to them."""
    for name in ("tokenizer_2d", "teacher"):
        visual = getattr(getattr(model, name, None), "visual", None)
        if visual is not None:
            tokenizer.cast_frozen_tower(visual, dtype)


def compile_model(model, cfg):
    """What the training step calls: the model itself, or with --compile the whole model through torch.compile, whose
    forward graph (one graph, no breaks, for every method) and the backward built from it are compiled together.
    The optimizer stays outside (fused on CUDA). The weights are shared, so checkpoints, pictures and probes go on
    using `model` itself (its state-dict names carry no `_orig_mod.` prefix)."""
    if not cfg.compile:
        return model
    return torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def epoch_order(num_samples, seed, epoch):
    """The shuffled sample order of an epoch: a pure function of (seed, epoch), so resuming needs no sampler state."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def frozen_towers(model):
    """The state-dict prefixes of the model's frozen CLIP towers that hold PRE-TRAINED weights: KR-MAE's
    `tokenizer_2d.visual.`, I2P-MAE's teacher `teacher.visual.` (both flag `visual_is_pretrained`)."""
    return tuple(f"{name}.visual." for name in ("tokenizer_2d", "teacher")
                 if getattr(getattr(model, name, None), "visual_is_pretrained", False))


def trainable_state(model):
    """The model's state dict without a pre-trained frozen CLIP tower (reloaded from CLIP's file on resume; it
    would add about 350 MB to every checkpoint).

    NOTE(unspecified): a random tower (tests, the tiny preset) is saved, since nothing else could restore it."""
    frozen = frozen_towers(model)
    return {name: value for name, value in model.state_dict().items() if not (frozen and name.startswith(frozen))}


def load_trainable_state(model, state):
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = frozen_towers(model)
    missing = [name for name in missing if not (frozen and name.startswith(frozen))]
    if missing or unexpected:
        raise RuntimeError(f"The checkpoint does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}"
                           f" (of {len(missing)} and {len(unexpected)}). Was it written with another configuration?")


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
def schedule_and_size_checks(cfg):
    """The checks pretrain.py and finetune.py share, as (passed, message) pairs: epochs, warm-up, batch size, the
    group counts against the points, the learning rates."""
    return [
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}."),
        (0 <= cfg.warmup_epochs <= cfg.epochs,
         f"--warmup_epochs must be between 0 and --epochs ({cfg.epochs}), got {cfg.warmup_epochs}."),
        (cfg.batch_size >= 1, f"--batch_size must be at least 1, got {cfg.batch_size}."),
        (1 <= cfg.num_groups <= cfg.num_points,
         f"--num_groups must be between 1 and --num_points ({cfg.num_points}), got {cfg.num_groups}."),
        (1 <= cfg.group_size <= cfg.num_points,
         f"--group_size must be between 1 and --num_points ({cfg.num_points}), got {cfg.group_size}."),
        (cfg.lr > 0 and cfg.min_lr >= 0, f"--lr must be positive and --min_lr not negative, got {cfg.lr} and "
                                         f"{cfg.min_lr}."),
    ]


def range_checks(cfg, ranges):
    """(passed, message) pairs: every float setting is finite (NaN fails every comparison, inf is no rate or weight),
    and every setting of `ranges` (name, allowed(value, cfg), the allowed values in words: a text formatted with
    cfg, or a function of cfg) lies in its range."""
    checks = [(math.isfinite(getattr(cfg, field.name)), f"--{field.name} must be a finite number, got "
                                                        f"{getattr(cfg, field.name)}.")
              for field in dataclasses.fields(cfg) if field.type in (float, "float")]
    for name, allowed, text in ranges:
        value = getattr(cfg, name)
        passed = bool(allowed(value, cfg))
        words = "" if passed else text(cfg) if callable(text) else text.format(cfg=cfg)
        checks.append((passed, f"--{name} must be {words}, got {value!r}."))
    return checks


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
    """Refuse, before any work, every setting that would fail late or quietly do something else than asked (k = 0
    views fused nothing; k > v used v; --epochs 0 wrote nothing). Raises ValueError naming the flag and its value
    (FileNotFoundError for a --data_root that does not exist)."""
    ratio_valid = 0 <= cfg.mask_ratio < 1
    num_masked = int(cfg.mask_ratio * cfg.num_groups) if ratio_valid else 0  # masking.num_visible's count
    checks = schedule_and_size_checks(cfg) + range_checks(cfg, RANGES) + [
        (ratio_valid, f"--mask_ratio must be in [0, 1), got {cfg.mask_ratio}."),
        (1 <= num_masked < cfg.num_groups,
         f"--mask_ratio {cfg.mask_ratio} masks {num_masked} of the {cfg.num_groups} groups (--num_groups); at least "
         f"one group must be masked and one visible."),
        (cfg.masking in MASKINGS, f"--masking must be one of {MASKINGS}, got {cfg.masking!r}."),
        (cfg.masking != "saliency" or cfg.use_2d, "--masking saliency reads the class attention of the 2-D views; it "
                                                  "needs the 2-D branch (--use_2d)."),
        (cfg.i2p_saliency_temperature > 0,
         f"--i2p_saliency_temperature must be positive, got {cfg.i2p_saliency_temperature}."),
        (cfg.fusion in FUSIONS, f"--fusion must be one of {FUSIONS}, got {cfg.fusion!r}."),
        (not cfg.use_2d or 1 <= cfg.num_selected_views <= cfg.num_views,
         f"--num_selected_views must be between 1 and --num_views ({cfg.num_views}) when the 2-D branch is on (with "
         f"or without RVS), got {cfg.num_selected_views}."),
        (cfg.data in ("auto", "shapenet55", "synthetic"),
         f"--data must be 'auto', 'shapenet55' or 'synthetic', got {cfg.data!r}."),
        (cfg.method in METHODS, f"--method must be one of {METHODS}, got {cfg.method!r}."),
        (cfg.log_every >= 1, f"--log_every must be at least 1 (read the losses every N steps), got {cfg.log_every}."),
        (cfg.method != "point_mae" or (not cfg.use_2d and cfg.masking == "random"),
         f"--method point_mae is --no-use_2d --masking random; got use_2d {cfg.use_2d}, masking {cfg.masking!r} "
         f"(use --method kr_mae to combine them otherwise)."),
        (not cfg.init_from or cfg.method in ("kr_mae", "point_mae"),
         f"--init_from loads Point-MAE's encoder and decoder into --method kr_mae or point_mae; --method "
         f"{cfg.method} has another decoder."),
    ]
    if cfg.method == "joint_mae":
        patches = (cfg.image_size // cfg.joint_patch_size) ** 2 if cfg.joint_patch_size > 0 else 0
        checks += [
            (cfg.joint_patch_size > 0 and cfg.image_size % cfg.joint_patch_size == 0,
             f"--image_size ({cfg.image_size}) must be a multiple of --joint_patch_size ({cfg.joint_patch_size})."),
            (0 <= cfg.joint_mask_ratio_2d < 1 and 1 <= int(cfg.joint_mask_ratio_2d * patches) < patches,
             f"--joint_mask_ratio_2d {cfg.joint_mask_ratio_2d} must mask at least one and keep at least one of the "
             f"{patches} 2-D tokens."),
            (cfg.joint_projection in ("perspective", "realistic"),
             f"--joint_projection must be 'perspective' or 'realistic', got {cfg.joint_projection!r}."),
            (cfg.joint_cross_views >= 0, f"--joint_cross_views must be 0 or more, got {cfg.joint_cross_views}."),
        ]
    if cfg.method == "i2p_mae":
        checks += [
            (1 <= cfg.i2p_target_points <= cfg.group_size,
             f"--i2p_target_points must be between 1 and --group_size ({cfg.group_size}), got {cfg.i2p_target_points}."),
            (cfg.i2p_projection in ("orthographic", "realistic"),
             f"--i2p_projection must be 'orthographic' or 'realistic', got {cfg.i2p_projection!r}."),
        ]
    if cfg.method == "crossalignnet":
        checks += [
            (cfg.cal_image_masking in ("complementary", "correspondence", "random"),
             f"--cal_image_masking must be complementary, correspondence or random, got {cfg.cal_image_masking!r}."),
            (cfg.cal_contrast in ("infonce", "ntxent"), f"--cal_contrast must be infonce or ntxent, got "
                                                        f"{cfg.cal_contrast!r}."),
            (cfg.cal_temperature > 0 and cfg.cal_gsa_weight >= 0,
             f"--cal_temperature must be positive and --cal_gsa_weight not negative, got {cfg.cal_temperature} and "
             f"{cfg.cal_gsa_weight}."),
            (cfg.batch_size >= 2, f"--method crossalignnet contrasts the shapes of a batch (and its heads have "
                                  f"BatchNorm): --batch_size must be at least 2, got {cfg.batch_size}."),
        ]
    for passed, message in checks:
        if not passed:
            raise ValueError(message)
    # A data_root other than the default is a request for real data: a mistyped one must not train on the synthetic
    # shapes instead (the default folder, when absent, falls back to them, announced by build_dataset).
    if cfg.data == "auto" and cfg.data_root != Config.data_root and not os.path.isdir(cfg.data_root):
        raise FileNotFoundError(f"--data_root {cfg.data_root!r} does not exist. Expected ShapeNet55 in Point-BERT's "
                                f"layout: {datasets.SHAPENET55_LAYOUT} Leave --data_root out (or pass --data "
                                f"synthetic) to pre-train on the built-in synthetic shapes.")


def build_dataset(cfg):
    """ShapeNet55 when it is on disk (or asked for), else the built-in synthetic shapes, announced loudly."""
    if cfg.data == "shapenet55" or (cfg.data == "auto" and os.path.isdir(cfg.data_root)):
        return datasets.ShapeNet55(cfg.data_root, split="train", num_points=cfg.num_points)
    print("=" * 100 + f"\nNo ShapeNet55 at {cfg.data_root!r}: pre-training on the BUILT-IN SYNTHETIC SHAPES "
          f"({cfg.synthetic_size} per epoch). Pass --data_root for real data.\n" + "=" * 100)
    return synthetic.SyntheticShapes(split="train", num_points=cfg.num_points, size=cfg.synthetic_size, seed=cfg.seed)


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
    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial weights
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    # --- data ---------------------------------------------------------------------------------------------------
    dataset = build_dataset(cfg)
    steps_per_epoch = len(dataset) // cfg.batch_size  # drop the last partial batch, as Point-MAE
    if steps_per_epoch == 0:
        raise ValueError(f"The dataset has {len(dataset)} shapes, fewer than one batch of {cfg.batch_size}.")
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    local_batch_size = cfg.batch_size // world_size  # each rank's share of the global batch (start_processes checked)
    if is_main:
        print(f"device {device}, bf16 {use_bf16}, {len(dataset)} shapes, {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps, {num_visible_text(cfg)}"
              + (f", {world_size} processes of {local_batch_size} shapes a step" if world_size > 1 else ""))

    # --- model and optimizer --------------------------------------------------------------------------------------
    model = build_model(cfg)
    if world_size > 1:
        model = sync_batchnorm(model, device)  # BatchNorm statistics over the global batch, as one process
    model = model.to(device)
    if is_main:
        print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M")
    if cfg.init_from and not cfg.resume:  # a resumed run already holds what it loaded at its start
        initialise_from(model, cfg.init_from)
    if use_bf16:
        cast_frozen_towers(model, torch.bfloat16)
    optimizer = make_optimizer(model, cfg, device)

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
    # Under torchrun the step runs through DDP, which averages the gradients over the ranks during backward; the
    # un-wrapped `model` serves everything else (pictures, probes, checkpoint). static_graph: the same parameters take
    # part in every step, but not always all of them (the view selector without RVS, CrossAlignNet's GSA decoder at
    # weight 0): DDP finds the unused ones once, at the first step, instead of searching the graph at every step.
    # NOTE(unspecified): a loss that compares the shapes of a batch with each other sees this rank's share only:
    # CrossAlignNet's InfoNCE contrasts batch_size / world_size shapes, one process the whole batch (the BatchNorms,
    # synchronised, see the whole batch). Every other loss here is a mean over the shapes, the same either way.
    train_model = (DistributedDataParallel(OnlyTheLossBackward(model), static_graph=True,
                                           device_ids=[device.index] if device.type == "cuda" else None)
                   if world_size > 1 else model)
    train_model = compile_model(train_model, cfg)  # --compile: after DDP, which then splits the graph at its buckets
    if is_main:
        check_log(log_path, start_epoch)  # a broken log is found now, not after an epoch

    # --- the loop -------------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if world_size > 1:
            # NOTE(unspecified): with several processes each rank seeds torch, numpy and random from (seed, rank,
            # epoch) at every epoch start, so its masks and augmentations are its own and an epoch's draws depend on
            # nothing else: a resumed run continues exactly, at any world size, and the checkpoint's RNG state
            # (rank 0's) is only read back by a single process. One process keeps one stream seeded once and saved
            # in the checkpoint, as before.
            seed_rank_generators(cfg.seed, rank, epoch)
        order = epoch_order(len(dataset), cfg.seed, epoch)  # the same global order on every rank
        loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch_size,
                                             sampler=rank_batches(order, cfg.batch_size, rank, world_size),
                                             drop_last=True, num_workers=cfg.num_workers,
                                             pin_memory=device.type == "cuda")
        # Every scalar the model returns (loss terms, statistics), summed on the device since the epoch began, in
        # float64 as Python's floats summed them before, so a single process logs the same numbers. Read off the
        # device only every --log_every steps and at the end of the epoch: no host sync at the other steps.
        sums, names, last_read_step, started = None, [], epoch * steps_per_epoch - 1, time.time()
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not cfg.progress or not is_main, leave=False)
        for batch_index, batch in enumerate(bar):
            step = epoch * steps_per_epoch + batch_index
            lr = learning_rate(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            points = batch[0].to(device, non_blocking=True)  # (B, N, 3), B = this rank's share of --batch_size
            if cfg.augment:  # Point-MAE: a random scale and translation per shape and axis
                points = datasets.scale_and_translate(points)  # (B, N, 3)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = train_model(points)
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
            # NOTE(unspecified): a non-finite loss is therefore caught up to --log_every steps late (a NaN or inf
            # keeps the epoch's sum non-finite, so no step of the epoch escapes the check), and the weights may by
            # then have taken that many bad steps. Nothing is written after it: checkpoints are written only at the
            # end of an epoch, after this check, so the last good checkpoint stays as it was.
            totals = dict(zip(names, summed_over_ranks(sums, world_size).tolist()))  # the one host sync
            if not all(math.isfinite(value) for name, value in totals.items() if name.startswith("loss")):
                if epoch > start_epoch or cfg.resume:  # this run has a checkpoint: this folder's, or the resumed one
                    last_good = checkpoint_path if epoch > start_epoch else cfg.resume
                    advice = f"The last good checkpoint {last_good!r} is untouched: resume from it with a lower --lr."
                else:
                    advice = ("No checkpoint of this run was written yet (one is written at the end of every epoch): "
                              "lower --lr and start again.")
                raise FloatingPointError(f"A loss term became non-finite at epoch {epoch}, at a step from "
                                         f"{last_read_step + 1} to {step} (the losses are read every --log_every "
                                         f"{cfg.log_every} steps; sums over the epoch so far: {totals}); the weights "
                                         f"may have taken up to {step - last_read_step} steps since, so nothing more "
                                         f"is written. {advice}")
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
        if epoch == start_epoch:
            # Only now, with this run's first epoch done, drop the log lines it replaces: an earlier run's whole log
            # (fresh run, --overwrite) or the lines of the epochs a resumed run redoes (a kill between a log line and
            # its checkpoint). Until here the earlier run's log and last.pth are untouched.
            truncate_log(log_path, start_epoch)
        append_log(log_path, record)
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
