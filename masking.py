"""Reinforced Masking (RM) and Part and Masking Alignment (PMA): paper section "Reinforced Masking", Eq. (7)-(8),
the PMA paragraph after it and Figure 3; PMA makes the alignment mask of Eq. (12) the identity (text after Eq. 13).

A small attention policy scores every 3-D token; the visible tokens are drawn from that distribution without
replacement, the rest are masked and reconstructed. The policy learns by REINFORCE with the reconstruction error
as reward. PMA then gives every visible 3-D token the 2-D patch token under its centre in each selected view.

    Eq. (7): P_S = Softmax(Linear(MHA(E_3D))),  P_S in R^n, sum_i p_i = 1
             I_v = n_v draws without replacement from Categorical(n, P_S),  n_v = n (1 - rho),  I_m = the rest
    Eq. (8): L_S = -E_{I_m ~ P}[L_R] = -sum_{i in I_m} log p_i * L_R^i
    PMA:     aligned[b, s, j] = E_2D[b, s, patch under the centre of visible token j in view s]

Shapes: B batch, G tokens (groups), Gv visible tokens, Gm masked tokens, S selected views, P patches per image,
D width, M generic count.

Paper symbol -> name here
    E_3D -> tokens (B, G, D)            P_S -> log_probs.exp() (B, G)        rho -> mask_ratio
    n -> num_groups (G)                 n_v -> num_visible(G, mask_ratio)    I_v -> visible_index (B, Gv)
    I_m -> masked_index (B, Gm)         L_R^i -> token_errors (B, Gm)        L_S -> reinforce_loss(...)
    E_2D (selected views) -> tokens_2d (B, S, P, D)                          E_2D^vis -> align_patches(...)

Demo: `python masking.py [--out masking_demo.png]` trains the policy on a toy table for a few steps and draws
random vs reinforced masks and the probability of every token.
"""
import argparse

import torch
from torch import nn


def num_visible(num_groups: int, mask_ratio: float) -> int:
    """n_v = G - int(rho * G): Point-MAE's rounding (64 groups, 0.6 -> 38 masked, 26 visible)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"Expected a mask ratio in [0, 1), but found {mask_ratio}.")
    return num_groups - int(mask_ratio * num_groups)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick rows of x (B, G, ...) by index (B, M) -> (B, M, ...), differentiable in x."""
    batch_index = torch.arange(x.shape[0], device=x.device).unsqueeze(1)  # (B, 1)
    return x[batch_index, index]  # (B, M, ...)


def sample_without_replacement(log_probs: torch.Tensor, num_samples: int, generator=None) -> torch.Tensor:
    """Draw num_samples distinct indices (B, M) per row of log_probs (B, G), in draw order (Gumbel-top-k).

    Adding independent Gumbel(0, 1) noise to log p and taking the top M has the same distribution as M
    sequential draws without replacement (docs/REFERENCE.md sec. 4); the descending order of the keys is the draw
    order. `generator` (a torch.Generator on the device of log_probs) makes the draw reproducible.
    """
    if not 0 <= num_samples <= log_probs.shape[-1]:
        raise ValueError(f"Expected to draw between 0 and {log_probs.shape[-1]} items, but found {num_samples}.")
    uniform = torch.rand(log_probs.shape, generator=generator, device=log_probs.device)  # (B, G)
    # Keep u away from 0 so that -log(-log(u)) stays finite.
    uniform = uniform.clamp_min(torch.finfo(uniform.dtype).tiny)  # (B, G)
    gumbel = -torch.log(-torch.log(uniform))  # (B, G)
    keys = log_probs.detach().float() + gumbel  # (B, G)
    return keys.topk(num_samples, dim=-1).indices  # (B, M)


def split_visible_masked(visible_index: torch.Tensor, num_groups: int):
    """Visible indices (B, Gv) in any order -> visible_index (B, Gv), masked_index (B, Gm), both ascending."""
    batch_size, visible_count = visible_index.shape
    is_visible = torch.zeros(batch_size, num_groups, dtype=torch.bool, device=visible_index.device)  # (B, G)
    is_visible.scatter_(1, visible_index, True)  # (B, G)
    # A stable sort of the 0/1 flags lists the masked tokens first, each part in ascending token order.
    order = torch.sort(is_visible.to(torch.int32), dim=1, stable=True).indices  # (B, G)
    masked_count = num_groups - visible_count
    return order[:, masked_count:], order[:, :masked_count]  # (B, Gv), (B, Gm)


