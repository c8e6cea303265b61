"""CrossAlignNet (Wang et al., PeerJ Computer Science 2025), re-implemented on the Point-MAE backbone; its equations
are missing from the copy of the paper at hand and are rebuilt from its prose (docs/PEERS.md sec. 4.2, the paper's "Mask
alignment strategy", "Encoders" and "Self-supervised tasks"; the 3-D encoder is this codebase's, so fine-tuning is the
same as for every method).

One random view of each shape is rendered as a depth image; every 3-D patch centre is projected into it. The 3-D
patches are masked at random and the image patches by the 3-D mask (mask alignment). Two tasks train the encoders:
global semantic alignment (GSA: a point-image contrastive loss) and local mask reconstruction (LMR: a decoder that
cross-attends to the visible image features and regresses the masked 3-D patches).

Equations (paper numbering; every body below is REBUILT from the prose around the marker, docs/PEERS.md 4.2)
  Eq. (1):  [u_i, v_i] = pi(K [R|t] c_i)           pixel of patch centre c_i (here: render.py `project`)
  Eq. (2):  I_p(i) = floor(v_i / S) (W / S) + floor(u_i / S)   image patch of centre i (v row, u column)
  mask alignment (no number): image patches are masked by the 3-D mask of the centres they hold (Table 7 modes)
  Eq. (3):  F_P^v = E_P(T_P^v + pos)               point encoder over the visible 3-D tokens
  Eq. (4):  F_I^v = E_I(T_I^v + pos_2D)            image encoder over the visible image tokens (F_I^m not computed)
  Eq. (5):  z^_P = H_P(Pool(D_G([F_P^v ; T_P^m] + pos)))        predicted global point feature
  Eq. (6):  z_I = H_I(Pool(F_I^v))                               global image feature
  Eq. (7):  l(i; P->I) = -log[ exp(cos(z^_P^i, z_I^i) / tau) / sum_k exp(cos(z^_P^i, z_I^k) / tau) ]
  Eq. (8):  L_GSA = 1 / (2B) sum_i [ l(i; P->I) + l(i; I->P) ]  (symmetric cross-modal InfoNCE)
  Eq. (9):  F_dec = D_L([F_P^v ; T_P^m] + pos, F_I^v)         self-attention + cross-attention to the image
  Eq. (10): P^ = Reshape(H_rec(F_dec[masked])), in R^{Gm x K x 3}
  Eq. (11): L_LMR = CD(P^, P_gt)                               squared-L2 Chamfer, mean over masked patches
  Eq. (12): L = L_LMR + lambda L_GSA
  contrast="ntxent" replaces Eq. (7)-(8) by SimCLR's NT-Xent over [z^_P; z_I] (2B - 2 negatives, as Inter-MAE).
The steps of `CrossAlignNet.forward` are those of docs/PEERS.md 4.4 (the spec on this codebase), numbered alike.

At the paper's configuration (the defaults) the model has 56.95 M parameters, against 57.69 M in the paper's Table 9
(point encoder 21.3 M, image encoder 21.3 M, LMR decoder 9.5 M, GSA decoder 3.5 M, tokenizer, heads and embeddings).

Shapes: B batch, N points, G groups (3-D patches), K points per group, D width, Gv / Gm visible / masked groups,
H x W image (H = W = image_size), S patch side, P = (H / S)(W / S) image patches, Pv kept image patches,
E projection width.

Paper symbol -> name here
  m -> num_groups (G)           K -> group_size             S -> patch_size           rho -> mask_ratio
  tau -> temperature            lambda -> gsa_weight        E_P -> encoder            E_I -> image_encoder
  D_G -> gsa_decoder            D_L -> lmr_decoder          H_P -> point_head         H_I -> image_head
  H_rec -> lmr_head             T_P^m -> gsa_mask_token, lmr_mask_token              I_p -> center_patch (B, G)
  F_P^v -> encoded (B, Gv, D)   F_I^v -> image_features (B, Pv, D)                   n_I -> image_keep_count
  z^_P -> point_embedding (B, E)                            z_I -> image_embedding (B, E)

Demo: `python crossalignnet.py [--out crossalignnet_demo.png]` runs a small model once on a toy chair, prints every
shape and draws the rendered view with the projected centres, the 3-D mask and the image mask of each mode.
"""
import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kat import DropPath, KATransformer, init_weights
from masking import gather_tokens, num_visible, random_masking, split_visible_masked
from render import MultiViewRenderer, pixels_to_patches
from tokenizer import CenterEmbedding, PointTokenizer

IMAGE_MASKINGS = ("complementary", "correspondence", "random")  # paper Table 7
CONTRASTS = ("infonce", "ntxent")


