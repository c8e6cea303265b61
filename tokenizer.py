"""Multi-view 2D and 3D Embedding (KR-MAE paper, section "Multi-view 2D and 3D Embedding", Eq. 2 and 3).

Turns a point cloud into 3-D tokens and its rendered views into 2-D tokens of the same width D.
  Eq. (3): E_3D = PointNet(P): FPS picks G centres, KNN gathers K points around each, a mini-PointNet
           embeds each neighbourhood (coordinates relative to its centre) into one token (Point-BERT/Point-MAE).
           The centres' positional embedding (CenterEmbedding) is added later, by the transformer, at every block.
  Eq. (2): E_2D^i = ViT(m_i): a frozen CLIP ViT reads each view; we keep all P last-layer patch tokens, map them
           to width D with a learnable Linear and add a learnable 2-D positional embedding.
           The tower's residual blocks are written out batch first (tower_block, bit for bit clip's own blocks in
           float32); under bf16 autocast the training script stores its matrices in bf16 once (cast_frozen_tower).

The file is named tokenizer.py, not tokenize.py: a tokenize.py at the repository root would shadow the standard
library's `tokenize` module and break `import torch` from there.

Shapes: B batch, N points, G groups/tokens, K points per group, V views, H x W image, P patches per image,
D width, C the CLIP tower's own width.
Paper symbol -> name: n -> num_groups (G), p -> group_size (K), d^E -> dim (D), m = HW/256 -> num_patches (P),
m_i -> images[:, i], E_3D -> tokens, E_2D^i -> tokens_2d[:, i].
Demo: `python tokenizer.py [--out tokenizer_demo.png]` prints every shape and draws the cloud coloured by group.
"""
import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# CLIP's image normalisation (the statistics its image tower was trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------- 3-D path: FPS, KNN, grouping (Eq. 3)
def gather_points(points, index):
    """points (B, N, C), index (B, ...) long -> (B, ..., C): points[b, index[b]] for every b."""
    batch = torch.arange(points.shape[0], device=points.device).view(-1, *([1] * (index.dim() - 1)))
    return points[batch, index]  # (B, ..., C)


@torch.no_grad()
def farthest_point_sample(points, num_samples, start_index=None, skip_near_origin=False):
    """Farthest point sampling: (B, N, 3) -> (B, G) long indices; start_index (B,) long, None means point 0.

    Each step takes the point farthest from everything chosen so far (ties: lowest index, as argmax does).
    The loop runs over the G samples only; batch and points are vectorised.
    skip_near_origin=True reproduces the CUDA kernel of Point-MAE's official code (pointnet2_ops), which never
    picks a point with x^2 + y^2 + z^2 <= 1e-3 after the first one (docs/REFERENCE.md sec. 7); only for exact parity
    with checkpoints trained that way. When every point left is that close, it picks point 0 again, as the kernel does.
    """
    batch_size, num_points, _ = points.shape
    if not 1 <= num_samples <= num_points:
        raise ValueError(f"Cannot sample {num_samples} distinct centres from a cloud of {num_points} points; "
                         f"expected 1 <= num_samples <= {num_points}.")
    # Distances decide which point is chosen, so they are computed in float32 even under autocast.
    with torch.autocast(device_type=points.device.type, enabled=False):
        points = points.float()  # (B, N, 3)
        # NOTE(unspecified): the paper does not say where FPS starts; we start at point 0 (like the common CUDA
        # FPS kernel), so grouping is deterministic; the loaders' random point subsets make that point random.
        if start_index is None:
            start_index = torch.zeros(batch_size, dtype=torch.long, device=points.device)  # (B,)
        # Squared distance of every point to its nearest selected point so far.
        nearest_distance = torch.full((batch_size, num_points), float("inf"), device=points.device,
                                      dtype=points.dtype)  # (B, N)
        # The kernel's skipped points never compete: -1 is below every distance, so argmax passes over them.
        skipped = (points ** 2).sum(-1) <= 1e-3 if skip_near_origin else None  # (B, N) bool
        current = start_index.to(device=points.device, dtype=torch.long)  # (B,)
        # The chosen indices go into a list, stacked once at the end. Writing them into a preallocated (B, G)
        # tensor column by column is the same in eager mode, but torch.compile's CPU backend (torch 2.13)
        # miscompiled those in-place writes (wrong centres for G >= 32); the list form compiles exactly.
        selected = [current]
        for _ in range(num_samples - 1):
            current_point = torch.gather(points, 1, current.view(-1, 1, 1).expand(-1, 1, 3))  # (B, 1, 3)
            distance = ((points - current_point) ** 2).sum(-1)  # (B, N)
            nearest_distance = torch.minimum(nearest_distance, distance)  # (B, N)
            # Chosen points have distance 0, so they are never picked again.
            candidates = nearest_distance if skipped is None else nearest_distance.masked_fill(skipped, -1.0)
            current = candidates.argmax(dim=-1)  # (B,)
            selected.append(current)
    return torch.stack(selected, dim=1)  # (B, G)