def random_masking(batch_size: int, num_groups: int, mask_ratio: float, device=None, generator=None):
    """Point-MAE's uniform random masking (kept for ablations): visible_index (B, Gv), masked_index (B, Gm)."""
    visible_count = num_visible(num_groups, mask_ratio)
    # A random permutation per row: argsort of i.i.d. uniform noise.
    noise = torch.rand(batch_size, num_groups, generator=generator, device=device)  # (B, G)
    permutation = noise.argsort(dim=1)  # (B, G)
    return split_visible_masked(permutation[:, :visible_count], num_groups)  # (B, Gv), (B, Gm)


class ReinforcedMasking(nn.Module):
    """Eq. (7): the sampling policy over the G tokens, and the draw of the visible set.

    NOTE(unspecified): "a lightweight MHA" is all the paper says. We use one pre-LayerNorm residual block,
    h = x + MHA(LN(x)), with nn.MultiheadAttention (num_heads heads), then Linear(D, 1) and a softmax over the G
    tokens (AdaMAE's layout, docs/REFERENCE.md sec. 4). The Linear starts at zero, so the initial policy is uniform,
    i.e. exactly Point-MAE's random masking, and only departs from it as L_S teaches it.
    NOTE(unspecified): the policy reads DETACHED tokens by default (detach_input=True), so L_S trains only the
    policy and never shapes the tokenizer; detach_input=False lets L_S reach the tokens.
    NOTE(unspecified): in eval mode the visible set is still drawn at random, as in training (the decoder has
    only seen sampled masks, and the paper stresses sampling over deterministic Top-K);
    deterministic_eval=True keeps the Gv most probable tokens instead.
    """

    def __init__(self, dim: int = 384, num_heads: int = 6, mask_ratio: float = 0.6,
                 detach_input: bool = True, deterministic_eval: bool = False):
        super().__init__()
        num_visible(1, mask_ratio)  # validates the ratio early, with a clear message
        self.mask_ratio = mask_ratio  # Point-MAE: 0.6
        self.detach_input = detach_input
        self.deterministic_eval = deterministic_eval
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, tokens: torch.Tensor, generator=None):
        """tokens (B, G, D) -> visible_index (B, Gv), masked_index (B, Gm) (both ascending), log_probs (B, G)."""
        if tokens.dim() != 3:
            raise ValueError(f"Expected tokens of shape (B, G, D), but found shape {tuple(tokens.shape)}.")
        num_groups = tokens.shape[1]
        x = tokens.detach() if self.detach_input else tokens  # (B, G, D)
        normed = self.norm(x)  # (B, G, D)
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]  # (B, G, D)  MHA(E_3D)
        logits = self.score(x).squeeze(-1).float()  # (B, G)  Linear(MHA(E_3D))
        # Eq. (7) in log space: log_softmax is the stable form of log(Softmax(.)) that Eq. (8) needs.
        log_probs = torch.log_softmax(logits, dim=-1)  # (B, G)  Eq. (7)

        visible_count = num_visible(num_groups, self.mask_ratio)
        if self.deterministic_eval and not self.training:
            drawn = log_probs.topk(visible_count, dim=-1).indices  # (B, Gv)
        else:
            # I_v ~ Categorical(n, P_S) without replacement (Eq. 7 text), all rows at once.
            drawn = sample_without_replacement(log_probs, visible_count, generator)  # (B, Gv)
        visible_index, masked_index = split_visible_masked(drawn, num_groups)  # (B, Gv), (B, Gm)
        return visible_index, masked_index, log_probs


def reinforce_loss(log_probs: torch.Tensor, masked_index: torch.Tensor, token_errors: torch.Tensor,
                   baseline: bool = False) -> torch.Tensor:
    """Eq. (8): L_S = -sum_{i in I_m} log p_i * L_R^i, with L_R^i (B, Gm) the per-token reconstruction error.

    Minimising L_S raises the probability of masked tokens that were hard to reconstruct, so they tend to be
    visible next time. The errors are a reward: detached here, so L_S never trains the reconstruction.
    NOTE(deviation): paper sums over the masked tokens; we average over masked tokens and the batch (AdaMAE,
    docs/REFERENCE.md sec. 4) so that lambda does not depend on G, the mask ratio or the batch size.
    NOTE(unspecified): baseline=True subtracts each shape's mean masked-token error (a variance-reducing
    REINFORCE baseline); the paper has none, so the default is False.
    """
    if masked_index.shape != token_errors.shape or masked_index.shape[0] != log_probs.shape[0]:
        raise ValueError(
            "Expected masked_index and token_errors of the same shape (B, Gm) with the batch of log_probs "
            f"{tuple(log_probs.shape)}, but found {tuple(masked_index.shape)} and {tuple(token_errors.shape)}."
        )
    if masked_index.shape[1] == 0:
        return log_probs.sum() * 0.0  # nothing masked: no reward, but keep the graph
    rewards = token_errors.detach().float()  # (B, Gm)  stop-gradient on L_R^i
    if baseline:
        rewards = rewards - rewards.mean(dim=1, keepdim=True)  # (B, Gm)
    masked_log_probs = log_probs.gather(1, masked_index)  # (B, Gm)  log p_i, i in I_m
    return -(masked_log_probs * rewards).mean()  # Eq. (8)