# ---------------------------------------------------------------------------------------------------------------
# pretrain.py --method crossalignnet: this file's fields of its Config, defaults, checks and constructor
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """CrossAlignNet's own fields of pretrain.py's Config; its backbone and 3-D tokens are kr_mae.Settings' fields."""
    # --- CrossAlignNet (--method crossalignnet; crossalignnet.py; Wang et al., PeerJ CS 2025) -----------------------
    cal_image_masking: str = "complementary"  # Table 7: complementary (best), correspondence, random
    cal_gsa_weight: float = 1e-4    # lambda of Eq. (12), L = L_LMR + lambda L_GSA (Table 8 best)
    cal_contrast: str = "infonce"   # Eq. (7)-(8): symmetric cross-modal InfoNCE; "ntxent": SimCLR NT-Xent
    cal_temperature: float = 0.1    # tau of the contrastive loss (NOTE(unspecified): 0.1, as Inter-MAE)
    cal_image_depth: int = 12       # the from-scratch image transformer (inferred from Table 9's 57.69 M)
    cal_gsa_depth: int = 2          # the global semantic alignment decoder ("fewer blocks"; inferred)


# What --method crossalignnet sets before --preset and the flags, and its paper's data settings unless --matched.
DEFAULTS = {"crossalignnet": dict(image_size=224)}  # CrossAlignNet: 224 x 224 images, 16 x 16 patches
PAPER_SETTINGS = {"crossalignnet": dict(num_points=2048, augment=False)}  # "Training": 2,048 points, no augmentation


