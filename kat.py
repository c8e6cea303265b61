"""Reliable-view 2D-3D Key-part Aligned Transformer (KAT): KR-MAE paper, section "Reliable-view 2D-3D Key-part
Aligned Transformer", Eq. (9)-(14), and the fusion ablation of Table 6.

Equations (one attention layer; every block of the encoder uses it)
  Eq. (9):  Q_3D = E_3D W_Q,  K_3D = E_3D W_K,  V_3D = E_3D W_V          (visible 3-D tokens)
  Eq. (10): T_self = softmax(Q_3D K_3D^T / sqrt(d)) V_3D
  Eq. (11): K_2D = E_2D W_K,  V_2D = E_2D W_V   with the SAME W_K, W_V   (Q_2D is defined but never used)
  Eq. (12): I_align(i, j) = 1 if 3-D token i projects to 2-D token j, else 0
  Eq. (13): T_cross^s = softmax(Q_3D K_2D^s^T / sqrt(d) (.) I_align) V_2D^s   for each selected view s
  Eq. (14): T = T_self + sum_s T_cross^s; after PMA I_align is the identity, so T_cross^s[i] = V_2D^s[i]
Table 6 rows -> `fusion`: A MLP -> "mlp", B Self-Attention -> "joint", C Cross-Attention -> "cross",
D Aligned-Attention (the paper's choice) -> "aligned".

Shapes: B batch, Gv visible 3-D tokens, S selected views, M 2-D tokens per view (M = Gv for PMA-aligned
tokens, M = P patches for a general align_mask), D width, h heads, D/h head width.
Symbols: E_3D^vis -> x, E_2D^vis -> tokens_2d, W_Q / W_K / W_V -> rows [0:D] / [D:2D] / [2D:3D] of
attn.qkv.weight, I_align -> align_mask, k (selected views) -> S, d^E -> dim, T_3D^vis -> attention output.
Demo: python kat.py [--out kat_demo.png]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSIONS = ("aligned", "cross", "joint", "mlp")
MASK_MODES = ("exclusion", "hadamard")


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a sample's whole residual branch with probability drop_prob."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x  # identity at evaluation
        keep_prob = 1.0 - self.drop_prob
        # one draw per sample, broadcast over tokens and channels
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) < keep_prob  # (B, 1, 1)
        return x * keep.to(x.dtype) / keep_prob  # rescaled so the expected output is unchanged


class KeyPartAttention(nn.Module):
    """Self-attention over the 3-D tokens plus the chosen 2-D fusion term (the 3-D input already layer-normed).

    fusion "aligned" (Table 6 row D): Eq. (14) with the mask of Eq. (12); align_mask None = PMA identity.
    fusion "cross" (row C): Eq. (14) without any mask, every 3-D token attends to all M tokens of each view.
    fusion "joint" (row B) and "cross" ignore align_mask; "mlp" (row A) uses it to find the aligned tokens.
    mask_mode "exclusion" (default) drops masked entries; "hadamard" is the literal Eq. (13) (ablation).
    """

    def __init__(self, dim, num_heads, fusion="aligned", mask_mode="exclusion"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, but got {fusion!r}.")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, but got {mask_mode!r}.")
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, but got dim={dim}, num_heads={num_heads}.")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.fusion, self.mask_mode = fusion, mask_mode
        # W_Q, W_K, W_V stacked and SHARED by the 3-D and 2-D tokens, Eq. (9) and (11); Point-MAE: no bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)  # output projection shared by all terms of Eq. (14)
        if fusion == "mlp":
            # NOTE(unspecified): Table 6 row A gives no sizes; we use Linear(2D, D) -> GELU -> Linear(D, D)
            self.fusion_mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def _split_heads(self, tokens):
        return tokens.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)  # (..., h, M, D/h)

    def _keys_values_2d(self, tokens_2d):
        # Eq. (11) with the shared W_K and W_V rows of qkv (Q_2D is not needed by Eq. 13)
        keys, values = F.linear(tokens_2d, self.qkv.weight[self.dim:]).chunk(2, dim=-1)  # 2 x (B, S, M, D)
        return self._split_heads(keys), self._split_heads(values)  # 2 x (B, S, h, M, D/h)

    @staticmethod
    def _check_pma_aligned(tokens_2d, num_visible):
        """Without align_mask the alignment is PMA's: 3-D token i <-> 2-D token i of every view, Eq. (14)."""
        if tokens_2d.shape[2] != num_visible:
            raise ValueError(f"Without align_mask the 2-D tokens must be PMA-aligned (M == Gv), but got "
                             f"M={tokens_2d.shape[2]} 2-D tokens per view for Gv={num_visible} 3-D tokens.")

    def _alignment_mask(self, align_mask, tokens_2d, num_visible):
        batch, views, count = tokens_2d.shape[:3]
        if align_mask is None:  # PMA alignment: 3-D token i <-> 2-D token i of every view, Eq. (14)
            self._check_pma_aligned(tokens_2d, num_visible)
            identity = torch.eye(num_visible, dtype=torch.bool, device=tokens_2d.device)  # (Gv, Gv)
            return identity.expand(batch, views, num_visible, num_visible)  # (B, S, Gv, M)
        if align_mask.shape != (batch, views, num_visible, count) or align_mask.dtype != torch.bool:
            raise ValueError(f"align_mask must be a bool tensor of shape {(batch, views, num_visible, count)} "
                             f"(B, S, Gv, M), but got {align_mask.dtype} {tuple(align_mask.shape)}.")
        return align_mask

    def cross_attention_weights(self, x, tokens_2d, align_mask=None):
        """Explicit Eq. (13) weights (B, S, h, Gv, M); "cross" fusion ignores the mask. Slow; demo and ablation."""
        queries = self._split_heads(F.linear(x, self.qkv.weight[: self.dim]))  # Eq. (9)  (B, h, Gv, D/h)
        keys, _ = self._keys_values_2d(tokens_2d)  # (B, S, h, M, D/h)
        # NOTE(deviation): Eq. (10)/(13) scale by 1/sqrt(d^E) (single head); we use 1/sqrt(D/h) per head
        logits = queries.unsqueeze(1) @ keys.transpose(-1, -2) * self.head_dim**-0.5  # (B, S, h, Gv, M)
        if self.fusion != "aligned":
            return logits.softmax(-1)  # Table 6 row C: every 2-D token of the view is attended
        mask = self._alignment_mask(align_mask, tokens_2d, x.shape[1]).unsqueeze(2)  # (B, S, 1, Gv, M)
        if self.mask_mode == "hadamard":
            # Eq. (13) read literally: masked logits become 0 and still receive weight exp(0)
            return (logits * mask).softmax(-1)  # (B, S, h, Gv, M)
        # NOTE(deviation): the paper writes a Hadamard product inside the softmax; we EXCLUDE masked entries
        # (weight 0), which is what "attend exclusively to aligned patches" (Table 6 text) describes.
        # A row with no allowed entry softmaxes over everything and is then zeroed: no NaN, no contribution.
        has_any = mask.any(-1, keepdim=True)  # (B, S, 1, Gv, 1)
        return logits.masked_fill(~(mask | ~has_any), float("-inf")).softmax(-1) * has_any  # (B, S, h, Gv, M)

    def _cross_sum(self, x, queries, tokens_2d, align_mask):
        """sum_s T_cross^s of Eq. (14) before the output projection  (B, Gv, D)."""
        batch, num_visible = x.shape[:2]
        views = tokens_2d.shape[1]
        if self.fusion == "aligned" and align_mask is None and self.mask_mode == "exclusion":
            # Fast path. With I_align = identity and exclusion, 3-D token i attends only to 2-D token i of each
            # view; a softmax over one entry is 1, so T_cross^s[i] = V_2D^s[i] exactly (no Gv x Gv matrix).
            # W_V is linear without bias, so sum_s (E_2D^s W_V) = (sum_s E_2D^s) W_V: one projection.
            # Consequence: W_Q and W_K get no gradient from the cross term in this mode, only W_V does.
            self._check_pma_aligned(tokens_2d, num_visible)
            return F.linear(tokens_2d.sum(1), self.qkv.weight[2 * self.dim :])  # Eq. (14)  (B, Gv, D)
        keys, values = self._keys_values_2d(tokens_2d)  # 2 x (B, S, h, M, D/h)
        if self.fusion == "aligned" and self.mask_mode == "hadamard":
            cross = self.cross_attention_weights(x, tokens_2d, align_mask) @ values  # Eq. (13)  (B, S, h, Gv, D/h)
        else:
            # every (batch, view) pair is one attention problem for the fused kernel
            queries = queries.unsqueeze(1).expand(-1, views, -1, -1, -1).flatten(0, 1)  # (B*S, h, Gv, D/h)
            attn_mask, has_any = None, None
            if self.fusion == "aligned":
                mask = self._alignment_mask(align_mask, tokens_2d, num_visible).unsqueeze(2)  # (B, S, 1, Gv, M)
                has_any = mask.any(-1, keepdim=True)  # (B, S, 1, Gv, 1)
                # rows with no allowed entry attend to all (avoids NaN) and are zeroed below
                attn_mask = (mask | ~has_any).flatten(0, 1)  # (B*S, 1, Gv, M)
            cross = F.scaled_dot_product_attention(
                queries, keys.flatten(0, 1), values.flatten(0, 1), attn_mask=attn_mask
            ).unflatten(0, (batch, views))  # Eq. (13)  (B, S, h, Gv, D/h)
            if has_any is not None:
                cross = cross * has_any  # a fully masked query row contributes 0
        return cross.sum(1).transpose(1, 2).flatten(2)  # sum over views, Eq. (14)  (B, Gv, D)

    def _aligned_mean(self, tokens_2d, align_mask, num_visible):
        """Mean of the 2-D tokens aligned with each 3-D token over all views and patches  (B, Gv, D)."""
        if align_mask is None:  # PMA-aligned tokens: the mean over views of token i
            self._check_pma_aligned(tokens_2d, num_visible)
            return tokens_2d.mean(1)  # (B, Gv, D)
        weights = self._alignment_mask(align_mask, tokens_2d, num_visible).to(tokens_2d.dtype)  # (B, S, Gv, M)
        total = torch.einsum("bsgm,bsmd->bgd", weights, tokens_2d)  # (B, Gv, D)
        return total / weights.sum((1, 3)).clamp_min(1.0).unsqueeze(-1)  # no aligned token -> zeros  (B, Gv, D)

    def forward(self, x, tokens_2d=None, align_mask=None, attn_mask=None):
        if attn_mask is not None and tokens_2d is not None:
            raise ValueError("attn_mask (a mask over one joint token sequence) is only supported without tokens_2d, "
                             "but both were given.")
        projected = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # Eq. (9)  (B, Gv, 3, h, D/h)
        queries, keys, values = projected.permute(2, 0, 3, 1, 4)  # 3 x (B, h, Gv, D/h)
        if tokens_2d is not None and self.fusion == "joint":
            # NOTE(unspecified): Table 6 row B ("Self-Attention") read as ONE self-attention over
            # [3-D tokens; all S*M 2-D tokens] with the shared W_Q, W_K, W_V; only the 3-D rows are kept and the
            # 2-D tokens are constant inputs, so their query rows need not be computed. align_mask is ignored.
            keys_2d, values_2d = self._keys_values_2d(tokens_2d)  # 2 x (B, S, h, M, D/h)
            keys = torch.cat([keys, keys_2d.transpose(1, 2).flatten(2, 3)], dim=2)  # (B, h, Gv+S*M, D/h)
            values = torch.cat([values, values_2d.transpose(1, 2).flatten(2, 3)], dim=2)  # (B, h, Gv+S*M, D/h)
        # attn_mask (B or 1, 1 or h, Gv, Gv) bool, True = may attend: used by peer methods whose one sequence
        # holds both modalities (joint_mae.py's local-aligned attention); None is plain self-attention.
        attended = F.scaled_dot_product_attention(queries, keys, values,
                                                  attn_mask=attn_mask)  # Eq. (10)  (B, h, Gv, D/h)
        attended = attended.transpose(1, 2).flatten(2)  # (B, Gv, D)
        if tokens_2d is None or self.fusion == "joint":
            return self.proj(attended)  # (B, Gv, D)
        if self.fusion == "mlp":
            # NOTE(unspecified): Table 6 row A ("MLP") read as: the fusion term replaces sum_s T_cross^s,
            # T = proj(T_self) + MLP([E_3D ; mean of the 2-D tokens aligned with it over all views]), and it sits
            # in the block's attention residual: x + drop_path(T). No attention to the 2-D tokens.
            aligned = self._aligned_mean(tokens_2d, align_mask, x.shape[1])  # (B, Gv, D)
            return self.proj(attended) + self.fusion_mlp(torch.cat([x, aligned], dim=-1))  # (B, Gv, D)
        return self.proj(attended + self._cross_sum(x, queries, tokens_2d, align_mask))  # Eq. (14)  (B, Gv, D)


