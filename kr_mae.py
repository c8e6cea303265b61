"""KR-MAE (AAAI 2026): the pre-training model, composed from the stage modules, and its objective.

Paper Figure 1 and sections "Training Objective" (Eq. 15-16) and "Pre-training Setup"; pretrain.py runs it:

    points --render.py (Eq. 1)--> v depth images --tokenizer.py (Eq. 2)--> 2-D patch tokens  E_2D  (B, V, P, D)
    points --tokenizer.py (Eq. 3)--> 3-D group tokens E_3D (B, G, D), centres (B, G, 3)
    rvs.py (Eq. 4-6): keep the k most reliable views                                   (B, S, P, D)
    masking.py (Eq. 7): sample the visible 3-D tokens; PMA: the patch under each visible centre  (B, S, Gv, D)
    kat.py (Eq. 9-14): encoder over the visible tokens, fused with their aligned 2-D tokens     (B, Gv, D)
    Eq. (15): P_pred = Rec(ST(T_3D^vis))   a Point-MAE decoder (mask tokens) and a Linear head  (B, Gm, K, 3)
    Eq. (16): L_R = squared-L2 Chamfer distance between each predicted and true masked group
    Eq. (8):  L_S = policy loss of the Reinforced Masking;   L_total = L_R + lambda * L_S
Without the 2-D branch and with random masking it is Point-MAE (Table 4, row A): --method point_mae.

Paper symbol -> name here:  v -> num_views, k -> num_selected_views, n -> num_groups, p -> group_size,
d^E -> dim, rho -> mask_ratio, lambda -> policy_weight, H = W -> image_size.
Shapes: B batch, N points, G groups, K points per group, V views, S selected views, P patches, D width,
Gv visible, Gm masked.

The settings (a method file's four parts, as every method file of pretrain.py --method has them):
  Settings        the fields of pretrain.py's Config this file adds, each with its source: the 3-D tokens, the 2-D
                  branch, the masking and the backbone, which every other method builds its 3-D path from too
  DEFAULTS        what --method kr_mae / point_mae sets before --preset and the flags
  PAPER_SETTINGS  its paper's data settings unless --matched (KR-MAE and Point-MAE: Point-MAE's, the defaults)
  check(cfg)      (passed, message) pairs for pretrain.check_config;   build(cfg)  the model
Run:  python pretrain.py --method kr_mae --preset tiny --epochs 2      (a CPU smoke run)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from i2p_mae import guided_masking, normalised_entropy
from kat import FUSIONS, KATransformer
from masking import ReinforcedMasking, align_patches, gather_tokens, random_masking, reinforce_loss
from render import MultiViewRenderer, pixels_to_patches
from rvs import ReliableViewSelector
from tokenizer import CenterEmbedding, ImagePatchTokenizer, PointTokenizer, random_tower_spec

MASKINGS = ("reinforced", "random", "saliency")  # --masking


@dataclass
class Settings:
    """KR-MAE's model: the 3-D tokens, the 2-D branch, the masking and the Point-MAE backbone."""
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


# --method -> what it sets before --preset and the flags. Point-MAE is KR-MAE without the 2-D branch and with random
# masking (Table 4 row A), on this backbone.
DEFAULTS = {"kr_mae": {}, "point_mae": dict(use_2d=False, masking="random")}
PAPER_SETTINGS = {}  # both use Point-MAE's data settings: the defaults


def check(cfg):
    """The settings of these fields that would fail late or quietly do something else than asked (k = 0 views fused
    nothing; k > v used v), as (passed, message) pairs. Every method builds its 3-D path and masks with them, so
    pretrain.check_config runs these for every --method."""
    ratio_valid = 0 <= cfg.mask_ratio < 1
    num_masked = int(cfg.mask_ratio * cfg.num_groups) if ratio_valid else 0  # masking.num_visible's count
    return [
        (ratio_valid, f"--mask_ratio must be in [0, 1), got {cfg.mask_ratio}."),
        (1 <= num_masked < cfg.num_groups,
         f"--mask_ratio {cfg.mask_ratio} masks {num_masked} of the {cfg.num_groups} groups (--num_groups); at least "
         f"one group must be masked and one visible."),
        (cfg.masking in MASKINGS, f"--masking must be one of {MASKINGS}, got {cfg.masking!r}."),
        (cfg.masking != "saliency" or cfg.use_2d, "--masking saliency reads the class attention of the 2-D views; it "
                                                  "needs the 2-D branch (--use_2d)."),
        (cfg.i2p_saliency_temperature > 0,  # --masking saliency is I2P-MAE's, with its temperature (i2p_mae.py)
         f"--i2p_saliency_temperature must be positive, got {cfg.i2p_saliency_temperature}."),
        (cfg.fusion in FUSIONS, f"--fusion must be one of {FUSIONS}, got {cfg.fusion!r}."),
        (not cfg.use_2d or 1 <= cfg.num_selected_views <= cfg.num_views,
         f"--num_selected_views must be between 1 and --num_views ({cfg.num_views}) when the 2-D branch is on (with "
         f"or without RVS), got {cfg.num_selected_views}."),
        (cfg.method != "point_mae" or (not cfg.use_2d and cfg.masking == "random"),
         f"--method point_mae is --no-use_2d --masking random; got use_2d {cfg.use_2d}, masking {cfg.masking!r} "
         f"(use --method kr_mae to combine them otherwise)."),
    ]


def build(cfg):
    """--method kr_mae or point_mae -> the model (it reads the fields of Settings from cfg)."""
    return KRMAE(cfg)


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
# The model: every stage module, composed (Figure 1)
# ---------------------------------------------------------------------------------------------------------------
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

        # The rendered views and their tokens first. They draw no random numbers, so the masks below draw the same
        # numbers with or without the 2-D branch.
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