def check(cfg):
    """--method crossalignnet's settings that cannot work, as (passed, message) pairs for pretrain.check_config."""
    return [
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


def build(cfg):
    """pretrain.py's Config -> CrossAlignNet, on KR-MAE's backbone fields (its image transformer: --num_heads)."""
    return CrossAlignNet(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=cfg.dim, depth=cfg.depth,
                         num_heads=cfg.num_heads, decoder_depth=cfg.decoder_depth,
                         decoder_heads=cfg.decoder_heads, gsa_depth=cfg.cal_gsa_depth,
                         image_depth=cfg.cal_image_depth, image_heads=cfg.num_heads, drop_path=cfg.drop_path,
                         mask_ratio=cfg.mask_ratio, image_size=cfg.image_size,
                         image_masking=cfg.cal_image_masking, contrast=cfg.cal_contrast,
                         temperature=cfg.cal_temperature, gsa_weight=cfg.cal_gsa_weight,
                         skip_near_origin=cfg.fps_skip_near_origin)


def chamfer_distance(predicted, target):
    """Squared-L2 Chamfer per group: (M, K, 3), (M, K', 3) -> (M,). Twin of kr_mae.chamfer_distance."""
    squared = torch.cdist(predicted.float(), target.float()).pow(2)  # (M, K, K')
    return squared.min(dim=2).values.mean(dim=1) + squared.min(dim=1).values.mean(dim=1)  # (M,)


def random_view_rotations(batch_size, device, max_elevation=math.radians(20)):
    """One random viewpoint per shape: rotations (B, 3, 3) acting on column vectors, p' = Rx(e) Ry(a) p.

    NOTE(unspecified): the paper pairs each cloud with the image of its own capture view; we draw the view: azimuth
    a ~ U[0, 2 pi) about the up axis y (ShapeNet), then elevation e ~ U[-20, 20] degrees about x (docs/PEERS.md 4.4).
    The renderer then looks at the rotated cloud from its fixed view 0 (PointCLIP V2's first side view, tilted by
    pi/9), so the camera's own tilt adds to e. Drawn anew at every call, from torch's global RNG on `device`.
    """
    azimuth = torch.rand(batch_size, device=device) * 2 * math.pi  # (B,)
    elevation = (torch.rand(batch_size, device=device) * 2 - 1) * max_elevation  # (B,)
    ca, sa, ce, se = azimuth.cos(), azimuth.sin(), elevation.cos(), elevation.sin()  # 4 x (B,)
    zero, one = torch.zeros_like(ca), torch.ones_like(ca)  # (B,), (B,)
    about_y = torch.stack([ca, zero, sa, zero, one, zero, -sa, zero, ca], dim=-1).view(-1, 3, 3)  # (B, 3, 3)
    about_x = torch.stack([one, zero, zero, zero, ce, -se, zero, se, ce], dim=-1).view(-1, 3, 3)  # (B, 3, 3)
    # An explicit sum, not a matmul, so bf16 autocast cannot round the rotation.
    return (about_x.unsqueeze(-1) * about_y.unsqueeze(1)).sum(2)  # (B, 3, 3)


def rotate(cloud, rotation):
    """p' = R p for every point: cloud (B, M, 3), rotation (B, 3, 3) -> (B, M, 3), float32 even under autocast."""
    return (cloud.float().unsqueeze(-2) * rotation.float().unsqueeze(1)).sum(-1)  # (B, M, 3)


def aligned_image_mask(center_patch, visible_index, num_patches, keep_count, mode="complementary"):
    """Mask alignment: the image patches to keep, given the 3-D mask -> image_visible (B, Pv), image_masked (B, P-Pv).

    center_patch (B, G) is I_p of Eq. (2); visible_index (B, Gv) the visible 3-D patches. A patch "owns" the 3-D
    patches whose centre lands in it. Each patch gets a tier; the keep_count patches of highest tier + U[0, 0.5) are
    kept (ties inside a tier broken at random), both outputs ascending.
        tier   complementary (Table 7 best)         correspondence (the Method text)       random
        2      owns masked centres, no visible one  owns visible centres, no masked one    -
        1      owns no centre                       owns no centre                         every patch
        0      owns a visible centre                owns a masked centre (conflicts too)   -
    NOTE(unspecified): the paper masks the image patch of every masked centre and says nothing of patches that own
    no centre or of how many patches stay visible; we keep a FIXED count n_I = P - floor(rho P), the point mask's
    ratio ("equivalent information retention"), and fill it from the unowned patches at random, as PiMAE's fixed
    keep-count does. A tier-0 patch is kept only when tiers 2 and 1 hold fewer than n_I patches.
    NOTE(deviation): the paper's conflict rule (an image patch holding a masked and a visible centre) also masks the
    visible 3-D patch; we mask only the image patch (tier 0), so every shape keeps exactly Gv 3-D patches and the
    batch needs no padding.
    """
    if mode not in IMAGE_MASKINGS:
        raise ValueError(f"mode must be one of {IMAGE_MASKINGS}, but got {mode!r}.")
    if not 0 <= keep_count <= num_patches:
        raise ValueError(f"keep_count must be between 0 and {num_patches} patches, but got {keep_count}.")
    batch_size, num_groups = center_patch.shape
    is_visible = torch.zeros(batch_size, num_groups, dtype=torch.long, device=center_patch.device)  # (B, G)
    is_visible.scatter_(1, visible_index, 1)  # (B, G)
    owned = torch.zeros(batch_size, num_patches, dtype=torch.long, device=center_patch.device)  # (B, P)
    visible_owners = owned.scatter_add(1, center_patch, is_visible) > 0  # (B, P) holds a visible centre
    masked_owners = owned.scatter_add(1, center_patch, 1 - is_visible) > 0  # (B, P) holds a masked centre
    tier = torch.ones(batch_size, num_patches, device=center_patch.device)  # (B, P) unowned: tier 1
    if mode == "complementary":  # masked image <-> visible points
        tier = torch.where(masked_owners & ~visible_owners, 2.0, tier).masked_fill(visible_owners, 0.0)  # (B, P)
    elif mode == "correspondence":  # masked image <-> masked points
        tier = torch.where(visible_owners & ~masked_owners, 2.0, tier).masked_fill(masked_owners, 0.0)  # (B, P)
    key = tier + 0.5 * torch.rand(batch_size, num_patches, device=center_patch.device)  # (B, P)
    kept = key.topk(keep_count, dim=1).indices  # (B, Pv)
    return split_visible_masked(kept, num_patches)  # (B, Pv), (B, P - Pv)


def infonce_loss(point_embedding, image_embedding, temperature=0.1):
    """Eq. (7)-(8): symmetric cross-modal InfoNCE, (B, E), (B, E) -> scalar; shape i's image is its positive."""
    with torch.autocast(device_type=point_embedding.device.type, enabled=False):  # logits / tau in float32
        points = F.normalize(point_embedding.float(), dim=-1)  # (B, E)
        images = F.normalize(image_embedding.float(), dim=-1)  # (B, E)
        logits = points @ images.t() / temperature  # (B, B) cos(z^_P^i, z_I^k) / tau
        targets = torch.arange(logits.shape[0], device=logits.device)  # (B,)
        # Eq. (7), rebuilt from the prose (docs/PEERS.md 4.2): l(i; P->I) = -log softmax_k(cos(z^_P^i, z_I^k) / tau)[i].
        # cross_entropy's row i is l(i; P->I); on the transpose it is l(i; I->P). Their mean over 2B terms: Eq. (8).
        directions = F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)  # Eq. (7)
        return directions / 2  # Eq. (8): the mean over the 2B terms