def align_patches(tokens_2d: torch.Tensor, patch_index: torch.Tensor, visible_index: torch.Tensor) -> torch.Tensor:
    """Part and Masking Alignment: tokens_2d (B, S, P, D), patch_index (B, S, G), visible_index (B, Gv)
    -> (B, S, Gv, D), row j of view s = the patch token under the centre of visible token j in view s.

    Part Alignment pairs every 3-D token with the patch its centre projects to (patch_index, computed by the
    renderer's project + pixels_to_patches); Masking Alignment keeps exactly the pairs of the visible tokens.
    Row j of the result is then aligned with visible token j, so the alignment mask of Eq. (12) is the identity
    (paper text after Eq. 13) and kat.py needs no mask.
    NOTE(unspecified): the patch under a centre is taken whether or not the centre is occluded in that view, and
    two tokens whose centres fall in one patch both receive that patch (a repeated row), which keeps the
    one-to-one layout.
    """
    batch_size, num_views, _, dim = tokens_2d.shape
    if patch_index.shape[:2] != (batch_size, num_views) or visible_index.shape[0] != batch_size:
        raise ValueError(
            "Expected tokens_2d (B, S, P, D), patch_index (B, S, G) and visible_index (B, Gv) to share B and S, "
            f"but found {tuple(tokens_2d.shape)}, {tuple(patch_index.shape)} and {tuple(visible_index.shape)}."
        )
    # Masking Alignment on the indices: the patch index of each visible token in each view.
    per_view_visible = visible_index.unsqueeze(1).expand(-1, num_views, -1)  # (B, S, Gv)
    visible_patch_index = patch_index.gather(2, per_view_visible)  # (B, S, Gv)
    # Part Alignment: fetch those patch tokens.
    gather_index = visible_patch_index.unsqueeze(-1).expand(-1, -1, -1, dim)  # (B, S, Gv, D)
    return tokens_2d.gather(2, gather_index)  # (B, S, Gv, D)


def _toy_table(num_points, generator):
    """A toy table (N, 3): half the points on a thin top plate, half on four thin legs (demo only)."""
    top_count = num_points // 2
    # Top plate: x in [-1, 1], y in [-0.6, 0.6], z in [0.47, 0.53].
    top = torch.rand(top_count, 3, generator=generator) * torch.tensor([2.0, 1.2, 0.06])  # (N/2, 3)
    top = top - torch.tensor([1.0, 0.6, -0.47])  # (N/2, 3)
    leg_count = num_points - top_count
    # Legs: thin vertical rods under the four corners, z in [-0.5, 0.5].
    corner = torch.tensor([[-0.9, -0.5], [0.9, -0.5], [-0.9, 0.5], [0.9, 0.5]])[torch.arange(leg_count) % 4]  # (N/2, 2)
    leg_xy = corner + 0.05 * torch.randn(leg_count, 2, generator=generator)  # (N/2, 2)
    leg_z = torch.rand(leg_count, 1, generator=generator) - 0.5  # (N/2, 1)
    return torch.cat([top, torch.cat([leg_xy, leg_z], dim=1)])  # (N, 3)


