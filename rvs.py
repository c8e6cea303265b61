"""Reliable Multi-View Selector (RVS): paper section "Reliable Multi-View Selector", Eq. (4)-(6), Figure 2.

Every rendered view gets a relevance score against the point cloud; only the k best views go on to Part and
Masking Alignment (masking.py) and the Key-part Aligned Transformer (kat.py).

    Eq. (4): [E_3D^cls ; E_2D^i,cls] = Maxpooling([E_3D ; E_2D^i])       max over tokens, per view i
    Eq. (5): s_i = Sigmoid(MLP([E_3D^cls ; E_2D^i,cls]))                   one score in (0, 1) per view
    Eq. (6): I = { i in 1..v : |{ j : s_j > s_i }| < k }                   the Top-k views

Shapes: B batch, G 3-D tokens (groups), V views, S = k selected views, P patches per image, D width.

Paper symbol -> name here
    E_3D -> tokens_3d (B, G, D)          E_2D^i -> tokens_2d[:, i] (B, P, D)     d^E -> dim
    E_3D^cls -> cls_3d (B, D)            E_2D^i,cls -> cls_2d[:, i] (B, D)
    s_i -> scores[:, i] (B, V)           k -> num_selected                       I -> selected (B, S)
    M' (the refined views) -> gated_tokens_2d (B, S, P, D), the tokens of the views in I times their score

Demo: `python rvs.py [--out rvs_demo.png]` scores random tokens and draws the scores as a bar chart.
"""
import argparse

import torch
from torch import nn