def ntxent_loss(point_embedding, image_embedding, temperature=0.1):
    """SimCLR NT-Xent over the 2B embeddings [points; images]: each has 1 positive and 2B - 2 negatives (Inter-MAE)."""
    with torch.autocast(device_type=point_embedding.device.type, enabled=False):
        batch_size = point_embedding.shape[0]
        both = F.normalize(torch.cat([point_embedding, image_embedding]).float(), dim=-1)  # (2B, E)
        logits = both @ both.t() / temperature  # (2B, 2B)
        self_pairs = torch.eye(2 * batch_size, dtype=torch.bool, device=logits.device)  # (2B, 2B)
        logits = logits.masked_fill(self_pairs, float("-inf"))  # (2B, 2B) no sample is its own negative
        index = torch.arange(batch_size, device=logits.device)  # (B,)
        targets = torch.cat([index + batch_size, index])  # (2B,) point i <-> image i
        return F.cross_entropy(logits, targets)


def global_pool(tokens):
    """Pool of Eq. (5)-(6): (B, M, D) -> (B, 2D). NOTE(unspecified): [max ; mean], the repository's SVM pooling."""
    return torch.cat([tokens.max(dim=1).values, tokens.mean(dim=1)], dim=-1)  # (B, 2D)


def projection_head(in_dim, out_dim):
    """H_P / H_I: "two fully connected layers, batch normalization and nonlinear activation only after the first".
    NOTE(unspecified): widths and biases from Inter-MAE's head: Linear(2D, E, no bias), BN, ReLU, Linear(E, E)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True),
                         nn.Linear(out_dim, out_dim, bias=False))


class CrossBlock(nn.Module):
    """One LMR decoder block: x += SelfAttn(LN(x)); x += CrossAttn(Q = LN(x), K = V = LN(image)); x += MLP(LN(x)).

    NOTE(unspecified): the paper says only that D_L is "composed of cross-attention and self-attention layers"; we
    use pre-LN (Point-MAE), the order self -> cross -> MLP, no bias on the q/k/v maps (Point-MAE's qkv_bias=False),
    and a LayerNorm of its own on the image features. self_attention=False drops the first sub-layer.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, self_attention=True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, but got dim={dim}, num_heads={num_heads}.")
        self.num_heads, self.self_attention = num_heads, self_attention
        if self_attention:
            self.norm1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.self_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)  # the point queries
        self.norm_image = nn.LayerNorm(dim)  # the image keys and values
        self.query = nn.Linear(dim, dim, bias=False)
        self.key_value = nn.Linear(dim, 2 * dim, bias=False)
        self.cross_proj = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        hidden_dim = int(dim * mlp_ratio)  # Point-MAE: ratio 4
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))
        self.drop_path = DropPath(drop_path)

    def split_heads(self, x):
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, h, M, D/h)

    def attend(self, queries, keys, values):
        attended = F.scaled_dot_product_attention(self.split_heads(queries), self.split_heads(keys),
                                                  self.split_heads(values))  # (B, h, M, D/h)
        return attended.transpose(1, 2).flatten(2)  # (B, M, D)

    def forward(self, x, image_features):
        """x (B, G, D) point tokens, image_features (B, Pv, D) -> (B, G, D)."""
        if self.self_attention:
            queries, keys, values = self.qkv(self.norm1(x)).chunk(3, dim=-1)  # 3 x (B, G, D)
            x = x + self.drop_path(self.self_proj(self.attend(queries, keys, values)))  # (B, G, D)
        keys, values = self.key_value(self.norm_image(image_features)).chunk(2, dim=-1)  # 2 x (B, Pv, D)
        cross = self.attend(self.query(self.norm2(x)), keys, values)  # (B, G, D) Q = points, K = V = image
        x = x + self.drop_path(self.cross_proj(cross))  # (B, G, D)
        return x + self.drop_path(self.mlp(self.norm3(x)))  # (B, G, D)