def _draw(centers, panels, path):
    """One row of panels; each panel colours the centres (G, 3) with a list of RGB tuples (demo only)."""
    from PIL import Image, ImageDraw

    size = 300
    image = Image.new("RGB", (size * len(panels), size + 30), "white")
    caption = "toy reconstruction error: legs 1.0, table top 0.2; L_S makes hard tokens visible"
    draw = ImageDraw.Draw(image)
    # An oblique view of the table: x to the right, z up, y pushed back diagonally.
    screen_x = centers[:, 0] + 0.35 * centers[:, 1]
    screen_y = centers[:, 2] + 0.25 * centers[:, 1]
    for panel, (title, colours) in enumerate(panels):
        draw.text((panel * size + 10, 8), title, fill="black")
        for x, y, colour in zip(screen_x.tolist(), screen_y.tolist(), colours):
            u, v = panel * size + size / 2 + 110 * x, size / 2 + 30 - 170 * y
            draw.ellipse([u - 5, v - 5, u + 5, v + 5], fill=colour, outline="black")
    draw.text((10, size + 12), caption, fill="black")
    image.save(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Random vs reinforced masking on a toy table.")
    parser.add_argument("--out", default="masking_demo.png", help="Where to write the picture (PNG).")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    # A cloud and its 64 group centres by farthest point sampling (a slow loop is fine for a demo).
    points = _toy_table(1024, generator)  # (N, 3)
    chosen = [0]
    distance = (points - points[0]).pow(2).sum(-1)  # (N,)
    for _ in range(63):
        chosen.append(int(distance.argmax()))
        distance = torch.minimum(distance, (points - points[chosen[-1]]).pow(2).sum(-1))  # (N,)
    centers = points[chosen]  # (G, 3)
    # Simple coordinate tokens: random Fourier features of the centres.
    dim, num_groups = 96, 64
    frequencies = 2.0 * torch.randn(3, dim // 2, generator=generator)  # (3, D/2)
    tokens = torch.cat([torch.sin(centers @ frequencies), torch.cos(centers @ frequencies)], dim=-1)  # (G, D)
    tokens = tokens.unsqueeze(0)  # (1, G, D)
    # Toy per-token reconstruction error: the thin legs are "hard" (1.0), the flat top "easy" (0.2).
    is_leg = centers[:, 2] < 0.4  # (G,)
    errors = torch.where(is_leg, 1.0, 0.2)  # (G,)
    print("points", tuple(points.shape), "centers", tuple(centers.shape), "tokens", tuple(tokens.shape))

    # Train the policy with L_S alone on a batch of 16 masks of the same table.
    policy = ReinforcedMasking(dim=dim, num_heads=6, mask_ratio=0.6)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    batch = tokens.expand(16, -1, -1)  # (B, G, D)
    for _ in range(30):
        visible_index, masked_index, log_probs = policy(batch, generator)
        loss = reinforce_loss(log_probs, masked_index, errors[masked_index])  # Eq. (8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print("visible", tuple(visible_index.shape), "masked", tuple(masked_index.shape),
          "log_probs", tuple(log_probs.shape), f"final L_S {loss.item():.4f}")

    # One mask of each kind for the single table.
    random_visible, random_masked = random_masking(1, num_groups, 0.6, generator=generator)  # (1, Gv), (1, Gm)
    reinforced_visible, _, log_probs = policy(tokens, generator)  # (1, Gv), (1, G)
    probabilities = log_probs.exp()[0].detach()  # (G,)
    print(f"P(leg token) {probabilities[is_leg].mean():.4f} vs P(top token) {probabilities[~is_leg].mean():.4f}"
          f" (uniform {1 / num_groups:.4f}); legs visible: random {int(is_leg[random_visible[0]].sum())},"
          f" reinforced {int(is_leg[reinforced_visible[0]].sum())} of {int(is_leg.sum())}")

    # PMA on a toy single view: orthographic x-z projection onto a 7 x 7 patch grid of a 112 x 112 image.
    pixels = ((1 - (centers[:, [2, 0]] + 1) / 2) * 111).round().long().clamp(0, 111)  # (G, 2) (row, col)
    pixels[:, 1] = 111 - pixels[:, 1]  # x grows to the right
    patch_index = (pixels[:, 0] // 16) * 7 + pixels[:, 1] // 16  # (G,)
    tokens_2d = torch.randn(1, 1, 49, dim, generator=generator)  # (B, S, P, D)
    aligned = align_patches(tokens_2d, patch_index.view(1, 1, -1), reinforced_visible)  # (B, S, Gv, D)
    print("tokens_2d", tuple(tokens_2d.shape), "patch_index", (1, 1, num_groups), "aligned", tuple(aligned.shape))

    def mask_colours(visible):
        return [(40, 90, 220) if index in set(visible.tolist()) else (210, 210, 210) for index in range(num_groups)]

    ramp = (probabilities - probabilities.min()) / (probabilities.max() - probabilities.min() + 1e-12)
    heat = [(255, int(230 - 200 * r), int(120 - 120 * r)) for r in ramp.tolist()]
    _draw(centers, [
        ("random masking (blue = visible, grey = masked)", mask_colours(random_visible[0])),
        ("reinforced masking after 30 steps of L_S", mask_colours(reinforced_visible[0])),
        (f"P_S per token: {probabilities.min():.4f} (pale) .. {probabilities.max():.4f} (red)", heat),
    ], args.out)
    print("wrote", args.out)