@torch.no_grad()
def knn_indices(points, centers, k):
    """The k nearest points (among ALL N) of every centre: (B, N, 3), (B, G, 3) -> (B, G, K) long, nearest first."""
    with torch.autocast(device_type=points.device.type, enabled=False):
        points, centers = points.float(), centers.float()  # (B, N, 3), (B, G, 3)
        # Squared distances from the coordinate differences: exact for ties and small distances (the matrix-product
        # form |c|^2 - 2 c.p + |p|^2 is not). Summed one axis at a time, left to right: the same float32 values as
        # ((centers[:, :, None] - points[:, None]) ** 2).sum(-1), without its (B, G, N, 3) temporary. torch.cdist's
        # exact mode picks the same neighbours, but on a GPU it launches one thread block per distance (8.4 M blocks
        # for a batch of 128).
        distance = (centers[:, :, None, 0] - points[:, None, :, 0]).square_()  # (B, G, N)
        for axis in (1, 2):
            distance += (centers[:, :, None, axis] - points[:, None, :, axis]).square_()  # (B, G, N)
        return distance.topk(k, dim=-1, largest=False, sorted=True).indices  # (B, G, K)


def group_points(points, num_groups, group_size, start_index=None, skip_near_origin=False):
    """Eq. (3) grouping: (B, N, 3) -> centers (B, G, 3), neighborhoods (B, G, K, 3) relative to their centre."""
    center_index = farthest_point_sample(points, num_groups, start_index, skip_near_origin)  # (B, G)
    centers = gather_points(points, center_index)  # (B, G, 3)
    neighbor_index = knn_indices(points, centers, group_size)  # (B, G, K)
    # Relative coordinates, not rescaled (Point-MAE); the first neighbour is the centre itself, at the origin.
    neighborhoods = gather_points(points, neighbor_index) - centers.unsqueeze(2)  # (B, G, K, 3)
    return centers, neighborhoods


# ---------------------------------------------------------------- 3-D path: embeddings (Eq. 3)
def trunc_normal_init(module):
    """Point-MAE's initialisation of the encoder side: truncated normal std 0.02 for every Linear and Conv1d
    weight, zero biases (BatchNorm keeps 1 / 0). Twin of kat.init_weights, which covers Linear and LayerNorm."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d)):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class MiniPointNet(nn.Module):
    """The lightweight PointNet of Eq. (3), with Point-MAE's sizes: one D-wide token per neighbourhood."""

    def __init__(self, dim=384):
        super().__init__()
        # Point-MAE: Conv1d 3->128, BN, ReLU, Conv1d 128->256 (shared over the K points).
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        # Point-MAE: Conv1d 512->512, BN, ReLU, Conv1d 512->D on [global, local] features.
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, dim, 1))
        trunc_normal_init(self)  # Point-MAE: the mini-PointNet is part of the encoder it initialises

    def forward(self, neighborhoods):
        batch_size, num_groups, group_size, _ = neighborhoods.shape
        # Every group is an independent sample for the 1x1 convolutions.
        x = neighborhoods.reshape(batch_size * num_groups, group_size, 3).transpose(1, 2)  # (B*G, 3, K)
        local_features = self.first_conv(x)  # (B*G, 256, K)
        # Max over the K points: symmetric, so the token ignores the order of the points in a group.
        global_feature = local_features.max(dim=2, keepdim=True).values  # (B*G, 256, 1)
        x = torch.cat([global_feature.expand(-1, -1, group_size), local_features], dim=1)  # (B*G, 512, K)
        x = self.second_conv(x)  # (B*G, D, K)
        tokens = x.max(dim=2).values  # (B*G, D)
        return tokens.reshape(batch_size, num_groups, -1)  # (B, G, D)  Eq. (3)