class CrossDecoder(nn.Module):
    """D_L of Eq. (9): CrossBlocks, the centre positions added at every block input (Point-MAE), then a final LN."""

    def __init__(self, dim, depth, num_heads, drop_path_rate=0.1):
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # Point-MAE: linearly 0 -> drop_path
        self.blocks = nn.ModuleList(CrossBlock(dim, num_heads, drop_path=rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)  # Point-MAE: truncated normal 0.02 for Linear, LayerNorm 1 / 0

    def forward(self, x, pos, image_features):
        for block in self.blocks:
            x = block(x + pos, image_features)  # (B, G, D)
        return self.norm(x)  # (B, G, D)  Eq. (9), rebuilt (docs/PEERS.md 4.2)


class CrossAlignNet(nn.Module):
    """CrossAlignNet pre-training: points (B, N, 3) -> dict of losses and the reconstruction-picture tensors.
    Fine-tuning keeps `tokenizer_3d`, `encoder_pos` and `encoder`, built exactly as kr_mae.KRMAE builds them."""

    def __init__(self, num_groups=64, group_size=32, dim=384, depth=12, num_heads=6, decoder_depth=4,
                 decoder_heads=6, gsa_depth=2, image_depth=12, image_heads=6, drop_path=0.1, mask_ratio=0.6,
                 image_size=224, patch_size=16, image_masking="complementary", contrast="infonce",
                 temperature=0.1, projection_dim=256, gsa_weight=1e-4, skip_near_origin=False):
        super().__init__()
        if image_masking not in IMAGE_MASKINGS or contrast not in CONTRASTS:
            raise ValueError(f"image_masking must be one of {IMAGE_MASKINGS} and contrast one of {CONTRASTS}, "
                             f"but got {image_masking!r} and {contrast!r}.")
        if image_size % patch_size != 0 or temperature <= 0 or gsa_weight < 0:
            raise ValueError(f"Expected image_size a multiple of patch_size, temperature > 0 and gsa_weight >= 0, but "
                             f"got {image_size}, {patch_size}, {temperature} and {gsa_weight}.")
        if num_visible(num_groups, mask_ratio) == num_groups:
            raise ValueError(f"mask_ratio {mask_ratio} masks none of the {num_groups} groups; LMR needs at least one.")
        self.num_groups, self.group_size, self.mask_ratio = num_groups, group_size, mask_ratio  # paper: 64, 32, 0.6
        self.image_size, self.patch_size = image_size, patch_size  # paper: 224; NOTE(unspecified): S = 16 (ViT)
        self.num_patches = (image_size // patch_size) ** 2  # P = 196 at 224 / 16
        self.image_keep_count = num_visible(self.num_patches, mask_ratio)  # n_I = P - floor(rho P): 79 at 224 / 16
        self.image_masking, self.contrast = image_masking, contrast  # paper Table 7 best: complementary
        self.temperature, self.gsa_weight = temperature, gsa_weight  # Inter-MAE: tau 0.1; Table 8 best: 1e-4
        # NOTE(unspecified): lambda = 1e-4 is Table 8's best row; the "Training" section's value is blank in our copy.
        # NOTE(unspecified): tau is lost with Eq. (7); 0.1 as Inter-MAE's NT-Xent. The loss's form (a symmetric
        # cross-modal InfoNCE, CrossPoint / CLIP) is rebuilt from "same viewpoint = positive, others = negatives".

        # The 3-D path that fine-tuning keeps: Eq. (3), exactly kr_mae.KRMAE's constructors and arguments.
        self.tokenizer_3d = PointTokenizer(num_groups=num_groups, group_size=group_size, dim=dim,
                                           skip_near_origin=skip_near_origin)
        self.encoder_pos = CenterEmbedding(dim=dim)
        self.encoder = KATransformer(dim=dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path)

        # The image of the view. NOTE(deviation): the paper uses Blender RGB(-D) renders of the mesh from the cloud's
        # capture view; we have no meshes, so one PointCLIP V2 depth render (render.py) of the cloud itself.
        # NOTE(unspecified): voxel grid of half the image side (112 for 224, docs/PEERS.md 4.4), bilinearly upsampled.
        self.renderer = MultiViewRenderer(num_views=1, image_size=image_size, grid_size=image_size // 2)
        # Image tokens: "partitioned into S x S patches which undergo 2D convolutional operations and are flattened".
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)  # one depth channel
        # NOTE(unspecified): learnable image positions, added at every block like the point encoder's ("both encoders
        # ... consistent with Point-MAE"); a from-scratch image transformer, 12 x 384, 6 heads (inferred from the
        # 57.69 M parameters of Table 9; a CLIP ViT-B alone would be 86 M).
        self.image_pos = nn.Parameter(torch.zeros(1, self.num_patches, dim))  # (1, P, D)
        # NOTE(deviation): Point-MAE decays no position table; util/optim.parameter_groups exempts only names
        # ending in "token" or holding "pos_embed", so AdamW's weight decay 0.05 applies to image_pos (the two mask tokens
        # are exempt); the peer table's rows use this rule.
        self.image_encoder = KATransformer(dim=dim, depth=image_depth, num_heads=image_heads,
                                           drop_path_rate=drop_path)

        # GSA, Eq. (5)-(6). NOTE(unspecified): depth 2 ("fewer blocks" than the encoder; fits Table 9's count), and
        # its own mask token and centre embedding, separate from LMR's (two decoders in the paper's Fig. 1).
        self.gsa_mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.gsa_pos = CenterEmbedding(dim=dim, trunc_normal=False)  # as Point-MAE's decoder_pos_embed
        self.gsa_decoder = KATransformer(dim=dim, depth=gsa_depth, num_heads=decoder_heads, drop_path_rate=drop_path)
        self.point_head = projection_head(2 * dim, projection_dim)  # H_P; NOTE(unspecified): E = 256 (CrossPoint)
        self.image_head = projection_head(2 * dim, projection_dim)  # H_I, the same structure

        # LMR, Eq. (9)-(10). NOTE(unspecified): 4 blocks, Point-MAE's decoder depth (fits Table 9's count).
        self.lmr_mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lmr_pos = CenterEmbedding(dim=dim, trunc_normal=False)
        self.lmr_decoder = CrossDecoder(dim, decoder_depth, decoder_heads, drop_path_rate=drop_path)
        self.lmr_head = nn.Linear(dim, 3 * group_size)  # "a simple fully connected layer", default init (Point-MAE)

        # NOTE(unspecified): initialisation as Point-MAE's: truncated normal 0.02 for tokens, positions and Linear
        # weights of the heads; the patch embedding as MAE's (Xavier-uniform on the flattened kernel).
        for parameter in (self.image_pos, self.gsa_mask_token, self.lmr_mask_token):
            nn.init.trunc_normal_(parameter, std=0.02)
        self.point_head.apply(init_weights)
        self.image_head.apply(init_weights)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(dim, -1))
        nn.init.zeros_(self.patch_embed.bias)

    @torch.no_grad()
    def render_view(self, points, centers, rotation=None):
        """Eq. (1)-(2): a view of each shape -> images (B, 1, H, W) in [0, 1] (background 1), center_pixels (B, G, 2)
        as (row, col), center_patch (B, G). `rotation` (B, 3, 3): a fixed view (tests); None draws one per shape.

        NOTE(deviation): Eq. (1) projects with a camera's K [R|t]; we send the rotated centres through the renderer's
        own point -> pixel map (render.py `project`), which is exact for the image it draws.
        NOTE(deviation): the paper's clouds are partial, back-projected from that one view's depth map; ours are
        complete ShapeNet55 clouds, so the image shows only the near side of the cloud it is paired with.
        """
        if rotation is None:
            rotation = random_view_rotations(points.shape[0], points.device)  # (B, 3, 3)
        rotated_points, rotated_centers = rotate(points, rotation), rotate(centers, rotation)  # (B, N, 3), (B, G, 3)
        images = self.renderer(rotated_points)[:, 0, :1]  # (B, 1, H, W) one view, one of its 3 equal channels
        # Eq. (1), rebuilt from the prose (docs/PEERS.md 4.2): the pixel (row v, column u) of every centre.
        center_pixels = self.renderer.project(rotated_points, rotated_centers)[:, 0]  # (B, G, 2)  Eq. (1)
        # Eq. (2), rebuilt from the prose (docs/PEERS.md 4.2): I_p = floor(v / S) (W / S) + floor(u / S), row-major.
        center_patch = pixels_to_patches(center_pixels, self.image_size, self.patch_size)  # (B, G)  Eq. (2)
        return images, center_pixels, center_patch

    def embed_image(self, images):
        """T_I: images (B, 1, H, W) -> patch tokens (B, P, D), row-major like pixels_to_patches (Eq. 2)."""
        # NOTE(unspecified): "normalization" of the images: the depth image's [0, 1] mapped to [-1, 1].
        tokens = self.patch_embed(images * 2 - 1)  # (B, D, H/S, W/S)
        return tokens.flatten(2).transpose(1, 2)  # (B, P, D)

    def forward(self, points):
        """points (B, N, 3) -> dict(loss, loss_rec, loss_gsa, centers, neighborhoods, visible_index, masked_index,
        predicted) and, for pictures, images, center_pixels, center_patch, image_visible_index, image_masked_index."""
        batch_size = points.shape[0]
        if self.training and batch_size < 2:
            raise ValueError(f"CrossAlignNet contrasts the shapes of a batch and its projection heads use BatchNorm, "
                             f"so training needs a batch of at least 2 shapes, but got a batch of {batch_size}.")
        # Step 1, Eq. (3) tokens. NOTE(unspecified): the 3-D branch reads the cloud as given; the random rotation
        # only places the camera, so the encoder sees the same poses as in fine-tuning.
        tokens, centers, neighborhoods = self.tokenizer_3d(points)  # (B, G, D), (B, G, 3), (B, G, K, 3)
        # Step 2: the view, and the image patch of every centre, Eq. (1)-(2).
        images, center_pixels, center_patch = self.render_view(points, centers)  # (B, 1, H, W), (B, G, 2), (B, G)
        # Step 3: random 3-D masking at rho (paper: 60 %).
        visible_index, masked_index = random_masking(batch_size, self.num_groups, self.mask_ratio,
                                                     device=points.device)  # (B, Gv), (B, Gm)
        num_masked = masked_index.shape[1]
        # Step 4: the aligned image mask.
        image_visible_index, image_masked_index = aligned_image_mask(
            center_patch, visible_index, self.num_patches, self.image_keep_count, self.image_masking)  # (B, Pv), ...

        # Step 5, Eq. (4). NOTE(deviation): the paper's E_I also encodes the masked image tokens (F_I^m); no loss uses
        # F_I^m and the paper credits masking for a cheaper image encoder, so we encode the visible tokens only.
        image_tokens = gather_tokens(self.embed_image(images), image_visible_index)  # (B, Pv, D)
        image_pos = gather_tokens(self.image_pos.expand(batch_size, -1, -1), image_visible_index)  # (B, Pv, D)
        # Eq. (4), rebuilt from the prose (docs/PEERS.md 4.2): F_I^v = E_I(T_I^v + pos_2D).
        image_features = self.image_encoder(image_tokens, image_pos)  # (B, Pv, D)  Eq. (4)

        # Step 6, Eq. (3): the point encoder over the visible groups.
        visible_centers = gather_tokens(centers, visible_index)  # (B, Gv, 3)
        masked_centers = gather_tokens(centers, masked_index)  # (B, Gm, 3)
        visible_tokens = gather_tokens(tokens, visible_index)  # (B, Gv, D)
        # Eq. (3), rebuilt from the prose (docs/PEERS.md 4.2): F_P^v = E_P(T_P^v + pos).
        encoded = self.encoder(visible_tokens, self.encoder_pos(visible_centers))  # (B, Gv, D)  Eq. (3)
        all_centers = torch.cat([visible_centers, masked_centers], dim=1)  # (B, G, 3) visible first

        # Step 7, GSA, Eq. (5)-(8).
        gsa_input = torch.cat([encoded, self.gsa_mask_token.expand(batch_size, num_masked, -1)], dim=1)  # (B, G, D)
        gsa_output = self.gsa_decoder(gsa_input, self.gsa_pos(all_centers))  # (B, G, D)
        # Eq. (5), rebuilt from the prose (docs/PEERS.md 4.2): z^_P = H_P(Pool(D_G([F_P^v ; T_P^m] + pos))).
        point_embedding = self.point_head(global_pool(gsa_output))  # (B, E)  Eq. (5)
        # Eq. (6), rebuilt from the prose (docs/PEERS.md 4.2): z_I = H_I(Pool(F_I^v)).
        image_embedding = self.image_head(global_pool(image_features))  # (B, E)  Eq. (6)
        contrast = infonce_loss if self.contrast == "infonce" else ntxent_loss
        # Eq. (7)-(8), rebuilt from the prose (docs/PEERS.md 4.2): L_GSA = (1 / 2B) sum_i [l(i; P->I) + l(i; I->P)].
        loss_gsa = contrast(point_embedding, image_embedding, self.temperature)  # Eq. (7)-(8)

        # Step 8, LMR, Eq. (9)-(11).
        lmr_input = torch.cat([encoded, self.lmr_mask_token.expand(batch_size, num_masked, -1)], dim=1)  # (B, G, D)
        lmr_pos = self.lmr_pos(all_centers)  # (B, G, D)
        # Eq. (9), rebuilt from the prose (docs/PEERS.md 4.2): F_dec = D_L([F_P^v ; T_P^m] + pos, F_I^v).
        decoded = self.lmr_decoder(lmr_input, lmr_pos, image_features)  # (B, G, D)  Eq. (9)
        predicted = self.lmr_head(decoded[:, -num_masked:])  # (B, Gm, 3K)
        # Eq. (10), rebuilt from the prose (docs/PEERS.md 4.2): Reshape(H_rec(F_dec[masked])).
        predicted = predicted.reshape(batch_size, num_masked, self.group_size, 3)  # (B, Gm, K, 3)  Eq. (10)
        target = gather_tokens(neighborhoods, masked_index)  # (B, Gm, K, 3)
        # NOTE(unspecified): the paper's "enhanced Chamfer Distance" is not defined; we use Point-MAE's squared-L2
        # Chamfer, averaged over the masked groups of the batch.
        group_errors = chamfer_distance(predicted.flatten(0, 1), target.flatten(0, 1))  # (B * Gm,)
        # Eq. (11), rebuilt from the prose (docs/PEERS.md 4.2): L_LMR = CD(P^, P_gt).
        loss_rec = group_errors.mean()  # Eq. (11)

        # Eq. (12), rebuilt from the prose (docs/PEERS.md 4.2): L = L_LMR + lambda L_GSA.
        # NOTE(unspecified): with lambda = 0 L_GSA is still computed and returned (logged), but not added, so the GSA
        # decoder and heads get no gradient (the Table 8 "L_LMR only" row).
        loss = loss_rec + self.gsa_weight * loss_gsa if self.gsa_weight > 0 else loss_rec  # Eq. (12)
        return dict(loss=loss, loss_rec=loss_rec, loss_gsa=loss_gsa, centers=centers, neighborhoods=neighborhoods,
                    visible_index=visible_index, masked_index=masked_index, predicted=predicted, images=images,
                    center_pixels=center_pixels, center_patch=center_patch, image_visible_index=image_visible_index,
                    image_masked_index=image_masked_index)


def toy_chair(num_points=1024, generator=None):
    """A y-up chair (N, 3): seat, backrest and four legs, points uniform inside thin boxes (demo only)."""
    boxes = torch.tensor([[-0.5, 0.0, -0.5, 0.5, 0.1, 0.5], [-0.5, 0.1, -0.5, 0.5, 1.0, -0.4]]
                         + [[x - 0.05, -0.8, z - 0.05, x + 0.05, 0.0, z + 0.05] for x in (-0.4, 0.4)
                            for z in (-0.4, 0.4)])  # (6, 6) min xyz, max xyz
    which = torch.arange(num_points) % len(boxes)  # (N,) equal shares per box
    low, high = boxes[which, :3], boxes[which, 3:]  # (N, 3), (N, 3)
    return low + torch.rand(num_points, 3, generator=generator) * (high - low)  # (N, 3)


if __name__ == "__main__":
    from PIL import Image, ImageDraw

    parser = argparse.ArgumentParser(description="CrossAlignNet on a toy chair: the view, the 3-D and image masks.")
    parser.add_argument("--out", default="crossalignnet_demo.png", help="where to write the PNG")
    args = parser.parse_args()
    torch.manual_seed(0)
    points = torch.stack([toy_chair(1024), toy_chair(1024)])  # (B, N, 3) B = 2: BatchNorm needs a batch
    model = CrossAlignNet(num_groups=32, group_size=16, dim=64, depth=2, num_heads=4, decoder_depth=2,
                          decoder_heads=4, gsa_depth=1, image_depth=2, image_heads=4, image_size=128,
                          projection_dim=32)
    out = model(points)
    print(f"points {tuple(points.shape)} -> P = {model.num_patches} image patches, keep n_I = {model.image_keep_count}")
    for name, value in out.items():
        print(f"  {name:20s} {tuple(value.shape)}" + (f" = {value.item():.4f}" if value.dim() == 0 else ""))
    out["loss"].backward()
    print("backward ok; parameters:", sum(parameter.numel() for parameter in model.parameters()))

    # One panel per image-masking mode, all for the same shape, view and 3-D mask (the forward used complementary).
    scale, grid = 3, model.image_size // model.patch_size
    visible = set(out["visible_index"][0].tolist())
    size = model.image_size * scale
    canvas = Image.new("RGB", (3 * size + 40, size + 70), "white")
    draw = ImageDraw.Draw(canvas)
    grey = (out["images"][0, 0] * 255).round().byte().numpy()  # (H, W)
    view = Image.fromarray(grey).convert("RGB").resize((size, size), Image.NEAREST)
    for panel, mode in enumerate(IMAGE_MASKINGS):
        kept, _ = aligned_image_mask(out["center_patch"], out["visible_index"], model.num_patches,
                                     model.image_keep_count, mode)  # (B, Pv)
        left = 10 + panel * (size + 10)
        tile = view.copy()
        shade = ImageDraw.Draw(tile, "RGBA")
        side = model.patch_size * scale
        for patch in range(model.num_patches):  # masked image patches washed out, kept ones outlined in green
            top, col = (patch // grid) * side, (patch % grid) * side  # row-major, as pixels_to_patches
            masked = patch not in set(kept[0].tolist())
            shade.rectangle([col, top, col + side - 1, top + side - 1], fill=(255, 255, 255, 190) if masked else None,
                            outline=None if masked else (20, 160, 60, 255), width=2)
        canvas.paste(tile, (left, 30))
        for group, (row, col) in enumerate(out["center_pixels"][0].tolist()):
            y, x = 30 + row * scale + scale // 2, left + col * scale + scale // 2  # rows are the vertical axis
            colour = (30, 90, 230) if group in visible else (230, 80, 30)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour, outline="black")
        draw.text((left, 8), f"image masking: {mode}", fill="black")
    draw.text((10, size + 40), "dots: projected 3-D centres (blue visible, orange masked); green squares: kept image "
                               "patches; pale: masked image patches", fill="black")
    canvas.save(args.out)
    print("wrote", args.out)
