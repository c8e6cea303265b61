"""Joint-MAE (Guo et al., IJCAI 2023), re-implemented on the Point-MAE backbone: a 2D-3D joint masked autoencoder
that masks a point cloud and a depth map projected from it, encodes the visible tokens of both in one transformer
with local-aligned attention, and reconstructs both, plus the reconstruction's projection (paper section 3).

Equations (the paper's own numbering; the joint encoder's equation in section 3.2 has no number, "JointEnc" here)
  Eq. (1): I = Project(P),  I in R^{H x W x 1}: a perspective depth map of P from a random view per shape
  Eq. (2): T_3D = Embed_3D(P),  T_2D = Embed_2D(I)   (3-D: FPS + KNN + mini-PointNet; 2-D: 4x4 patchify, 2 convs)
  JointEnc: E^v_2D-3D = JointEnc(Concat(T^v_3D + M_3D, T^v_2D + M_2D)), local-aligned attention in every block
  Eq. (3): D_2D-3D = ShareDec(Concat(E^v_2D-3D, T^m_3D, T^m_2D))
  Eq. (4): D'_3D = SpeDec_3D(D_3D, E^v_3D),  D'_2D = SpeDec_2D(D_2D, E^v_2D)   (one cross-attention block each)
  Eq. (5): L_3D = CD(RecHead_3D(D'_3D), P),  L_2D = MSE(RecHead_2D(D'_2D), I)
  Eq. (6): L_3D-2D = MSE(Project(RecHead_3D(D'_3D)), I)
  Eq. (7): L_overall = L_2D + L_3D + L_3D-2D

Shapes: B batch, N points, G 3-D tokens (groups), K points per group, D width (the paper's C), Gv / Gm visible /
masked 3-D tokens, H x W image (H = W = image_size), p patch_size, P2 = (H / p)^2 2-D tokens per image, P2v / P2m
visible / masked 2-D tokens, L = Gv + P2v joint sequence, V views of L_3D-2D, R = any flattened leading dims.

Paper symbol -> name here
    P -> points (B, N, 3)                     I -> image (B, 1, H, W)              Project -> JointMAE.project
    T_3D -> tokens_3d (B, G, D)               T_2D -> tokens_2d (B, P2, D)         C -> dim (D)
    M_3D, M_2D -> modality_token_3d, modality_token_2d (1, 1, D)    75 % -> mask_ratio, mask_ratio_2d
    T^m_3D, T^m_2D -> mask_token_3d, mask_token_2d (1, 1, D)        E^v_2D-3D -> encoded (B, L, D)
    E^v_3D, E^v_2D -> encoded_3d (B, Gv, D), encoded_2d (B, P2v, D)
    ShareDec -> shared_decoder                SpeDec_3D, SpeDec_2D -> specific_decoder_3d, specific_decoder_2d
    RecHead_3D -> reconstruction_head         RecHead_2D -> reconstruction_head_2d
    L_3D, L_2D, L_3D-2D, L_overall -> loss_rec, loss_2d, loss_cross, loss
    Table 6 "2D-3D" / "3D-2D" local or global -> local_3d_to_2d, local_2d_to_3d (named query -> key)
    Table 8 "View Num." of L_3D-2D -> cross_views (0: no L_3D-2D)

Demo: `python joint_mae.py [--out joint_mae_demo.png]` trains a small model on a torus for a few steps, prints
every shape and draws the depth map with its masks, the attention mask and both reconstructions.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kat import KATransformer, init_weights
from masking import gather_tokens, num_visible, random_masking
from render import MultiViewRenderer, pixels_to_patches
from tokenizer import CenterEmbedding, PointTokenizer

PROJECTIONS = ("perspective", "realistic")
# NOTE(unspecified): the paper cites PointCLIP / SimpleView for its projection; we take PointCLIP V1's camera
# (mv_utils_zs.py: TRANS = -1.6, so z' = z + 1.6 for a cloud in the unit sphere).
CAMERA_DISTANCE = 1.6
# NOTE(unspecified): each point covers a 2 x 2 pixel square (PointCLIP V1 draws 1 x 1), because 1,024 points at
# 1 x 1 cover under 2 % of a 224 x 224 image.
SPLAT = 2
# NOTE(unspecified): "a random view at every iteration": per shape, azimuth U[0, 2 pi) about the up axis y and
# elevation U[-20, 20] degrees.
MAX_ELEVATION = math.pi / 9
# NOTE(unspecified): points with z' below this are dropped (PointCLIP V1 keeps z' >= 0), which keeps 1 / z', x / z'
# and their gradients finite; unit-sphere clouds have z' >= 0.6, so only stray predicted points are affected.
NEAR_PLANE = 1e-4


def chamfer_distance(predicted, target):
    """Squared-L2 Chamfer distance per group: (M, K, 3), (M, K', 3) -> (M,). Twin of pretrain.chamfer_distance."""
    squared = torch.cdist(predicted.float(), target.float()).pow(2)  # (M, K, K')
    return squared.min(dim=2).values.mean(dim=1) + squared.min(dim=1).values.mean(dim=1)  # (M,)


# ---------------------------------------------------------------- Eq. (1) and (6): the projection
def view_rotation(azimuth, elevation):
    """Camera rotations (...), (...) radians -> (..., 3, 3), p' = R p: azimuth about y, elevation about x, then a
    quarter turn in the image plane so that a y-up shape stands upright in the picture (rows follow -y)."""
    cos_a, sin_a, cos_e, sin_e = azimuth.cos(), azimuth.sin(), elevation.cos(), elevation.sin()
    zero, one = torch.zeros_like(cos_a), torch.ones_like(cos_a)
    about_y = torch.stack([cos_a, zero, sin_a, zero, one, zero, -sin_a, zero, cos_a], -1).unflatten(-1, (3, 3))
    about_x = torch.stack([one, zero, zero, zero, cos_e, -sin_e, zero, sin_e, cos_e], -1).unflatten(-1, (3, 3))
    # NOTE(unspecified): the image orientation; this quarter turn (x' = -y, y' = x) only makes pictures upright.
    quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], device=azimuth.device)
    return quarter @ about_x @ about_y  # (..., 3, 3)