class CenterEmbedding(nn.Module):
    """Positional embedding of the group centres (Point-MAE): Linear(3, 128) -> GELU -> Linear(128, D).

    trunc_normal=True: Point-MAE's encoder-side initialisation (its encoder `pos_embed`); False keeps PyTorch's
    default, as Point-MAE's `decoder_pos_embed`, which no init call reaches."""

    def __init__(self, dim=384, hidden_dim=128, trunc_normal=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))
        if trunc_normal:
            trunc_normal_init(self)

    def forward(self, centers):
        return self.mlp(centers)  # (B, G, D)


def check_finite(points, name):
    """Raise a ValueError naming the shape and the count of NaN / inf values unless every value is finite.
    Twin of render.check_finite (copied so that each stage module stands alone).
    Left out under torch.compile: a branch on a tensor's values would split the compiled graph in two (and wait for
    the GPU); the data readers already refuse non-finite points when they load a file (datasets.py)."""
    if torch.compiler.is_compiling():
        return
    if not torch.isfinite(points).all():  # one host sync on CUDA; the count below only runs on the error path
        bad = int((~torch.isfinite(points)).sum())
        raise ValueError(f"Expected finite {name}; found {bad} NaN or infinite values in {name} of shape "
                         f"{tuple(points.shape)}.")


class PointTokenizer(nn.Module):
    """Eq. (3) end to end: points (B, N, 3) -> tokens (B, G, D), centers (B, G, 3), neighborhoods (B, G, K, 3)."""

    def __init__(self, num_groups=64, group_size=32, dim=384, skip_near_origin=False):  # Point-MAE: 64, 32, 384
        super().__init__()
        self.num_groups = num_groups
        self.group_size = group_size
        self.skip_near_origin = skip_near_origin  # FPS as Point-MAE's CUDA kernel (see farthest_point_sample)
        self.group_encoder = MiniPointNet(dim)

    def forward(self, points, start_index=None):
        # The entry point of every model (pre-training and fine-tuning): check the input once, here.
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[1] < max(self.num_groups, self.group_size):
            raise ValueError(f"Expected points of shape (B, N, 3) with N >= {max(self.num_groups, self.group_size)} "
                             f"(num_groups {self.num_groups}, group_size {self.group_size}); found "
                             f"{tuple(points.shape)}.")
        # One NaN or inf would turn the whole batch's tokens into NaN (FPS and KNN compare distances across the
        # cloud; BatchNorm mixes the batch) and, in training mode, leave BatchNorm's running statistics NaN for good.
        # On CUDA this check costs one host sync per call, i.e. per batch: accepted at this entry point.
        check_finite(points, "points")
        # centers (B, G, 3), neighborhoods (B, G, K, 3)
        centers, neighborhoods = group_points(points, self.num_groups, self.group_size, start_index,
                                              self.skip_near_origin)
        tokens = self.group_encoder(neighborhoods)  # (B, G, D)  Eq. (3)
        return tokens, centers, neighborhoods


