"""I2P-MAE (Zhang et al., CVPR 2023), re-implemented on the Point-MAE backbone: masked autoencoding of a point cloud
guided by a frozen 2-D pre-trained model (CLIP ViT-B/16) that looks at three projections of the cloud. The 2-D
model chooses which tokens stay visible (2D-guided masking) and gives the visible tokens a second target, its
features back-projected onto their points (2D-semantic reconstruction).

The seed document is the paper's supplement, which has no equations; the official code is the authority, so the map
names its functions (models/I2P_MAE.py, clip_attn/model.py) and the supplement's tables (docs/PEERS.md section 3).
  proj2img        3 orthographic axis views from cyclic permutations (x, y, z), (z, x, y), (y, z, x): the first two
                  coordinates pick the pixel, the third is summed over a 5 x 5 splat, then sigmoid and ImageNet
                  normalisation                                            -> orthographic_splat, pixel_of
                  (projection="realistic": render.py's PointCLIP V2 renderer with the same 3 axis views instead)
  encode_image    frozen CLIP: last-layer patch features after ln_post and proj, and the last block's head-averaged
                  attention of the class token over the patches
                                               -> CLIPTeacher, tokenizer.run_tower_with_attention
  I2P             bicubic upsampling of a patch map to H x W, read at a point's pixel -> bicubic_sample
  spatial_sals    s_g = mean over the 3 views of I2P(attention)(c_g); supplement Table 2: "Ave" is best
  mask_2D_guided  p = softmax(s / tau) over the G centres, G draws without replacement, the first Gv stay visible
                  -> guided_masking; guided=False: Point-MAE's random masking (with weight_2d=0 as well, the
                  pure 3-D pre-training of supplement Table 1's "w/o 2D Guidance" row)
  rec_head_3d     L_3D = Chamfer-L2(predicted masked groups, their points), as Point-MAE
  rec_head_2d     L_2D = MSE(head(visible tokens), concat over the 3 views of I2P(features) at each token's T
                  nearest points); supplement Table 2: "Concat" beats "Ave"
  runner          loss = L_3D + w_2d L_2D, w_2d = 1
The backbone (tokenizer_3d, encoder_pos, encoder, the 4-block decoder) is this codebase's Point-MAE, not the
official Point-M2AE hierarchy: fine-tuning loads the 3-D path unchanged (docs/PEERS.md section 1).

Shapes: B batch, N points, G groups (tokens), K points per group, D width, Gv / Gm visible / masked tokens,
V = 3 views, H x W image (H = W = image_size), g x g patch grid, P = g^2 patches, C CLIP feature width (512 for
ViT-B/16 after proj), T target points per visible token, Q query points.

Official symbol -> name here
    pts -> points (B, N, 3)                   imgs_1..3 -> images (B, V, 3, H, W)
    pc_min, grid_size, offsets -> frame = (lower, pixel_size, shift)   img_offset (5 x 5) -> SPLAT_OFFSETS
    img_feats -> features (B, V, C, g, g)    img_sals[:, 0, 1:] -> attention_maps (B, V, 1, g, g)
    spatial_sals -> saliency (B, G)          attm = softmax(spatial_sals) -> log_probs.exp() (B, G)
    mask_ratio (0.8) -> mask_ratio           num_keep -> num_visible(G, mask_ratio) = Gv
    rec_head_3d -> reconstruction_head       rec_head_2d -> semantic_head     group_sizes[1] (8) -> target_points (T)
    clip_feats_1..3 (concatenated) -> target (B, Gv, T, V * C)            loss_3d, loss_2d -> loss_rec, loss_2d
    (ours) tau -> saliency_temperature; H(p) / log G -> masking_entropy

Demo: `python i2p_mae.py [--out i2p_mae_demo.png]` runs one forward pass on a torus with a small random CLIP tower,
prints every shape and draws the 3 views with the saliency and the chosen visible centres.
"""
import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kat import KATransformer
from masking import gather_tokens, num_visible, random_masking, sample_without_replacement, split_visible_masked
from render import MultiViewRenderer
from tokenizer import (CenterEmbedding, PointTokenizer, frozen_clip_tower, gather_points, knn_indices,
                       random_tower_spec, run_tower_with_attention)