class KATBlock(nn.Module):
    """Pre-LN transformer block (Point-MAE) whose attention is KeyPartAttention; tokens_2d None = Point-MAE block."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, fusion="aligned", mask_mode="exclusion"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = KeyPartAttention(dim, num_heads, fusion=fusion, mask_mode=mask_mode)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        hidden_dim = int(dim * mlp_ratio)  # Point-MAE: ratio 4
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))

    def forward(self, x, tokens_2d=None, align_mask=None, attn_mask=None):
        # NOTE(unspecified): the 2-D tokens enter Eq. (11) as given, E_2D^vis W, with no LayerNorm (the pre-LN of
        # Point-MAE normalises only the 3-D stream), and are constant inputs to every block (never updated), since
        # the paper only defines 3-D outputs. A LayerNorm here would undo any scaling of the 2-D tokens, such as
        # the reliability scores by which rvs.py weighs the selected views, and so cut the selector's gradient.
        x = x + self.drop_path(self.attn(self.norm1(x), tokens_2d, align_mask, attn_mask))  # (B, Gv, D)
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, Gv, D)


def init_weights(module):
    """Point-MAE initialisation: truncated normal std 0.02 for Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class KATransformer(nn.Module):
    """Stack of KATBlocks with a final LayerNorm: the encoder (12 blocks) or, without 2-D tokens, the decoder."""

    def __init__(self, dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.1, fusion="aligned",
                 mask_mode="exclusion"):
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # Point-MAE: linearly 0 -> 0.1
        self.blocks = nn.ModuleList(
            KATBlock(dim, num_heads, mlp_ratio, rate, fusion=fusion, mask_mode=mask_mode) for rate in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)

    def forward(self, x, pos, tokens_2d=None, align_mask=None, return_hidden=(), attn_mask=None):
        """attn_mask (B, 1, Gv, Gv) bool, True = may attend, applied in every block; only without tokens_2d."""
        wanted = set(return_hidden)
        if any(not 0 <= index < len(self.blocks) for index in wanted):
            raise ValueError(f"return_hidden must hold block indices in [0, {len(self.blocks)}), "
                             f"but got {tuple(return_hidden)}.")
        hidden = {}
        for index, block in enumerate(self.blocks):
            # position added at every block input (Point-MAE)
            x = block(x + pos, tokens_2d, align_mask, attn_mask)  # (B, Gv, D)
            if index in wanted:
                hidden[index] = x
        if not return_hidden:
            return self.norm(x)  # (B, Gv, D)
        return self.norm(x), [self.norm(hidden[index]) for index in return_hidden]  # (B, Gv, D), list of same