# ---------------------------------------------------------------- 2-D path: frozen CLIP ViT (Eq. 2)
def import_clip():
    """Import clip-anytorch lazily (it pulls in torchvision), silencing its pkg_resources deprecation warning."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pkg_resources.*")
            import clip
    except ImportError as error:
        raise RuntimeError("The 2-D branch needs the package clip-anytorch "
                           "(pip install clip-anytorch 'setuptools<81'), "
                           f"which could not be imported: {error}") from error
    return clip


def load_clip_tower(clip_model="ViT-B/16"):
    """The image tower of a pre-trained CLIP model: a model name (downloaded when online) or a local checkpoint path."""
    clip = import_clip()
    try:
        model, _ = clip.load(clip_model, device="cpu", jit=False)
    except Exception as error:
        raise RuntimeError(
            f"Could not load the CLIP model {clip_model!r}: {error}. Without internet access, pass a local path to the "
            "ViT-B/16 checkpoint (the ViT-B-16.pt file that clip.load downloads into ~/.cache/clip) with "
            "--clip_model PATH (clip_model=PATH in Python), or use a randomly initialised tower with "
            "--clip_random_tower width,layers,heads, e.g. --clip_random_tower 768,12,12 for ViT-B/16's size "
            "(random_tower=dict(width=768, layers=12, heads=12, patch_size=16) in Python); its features carry no "
            "pre-trained knowledge (tests and quick runs only).") from error
    return model.visual.float()


def random_tower_spec(text):
    """--clip_random_tower '64,2,2' -> dict(width=64, layers=2, heads=2, patch_size=16), the random_tower of
    ImagePatchTokenizer and frozen_clip_tower; '' -> None (CLIP's pre-trained tower)."""
    if not text:
        return None
    try:
        width, layers, heads = (int(value) for value in text.split(","))
    except ValueError:
        raise ValueError(f"--clip_random_tower expects 'width,layers,heads' such as '768,12,12', got {text!r}.")
    return dict(width=width, layers=layers, heads=heads, patch_size=16)


def build_random_tower(image_size, width, layers, heads, patch_size=16):
    """A randomly initialised CLIP VisionTransformer (same code as the pre-trained one) for tests and the CPU preset."""
    clip = import_clip()
    return clip.model.VisionTransformer(input_resolution=image_size, patch_size=patch_size, width=width,
                                        layers=layers, heads=heads, output_dim=width)


def frozen_clip_tower(image_size, clip_model="ViT-B/16", random_tower=None):
    """The frozen CLIP image tower of KR-MAE's 2-D tokens and of I2P-MAE's teacher -> (visual, grid_size).

    CLIP's weights (clip_model), or with random_tower=dict(width, layers, heads[, patch_size]) a randomly initialised
    tower of that size (tests, the CPU preset). Frozen: float32, no gradients, eval mode (the owner keeps it in eval
    mode and calls it under torch.no_grad). image_size must be a multiple of the patch size: grid_size = H / patch."""
    if random_tower is not None:
        unknown = set(random_tower) - {"width", "layers", "heads", "patch_size"}
        if unknown:
            raise ValueError(f"random_tower takes width, layers, heads and patch_size; found also {sorted(unknown)}.")
        visual = build_random_tower(image_size, **random_tower)
    else:
        visual = load_clip_tower(clip_model)
    visual = visual.float().eval().requires_grad_(False)
    patch_size = visual.conv1.kernel_size[0]
    if image_size % patch_size != 0:
        raise ValueError(f"image_size must be a multiple of the patch size {patch_size}; found {image_size}.")
    return visual, image_size // patch_size


def interpolate_positional_embedding(table, grid_size):
    """CLIP position table (1 + g*g, C) -> (1 + grid_size^2, C): bicubic over the patch grid, class position kept."""
    class_position, patch_positions = table[:1], table[1:]  # (1, C), (g*g, C)
    old_grid = int(round(patch_positions.shape[0] ** 0.5))
    if old_grid * old_grid != patch_positions.shape[0]:
        raise ValueError(f"Expected a square grid of patch positions, found {patch_positions.shape[0]} positions.")
    if old_grid == grid_size:
        return table.float().clone()
    grid = patch_positions.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
    # Plain bicubic (align_corners=False, no antialiasing), the usual resampling of ViT position tables.
    grid = F.interpolate(grid.float(), size=(grid_size, grid_size), mode="bicubic",
                         align_corners=False)  # (1, C, grid, grid)
    patch_positions = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, -1)  # (grid^2, C)
    return torch.cat([class_position.float(), patch_positions], dim=0)  # (1 + grid^2, C)


def cast_frozen_tower(visual, dtype):
    """Store a frozen CLIP image tower's matrices in `dtype` (e.g. torch.bfloat16), once, in place; returns `visual`.

    CLIP's own recipe (clip.model.convert_weights, which does the same in float16): the weights and biases of every
    Conv and Linear (conv1, the blocks' mlp.c_fc, mlp.c_proj and attn.out_proj), the attention's packed in_proj_weight
    and in_proj_bias, and the output matrix `proj`; also the blocks' LayerNorms (see the NOTE below). ln_pre,
    ln_post, class_embedding and positional_embedding stay float32. The tower then runs in `dtype` (run_tower, run_tower_with_attention follow conv1's dtype), and bf16
    autocast does not re-cast the frozen weights at every call (autocast caches only casts of weights that
    require grad). The training script calls this once, when it turns bf16 autocast on.
    NOTE(unspecified): the papers do not say in which precision the frozen tower runs; under bf16 autocast we store
    its matrices in bf16 (CLIP's recipe, which CLIP applies in float16; bf16 keeps float32's range), which gives
    the same error against the float32 tower as casting them under autocast at every call."""
    for module in visual.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):  # attn.out_proj is a Linear too
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, nn.MultiheadAttention):
            # CLIP's list; only in_proj_weight and in_proj_bias exist in its towers (one packed projection).
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                         "bias_k", "bias_v"):
                tensor = getattr(module, name)
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype)
    if visual.proj is not None:
        visual.proj.data = visual.proj.data.to(dtype)
    # NOTE(deviation): one step beyond CLIP's recipe: the blocks' LayerNorm weights and biases go to `dtype` too.
    # tower_block normalises the activations in their own dtype, and CUDA's layer_norm kernel wants its weight and
    # bias in the input's dtype (the CPU's also takes float32 ones); it still accumulates the statistics in float32.
    # ln_pre and ln_post stay float32: they are clip's LayerNorm modules, which normalise a float32 copy.
    for block in visual.transformer.resblocks:
        for norm in (block.ln_1, block.ln_2):
            norm.weight.data = norm.weight.data.to(dtype)
            norm.bias.data = norm.bias.data.to(dtype)
    return visual