PROJECTIONS = ("orthographic", "realistic")
# proj2img's three views, pts_1 = (x, y, z), pts_2 = (z, x, y), pts_3 = (y, z, x): coordinates (row, column, value).
VIEW_PERMUTATIONS = ((0, 1, 2), (2, 0, 1), (1, 2, 0))
# The same views as rotations p' = M p for render.py (rows from x', columns from y', depth z'): cyclic
# permutations are proper rotations (determinant +1), so the renderer sees the shape unmirrored.
AXIS_VIEW_ROTATIONS = torch.eye(3)[torch.tensor(VIEW_PERMUTATIONS)]  # (V, 3, 3): row i of view v = e_{order[i]}
# proj2img's img_offset: every point is written to the 5 x 5 pixels around its own.
SPLAT_OFFSETS = torch.tensor([(row, col) for row in range(-2, 3) for col in range(-2, 3)])  # (25, 2)
# NOTE(unspecified): proj2img normalises with ImageNet's statistics (official img_mean / img_std), although CLIP was
# trained with its own (tokenizer.CLIP_MEAN / CLIP_STD); we keep the official ones, part of its projection.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# pretrain.py --method i2p_mae: this file's fields of its Config, defaults, checks and constructor
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """I2P-MAE's own fields of pretrain.py's Config; its backbone and 3-D tokens are kr_mae.Settings' fields."""
    # --- I2P-MAE (--method i2p_mae; i2p_mae.py; Zhang et al., CVPR 2023, official code) ----------------------------
    i2p_guided: bool = True         # 2D-guided masking (mask_2D_guided); False: random (supplement Table 1)
    i2p_saliency_temperature: float = 1.0  # softmax temperature of the saliency (official: 1, none)
    i2p_target_points: int = 8      # 2-D targets per visible token: its nearest points (official: 8 per token)
    i2p_weight_2d: float = 1.0      # loss = L_3D + L_2D (official runner: 1 : 1)
    i2p_projection: str = "orthographic"  # official proj2img (3 axis views, 5x5 sum splat); "realistic": render.py


# What --method i2p_mae sets before --preset and the flags, and its paper's data settings unless --matched.
DEFAULTS = {"i2p_mae": dict(image_size=224)}  # I2P-MAE: CLIP ViT-B/16 at 224 x 224 (14 x 14 patches)
PAPER_SETTINGS = {"i2p_mae": dict(num_points=2048, mask_ratio=0.8, batch_size=64)}  # official config: 2,048, 0.8, 64


def check(cfg):
    """--method i2p_mae's settings that cannot work, as (passed, message) pairs for pretrain.check_config (the
    saliency temperature is checked for every method: kr_mae's --masking saliency uses it too)."""
    return [
        (1 <= cfg.i2p_target_points <= cfg.group_size,
         f"--i2p_target_points must be between 1 and --group_size ({cfg.group_size}), got {cfg.i2p_target_points}."),
        (cfg.i2p_projection in ("orthographic", "realistic"),
         f"--i2p_projection must be 'orthographic' or 'realistic', got {cfg.i2p_projection!r}."),
    ]


def build(cfg):
    """pretrain.py's Config -> I2PMAE, on KR-MAE's backbone fields and its CLIP tower flags."""
    return I2PMAE(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=cfg.dim, depth=cfg.depth,
                  num_heads=cfg.num_heads, decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads,
                  drop_path=cfg.drop_path, mask_ratio=cfg.mask_ratio, image_size=cfg.image_size,
                  clip_model=cfg.clip_model, random_tower=random_tower_spec(cfg.clip_random_tower),
                  guided=cfg.i2p_guided, saliency_temperature=cfg.i2p_saliency_temperature,
                  target_points=cfg.i2p_target_points, weight_2d=cfg.i2p_weight_2d,
                  projection=cfg.i2p_projection, skip_near_origin=cfg.fps_skip_near_origin)


def chamfer_distance(predicted, target):
    """Squared-L2 Chamfer distance per group: (M, K, 3), (M, K', 3) -> (M,). Twin of kr_mae.chamfer_distance."""
    squared = torch.cdist(predicted.float(), target.float()).pow(2)  # (M, K, K')
    return squared.min(dim=2).values.mean(dim=1) + squared.min(dim=1).values.mean(dim=1)  # (M,)