def unit_sphere_frame(points):
    """Centroid (B, 1, 3) and largest radius (B, 1, 1) of each cloud (B, N, 3)."""
    origin = points.mean(dim=1, keepdim=True)  # (B, 1, 3)
    radius = (points - origin).norm(dim=-1).amax(dim=1).clamp_min(1e-12)  # (B,)
    return origin, radius.view(-1, 1, 1)  # (B, 1, 3), (B, 1, 1)


def camera_frame(points, origin, radius, rotations):
    """(B, M, 3) points -> (B, V, M, 3) in each of the V cameras (B, V, 3, 3): into the unit sphere of the INPUT
    cloud (origin, radius), rotate, then move away from the camera by CAMERA_DISTANCE along z."""
    unit = (points - origin) / radius  # (B, M, 3)
    rotated = torch.einsum("bvij,bmj->bvmi", rotations, unit)  # (B, V, M, 3)
    return rotated + rotated.new_tensor([0.0, 0.0, CAMERA_DISTANCE])  # (B, V, M, 3)


def perspective_coordinates(camera_points, image_size):
    """Continuous (row, col) of camera-frame points (..., 3), PointCLIP V1: (x / z + 1) H / 2, (y / z + 1) W / 2."""
    x, y, z = camera_points.unbind(-1)  # 3 x (...)
    safe_z = torch.where(z > NEAR_PLANE, z, torch.ones_like(z))  # points behind the near plane: callers drop them
    return (x / safe_z + 1) * image_size / 2, (y / safe_z + 1) * image_size / 2, safe_z  # 3 x (...)


def perspective_pixels(camera_points, image_size):
    """The pixel under each camera-frame point (..., M, 3) -> (..., M, 2) long (row, col), and (..., M) inside."""
    rows, cols, _ = perspective_coordinates(camera_points, image_size)  # 2 x (..., M)
    # PointCLIP V1's 1 x 1 splat: offset -1/2, then ceil, i.e. the nearest pixel
    pixels = torch.stack([torch.ceil(rows - 0.5), torch.ceil(cols - 0.5)], dim=-1)  # (..., M, 2)
    inside = ((pixels >= 0) & (pixels <= image_size - 1)).all(-1) & (camera_points[..., 2] > NEAR_PLANE)  # (..., M)
    return pixels.clamp(0, image_size - 1).long(), inside  # (..., M, 2), (..., M)


def perspective_depth(camera_points, image_size, splat=SPLAT):
    """Eq. (1), PointCLIP V1's points2depth: camera-frame points (..., M, 3) -> depth maps (..., H, W).

    Each point covers splat x splat pixels (offsets arange(splat) - splat / 2, then ceil, as PointCLIP V1); a pixel
    holds the harmonic mean of the depths z' of the points on it, n / sum_i 1 / z'_i (a soft z-buffer leaning to the
    near points, differentiable in z'); background 0; points outside the frame or nearer than NEAR_PLANE dropped.
    """
    leading, count = camera_points.shape[:-2], camera_points.shape[-2]
    flat = camera_points.reshape(-1, count, 3)  # (R, M, 3)
    rows, cols, safe_z = perspective_coordinates(flat, image_size)  # 3 x (R, M)
    offsets = torch.arange(splat, device=flat.device, dtype=flat.dtype) - splat / 2  # PointCLIP V1: linspace
    pixel_rows = torch.ceil(rows[..., None, None] + offsets[:, None])  # (R, M, s, 1)
    pixel_cols = torch.ceil(cols[..., None, None] + offsets[None, :])  # (R, M, 1, s)
    inside = ((pixel_rows >= 0) & (pixel_rows <= image_size - 1) & (pixel_cols >= 0)
              & (pixel_cols <= image_size - 1) & (flat[..., 2] > NEAR_PLANE)[..., None, None])  # (R, M, s, s)
    index = torch.where(inside, pixel_rows * image_size + pixel_cols, 0).long().flatten(1)  # (R, M*s*s) row-major
    inverse_depth = torch.where(inside, 1 / safe_z[..., None, None], 0).flatten(1)  # (R, M*s*s)
    canvas = flat.new_zeros(flat.shape[0], image_size * image_size)  # (R, H*W)
    inverse_sum = canvas.scatter_add(1, index, inverse_depth)  # (R, H*W)  sum_i 1 / z'_i
    hits = canvas.scatter_add(1, index, inside.flatten(1).to(canvas.dtype))  # (R, H*W)  n
    covered = hits > 0  # (R, H*W)
    depth = torch.where(covered, hits / torch.where(covered, inverse_sum, 1), 0)  # (R, H*W) Eq. (1)
    return depth.view(*leading, image_size, image_size)  # (..., H, W)