def _heat_map(weights, cell):
    """(Gv, M) weights in [0, 1] -> a blue-to-yellow RGB picture, one cell x cell square per entry."""
    import numpy as np
    from PIL import Image

    scaled = (weights - weights.min()) / (weights.max() - weights.min()).clamp_min(1e-12)  # per-panel range
    low, high = torch.tensor([20.0, 30.0, 90.0]), torch.tensor([250.0, 230.0, 40.0])
    rgb = low + scaled.unsqueeze(-1) * (high - low)  # (Gv, M, 3)
    image = Image.fromarray(rgb.to(torch.uint8).numpy().astype(np.uint8))
    return image.resize((image.width * cell, image.height * cell), Image.NEAREST)


if __name__ == "__main__":
    from PIL import Image, ImageDraw

    parser = argparse.ArgumentParser(description="KAT demo: fusion modes and 3-D -> 2-D attention weights.")
    parser.add_argument("--out", default="kat_demo.png", help="where to write the PNG heat-map")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch, visible, views, patches, dim, heads = 2, 16, 3, 49, 64, 4
    x = torch.randn(batch, visible, dim)  # visible 3-D tokens
    pos = torch.randn(batch, visible, dim)  # their centre embeddings
    aligned_2d = x.unsqueeze(1) + 0.5 * torch.randn(batch, views, visible, dim)  # PMA-aligned 2-D tokens
    patch_tokens = torch.randn(batch, views, patches, dim)  # all patches of the selected views
    patch_index = torch.randint(0, patches, (batch, views, visible))  # patch under each 3-D centre
    align_mask = F.one_hot(patch_index, patches).bool()  # Eq. (12)
    print(f"x {tuple(x.shape)}  pos {tuple(pos.shape)}  aligned 2-D tokens {tuple(aligned_2d.shape)}")
    print(f"patch tokens {tuple(patch_tokens.shape)}  align_mask {tuple(align_mask.shape)}")
    for fusion in FUSIONS:
        encoder = KATransformer(dim, depth=2, num_heads=heads, fusion=fusion).eval()
        out, hidden = encoder(x, pos, aligned_2d, return_hidden=(0,))
        print(f"fusion {fusion:8s} PMA tokens -> {tuple(out.shape)}, hidden[0] {tuple(hidden[0].shape)}")
        if fusion in ("aligned", "mlp"):
            print(f"fusion {fusion:8s} general mask -> {tuple(encoder(x, pos, patch_tokens, align_mask).shape)}")
    print(f"no 2-D tokens (decoder) -> {tuple(KATransformer(dim, depth=2, num_heads=heads)(x, pos).shape)}")
    # attention weights of one block with PyTorch's default init (more contrast than std 0.02)
    panels = []
    for fusion in ("cross", "aligned"):
        block = KATBlock(dim, heads, fusion=fusion)
        block.attn.load_state_dict(panels[0][1] if panels else block.attn.state_dict())  # same weights
        with torch.no_grad():
            weights = block.attn.cross_attention_weights(block.norm1(x), aligned_2d)  # (B, S, h, Gv, Gv)
        print(f"{fusion} weights {tuple(weights.shape)}, row sums {weights[0, 0, 0].sum(-1)[:3].tolist()}")
        panels.append((fusion, block.attn.state_dict(), _heat_map(weights[0, 0, 0], cell=16)))
    margin = 24
    canvas = Image.new("RGB", (2 * panels[0][2].width + 3 * margin, panels[0][2].height + 2 * margin), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (fusion, _, picture) in enumerate(panels):
        left = margin + column * (picture.width + margin)
        canvas.paste(picture, (left, margin))
        draw.text((left, 6), f'"{fusion}": 3-D token (row) -> 2-D token (col), view 0 head 0', fill="black")
    draw.text((margin, canvas.height - 18), "colour: each panel's minimum (blue) to maximum (yellow)", fill="black")
    canvas.save(args.out)
    print(f"wrote {args.out} ({canvas.width} x {canvas.height})")