def imagenet_normalise(images):
    """(..., 3, H, W) in [0, 1] -> ImageNet-normalised, per channel (proj2img's last step)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)  # (3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)  # (3, 1, 1)
    return (images - mean) / std  # (..., 3, H, W)


# ---------------------------------------------------------------- proj2img: 3 orthographic splatted views
def permute_views(points):
    """(B, M, 3) -> (B, V, M, 3): each view's (row, column, value) coordinates, proj2img's pts_1, pts_2, pts_3."""
    return torch.stack([points[..., list(order)] for order in VIEW_PERMUTATIONS], dim=1)  # (B, V, M, 3)


def orthographic_frame(points, image_size):
    """proj2img's per-cloud, per-view frame: lower (B, V, 1, 2), pixel_size (B, V, 1, 1), shift (B, V, 1, 2).

    pixel = floor((p_xy - lower) / pixel_size) + 1 + shift, with pixel_size = max(range_x, range_y) / (H - 3) and
    shift = H / 2 - floor((dense_high + dense_low) / 2) - 1 centring the box of the 5 x 5-splatted pixels."""
    with torch.autocast(device_type=points.device.type, enabled=False):  # pixel indices from float32 coordinates
        views = permute_views(points.float())  # (B, V, N, 3)
        upper, lower = views.amax(dim=2), views.amin(dim=2)  # (B, V, 3), (B, V, 3)
        # Guard a cloud with no extent in the image plane (the official code would divide by zero).
        pixel_size = (upper - lower)[..., :2].amax(dim=-1).div(image_size - 3).clamp_min(1e-12)  # (B, V)
        pixel_size = pixel_size[..., None, None]  # (B, V, 1, 1)
        lower = lower[..., None, :2]  # (B, V, 1, 2)
        index = torch.floor((views[..., :2] - lower) / pixel_size)  # (B, V, N, 2)
        dense_low = index.amin(dim=2) - 2 + 1  # (B, V, 2): the splat reaches 2 pixels out, then the official + 1
        dense_high = index.amax(dim=2) + 2 + 1  # (B, V, 2)
        # NOTE(unspecified): the official code is written for H = 224 only; for other sizes we put H in place of 224
        # (H - 3, H / 2) and keep the 5 x 5 splat.
        shift = image_size // 2 - torch.floor((dense_high + dense_low) / 2) - 1  # (B, V, 2)
    return lower, pixel_size, shift[:, :, None, :]  # (B, V, 1, 2), (B, V, 1, 1), (B, V, 1, 2)


def pixel_of(query, frame, image_size):
    """(row, column) of query points (B, M, 3) in each view -> (B, V, M, 2) long: the ONE transform that both the
    images (orthographic_splat) and every lookup (centres, target points) use, as proj2img and I2P share it."""
    lower, pixel_size, shift = frame
    with torch.autocast(device_type=query.device.type, enabled=False):
        views = permute_views(query.float())  # (B, V, M, 3)
        pixels = torch.floor((views[..., :2] - lower) / pixel_size) + 1 + shift  # (B, V, M, 2)
    # Points of the cloud land in [1, H - 2] (2 pixels inside the splat box), where this clamp does nothing; it
    # only guards other queries (the official I2P asserts instead).
    return pixels.long().clamp(0, image_size - 1)  # (B, V, M, 2)


def orthographic_splat(points, image_size=224):
    """proj2img: points (B, N, 3) -> images (B, V, 3, H, W) ImageNet-normalised, and the frame for pixel_of.

    Every point adds its third (permuted) coordinate to the 5 x 5 pixels around its pixel; sums, not a z-buffer
    (official reduction 'sum', x-ray-like); empty pixels hold 0, so sigmoid makes the background 0.5."""
    batch_size, num_views = points.shape[0], len(VIEW_PERMUTATIONS)
    frame = orthographic_frame(points, image_size)
    with torch.autocast(device_type=points.device.type, enabled=False):
        values = permute_views(points.float())[..., 2]  # (B, V, N)
        centre = pixel_of(points, frame, image_size)  # (B, V, N, 2)
        dense = centre[:, :, :, None, :] + SPLAT_OFFSETS.to(points.device)  # (B, V, N, 25, 2)
        # The official fix moves a pixel 1 out of the image back in by 1; the splat box overshoots by at most 1
        # pixel on each side, so this is a clamp (and the edge row or column then receives two contributions).
        rows, cols = dense.clamp(0, image_size - 1).unbind(-1)  # 2 x (B, V, N, 25)
        image_index = torch.arange(batch_size * num_views, device=points.device).view(batch_size, num_views, 1, 1)
        flat_index = (image_index * image_size + rows) * image_size + cols  # (B, V, N, 25)
        canvas = torch.zeros(batch_size * num_views * image_size * image_size, device=points.device)  # (B*V*H*W,)
        canvas.scatter_add_(0, flat_index.reshape(-1), values[..., None].expand_as(rows).reshape(-1))
        image = torch.sigmoid(canvas.view(batch_size, num_views, 1, image_size, image_size))  # (B, V, 1, H, W)
        images = imagenet_normalise(image.expand(-1, -1, 3, -1, -1))  # (B, V, 3, H, W): one value, 3 channels
    return images, frame


# ---------------------------------------------------------------- I2P: bicubic back-projection
def cubic_weights(t):
    """The 4 bicubic tap weights at fractions t (...) -> (..., 4): PyTorch's cubic convolution, A = -0.75."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)  # (..., 4)