def patchify(image, patch_size):
    """(B, 1, H, W) -> (B, P2, p, p), patches in row-major order (render.pixels_to_patches' index)."""
    batch, _, height, width = image.shape
    grid_rows, grid_cols = height // patch_size, width // patch_size
    patches = image.reshape(batch, grid_rows, patch_size, grid_cols, patch_size)  # (B, H/p, p, W/p, p)
    return patches.permute(0, 1, 3, 2, 4).reshape(batch, grid_rows * grid_cols, patch_size, patch_size)  # (B, P2, p, p)


# ---------------------------------------------------------------- Eq. (2), 2-D branch; Eq. (4)
class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, each pixel on its own (no batch or spatial mixing)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W)


class MaskedConvBlock(nn.Module):
    """One 3x3 convolution block of Eq. (2): strided 3x3 conv -> norm -> GELU, then a residual 3x3 conv; every
    convolution reads its input multiplied by the visible-patch mask (ConvMAE's masked convolution)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.down = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = ChannelNorm(out_channels)
        self.refine = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x, mask_in, mask_out):
        x = F.gelu(self.norm(self.down(x * mask_in.to(x.dtype))))  # (B, C_out, S/2, S/2)
        return x + self.refine(x * mask_out.to(x.dtype))  # (B, C_out, S/2, S/2)


class ConvTokenizer2D(nn.Module):
    """Eq. (2), T_2D = Embed_2D(I): depth map (B, 1, H, W) and visible-token flags (B, P2) -> tokens (B, P2, D).

    4x4 patchify + linear projection (a 4x4 stride-4 conv) to a (H/4)^2 grid, then two 3x3 conv blocks of stride 2:
    overall 1/16 at p = 16, one token per p x p patch.
    NOTE(unspecified): widths D/4, D/2, D (96 / 192 / 384, the stage widths of Point-M2AE and I2P-MAE), a per-pixel
    LayerNorm, GELU, a residual 3x3 conv per block and PyTorch's default conv initialisation.
    NOTE(unspecified): masked convolution as ConvMAE (which the paper cites): every conv input is multiplied by
    the nearest-upsampled visible-patch mask, so a visible token never sees the pixels of a masked patch (a 3x3
    conv would otherwise read about 6 px into the neighbouring patches).
    """

    def __init__(self, dim=384, patch_size=16):
        super().__init__()
        if patch_size % 4 != 0:
            raise ValueError(f"patch_size must be a multiple of 4 (4x4 patchify then two stride-2 blocks), "
                             f"but got {patch_size}.")
        self.patch_size = patch_size
        stem = patch_size // 4  # paper: 4 at p = 16
        self.patchify = nn.Conv2d(1, dim // 4, stem, stride=stem)  # 4x4 patchify + linear projection
        self.block1 = MaskedConvBlock(dim // 4, dim // 2)
        self.block2 = MaskedConvBlock(dim // 2, dim)

    def forward(self, image, visible):
        batch, _, height, width = image.shape
        flags = visible.view(batch, 1, height // self.patch_size, width // self.patch_size).float()  # (B, 1, H/p, W/p)
        mask_4 = F.interpolate(flags, scale_factor=4, mode="nearest")  # (B, 1, 4H/p, 4W/p)
        mask_2 = F.interpolate(flags, scale_factor=2, mode="nearest")  # (B, 1, 2H/p, 2W/p)
        x = self.patchify(image)  # (B, D/4, 4H/p, 4W/p): each cell reads only its own patch
        x = self.block1(x, mask_4, mask_2)  # (B, D/2, 2H/p, 2W/p)
        x = self.block2(x, mask_2, flags)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, P2, D)  Eq. (2), row-major like pixels_to_patches


class CrossBlock(nn.Module):
    """Eq. (4), SpeDec: one pre-LN block whose attention is cross-attention, then the MLP and a final LayerNorm:
    x + CrossAttn(LN(x + pos), LN(context)), then + MLP(LN(.)). Queries (B, M, D), context (B, Lc, D) -> (B, M, D).

    NOTE(unspecified): the cross-attention REPLACES self-attention ("we adopt cross-attention layer in the 1-block
    specific decoders"); queries get their decoder position added, keys / values are the encoder outputs as they are.
    A query row's output depends on that row and the context only, so the caller may pass just the rows it needs.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, but got dim={dim}, num_heads={num_heads}.")
        self.num_heads = num_heads
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim, bias=False)  # Point-MAE's qkv has no bias
        self.key_value = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)  # Point-MAE: trunc normal 0.02, zero biases, LayerNorm 1 / 0

    def _split_heads(self, tokens):
        return tokens.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, h, M, D/h)

    def forward(self, x, pos, context):
        queries = self._split_heads(self.query(self.norm_query(x + pos)))  # (B, h, M, D/h)
        keys, values = self.key_value(self.norm_context(context)).chunk(2, dim=-1)  # 2 x (B, Lc, D)
        attended = F.scaled_dot_product_attention(queries, self._split_heads(keys),
                                                  self._split_heads(values))  # (B, h, M, D/h)
        x = x + self.proj(attended.transpose(1, 2).flatten(2))  # (B, M, D)  Eq. (4)
        return self.norm(x + self.mlp(self.norm2(x)))  # (B, M, D)