def tower_block(block, x, return_class_attention=False):
    """One residual block of CLIP's image tower (clip.model.ResidualAttentionBlock), written out, batch first:
    x (M, 1 + P, C) -> (M, 1 + P, C), computed in x's dtype (the caller's: the dtype of the tower's matrices).

        x = x + out_proj(MHA(ln_1(x)))               MHA: one packed q, k, v projection, softmax(q k^T / sqrt(d)) v
        x = x + c_proj(QuickGELU(c_fc(ln_2(x))))     QuickGELU(h) = h * sigmoid(1.702 h)

    The stock block runs nn.MultiheadAttention sequence first, (1 + P, M, C), which copies the packed q, k and v
    and the attention output around the same scaled_dot_product_attention call; here q, k and v are views of one
    Linear's output. In float32 the result is bit for bit the stock block's (tests: torch.equal).
    return_class_attention=True also returns row 0 (the class token's query) of the attention weights, averaged
    over the heads, over the P patch keys: (M, P) float32.
    """
    attention = block.attn
    batch_size, length, width = x.shape  # length = 1 + P
    num_heads = attention.num_heads
    head_dim = width // num_heads  # d = C / heads: 64 in ViT-B/16
    # ---- attention half: x = x + out_proj(MHA(ln_1(x)))
    # In x's dtype, without clip's two copies (a float32 copy of x, normalised, cast back): the kernel accumulates
    # the statistics in float32 either way. The weight and bias are in x's dtype too (cast_frozen_tower).
    y = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)  # (M, 1 + P, C)
    # in_proj_weight is nn.MultiheadAttention's packed [W_q; W_k; W_v] (3C, C): one GEMM for all three.
    qkv = F.linear(y, attention.in_proj_weight, attention.in_proj_bias)  # (M, 1 + P, 3C)
    qkv = qkv.view(batch_size, length, 3, num_heads, head_dim)  # (M, 1 + P, 3, heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (M, heads, 1 + P, d): views, no copy
    # CLIP's image tower has no attention mask (only its text tower's is causal) and no dropout at inference.
    attended = F.scaled_dot_product_attention(q, k, v)  # (M, heads, 1 + P, d)
    attended = attended.transpose(1, 2).reshape(batch_size, length, width)  # (M, 1 + P, C): heads concatenated
    x = x + F.linear(attended, attention.out_proj.weight, attention.out_proj.bias)  # (M, 1 + P, C)
    # ---- MLP half: x = x + c_proj(QuickGELU(c_fc(ln_2(x))))
    y = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)  # (M, 1 + P, C)
    hidden = F.linear(y, block.mlp.c_fc.weight, block.mlp.c_fc.bias)  # (M, 1 + P, 4C)
    # QuickGELU, clip.model.QuickGELU's definition (the sigmoid approximation of GELU CLIP was trained with).
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # (M, 1 + P, 4C)
    x = x + F.linear(hidden, block.mlp.c_proj.weight, block.mlp.c_proj.bias)  # (M, 1 + P, C)
    if not return_class_attention:
        return x
    # ---- the weights SDPA does not return, for the class token's query only (cheap: one row per head).
    # NOTE(deviation): I2P-MAE's official code takes this map from its float16 tower; we compute this one row in
    # float32 from the tower's q and k (scaled first, as nn.MultiheadAttention does), so that under bf16 the
    # saliency is not rounded to bf16's 8 significant bits. In float32 it is nn.MultiheadAttention's map to ~1e-8.
    scores = (q[:, :, :1].float() * head_dim ** -0.5) @ k.float().transpose(-2, -1)  # (M, heads, 1, 1 + P)
    class_attention = scores.softmax(dim=-1).mean(dim=1)  # (M, 1, 1 + P): averaged over the heads
    return x, class_attention[:, 0, 1:]  # (M, 1 + P, C), (M, P): patch keys only