def bicubic_sample(maps, pixels, image_size):
    """I2P: maps (B, V, C, g, g), pixels (B, V, Q, 2) (row, col) of an H x H picture -> (B, V, Q, C), equal to
    F.interpolate(maps, size=(H, H), mode="bicubic", align_corners=False)[..., row, col].

    Only the Q queried pixels are computed: the full upsampled features would be B * 3 * 512 * 224^2 floats (39 GB at
    B = 128). Each pixel reads a 4 x 4 block of the g x g map; its 16 weights form one row of a sparse (Q, P) matrix,
    so all pixels are one batched matrix product."""
    batch_size, num_views, channels, grid, _ = maps.shape
    num_queries = pixels.shape[2]
    with torch.autocast(device_type=maps.device.type, enabled=False):
        # Source coordinate of an output pixel's centre (align_corners=False, not clamped for cubic, as PyTorch).
        source = (pixels.float() + 0.5) * (grid / image_size) - 0.5  # (B, V, Q, 2)
        base = torch.floor(source)  # (B, V, Q, 2)
        weights = cubic_weights(source - base)  # (B, V, Q, 2, 4)
        taps = (base.long()[..., None] + torch.arange(-1, 3, device=maps.device)).clamp(0, grid - 1)  # (B, V, Q, 2, 4)
        tap_index = taps[..., 0, :, None] * grid + taps[..., 1, None, :]  # (B, V, Q, 4, 4): row-major patch index
        tap_weight = weights[..., 0, :, None] * weights[..., 1, None, :]  # (B, V, Q, 4, 4)
        matrix = torch.zeros(batch_size * num_views, num_queries, grid * grid, device=maps.device)  # (B*V, Q, P)
        # Border taps repeat a clamped index: their weights add up, as the replicated border of the upsampling.
        matrix.scatter_add_(2, tap_index.reshape(batch_size * num_views, num_queries, 16),
                            tap_weight.reshape(batch_size * num_views, num_queries, 16))
        flat_maps = maps.float().reshape(batch_size * num_views, channels, grid * grid).transpose(1, 2)  # (B*V, P, C)
        sampled = torch.bmm(matrix, flat_maps)  # (B*V, Q, C)
    return sampled.view(batch_size, num_views, num_queries, channels)  # (B, V, Q, C)


# ---------------------------------------------------------------- mask_2D_guided
def guided_masking(saliency, mask_ratio, temperature=1.0):
    """mask_2D_guided: saliency (B, G) -> visible_index (B, Gv), masked_index (B, Gm) (ascending), log_probs (B, G).

    p = softmax(s / tau); G draws without replacement (torch.multinomial in the official code), the first Gv drawn
    stay visible. Drawing only those Gv (Gumbel-top-k, masking.sample_without_replacement) has the same law."""
    log_probs = torch.log_softmax(saliency.float() / temperature, dim=-1)  # (B, G)
    drawn = sample_without_replacement(log_probs, num_visible(saliency.shape[1], mask_ratio))  # (B, Gv)
    visible_index, masked_index = split_visible_masked(drawn, saliency.shape[1])  # (B, Gv), (B, Gm)
    return visible_index, masked_index, log_probs