def local_aligned_mask(center_patch, visible_index_2d, local_3d_to_2d=True, local_2d_to_3d=True):
    """Section 3.3: (B, Gv) patch under each visible 3-D centre (-1: none), (B, P2v) visible 2-D token indices
    -> (B, 1, L, L) bool, True = may attend, rows = queries [3-D; 2-D]; None when both directions are global.

    Within a modality every token attends to every token; a 3-D and a 2-D token attend to each other only if the
    3-D centre projects into that 2-D token. Every row keeps its own modality, so no softmax is empty.
    NOTE(unspecified): the Table 6 switches are named by query -> key (local_3d_to_2d: 3-D queries, 2-D keys); the
    test is centre-in-patch only, without occlusion ("if its 3D center point is projected onto the pixels within
    the 2D token"); a centre outside the image has no 2-D partner.
    """
    if not (local_3d_to_2d or local_2d_to_3d):
        return None  # Table 6 "Global / Global": plain self-attention over the joint sequence
    aligned = center_patch[:, :, None] == visible_index_2d[:, None, :]  # (B, Gv, P2v)
    batch, visible_3d, visible_2d = aligned.shape
    length = visible_3d + visible_2d
    mask = torch.ones(batch, length, length, dtype=torch.bool, device=aligned.device)  # (B, L, L)
    if local_3d_to_2d:
        mask[:, :visible_3d, visible_3d:] = aligned  # 3-D query -> 2-D key
    if local_2d_to_3d:
        mask[:, visible_3d:, :visible_3d] = aligned.transpose(1, 2)  # 2-D query -> 3-D key
    return mask.unsqueeze(1)  # (B, 1, L, L), broadcast over heads