class ImagePatchTokenizer(nn.Module):
    """Eq. (2): images (B, V, 3, H, W) in [0, 1] -> 2-D tokens (B, V, P, D) from a frozen CLIP ViT's patch tokens."""

    def __init__(self, dim=384, image_size=112, clip_model="ViT-B/16", random_tower=None):
        super().__init__()
        # Frozen tower: no gradients, always eval mode (see train below), run under torch.no_grad in forward.
        self.visual, self.grid_size = frozen_clip_tower(image_size, clip_model, random_tower)  # grid 112 / 16 = 7
        self.visual_is_pretrained = random_tower is None
        self.image_size = image_size
        self.num_patches = self.grid_size ** 2  # m = HW / 256 = 49
        width = self.visual.conv1.out_channels  # C: 768 for ViT-B/16
        # CLIP's table is for 224 x 224 (14 x 14 patches); it is interpolated once, here, to our grid and kept as
        # a buffer used by forward; CLIP's own parameter is left untouched. The buffer is saved with the model, so
        # a reloaded random tower (tests, CPU preset) gets the table of the tower it was trained with.
        table = interpolate_positional_embedding(self.visual.positional_embedding.detach(), self.grid_size)
        self.register_buffer("tower_positional_embedding", table)  # (1 + P, C)
        # NOTE(deviation): PointCLIP V2 feeds its depth images to CLIP unnormalised; we apply CLIP's mean/std
        # because the pre-trained tower was trained on images normalised that way.
        self.register_buffer("image_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        # NOTE(unspecified): the paper maps patches "to a d^E-dimensional vector" without saying how; we skip CLIP's
        # `proj` (trained only for the class token's image-text space) and learn one Linear(C -> D) on ln_post tokens.
        self.proj = nn.Linear(width, dim)
        # "augmented with learnable positional encodings": one table shared by all views.
        # NOTE(unspecified): its initialisation; we use a truncated normal with std 0.02 (MAE-style).
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, self.num_patches, dim))  # (1, 1, P, D)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def train(self, mode=True):
        """Switch the learnable parts; the frozen tower stays in eval mode whatever `mode` is."""
        super().train(mode)
        self.visual.eval()
        return self

    def run_tower(self, images):
        """CLIP's visual forward up to ln_post, keeping ALL tokens: normalised (M, 3, H, W) -> (M, 1 + P, C), in the
        dtype of the tower's matrices (float32, or bf16 after cast_frozen_tower): run_clip_tower."""
        return run_clip_tower(self.visual, images, self.tower_positional_embedding)

    def forward(self, images, return_attention=False):
        """images (B, V, 3, H, W) -> tokens (B, V, P, D); return_attention=True also returns the class token's
        last-layer attention over the patches (B, V, P) (run_tower_with_attention: I2P-MAE's saliency, for
        pretrain.py's --masking saliency); the patch features are the same either way (the same tower_block walk)."""
        batch_size, num_views, channels, height, width = images.shape
        if channels != 3 or height != self.image_size or width != self.image_size:
            raise ValueError(f"Expected images (B, V, 3, {self.image_size}, {self.image_size}); "
                             f"found {tuple(images.shape)}.")
        # One batched tower call for all views of all shapes.
        x = images.reshape(batch_size * num_views, 3, height, width)  # (B*V, 3, H, W)
        x = (x - self.image_mean) / self.image_std  # CLIP normalisation
        with torch.no_grad():
            if return_attention:
                patch_tokens, attention = run_tower_with_attention(
                    self.visual, x, project=False, positional_embedding=self.tower_positional_embedding)
                patch_tokens = patch_tokens.to(x.dtype)  # (B*V, P, C), attention (B*V, P)
            else:
                patch_tokens = self.run_tower(x)[:, 1:]  # (B*V, P, C): class token dropped
        if not torch.is_autocast_enabled(x.device.type):  # a bf16 tower's output, used without autocast
            patch_tokens = patch_tokens.to(self.proj.weight.dtype)  # (B*V, P, C)
        tokens = self.proj(patch_tokens)  # (B*V, P, D)  Eq. (2)
        tokens = tokens.reshape(batch_size, num_views, self.num_patches, -1)  # (B, V, P, D)
        tokens = tokens + self.pos_embed  # (B, V, P, D)  Eq. (2) with learnable positions
        if return_attention:
            return tokens, attention.reshape(batch_size, num_views, self.num_patches)  # (B, V, P, D), (B, V, P)
        return tokens