def normalised_entropy(log_probs):
    """H(p) / log G per row of log_probs (B, G) -> (B,): 1 for uniform masking, 0 for a deterministic choice."""
    return -(log_probs.exp() * log_probs).sum(dim=-1) / math.log(log_probs.shape[-1])  # (B,)


# ---------------------------------------------------------------- encode_image: the frozen 2-D teacher
class CLIPTeacher(nn.Module):
    """The frozen CLIP image tower (encode_image): images (B, V, 3, H, W) -> features (B, V, C, g, g),
    attention_maps (B, V, 1, g, g)."""

    def __init__(self, image_size=224, clip_model="ViT-B/16", random_tower=None):
        super().__init__()
        # NOTE(deviation): the official code runs CLIP in fp16; we keep fp32 weights, which the training script stores
        # in bf16 when it runs under bf16 autocast (util/weights.cast_frozen_towers, CLIP's recipe), as the other tower.
        self.visual, self.grid_size = frozen_clip_tower(image_size, clip_model, random_tower)  # g: 224 / 16 = 14
        # The training script leaves a pre-trained tower out of its checkpoints (a random one is saved).
        self.visual_is_pretrained = random_tower is None
        self.feature_dim = self.visual.proj.shape[1]  # C: 512 for ViT-B/16 (after proj)

    def train(self, mode=True):
        """The tower stays in eval mode whatever `mode` is (it has no train-time behaviour to switch anyway)."""
        super().train(mode)
        self.visual.eval()
        return self

    @torch.no_grad()
    def forward(self, images):
        batch_size, num_views = images.shape[:2]
        # One tower call for all views of all shapes; the position table is resampled to g x g when H != 224.
        features, attention = run_tower_with_attention(self.visual, images.flatten(0, 1))  # (B*V, P, C), (B*V, P)
        grid = self.grid_size
        features = features.transpose(1, 2).reshape(batch_size, num_views, -1, grid, grid)  # (B, V, C, g, g)
        attention_maps = attention.reshape(batch_size, num_views, 1, grid, grid)  # (B, V, 1, g, g)
        return features, attention_maps