# ---------------------------------------------------------------- the model
class JointMAE(nn.Module):
    """Joint-MAE pre-training model (paper Figure 2). The 3-D path (`tokenizer_3d`, `encoder_pos`, `encoder`) has
    pretrain.KRMAE's names and classes, so fine-tuning loads it unchanged; the rest is pre-training only."""

    def __init__(self, num_groups=64, group_size=32, dim=384, depth=12, num_heads=6, decoder_depth=2,
                 decoder_heads=6, drop_path=0.1, mask_ratio=0.75, mask_ratio_2d=0.75, image_size=224,
                 patch_size=16, projection="perspective", local_3d_to_2d=True, local_2d_to_3d=True,
                 modality_token_3d=True, cross_views=4, weight_3d=1.0, weight_2d=1.0, weight_cross=1.0,
                 skip_near_origin=False):
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, but got {projection!r}.")
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
        if cross_views < 0:
            raise ValueError(f"cross_views must be 0 (no L_3D-2D) or more, but got {cross_views}.")
        self.num_patches = (image_size // patch_size) ** 2  # P2; paper: 224^2 / 16^2 = 196
        for name, count, ratio in (("mask_ratio", num_groups, mask_ratio),
                                   ("mask_ratio_2d", self.num_patches, mask_ratio_2d)):
            if num_visible(count, ratio) in (0, count):  # also checks 0 <= ratio < 1
                raise ValueError(f"{name}={ratio} leaves {num_visible(count, ratio)} of {count} tokens visible; "
                                 f"both the visible and the masked set must be non-empty.")
        self.group_size, self.mask_ratio, self.mask_ratio_2d = group_size, mask_ratio, mask_ratio_2d  # paper: 75 %
        self.image_size, self.patch_size, self.projection = image_size, patch_size, projection  # paper: 224, 16
        self.local_3d_to_2d, self.local_2d_to_3d = local_3d_to_2d, local_2d_to_3d  # Table 6: both local
        self.cross_views = cross_views  # Table 8: 4 views
        self.weight_3d, self.weight_2d, self.weight_cross = weight_3d, weight_2d, weight_cross  # Eq. (7): 1, 1, 1
        # Eq. (2), 3-D. NOTE(deviation): paper embeds hierarchically (FPS + KNN to N/8, then N/32 centres); we keep
        # Point-MAE's one-level tokenizer so that fine-tuning is Point-MAE's (paper Table 7: -1.2 SVM points).
        self.tokenizer_3d = PointTokenizer(num_groups=num_groups, group_size=group_size, dim=dim,
                                           skip_near_origin=skip_near_origin)
        self.encoder_pos = CenterEmbedding(dim=dim)
        # Eq. (2), 2-D: learned from scratch, with a learnable position table.
        self.tokenizer_2d = ConvTokenizer2D(dim=dim, patch_size=patch_size)
        # NOTE(unspecified): learnable 2-D position tables (MAE convention), one for the encoder, one for the decoder.
        self.pos_embed_2d = nn.Parameter(torch.zeros(1, self.num_patches, dim))  # (1, P2, D)
        # JointEnc: modality tokens added to every token of their modality, "randomly initialized".
        # NOTE(unspecified): M_3D belongs to no part that fine-tuning keeps, so the fine-tuned encoder never sees it
        # (a shift by one constant vector); modality_token_3d=False fixes M_3D = 0 (no parameter), keeping M_2D.
        self.modality_token_2d = nn.Parameter(torch.zeros(1, 1, dim))  # (1, 1, D)
        if modality_token_3d:
            self.modality_token_3d = nn.Parameter(torch.zeros(1, 1, dim))  # (1, 1, D)
        else:
            self.register_parameter("modality_token_3d", None)
        # JointEnc: 12 blocks over [3-D; 2-D] visible tokens; the local-aligned mask enters every block.
        self.encoder = KATransformer(dim=dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path)
        # Eq. (3): two mask tokens and the 2-block modal-shared decoder.
        # NOTE(unspecified): the shared decoder uses Point-MAE's decoder drop path (0 -> drop_path over its blocks).
        self.mask_token_3d = nn.Parameter(torch.zeros(1, 1, dim))  # (1, 1, D)
        self.mask_token_2d = nn.Parameter(torch.zeros(1, 1, dim))  # (1, 1, D)
        self.decoder_pos = CenterEmbedding(dim=dim, trunc_normal=False)  # Point-MAE: default init there
        self.decoder_pos_2d = nn.Parameter(torch.zeros(1, self.num_patches, dim))  # (1, P2, D)
        self.shared_decoder = KATransformer(dim=dim, depth=decoder_depth, num_heads=decoder_heads,
                                            drop_path_rate=drop_path)
        # Eq. (4): the two 1-block modal-specific decoders.
        self.specific_decoder_3d = CrossBlock(dim, decoder_heads)
        self.specific_decoder_2d = CrossBlock(dim, decoder_heads)
        # Eq. (5): single linear heads (Point-MAE: K points x 3 per group; MAE: p x p pixels per patch).
        self.reconstruction_head = nn.Linear(dim, 3 * group_size)
        self.reconstruction_head_2d = nn.Linear(dim, patch_size * patch_size)
        if projection == "realistic":
            # NOTE(unspecified): the "realistic" option renders with render.py (PointCLIP V2, 1 view, a voxel grid of
            # half the image size, as 112 at 224) on the pre-rotated cloud; image = 1 - rendering, so the
            # background is 0 as in the perspective map; each rendered cloud is framed by its own bounding box.
            self.renderer = MultiViewRenderer(num_views=1, image_size=image_size, grid_size=max(8, image_size // 2))
        # NOTE(unspecified): position tables and modality tokens get MAE's / Point-MAE's truncated normal, std 0.02.
        # NOTE(deviation): Point-MAE decays no token; pretrain.parameter_groups exempts only names ending in "token"
        # or holding "pos_embed", so AdamW's weight decay 0.05 applies here to modality_token_2d / _3d,
        # mask_token_3d / _2d and decoder_pos_2d (pos_embed_2d is exempt); the peer table's rows use this rule.
        for parameter in (self.pos_embed_2d, self.modality_token_2d, self.modality_token_3d, self.mask_token_3d,
                          self.mask_token_2d, self.decoder_pos_2d):
            if parameter is not None:
                nn.init.trunc_normal_(parameter, std=0.02)

    # ------------------------------------------------------------ Project of Eq. (1) and (6)
    def project(self, clouds, origin, radius, rotations):
        """Project(.): clouds (B, M, 3) seen by (B, V, 3, 3) cameras -> depth maps (B, V, H, W), float32."""
        camera_points = camera_frame(clouds.float(), origin, radius, rotations)  # (B, V, M, 3)
        if self.projection == "perspective":
            return perspective_depth(camera_points, self.image_size)  # (B, V, H, W)
        rendered = self.renderer(camera_points.flatten(0, 1))  # (B*V, 1, 3, H, W)
        return 1 - rendered[:, 0, 0].unflatten(0, camera_points.shape[:2])  # (B, V, H, W)

    def center_pixels(self, points, centers, origin, radius, rotation):
        """Pixel (B, G, 2) and 2-D token (B, G) under each centre in the input view (B, 1, 3, 3); token -1: outside."""
        camera_centers = camera_frame(centers.float(), origin, radius, rotation)[:, 0]  # (B, G, 3)
        if self.projection == "perspective":
            pixels, inside = perspective_pixels(camera_centers, self.image_size)  # (B, G, 2), (B, G)
        else:
            camera_points = camera_frame(points.float(), origin, radius, rotation)[:, 0]  # (B, N, 3)
            pixels = self.renderer.project(camera_points, camera_centers)[:, 0]  # (B, G, 2)
            inside = torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device)  # (B, G)
        patch = pixels_to_patches(pixels, self.image_size, self.patch_size)  # (B, G)
        return pixels, torch.where(inside, patch, -1)  # (B, G, 2), (B, G)

    def cross_reconstruction_loss(self, predicted, centers, neighborhoods, visible_index, masked_index, origin,
                                  radius, azimuth, elevation):
        """Eq. (6) over cross_views views: MSE between the projection of the reconstructed cloud and its target.

        NOTE(deviation): paper projects RecHead_3D(D'_3D) and compares with I. We project the union of the visible
        ground-truth groups and the predicted masked groups, and compare with the projection of all ground-truth
        groups, so a perfect reconstruction scores 0 (points in no group would otherwise be an irreducible error);
        the gradient still reaches only the predicted points.
        NOTE(unspecified): the views are the input view and the same camera turned by 2 pi v / V in azimuth
        (Table 8: V = 4 -> +0, 90, 180, 270 degrees); the targets of the other views are projected the same way.
        NOTE(unspecified): a z-buffer projection is differentiable in depth only: x and y of the prediction (in the
        camera frame) get no gradient from L_3D-2D, and a predicted point on a background pixel is pushed towards
        the camera; the paper does not say how it handled this.
        """
        visible = gather_tokens(neighborhoods, visible_index) + gather_tokens(centers, visible_index)[:, :, None]
        reconstructed = predicted.float() + gather_tokens(centers, masked_index)[:, :, None]  # (B, Gm, K, 3)
        reconstruction = torch.cat([visible, reconstructed], dim=1).flatten(1, 2)  # (B, G*K, 3)
        truth = (neighborhoods + centers[:, :, None]).flatten(1, 2)  # (B, G*K, 3)
        turns = torch.arange(self.cross_views, device=azimuth.device) * (2 * math.pi / self.cross_views)  # (V,)
        with torch.autocast(device_type=predicted.device.type, enabled=False):  # cameras and depths in float32
            rotations = view_rotation(azimuth[:, None] + turns,
                                      elevation[:, None].expand(-1, self.cross_views))  # (B, V, 3, 3)
            projected = self.project(reconstruction, origin, radius, rotations)  # (B, V, H, W)  Project(.)
            with torch.no_grad():
                target = self.project(truth, origin, radius, rotations)  # (B, V, H, W)
            return F.mse_loss(projected, target)  # Eq. (6)

    # ------------------------------------------------------------ forward
    def forward(self, points):
        """points (B, N, 3), normalised / augmented by the caller -> dict with the losses and the picture's inputs."""
        batch, device = points.shape[0], points.device
        tokens_3d, centers, neighborhoods = self.tokenizer_3d(points)  # (B, G, D), (B, G, 3), (B, G, K, 3)  Eq. (2)
        num_groups = centers.shape[1]

        # Eq. (1): a random view per shape; the unit-sphere frame comes from the INPUT cloud and is reused for the
        # centres and the reconstruction. NOTE(unspecified): centroid and largest radius (PointCLIP's camera
        # expects a cloud in the unit sphere).
        azimuth = torch.rand(batch, device=device) * 2 * math.pi  # (B,)
        elevation = (torch.rand(batch, device=device) * 2 - 1) * MAX_ELEVATION  # (B,)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            origin, radius = unit_sphere_frame(points.float())  # (B, 1, 3), (B, 1, 1)
            rotation = view_rotation(azimuth, elevation)[:, None]  # (B, 1, 3, 3)
            image = self.project(points, origin, radius, rotation)  # (B, 1, H, W)  Eq. (1)
            pixels, center_patch = self.center_pixels(points, centers, origin, radius, rotation)  # (B, G, 2), (B, G)

        # Random masking, independent per modality. NOTE(unspecified): paper says "a large ratio, e.g., 75 %"; we
        # default to 0.75 for both (pretrain.py's matched settings may set the 3-D ratio to Point-MAE's 0.6).
        visible_index, masked_index = random_masking(batch, num_groups, self.mask_ratio, device)  # (B, Gv), (B, Gm)
        visible_index_2d, masked_index_2d = random_masking(batch, self.num_patches, self.mask_ratio_2d,
                                                           device)  # (B, P2v), (B, P2m)
        visible_flags_2d = torch.zeros(batch, self.num_patches, dtype=torch.bool, device=device)  # (B, P2)
        visible_flags_2d.scatter_(1, visible_index_2d, True)  # (B, P2)
        tokens_2d = self.tokenizer_2d(image, visible_flags_2d)  # (B, P2, D)  Eq. (2)

        # JointEnc: Concat(T^v_3D + M_3D, T^v_2D + M_2D), positions added at every block, local-aligned attention.
        visible_tokens_3d = gather_tokens(tokens_3d, visible_index)  # (B, Gv, D)
        if self.modality_token_3d is not None:
            visible_tokens_3d = visible_tokens_3d + self.modality_token_3d  # (B, Gv, D)
        visible_tokens_2d = gather_tokens(tokens_2d, visible_index_2d) + self.modality_token_2d  # (B, P2v, D)
        visible_centers = gather_tokens(centers, visible_index)  # (B, Gv, 3)
        masked_centers = gather_tokens(centers, masked_index)  # (B, Gm, 3)
        pos_2d = gather_tokens(self.pos_embed_2d.expand(batch, -1, -1), visible_index_2d)  # (B, P2v, D)
        encoder_input = torch.cat([visible_tokens_3d, visible_tokens_2d], dim=1)  # (B, L, D)
        encoder_pos = torch.cat([self.encoder_pos(visible_centers), pos_2d], dim=1)  # (B, L, D)
        attention_mask = local_aligned_mask(gather_tokens(center_patch, visible_index), visible_index_2d,
                                            self.local_3d_to_2d, self.local_2d_to_3d)  # (B, 1, L, L) or None
        encoded = self.encoder(encoder_input, encoder_pos, attn_mask=attention_mask)  # (B, L, D)  JointEnc
        num_visible_3d, length = visible_index.shape[1], encoded.shape[1]
        encoded_3d, encoded_2d = encoded[:, :num_visible_3d], encoded[:, num_visible_3d:]  # (B, Gv, D), (B, P2v, D)

        # Eq. (3): the shared decoder over [E^v_3D; E^v_2D; T^m_3D x Gm; T^m_2D x P2m].
        num_masked_3d, num_masked_2d = masked_index.shape[1], masked_index_2d.shape[1]
        decoder_input = torch.cat([encoded, self.mask_token_3d.expand(batch, num_masked_3d, -1),
                                   self.mask_token_2d.expand(batch, num_masked_2d, -1)], dim=1)  # (B, G + P2, D)
        decoder_pos_3d = self.decoder_pos(torch.cat([visible_centers, masked_centers], dim=1))  # (B, G, D)
        decoder_pos_2d = self.decoder_pos_2d.expand(batch, -1, -1)  # (B, P2, D)
        masked_pos_2d = gather_tokens(decoder_pos_2d, masked_index_2d)  # (B, P2m, D)
        decoder_pos = torch.cat([decoder_pos_3d[:, :num_visible_3d], gather_tokens(decoder_pos_2d, visible_index_2d),
                                 decoder_pos_3d[:, num_visible_3d:], masked_pos_2d], dim=1)  # (B, G + P2, D)
        decoded = self.shared_decoder(decoder_input, decoder_pos)  # (B, G + P2, D)  Eq. (3)

        # Eq. (4): split D_2D-3D by modality; only the masked rows reach a loss, and a cross-attention block treats
        # every query row on its own, so only those rows are decoded (the same values as decoding all of D_3D).
        masked_decoded_3d = decoded[:, length:length + num_masked_3d]  # (B, Gm, D)  masked rows of D_3D
        masked_decoded_2d = decoded[:, length + num_masked_3d:]  # (B, P2m, D)  masked rows of D_2D
        specific_3d = self.specific_decoder_3d(masked_decoded_3d, decoder_pos_3d[:, num_visible_3d:],
                                               encoded_3d)  # (B, Gm, D)  Eq. (4)
        specific_2d = self.specific_decoder_2d(masked_decoded_2d, masked_pos_2d, encoded_2d)  # (B, P2m, D)  Eq. (4)

        # Eq. (5): L_3D, the l2 Chamfer distance per masked group (Point-MAE), centre-relative points.
        # NOTE(unspecified): L_3D is Point-MAE's mean over the masked groups of the batch.
        predicted = self.reconstruction_head(specific_3d).reshape(
            batch, num_masked_3d, self.group_size, 3)  # (B, Gm, K, 3)
        target = gather_tokens(neighborhoods, masked_index)  # (B, Gm, K, 3)
        loss_rec = chamfer_distance(predicted.flatten(0, 1), target.flatten(0, 1)).mean()  # Eq. (5)
        # Eq. (5): L_2D, the pixel MSE on the masked patches (MAE).
        # NOTE(unspecified): raw depth targets (no per-patch normalisation), masked patches only (MAE).
        predicted_2d = self.reconstruction_head_2d(specific_2d).reshape(
            batch, num_masked_2d, self.patch_size, self.patch_size)  # (B, P2m, p, p)
        target_2d = gather_tokens(patchify(image, self.patch_size), masked_index_2d)  # (B, P2m, p, p)
        squared_2d = (predicted_2d.float() - target_2d).pow(2)  # (B, P2m, p, p)
        loss_2d = squared_2d.mean()  # Eq. (5)
        foreground = target_2d > 0  # (B, P2m, p, p): most pixels of a sparse depth map are background
        loss_2d_foreground = (squared_2d.detach() * foreground).sum() / foreground.sum().clamp_min(1)  # log only

        if self.cross_views > 0:
            loss_cross = self.cross_reconstruction_loss(predicted, centers, neighborhoods, visible_index,
                                                        masked_index, origin, radius, azimuth, elevation)  # Eq. (6)
        else:
            loss_cross = loss_rec.new_zeros(())  # Table 8, "no L_3D-2D"
        loss = self.weight_3d * loss_rec + self.weight_2d * loss_2d + self.weight_cross * loss_cross  # Eq. (7)
        return dict(loss=loss, loss_rec=loss_rec, loss_2d=loss_2d, loss_cross=loss_cross,
                    loss_2d_foreground=loss_2d_foreground, centers=centers, neighborhoods=neighborhoods,
                    visible_index=visible_index, masked_index=masked_index, predicted=predicted, image=image,
                    center_pixels=pixels, center_patch=center_patch, rotation=rotation[:, 0],
                    visible_index_2d=visible_index_2d, masked_index_2d=masked_index_2d, predicted_2d=predicted_2d,
                    attention_mask=attention_mask)


# ---------------------------------------------------------------- demo
def _grey(image, size):
    """(H, W) depth map -> an RGB PIL picture size x size, background white, near points dark."""
    import numpy as np
    from PIL import Image

    foreground = image > 0.5  # perspective depths of the unit sphere lie in [0.6, 2.6]; lower predictions = none
    scaled = (image - 0.6).clamp(0, 2) / 2  # (H, W) in [0, 1]
    grey = torch.where(foreground, 30 + 190 * scaled, torch.full_like(image, 255.0))  # (H, W)
    picture = Image.fromarray(grey.round().to(torch.uint8).numpy().astype(np.uint8)).convert("RGB")
    return picture.resize((size, size), Image.NEAREST)


if __name__ == "__main__":
    import numpy as np
    from PIL import Image, ImageDraw

    from tokenizer import demo_torus

    parser = argparse.ArgumentParser(description="Joint-MAE demo: a few steps on a torus, then draw every stage.")
    parser.add_argument("--out", default="joint_mae_demo.png", help="where to write the PNG")
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps before drawing")
    args = parser.parse_args()
    torch.manual_seed(0)
    points = torch.from_numpy(demo_torus(1024)).unsqueeze(0).repeat(4, 1, 1)  # (B, N, 3): views differ per shape
    model = JointMAE(num_groups=32, group_size=16, dim=96, depth=4, num_heads=4, decoder_depth=2, decoder_heads=4,
                     image_size=112, patch_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(args.steps + 1):
        out = model(points)
        if step in (0, args.steps):
            losses = "  ".join(f"{key} {out[key].item():.4f}" for key in out if key.startswith("loss"))
            print(f"step {step:3d}: {losses}")
        if step < args.steps:
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(points[:1])
    for key, value in out.items():
        print(f"{key:20s}", tuple(value.shape) if value is not None else None)

    size, image_size, patch = 336, model.image_size, model.patch_size
    scale = size / image_size
    # Panel 1: Eq. (1) depth map, masked 2-D patches hatched, visible 3-D centres in red, masked ones in blue.
    depth_panel = _grey(out["image"][0, 0], size)
    draw = ImageDraw.Draw(depth_panel)
    grid = image_size // patch
    for index in out["masked_index_2d"][0].tolist():
        top, left = (index // grid) * patch * scale, (index % grid) * patch * scale
        draw.rectangle([left, top, left + patch * scale - 1, top + patch * scale - 1], outline=(200, 200, 200))
        draw.line([left, top, left + patch * scale - 1, top + patch * scale - 1], fill=(210, 210, 210))
    for indices, colour in ((out["visible_index"][0], (220, 40, 30)), (out["masked_index"][0], (40, 90, 220))):
        for row, col in out["center_pixels"][0, indices].tolist():
            y, x = (row + 0.5) * scale, (col + 0.5) * scale
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    # Panel 2: the local-aligned attention mask (white = may attend), 3-D block top-left.
    mask = out["attention_mask"][0, 0].float()  # (L, L)
    mask_panel = Image.fromarray((mask * 255).to(torch.uint8).numpy().astype(np.uint8)).convert("RGB")
    mask_panel = mask_panel.resize((size, size), Image.NEAREST)
    split = out["visible_index"].shape[1] * size / mask.shape[0]
    ImageDraw.Draw(mask_panel).line([split, 0, split, size], fill=(220, 40, 30))
    ImageDraw.Draw(mask_panel).line([0, split, size, split], fill=(220, 40, 30))
    # Panel 3: the 2-D reconstruction, visible patches of I and predicted masked patches.
    patches = patchify(out["image"], patch).clone()  # (1, P2, p, p)
    patches[0, out["masked_index_2d"][0]] = out["predicted_2d"][0].clamp_min(0)
    recon_2d = patches.reshape(1, grid, grid, patch, patch).permute(0, 1, 3, 2, 4).reshape(image_size, image_size)
    # Panel 4: Eq. (6), the projection of visible groups + predicted masked groups in the input view.
    origin, radius = unit_sphere_frame(points[:1])
    visible = out["neighborhoods"][0, out["visible_index"][0]] + out["centers"][0, out["visible_index"][0], None]
    masked = out["predicted"][0] + out["centers"][0, out["masked_index"][0], None]
    reconstruction = torch.cat([visible, masked]).reshape(1, -1, 3)  # (1, G*K, 3)
    with torch.no_grad():
        recon_3d = model.project(reconstruction, origin, radius, out["rotation"][:1, None])[0, 0]  # (H, W)
    panels = [(depth_panel, "Eq. (1): depth map I of a random view; hatched: masked\n"
                            "2-D tokens; dots: visible (red) / masked (blue) centres"),
              (mask_panel, "local-aligned attention mask, white = may attend\n"
                           "rows / columns: [visible 3-D | visible 2-D]"),
              (_grey(recon_2d, size), "Eq. (5), 2-D: visible patches of I and the\npredicted masked patches"),
              (_grey(recon_3d, size), "Eq. (6): Project(visible groups + predicted\nmasked groups), input view")]
    canvas = Image.new("RGB", (2 * size + 30, 2 * size + 80), "white")
    for number, (picture, title) in enumerate(panels):
        left, top = 10 + (number % 2) * (size + 10), 32 + (number // 2) * (size + 38)
        canvas.paste(picture, (left, top))
        ImageDraw.Draw(canvas).multiline_text((left, top - 28), title, fill="black")
    canvas.save(args.out)
    print("wrote", args.out)