def run_clip_tower(visual, images, positional_embedding=None, return_class_attention=False):
    """CLIP's visual forward up to ln_post, keeping ALL tokens: normalised images (M, 3, H, W) -> (M, 1 + P, C).

    visual: clip-anytorch's VisionTransformer (load_clip_tower, or build_random_tower). It runs in the dtype of the
    tower's matrices (float32, or bf16 after cast_frozen_tower) and returns that dtype, with the caller's autocast
    switched off inside: a float32 tower gives float32 results under bf16 autocast too, and a bf16 tower's
    LayerNorms are not round-tripped through float32 nor its weights re-cast at every call. The caller decides on
    torch.no_grad. positional_embedding (1 + P, C) overrides the tower's table, which is otherwise resampled to the
    image's grid here (interpolate_positional_embedding; unchanged at the native size).
    return_class_attention=True also returns the last block's class-token attention over the patches (M, P) float32
    (tower_block)."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (M, C, H/16, W/16)
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"Expected square images, found {tuple(images.shape)}.")
        if positional_embedding is None:
            positional_embedding = interpolate_positional_embedding(visual.positional_embedding.detach(),
                                                                    x.shape[-1])  # (1 + P, C)
        x = x.flatten(2).transpose(1, 2)  # (M, P, C)
        class_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (M, 1, C)
        x = torch.cat([class_token, x], dim=1)  # (M, 1 + P, C)
        x = x + positional_embedding.to(x.dtype)  # (M, 1 + P, C)
        # ln_pre and ln_post stay clip's LayerNorm modules (float32 inside, x's dtype out): once per image each.
        x = visual.ln_pre(x)  # (M, 1 + P, C)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = tower_block(block, x)  # (M, 1 + P, C)
        if not return_class_attention:
            return visual.ln_post(tower_block(blocks[-1], x))  # (M, 1 + P, C)
        # The last block also returns the class token's attention row (in float32, see tower_block).
        x, class_attention = tower_block(blocks[-1], x, return_class_attention=True)  # (M, 1 + P, C), (M, P)
        return visual.ln_post(x), class_attention  # (M, 1 + P, C), (M, P)


def run_tower_with_attention(visual, images, project=True, positional_embedding=None):
    """A CLIP ViT tower's last-layer patch features and its last block's class-token attention over the patches.

    visual: clip-anytorch's VisionTransformer (load_clip_tower, or build_random_tower); images (M, 3, H, W), already
    normalised as the caller wants, with H = W a multiple of the patch size.
    Returns patch_features (M, P, C) float32: ln_post(x)[patches], times `proj` when project=True (C = the tower's
    output width, 512 for ViT-B/16; otherwise its own width, 768), and class_attention (M, P) float32: row 0 (the
    class token) of the LAST block's attention, averaged over heads, over the P patch keys (row-major grid order).
    Each row sums to 1 minus the class token's attention to itself, so at most 1 (as I2P-MAE's modified CLIP).

    The forward is run_clip_tower's (the same as ImagePatchTokenizer.run_tower), its last block also returning the
    class token's attention row; positional_embedding as there. The caller decides on torch.no_grad.
    """
    tokens, class_attention = run_clip_tower(visual, images, positional_embedding, return_class_attention=True)
    patch_features = tokens[:, 1:]  # (M, P, C): class token dropped
    if project and visual.proj is not None:
        with torch.autocast(device_type=images.device.type, enabled=False):  # in the tower's dtype, as the tower
            patch_features = patch_features @ visual.proj.to(patch_features.dtype)  # (M, P, C_out)
    return patch_features.float(), class_attention  # (M, P, C_out), (M, P)


# ---------------------------------------------------------------- demo
def demo_torus(num_points=1024, seed=0):
    """A tilted torus of num_points points, centred and scaled into the unit sphere (numpy, no data files)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    around, tube = rng.uniform(0, 2 * np.pi, (2, num_points))
    radius = 1.0 + 0.35 * np.cos(tube)
    cloud = np.stack([radius * np.cos(around), radius * np.sin(around), 0.35 * np.sin(tube)], axis=1)  # (N, 3)
    tilt = np.deg2rad(60.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    cloud = cloud @ rotation.T
    cloud -= cloud.mean(axis=0)
    return (cloud / np.linalg.norm(cloud, axis=1).max()).astype(np.float32)


def simple_depth_views(points, num_views=2, image_size=112):
    """Crude orthographic depth splats (a stand-in for render.py): (B, N, 3) -> (B, V, 3, H, W), background 1."""
    batch_size = points.shape[0]
    images = torch.ones(batch_size, num_views, image_size * image_size)  # (B, V, H*W)
    for view in range(num_views):  # demo only: a handful of views
        angle = torch.tensor(torch.pi * view / num_views)
        x = points[..., 0] * torch.cos(angle) + points[..., 2] * torch.sin(angle)  # (B, N)
        depth = (points[..., 2] * torch.cos(angle) - points[..., 0] * torch.sin(angle) + 1) / 2  # (B, N) in [0, 1]
        column = ((x + 1) / 2 * (image_size - 1)).long().clamp(0, image_size - 1)  # (B, N)
        row = ((1 - points[..., 1]) / 2 * (image_size - 1)).long().clamp(0, image_size - 1)  # (B, N)
        # The nearest point of each pixel wins (smallest depth).
        images[:, view].scatter_reduce_(1, row * image_size + column, depth, reduce="amin")
    images = images.reshape(batch_size, num_views, 1, image_size, image_size)  # (B, V, 1, H, W)
    return images.expand(-1, -1, 3, -1, -1)  # (B, V, 3, H, W): all channels share the depth


def draw_groups(points, centers, neighborhoods, path, size=480):
    """Two orthographic panels: each point coloured by its nearest centre, and the K-point neighbourhoods."""
    import colorsys
    from PIL import Image, ImageDraw
    num_groups = centers.shape[0]
    # Golden-ratio hue steps keep consecutive groups far apart in colour.
    hues = [(group * 0.618) % 1.0 for group in range(num_groups)]
    palette = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.9)) for hue in hues]
    nearest_center = torch.cdist(points, centers).argmin(dim=1).tolist()  # (N,)
    members = (neighborhoods + centers[:, None]).reshape(-1, 3)  # (G*K, 3)
    member_group = torch.arange(num_groups).repeat_interleave(neighborhoods.shape[1]).tolist()  # (G*K,)
    canvas = Image.new("RGB", (2 * size, size), "white")
    draw = ImageDraw.Draw(canvas)

    def to_pixel(point, panel):
        return panel * size + (point[0] + 1.05) / 2.1 * size, (1.05 - point[1]) / 2.1 * size

    panels = [(points.tolist(), nearest_center), (members.tolist(), member_group)]
    for panel, (coordinates, groups) in enumerate(panels):
        for point, group in sorted(zip(coordinates, groups), key=lambda item: item[0][2]):  # far points first
            u, v = to_pixel(point, panel)
            draw.ellipse([u - 2.5, v - 2.5, u + 2.5, v + 2.5], fill=palette[group])
    for center in centers.tolist():
        u, v = to_pixel(center, 0)
        draw.ellipse([u - 4, v - 4, u + 4, v + 4], outline="black", width=2)
    draw.text((8, 8), "points coloured by nearest FPS centre (black rings)", fill="black")
    draw.text((size + 8, 8), "K-nearest neighbourhoods (later groups drawn over earlier)", fill="black")
    canvas.save(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tokenise a built-in torus into 3-D and 2-D tokens; draw its groups.")
    parser.add_argument("--out", default="tokenizer_demo.png", help="where to write the PNG")
    args = parser.parse_args()
    torch.manual_seed(0)
    points = torch.from_numpy(demo_torus())[None]  # (1, N, 3)
    print("points        ", tuple(points.shape))
    point_tokenizer = PointTokenizer(num_groups=64, group_size=32, dim=384).eval()  # Point-MAE sizes
    with torch.no_grad():
        tokens, centers, neighborhoods = point_tokenizer(points)
        positions = CenterEmbedding(dim=384)(centers)
    print("centers       ", tuple(centers.shape))
    print("neighborhoods ", tuple(neighborhoods.shape))
    print("3-D tokens    ", tuple(tokens.shape), " (Eq. 3)")
    print("center embed  ", tuple(positions.shape))
    images = simple_depth_views(points, num_views=2, image_size=112)  # (1, V, 3, H, W)
    print("images        ", tuple(images.shape))
    small_tower = dict(width=64, layers=2, heads=2, patch_size=16)  # random weights: the demo needs no download
    image_tokenizer = ImagePatchTokenizer(dim=384, image_size=112, random_tower=small_tower)
    with torch.no_grad():
        tokens_2d = image_tokenizer(images)
    print("2-D tokens    ", tuple(tokens_2d.shape), " (Eq. 2, small random tower; P = 112^2 / 16^2 = 49)")
    draw_groups(points[0], centers[0], neighborhoods[0], args.out)
    print("wrote", args.out)