# ---------------------------------------------------------------- the model
class I2PMAE(nn.Module):
    """I2P-MAE on the Point-MAE backbone: points (B, N, 3) -> dict(loss, loss_rec, loss_2d, masking_entropy, ...)."""

    def __init__(self, num_groups=64, group_size=32, dim=384, depth=12, num_heads=6, decoder_depth=4,
                 decoder_heads=6, drop_path=0.1, mask_ratio=0.8, image_size=224, clip_model="ViT-B/16",
                 random_tower=None, guided=True, saliency_temperature=1.0, target_points=8, weight_2d=1.0,
                 projection="orthographic", skip_near_origin=False):
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}; found {projection!r}.")
        if not 1 <= target_points <= group_size:
            raise ValueError(f"target_points must be between 1 and group_size ({group_size}); found {target_points}.")
        if saliency_temperature <= 0:
            raise ValueError(f"saliency_temperature must be positive; found {saliency_temperature}.")
        num_visible(num_groups, mask_ratio)  # validates the ratio early, with a clear message
        self.num_groups, self.group_size, self.mask_ratio = num_groups, group_size, mask_ratio  # official: 0.8
        self.image_size, self.projection = image_size, projection  # official: 224, proj2img
        # NOTE(unspecified): the official softmax has no temperature (tau = 1, the default); saliency_temperature < 1
        # sharpens the near-uniform guidance and is our own ablation, to be labelled as such.
        self.guided, self.saliency_temperature = guided, saliency_temperature
        # NOTE(unspecified): the official 2-D target has 8 points per token (its 256-centre level groups 8 of the
        # 512 first-level centres); our tokens group K = 32 input points, so the target takes each visible token's
        # T = 8 nearest input points (T = K is allowed but costs a 384 -> 49,152 head).
        self.target_points, self.weight_2d = target_points, weight_2d  # official runner: loss_3d + loss_2d
        # The 3-D path fine-tuning keeps, named and built exactly as kr_mae.KRMAE's (docs/PEERS.md section 1).
        self.tokenizer_3d = PointTokenizer(num_groups=num_groups, group_size=group_size, dim=dim,
                                           skip_near_origin=skip_near_origin)
        self.encoder_pos = CenterEmbedding(dim=dim)
        self.encoder = KATransformer(dim=dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path)
        # NOTE(deviation): the official backbone is Point-M2AE's 3-level hierarchy with a 1 + 1-block decoder; we use
        # Point-MAE's encoder and 4-block decoder, and decode (and reconstruct) at the G-token level.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # official and Point-MAE: truncated normal, std 0.02
        self.decoder_pos = CenterEmbedding(dim=dim, trunc_normal=False)  # Point-MAE: default init there
        self.decoder = KATransformer(dim=dim, depth=decoder_depth, num_heads=decoder_heads, drop_path_rate=drop_path)
        self.teacher = CLIPTeacher(image_size=image_size, clip_model=clip_model, random_tower=random_tower)
        num_views, feature_dim = len(VIEW_PERMUTATIONS), self.teacher.feature_dim
        # rec_head_3d and rec_head_2d: 1x1 Conv1d with PyTorch's default initialisation in the official code; a
        # Linear is the same map.
        self.reconstruction_head = nn.Linear(dim, 3 * group_size)
        self.semantic_head = nn.Linear(dim, target_points * num_views * feature_dim)  # T * 3 * 512 = 12,288
        if projection == "realistic":
            # NOTE(deviation): the official proj2img splats points orthographically; projection="realistic" renders
            # the same 3 axis views with PointCLIP V2's pipeline (render.py), denser depth maps.
            # NOTE(unspecified): its voxel grid is half the image (112 for 224), and its [0, 1] images get
            # proj2img's ImageNet normalisation.
            self.renderer = MultiViewRenderer(num_views=num_views, image_size=image_size, grid_size=image_size // 2)
            self.renderer.rotations = AXIS_VIEW_ROTATIONS.clone()  # (V, 3, 3): proj2img's views, not PointCLIP V2's

    def project(self, points):
        """The 3 views of each cloud: images (B, V, 3, H, W), normalised, and what pixels() needs (the frame)."""
        if self.projection == "orthographic":
            return orthographic_splat(points, self.image_size)  # (B, V, 3, H, W), frame
        return imagenet_normalise(self.renderer(points)), None  # (B, V, 3, H, W)

    def pixels(self, points, frame, query):
        """(row, column) of query points (B, M, 3) in each view of `points` -> (B, V, M, 2) long."""
        if self.projection == "orthographic":
            return pixel_of(query, frame, self.image_size)  # (B, V, M, 2)
        return self.renderer.project(points, query)  # (B, V, M, 2)

    @torch.no_grad()
    def spatial_saliency(self, points, frame, attention_maps, centers):
        """spatial_sals: each centre's bicubic-upsampled attention, averaged over the 3 views (supp. Table 2: "Ave").
        attention_maps (B, V, 1, g, g), centers (B, G, 3) -> saliency (B, G)."""
        center_pixels = self.pixels(points, frame, centers)  # (B, V, G, 2)
        return bicubic_sample(attention_maps, center_pixels, self.image_size).squeeze(-1).mean(dim=1)  # (B, G)

    @torch.no_grad()
    def semantic_target(self, points, frame, features, visible_centers):
        """The 2-D-semantic target: features (B, V, C, g, g), visible_centers (B, Gv, 3) -> (B, Gv, T, V*C), the
        bicubic-upsampled features at each visible token's T nearest points, concatenated over the views."""
        batch_size, num_visible_tokens = visible_centers.shape[:2]
        # The tokenizer's own K nearest points (same KNN), first T of them, in ORIGINAL coordinates (official
        # neighborhood_ori): gathered, not rebuilt from neighborhoods + centers, so that their pixels are exact.
        nearest = knn_indices(points, visible_centers, self.group_size)[:, :, :self.target_points]  # (B, Gv, T)
        target_points = gather_points(points, nearest).flatten(1, 2)  # (B, Gv*T, 3)
        target_pixels = self.pixels(points, frame, target_points)  # (B, V, Gv*T, 2)
        target = bicubic_sample(features, target_pixels, self.image_size)  # (B, V, Gv*T, C)
        num_views, feature_dim = target.shape[1], target.shape[-1]
        target = target.view(batch_size, num_views, num_visible_tokens, self.target_points,
                             feature_dim)  # (B, V, Gv, T, C)
        # Concatenated over the views, view-major (official torch.cat((clip_feats_1, _2, _3), dim=-1)).
        return target.permute(0, 2, 3, 1, 4).reshape(batch_size, num_visible_tokens, self.target_points,
                                                     num_views * feature_dim)  # (B, Gv, T, V*C)

    def choose_mask(self, saliency):
        """saliency (B, G) -> visible_index (B, Gv), masked_index (B, Gm), masking_entropy (0-dim, H(p) / log G)."""
        batch_size, num_groups = saliency.shape
        # guided=False: Point-MAE's uniform random masking. It ablates the masking only; supplement Table 1's
        # "w/o 2D Guidance" row (no 2-D model at all) is guided=False with weight_2d=0.
        if not self.guided:
            visible_index, masked_index = random_masking(batch_size, num_groups, self.mask_ratio, saliency.device)
            return visible_index, masked_index, saliency.new_ones(())
        visible_index, masked_index, log_probs = guided_masking(saliency, self.mask_ratio, self.saliency_temperature)
        # Near 1 with the official tau = 1: attention probabilities are about 1 / P, so softmax(s) is almost uniform
        # (docs/PEERS.md 3.6, risk 1); logged to show how much the guidance actually guides.
        return visible_index, masked_index, normalised_entropy(log_probs).mean()

    def forward(self, points):
        """points (B, N, 3), already augmented -> dict with the losses and what the reconstruction picture needs."""
        batch_size = points.shape[0]
        tokens, centers, neighborhoods = self.tokenizer_3d(points)  # (B, G, D), (B, G, 3), (B, G, K, 3)

        # proj2img, encode_image and the spatial attention cloud: the teacher's outputs are fixed targets.
        with torch.no_grad():
            images, frame = self.project(points)  # (B, V, 3, H, W)
            features, attention_maps = self.teacher(images)  # (B, V, C, g, g), (B, V, 1, g, g)
            saliency = self.spatial_saliency(points, frame, attention_maps, centers)  # (B, G)

        # mask_2D_guided (or random), then Point-MAE's encoder over the visible tokens.
        visible_index, masked_index, masking_entropy = self.choose_mask(saliency)  # (B, Gv), (B, Gm), ()
        visible_tokens = gather_tokens(tokens, visible_index)  # (B, Gv, D)
        visible_centers = gather_tokens(centers, visible_index)  # (B, Gv, 3)
        masked_centers = gather_tokens(centers, masked_index)  # (B, Gm, 3)
        encoded = self.encoder(visible_tokens, self.encoder_pos(visible_centers))  # (B, Gv, D)

        # Point-MAE's decoder over [visible tokens; mask tokens]; I2P-MAE reads BOTH parts of its output.
        num_visible_tokens, num_masked = visible_index.shape[1], masked_index.shape[1]
        decoder_input = torch.cat([encoded, self.mask_token.expand(batch_size, num_masked, -1)], dim=1)  # (B, G, D)
        decoder_pos = self.decoder_pos(torch.cat([visible_centers, masked_centers], dim=1))  # (B, G, D)
        decoded = self.decoder(decoder_input, decoder_pos)  # (B, G, D)
        decoded_visible = decoded[:, :num_visible_tokens]  # (B, Gv, D)
        decoded_masked = decoded[:, num_visible_tokens:]  # (B, Gm, D)

        # rec_head_3d: the masked groups' coordinates, Chamfer-L2 (official loss_3d).
        predicted = self.reconstruction_head(decoded_masked)  # (B, Gm, 3K)
        predicted = predicted.reshape(batch_size, num_masked, self.group_size, 3)  # (B, Gm, K, 3)
        target_3d = gather_tokens(neighborhoods, masked_index)  # (B, Gm, K, 3)
        loss_rec = chamfer_distance(predicted.flatten(0, 1), target_3d.flatten(0, 1)).mean()  # L_3D

        # rec_head_2d: each visible token predicts the teacher's features at its T nearest points in all 3 views.
        target_2d = self.semantic_target(points, frame, features, visible_centers)  # (B, Gv, T, V*C)
        predicted_2d = self.semantic_head(decoded_visible).reshape(target_2d.shape)  # (B, Gv, T, V*C)
        loss_2d = F.mse_loss(predicted_2d.float(), target_2d)  # L_2D: mean over every element (official MSELoss)

        loss = loss_rec + self.weight_2d * loss_2d  # official runner: loss_3d + loss_2d
        return dict(loss=loss, loss_rec=loss_rec, loss_2d=loss_2d, masking_entropy=masking_entropy,
                    centers=centers, neighborhoods=neighborhoods, visible_index=visible_index,
                    masked_index=masked_index, predicted=predicted, saliency=saliency)


# ---------------------------------------------------------------- demo
def draw_views(images, attention_maps, center_pixels, visible_index, path, scale=2):
    """One panel per view: the splatted image in grey, the upsampled attention in red, visible centres as green
    rings and masked centres as black dots. images (V, 3, H, W) normalised, attention_maps (V, 1, g, g),
    center_pixels (V, G, 2), visible_index (Gv,)."""
    import numpy as np
    from PIL import Image, ImageDraw

    num_views, _, size, _ = images.shape
    grey = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # (V, H, W): back to the sigmoid values
    grey = (grey - grey.amin(dim=(1, 2), keepdim=True)) / (grey.amax(dim=(1, 2), keepdim=True)
                                                          - grey.amin(dim=(1, 2), keepdim=True)).clamp_min(1e-12)
    heat = F.interpolate(attention_maps, size=(size, size), mode="bicubic", align_corners=False)[:, 0]  # (V, H, W)
    heat = (heat - heat.amin(dim=(1, 2), keepdim=True)) / (heat.amax(dim=(1, 2), keepdim=True)
                                                          - heat.amin(dim=(1, 2), keepdim=True)).clamp_min(1e-12)
    rgb = torch.stack([0.6 * grey + 0.4 * heat, 0.6 * grey, 0.6 * grey], dim=-1)  # (V, H, W, 3)
    canvas = Image.new("RGB", (num_views * size * scale, size * scale + 24), "white")
    draw = ImageDraw.Draw(canvas)
    visible = set(visible_index.tolist())
    titles = ("view 1: rows x, cols y, value z", "view 2: rows z, cols x, value y", "view 3: rows y, cols z, value x")
    for view in range(num_views):
        tile = Image.fromarray((rgb[view].numpy() * 255).round().astype(np.uint8))
        canvas.paste(tile.resize((size * scale, size * scale), Image.NEAREST), (view * size * scale, 24))
        draw.text((view * size * scale + 4, 6), titles[view], fill="black")
        for group, (row, col) in enumerate(center_pixels[view].tolist()):
            x, y = view * size * scale + col * scale, 24 + row * scale  # rows are the picture's vertical axis
            if group in visible:
                draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=(0, 200, 0), width=2)
            else:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill="black")
    canvas.save(path)