def top_k_views(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. (6): indices (B, S = k) of the k highest-scoring views, ordered by descending score.

    Eq. (6) keeps view i when fewer than k views score strictly higher. With ties that set can hold more than k
    views (e.g. scores 0.9, 0.5, 0.5 and k = 2 keep all three), while the paper also asks for |M'| = k. We keep
    exactly k: the stable descending sort puts equal scores in ascending view order, so ties go to the lower
    view index. The result is always a subset of Eq. (6)'s set, and equal to it when there are no ties.
    """
    if scores.dim() != 2:
        raise ValueError(f"Expected view scores of shape (B, V), but found shape {tuple(scores.shape)}.")
    num_views = scores.shape[1]
    if not 1 <= k <= num_views:
        raise ValueError(f"Expected the number of selected views k in [1, {num_views}], but found k = {k}.")
    # A stable sort keeps tied scores in their original (ascending index) order: the deterministic tie-break.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, V)
    return order[:, :k]  # (B, S)  Eq. (6)


class ReliableViewSelector(nn.Module):
    """Eq. (4)-(6): score each view against the point cloud, keep the k best, gate their tokens by the score.

    NOTE(unspecified): the paper only says "a multilayer perceptron that projects the concatenated embedding to a
    scalar". We use Linear(2D, hidden_dim) -> GELU -> Linear(hidden_dim, 1) with hidden_dim = D by default
    (Point-MAE's blocks use GELU too).
    NOTE(unspecified): Top-k (Eq. 6) has no gradient and the paper does not say how the MLP learns. We multiply
    the selected views' 2-D tokens by their scores, so the reconstruction loss flows back into the MLP through
    every kept view: a view whose tokens help reconstruction gets its score pushed up.
    """

    def __init__(self, dim: int = 384, num_selected: int = 3, hidden_dim: int | None = None):
        super().__init__()
        # Paper Table 4: 3 selected views work best (1, 6 and 9 were worse).
        self.num_selected = num_selected
        hidden_dim = dim if hidden_dim is None else hidden_dim
        # The scalar scoring MLP of Eq. (5), fed the concatenated pair of [cls] vectors (2D wide).
        self.score_mlp = nn.Sequential(
            nn.Linear(2 * dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, tokens_3d: torch.Tensor, tokens_2d: torch.Tensor):
        """tokens_3d (B, G, D), tokens_2d (B, V, P, D) -> selected (B, S) long, scores (B, V),
        gated_tokens_2d (B, S, P, D) = tokens_2d of the selected views * their scores."""
        if tokens_3d.dim() != 3 or tokens_2d.dim() != 4:
            raise ValueError(
                "Expected tokens_3d of shape (B, G, D) and tokens_2d of shape (B, V, P, D), but found shapes "
                f"{tuple(tokens_3d.shape)} and {tuple(tokens_2d.shape)}."
            )
        if tokens_3d.shape[0] != tokens_2d.shape[0] or tokens_3d.shape[-1] != tokens_2d.shape[-1]:
            raise ValueError(
                "Expected tokens_3d and tokens_2d to share batch size and width, but found shapes "
                f"{tuple(tokens_3d.shape)} and {tuple(tokens_2d.shape)}."
            )
        batch_size, num_views = tokens_2d.shape[:2]

        # Eq. (4): global [cls] vectors by max-pooling over the tokens of each modality.
        cls_3d = tokens_3d.max(dim=1).values  # (B, D)  Eq. (4)
        cls_2d = tokens_2d.max(dim=2).values  # (B, V, D)  Eq. (4), one per view
        # Pair the single point-cloud vector with every view's vector.
        pairs = torch.cat([cls_3d.unsqueeze(1).expand(-1, num_views, -1), cls_2d], dim=-1)  # (B, V, 2D)

        # Eq. (5): MLP to a scalar, then sigmoid. The sigmoid runs in float32 so that bf16 autocast does not
        # round nearby scores into ties.
        scores = torch.sigmoid(self.score_mlp(pairs).squeeze(-1).float())  # (B, V)  Eq. (5)

        # Eq. (6): the k best views; a selection, so computed without gradient.
        selected = top_k_views(scores.detach(), self.num_selected)  # (B, S)  Eq. (6)

        # Gather the selected views' tokens and scores in one vectorised indexing step.
        batch_index = torch.arange(batch_size, device=tokens_2d.device).unsqueeze(1)  # (B, 1)
        selected_tokens = tokens_2d[batch_index, selected]  # (B, S, P, D)
        selected_scores = scores.gather(1, selected)  # (B, S)
        # Gating: the scores reach the loss only through this product (see the class NOTE).
        gated_tokens_2d = selected_tokens * selected_scores[:, :, None, None].to(selected_tokens.dtype)  # (B, S, P, D)
        return selected, scores, gated_tokens_2d


def _draw_scores(scores, selected, path):
    """Bar chart of one shape's view scores (V,), the selected views in orange, written to `path` as PNG."""
    from PIL import Image, ImageDraw

    num_views = len(scores)
    width, height, margin = 90 + 60 * num_views, 320, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    # Scores from a fresh MLP sit close together, so the axis spans [min - pad, max + pad], not [0, 1].
    pad = max(0.1 * (max(scores) - min(scores)), 1e-3)
    low, high = min(scores) - pad, max(scores) + pad
    plot_bottom, plot_top = height - margin, margin
    for view, score in enumerate(scores):
        left = margin + 60 * view
        top = plot_bottom - (score - low) / (high - low) * (plot_bottom - plot_top)
        colour = (240, 140, 40) if view in selected else (150, 150, 150)
        draw.rectangle([left, top, left + 40, plot_bottom], fill=colour)
        draw.text((left + 2, top - 14), f"{score:.4f}", fill="black")
        draw.text((left + 14, plot_bottom + 6), f"v{view}", fill="black")
    draw.line([margin - 5, plot_bottom, width - 20, plot_bottom], fill="black")
    draw.text((margin, 10), f"RVS view scores s_i (Eq. 5), axis {low:.3f}..{high:.3f}", fill="black")
    draw.text((margin, 26), f"orange: Top-{len(selected)} selected views (Eq. 6)", fill="black")
    image.save(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Score random views with the Reliable Multi-View Selector.")
    parser.add_argument("--out", default="rvs_demo.png", help="Where to write the bar chart (PNG).")
    args = parser.parse_args()

    torch.manual_seed(0)
    # Point-MAE / CLIP sizes: 64 groups, 10 rendered views, 7 x 7 = 49 patches of a 112 x 112 image, width 384.
    batch_size, num_groups, num_views, num_patches, dim = 2, 64, 10, 49, 384
    tokens_3d = torch.randn(batch_size, num_groups, dim)  # (B, G, D)
    # Give each view its own brightness so the views differ visibly in their max-pooled vectors.
    view_gain = torch.linspace(0.5, 1.5, num_views)[None, :, None, None]  # (1, V, 1, 1)
    tokens_2d = torch.randn(batch_size, num_views, num_patches, dim) * view_gain  # (B, V, P, D)
    print("tokens_3d", tuple(tokens_3d.shape), "tokens_2d", tuple(tokens_2d.shape))

    # The Eq. (4) [cls] vectors and their per-view pairs, as computed inside forward.
    print("cls_3d", tuple(tokens_3d.max(dim=1).values.shape), "cls_2d", tuple(tokens_2d.max(dim=2).values.shape),
          "pairs", (batch_size, num_views, 2 * dim))
    selector = ReliableViewSelector(dim=dim, num_selected=3)
    selected, scores, gated_tokens_2d = selector(tokens_3d, tokens_2d)
    print("scores", tuple(scores.shape), "selected", tuple(selected.shape), "gated", tuple(gated_tokens_2d.shape))
    print("shape 0 scores:", [round(value, 4) for value in scores[0].tolist()])
    print("shape 0 selected views (best first):", selected[0].tolist())

    _draw_scores(scores[0].tolist(), selected[0].tolist(), args.out)
    print("wrote", args.out)