if __name__ == "__main__":
    from tokenizer import demo_torus

    parser = argparse.ArgumentParser(description="One I2P-MAE forward pass on a torus with a small random CLIP tower.")
    parser.add_argument("--out", default="i2p_mae_demo.png", help="where to write the PNG of the 3 views")
    args = parser.parse_args()
    torch.manual_seed(0)
    points = torch.from_numpy(demo_torus(num_points=1024))[None]  # (1, N, 3)
    small_tower = dict(width=64, layers=2, heads=2, patch_size=16)  # random weights: the demo needs no download
    model = I2PMAE(dim=96, depth=2, num_heads=3, decoder_depth=1, decoder_heads=3, random_tower=small_tower).eval()
    print("points         ", tuple(points.shape))
    images, frame = orthographic_splat(points, model.image_size)
    print("images         ", tuple(images.shape), " (proj2img: 3 views, 5 x 5 sum splat, sigmoid, ImageNet)")
    features, attention_maps = model.teacher(images)
    print("features       ", tuple(features.shape), " (encode_image after ln_post and proj; random tower C = 64)")
    print("attention maps ", tuple(attention_maps.shape), " (last block, class token over the patches)")
    with torch.no_grad():
        out = model(points)
        center_pixels = pixel_of(out["centers"], frame, model.image_size)  # (1, V, G, 2)
    for name in ("centers", "neighborhoods", "saliency", "visible_index", "masked_index", "predicted"):
        print(f"{name:15s}", tuple(out[name].shape))
    print("center pixels  ", tuple(center_pixels.shape))
    print(f"loss {out['loss']:.4f} = L_3D {out['loss_rec']:.4f} + L_2D {out['loss_2d']:.4f}; "
          f"masking entropy H(p) / log G = {out['masking_entropy']:.5f}")
    draw_views(images[0], attention_maps[0], center_pixels[0], out["visible_index"][0], args.out)
    print("wrote", args.out)
