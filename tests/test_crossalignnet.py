"""Tests for crossalignnet.py: the tiered image mask, the contrastive losses and CrossBlock against slow versions,
the centre -> image patch map and its orientation, gradients to every part, and a tiny end-to-end step."""
import math

import pytest
import torch
import torch.nn as nn

import crossalignnet as cal
from kat import KATBlock, KATransformer
from masking import gather_tokens
from tokenizer import CenterEmbedding, PointTokenizer

# A small model: G 16, K 8, D 32, 64 x 64 images of 16 x 16 patches (P = 16), no stochastic depth.
SMALL = dict(num_groups=16, group_size=8, dim=32, depth=2, num_heads=4, decoder_depth=2, decoder_heads=4,
             gsa_depth=1, image_depth=2, image_heads=4, image_size=64, patch_size=16, projection_dim=16,
             drop_path=0.0)


def random_clouds(batch=4, num_points=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_points, 3, generator=generator) * 2 - 1  # (B, N, 3)


# ------------------------------------------------------------------------------------------ aligned image mask
# Hand-built case: 8 centres over P = 16 patches. Centres 0 (visible) and 1 (masked) share patch 0: a conflict.
#   visible-only owners {1, 4}, masked-only owners {2, 3, 5}, conflict {0}, unowned {6, ..., 15}.
CENTER_PATCH = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
VISIBLE = torch.tensor([0, 2, 6])
VISIBLE_ONLY, MASKED_ONLY, CONFLICT, UNOWNED = {1, 4}, {2, 3, 5}, {0}, set(range(6, 16))


def hand_built_masks(mode, keep_count, rows=300):
    torch.manual_seed(0)
    kept, dropped = cal.aligned_image_mask(CENTER_PATCH.expand(rows, -1), VISIBLE.expand(rows, -1), 16, keep_count,
                                           mode)  # (rows, Pv), (rows, P - Pv)
    assert kept.shape == (rows, keep_count) and dropped.shape == (rows, 16 - keep_count)  # exact keep-count
    assert torch.equal(torch.cat([kept, dropped], 1).sort(1).values, torch.arange(16).expand(rows, -1))  # a split
    assert torch.equal(kept, kept.sort(1).values) and torch.equal(dropped, dropped.sort(1).values)  # ascending
    return [set(row) for row in kept.tolist()]


def test_complementary_keeps_masked_owners_and_never_visible_owners():
    for kept in hand_built_masks("complementary", 5):
        assert MASKED_ONLY <= kept  # tier 2 always kept
        assert not kept & (VISIBLE_ONLY | CONFLICT)  # tier 0 never, while unowned patches remain
        assert len(kept & UNOWNED) == 2
    # 13 = tiers 2 + 1 exactly; at 14 one tier-0 patch must be kept, and only then.
    assert all(kept == MASKED_ONLY | UNOWNED for kept in hand_built_masks("complementary", 13))
    for kept in hand_built_masks("complementary", 14):
        assert MASKED_ONLY | UNOWNED <= kept and len(kept & (VISIBLE_ONLY | CONFLICT)) == 1


def test_correspondence_keeps_visible_owners_and_never_masked_owners_or_conflicts():
    for kept in hand_built_masks("correspondence", 5):
        assert VISIBLE_ONLY <= kept
        assert not kept & (MASKED_ONLY | CONFLICT)
        assert len(kept & UNOWNED) == 3


def test_random_image_masking_ignores_the_3d_mask():
    counts = torch.zeros(16)
    for kept in hand_built_masks("random", 5):
        counts[list(kept)] += 1
    frequency = counts / 300  # every patch kept with probability 5 / 16
    assert (frequency - 5 / 16).abs().max() < 0.12
    # The unowned patches are random-filled in every mode: each is kept sometimes, and not always.
    fill = torch.zeros(16)
    for kept in hand_built_masks("complementary", 5):
        fill[list(kept)] += 1
    assert ((fill[6:] > 0) & (fill[6:] < 300)).all()


def test_keep_count_is_paper_rule():
    assert cal.CrossAlignNet(**{**SMALL, "image_size": 224}).image_keep_count == 196 - math.floor(0.6 * 196) == 79
    model = cal.CrossAlignNet(**{**SMALL, "image_size": 224, "mask_ratio": 0.75})
    assert (model.num_patches, model.image_keep_count) == (196, 49)
    with pytest.raises(ValueError, match="mode"):
        cal.aligned_image_mask(CENTER_PATCH[None], VISIBLE[None], 16, 5, "independent")


# ------------------------------------------------------------------------------------------ contrastive losses
def slow_infonce(points, images, temperature):
    """Eq. (7)-(8) by loops: cosines by hand, both directions, averaged over 2B terms."""
    batch = len(points)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    sims = [[cos(points[i], images[k]) / temperature for k in range(batch)] for i in range(batch)]
    total = 0.0
    for i in range(batch):
        total -= math.log(math.exp(sims[i][i]) / sum(math.exp(sims[i][k]) for k in range(batch)))  # P -> I
        total -= math.log(math.exp(sims[i][i]) / sum(math.exp(sims[k][i]) for k in range(batch)))  # I -> P
    return total / (2 * batch)


def slow_ntxent(points, images, temperature):
    both = [torch.nn.functional.normalize(torch.tensor(row, dtype=torch.float64), dim=0) for row in points + images]
    batch, total = len(points), 0.0
    for i in range(2 * batch):
        positive = (i + batch) % (2 * batch)
        denominator = sum(math.exp(float(both[i] @ both[k]) / temperature) for k in range(2 * batch) if k != i)
        total -= math.log(math.exp(float(both[i] @ both[positive]) / temperature) / denominator)
    return total / (2 * batch)


def test_infonce_hand_case_slow_loop_and_symmetry():
    eye = torch.eye(2)
    # Orthonormal pairs: cos = 1 on the positive, 0 on the negative -> log(1 + e^-2) for tau = 0.5.
    assert cal.infonce_loss(eye, eye, 0.5).item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-5)
    points = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-0.5, 2.0]])
    images = torch.tensor([[0.8, 0.3], [0.0, 1.0], [1.0, -1.0]])
    fast = cal.infonce_loss(points, images, 0.5).item()
    assert fast == pytest.approx(slow_infonce(points.tolist(), images.tolist(), 0.5), rel=1e-5)
    assert fast == pytest.approx(cal.infonce_loss(images, points, 0.5).item(), rel=1e-6)  # symmetric
    assert fast == pytest.approx(cal.infonce_loss(3 * points, images / 7, 0.5).item(), rel=1e-5)  # cosine
    # The P -> I direction alone differs from the symmetric mean here, so the test sees a missing direction.
    one_way = torch.nn.functional.cross_entropy(
        torch.nn.functional.normalize(points, dim=1) @ torch.nn.functional.normalize(images, dim=1).t() / 0.5,
        torch.arange(3)).item()
    assert abs(one_way - fast) > 1e-3


def test_ntxent_hand_case_and_slow_loop():
    eye = torch.eye(2)
    # Each embedding: positive cos 1, two negatives cos 0 -> log(1 + 2 e^-2) for tau = 0.5.
    assert cal.ntxent_loss(eye, eye, 0.5).item() == pytest.approx(math.log1p(2 * math.exp(-2)), rel=1e-5)
    generator = torch.Generator().manual_seed(3)
    points, images = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    assert cal.ntxent_loss(points, images, 0.2).item() == pytest.approx(
        slow_ntxent(points.tolist(), images.tolist(), 0.2), rel=1e-5)
    assert cal.ntxent_loss(points, images, 0.2).item() != pytest.approx(cal.infonce_loss(points, images, 0.2).item())


# ------------------------------------------------------------------------------------------ CrossBlock
def randomise(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3 + (1.0 if parameter.dim() == 1 else 0.0))
    return module.eval()


def slow_attention(queries, keys, values, heads):
    """(M, D), (M', D), (M', D) -> (M, D): explicit softmax per head."""
    head_dim = queries.shape[1] // heads
    out = torch.zeros_like(queries)
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        weights = torch.softmax(queries[:, cols] @ keys[:, cols].t() / math.sqrt(head_dim), dim=-1)  # (M, M')
        out[:, cols] = weights @ values[:, cols]
    return out


def test_cross_block_matches_slow_explicit_attention():
    dim, heads = 16, 4
    block = randomise(cal.CrossBlock(dim, heads), seed=1)
    generator = torch.Generator().manual_seed(2)
    x, image = torch.randn(2, 5, dim, generator=generator), torch.randn(2, 3, dim, generator=generator)
    expected = []
    for b in range(2):
        h = x[b]
        q, k, v = block.qkv(block.norm1(h)).chunk(3, dim=-1)
        h = h + block.self_proj(slow_attention(q, k, v, heads))  # self-attention over the point tokens
        k, v = block.key_value(block.norm_image(image[b])).chunk(2, dim=-1)  # K = V source: LN(image features)
        h = h + block.cross_proj(slow_attention(block.query(block.norm2(h)), k, v, heads))
        expected.append(h + block.mlp(block.norm3(h)))
    assert torch.allclose(block(x, image), torch.stack(expected), atol=1e-5)
    # Keys and values are a set: permuting the image tokens, or shifting them (the LayerNorm), changes nothing;
    # other image features change the output.
    assert torch.allclose(block(x, image), block(x, image.flip(1) + 1), atol=1e-5)
    assert not torch.allclose(block(x, image), block(x, torch.randn(2, 3, dim, generator=generator)), atol=1e-3)


def test_cross_block_on_its_own_tokens_is_a_self_attention_block():
    dim, heads = 16, 4
    reference = randomise(KATBlock(dim, heads), seed=4)
    block = cal.CrossBlock(dim, heads, self_attention=False).eval()
    with torch.no_grad():  # the cross-attention takes the self-attention block's weights
        block.query.weight.copy_(reference.attn.qkv.weight[:dim])
        block.key_value.weight.copy_(reference.attn.qkv.weight[dim:])
        block.cross_proj.load_state_dict(reference.attn.proj.state_dict())
        block.norm2.load_state_dict(reference.norm1.state_dict())
        block.norm_image.load_state_dict(reference.norm1.state_dict())
        block.norm3.load_state_dict(reference.norm2.state_dict())
        block.mlp.load_state_dict(reference.mlp.state_dict())
    x = torch.randn(3, 6, dim, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(block(x, x), reference(x), atol=1e-5)  # K = V = Q source -> plain self-attention


# ------------------------------------------------------------------------------------------ centre -> patch
def l_shaped_cloud():
    """Three tight clusters at (x, y) = (-1, 1), (1, 1), (-1, -1); the corner (1, -1) is empty."""
    generator = torch.Generator().manual_seed(6)
    corners = torch.tensor([[-1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])  # (3, 3)
    offsets = (torch.rand(258, 3, generator=generator) * 2 - 1) * 0.02  # (N, 3) within 0.02 of the corner
    points = corners.repeat_interleave(86, 0) + offsets  # (N, 3)
    return points[None], corners[None]  # (1, N, 3), (1, 3, 3)


def test_center_patch_matches_project_and_the_hand_worked_pixels():
    model = cal.CrossAlignNet(**SMALL)
    model.renderer.rotations = torch.eye(3)[None]  # identity camera: rows follow x, columns follow y
    points, centers = l_shaped_cloud()
    images, pixels, patches = model.render_view(points, centers, rotation=torch.eye(3)[None])
    # Slow Eq. (2) from render.py's own project, one centre at a time.
    projected = model.renderer.project(points, centers)[0, 0]  # (G, 2)
    slow = [int(row) // 16 * (64 // 16) + int(col) // 16 for row, col in projected.tolist()]
    assert patches[0].tolist() == slow and torch.equal(pixels[0], projected)
    # By hand (extent 2.04): x, y = -1 -> normalised -0.78 -> grid ceil(3.45) = 4 -> map 3 -> pixel (7 * 64) // 60 = 7;
    # +1 -> 0.78 -> grid ceil(28.5) = 29 -> map 28 -> (57 * 64) // 60 = 60.
    assert pixels[0].tolist() == [[7, 60], [60, 60], [7, 7]]
    assert patches[0].tolist() == [3, 15, 0]  # a row / column swap would give [12, 15, 0]
    # Orientation: the image is drawn where the centre projects, and empty at the transposed pixel.
    image = images[0, 0]  # (H, W)
    assert image[7, 60] < 0.5 and image[60, 7] == 1.0
    # The patch embedding is row-major too: changing only patch 3's pixels changes only token 3.
    model.eval()
    blank = torch.ones(1, 1, 64, 64)
    marked = blank.clone()
    marked[..., 0:16, 48:64] = 0.0  # image rows 0-15, columns 48-63: patch 3
    changed = (model.embed_image(marked) - model.embed_image(blank)).abs().sum(-1)[0]  # (P,)
    assert changed.nonzero().flatten().tolist() == [3]


def test_random_views_are_rotations_within_the_elevation_range():
    torch.manual_seed(7)
    rotations = cal.random_view_rotations(500, "cpu").double()  # (B, 3, 3)
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(500, -1, -1),
                          atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(500, dtype=torch.float64), atol=1e-5)
    up = rotations[:, :, 1]  # R e_y = (0, cos e, sin e): tilted by the elevation only
    assert up[:, 1].min() >= math.cos(math.radians(20)) - 1e-6 and up[:, 0].abs().max() < 1e-6
    azimuth = torch.atan2(rotations[:, 0, 2], rotations[:, 0, 0])  # Ry(a) puts sin a at (0, 2)
    assert azimuth.min() < -2.5 and azimuth.max() > 2.5  # the whole circle is drawn


# ------------------------------------------------------------------------------------------ the model
def test_fine_tuning_path_has_point_mae_names():
    model = cal.CrossAlignNet(**SMALL)
    reference = nn.Module()
    reference.tokenizer_3d = PointTokenizer(num_groups=16, group_size=8, dim=32)
    reference.encoder_pos = CenterEmbedding(dim=32)
    reference.encoder = KATransformer(dim=32, depth=2, num_heads=4, drop_path_rate=0.0)
    prefixes = ("tokenizer_3d.", "encoder_pos.", "encoder.")
    ours = {name: tuple(value.shape) for name, value in model.state_dict().items() if name.startswith(prefixes)}
    assert ours == {name: tuple(value.shape) for name, value in reference.state_dict().items()}
    others = [name for name, _ in model.named_children() if name not in ("tokenizer_3d", "encoder_pos", "encoder")]
    assert not [name for name in others if name.startswith(("tokenizer_3d", "encoder_pos", "encoder"))]


def test_gradient_reaches_every_part_and_lambda_zero_only_logs_gsa():
    torch.manual_seed(8)
    model = cal.CrossAlignNet(**SMALL).train()
    model(random_clouds())["loss"].backward()
    parts = ["tokenizer_3d", "encoder_pos", "encoder", "patch_embed", "image_pos", "image_encoder", "gsa_mask_token",
             "gsa_pos", "gsa_decoder", "point_head", "image_head", "lmr_mask_token", "lmr_pos", "lmr_decoder",
             "lmr_head"]
    for part in parts:
        grads = [p.grad for name, p in model.named_parameters() if name.split(".")[0] == part]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches {part}"
    torch.manual_seed(8)
    model = cal.CrossAlignNet(**{**SMALL, "gsa_weight": 0.0}).train()
    out = model(random_clouds())
    assert torch.isfinite(out["loss_gsa"]) and out["loss_gsa"] > 0 and torch.equal(out["loss"], out["loss_rec"])
    out["loss"].backward()
    assert all(p.grad is None for name, p in model.named_parameters() if name.startswith(("gsa_", "point_head")))
    assert model.image_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # still trained through LMR


def test_each_branch_reads_the_right_tokens():
    """Which tensor each part of the two branches reads: E_I the kept image patches (the aligned image mask, not the
    3-D one) at their positions (Eq. 4); E_P the visible groups (Eq. 3); D_G and D_L [F_P^v ; mask tokens] at the
    centres' positions, D_L cross-attending to the image ENCODER's output (Eq. 9); H_P / H_I the pools of D_G's and
    E_I's outputs (Eq. 5-6); H_rec the masked rows of D_L (Eq. 10); L_GSA their contrast (Eq. 7-8). Here Gv = Pv = 7,
    so swapping the point and image features, or the two masks, runs without a shape error: only this test sees it."""
    torch.manual_seed(8)
    model = cal.CrossAlignNet(**SMALL).train()
    seen = {}
    for name in ("tokenizer_3d", "encoder", "image_encoder", "gsa_decoder", "point_head", "image_head",
                 "lmr_decoder", "lmr_head"):
        getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, (args, output)))
    out = model(random_clouds())
    visible, masked = out["visible_index"], out["masked_index"]  # (B, Gv), (B, Gm)
    kept = out["image_visible_index"]  # (B, Pv)
    assert visible.shape[1] == kept.shape[1] == 7 and masked.shape[1] == 9  # shapes cannot tell the parts apart
    assert not torch.equal(kept, visible)  # the complementary image mask is not the 3-D one
    tokens = seen["tokenizer_3d"][1][0]  # (B, G, D)
    (image_tokens, image_pos), image_features = seen["image_encoder"]
    assert torch.equal(image_tokens, gather_tokens(model.embed_image(out["images"]), kept))  # T_I^v
    assert torch.equal(image_pos, model.image_pos[0, kept])  # pos_2D of the kept patches
    (point_tokens, point_pos), encoded = seen["encoder"]
    assert torch.equal(point_tokens, gather_tokens(tokens, visible))  # T_P^v
    assert torch.equal(point_pos, model.encoder_pos(gather_tokens(out["centers"], visible)))
    all_centers = torch.cat([gather_tokens(out["centers"], visible), gather_tokens(out["centers"], masked)], 1)
    (gsa_input, gsa_pos), gsa_output = seen["gsa_decoder"]
    assert torch.equal(gsa_input, torch.cat([encoded, model.gsa_mask_token.expand(4, 9, -1)], 1))
    assert torch.equal(gsa_pos, model.gsa_pos(all_centers))
    (lmr_input, lmr_pos, context), decoded = seen["lmr_decoder"]
    assert torch.equal(lmr_input, torch.cat([encoded, model.lmr_mask_token.expand(4, 9, -1)], 1))
    assert torch.equal(lmr_pos, model.lmr_pos(all_centers))
    assert torch.equal(context, image_features)  # Eq. (9): keys and values from E_I's output F_I^v
    assert torch.equal(seen["point_head"][0][0], cal.global_pool(gsa_output))  # Eq. (5)
    assert torch.equal(seen["image_head"][0][0], cal.global_pool(image_features))  # Eq. (6)
    assert torch.equal(seen["lmr_head"][0][0], decoded[:, 7:])  # Eq. (10): the masked rows, after the visible ones
    assert torch.equal(out["predicted"], seen["lmr_head"][1].reshape(4, 9, 8, 3))
    assert torch.equal(out["loss_gsa"], cal.infonce_loss(seen["point_head"][1], seen["image_head"][1], 0.1))


@pytest.mark.parametrize("image_masking, contrast", [("complementary", "infonce"), ("correspondence", "ntxent"),
                                                     ("random", "infonce")])
def test_tiny_end_to_end_step(image_masking, contrast):
    torch.manual_seed(9)
    model = cal.CrossAlignNet(**{**SMALL, "image_masking": image_masking, "contrast": contrast}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    points = random_clouds()
    out = model(points)
    B, G, K, Gv = 4, 16, 8, 16 - int(0.6 * 16)
    assert out["centers"].shape == (B, G, 3) and out["neighborhoods"].shape == (B, G, K, 3)
    assert out["visible_index"].shape == (B, Gv) and out["masked_index"].shape == (B, G - Gv)
    assert out["predicted"].shape == (B, G - Gv, K, 3)
    assert out["image_visible_index"].shape == (B, model.image_keep_count)
    assert torch.isfinite(out["loss"]) and out["loss"].item() == pytest.approx(
        out["loss_rec"].item() + 1e-4 * out["loss_gsa"].item(), rel=1e-6)
    if image_masking == "complementary":  # in the forward, too: no kept patch holds a visible centre, if avoidable
        for b in range(B):
            owners = set(out["center_patch"][b, out["visible_index"][b]].tolist())
            if model.num_patches - len(owners) >= model.image_keep_count:
                assert not owners & set(out["image_visible_index"][b].tolist())
    before = model.encoder.blocks[0].attn.qkv.weight.detach().clone()
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    assert not torch.equal(before, model.encoder.blocks[0].attn.qkv.weight)
    assert torch.isfinite(model(points)["loss"])


def test_batch_of_one_is_refused_in_training_only():
    model = cal.CrossAlignNet(**SMALL).train()
    with pytest.raises(ValueError, match="batch of 1"):
        model(random_clouds(batch=1))
    out = model.eval()(random_clouds(batch=1))  # the reconstruction picture runs one shape in eval mode
    assert out["predicted"].shape == (1, int(0.6 * 16), 8, 3) and torch.isfinite(out["loss"])


def test_bf16_autocast_keeps_losses_float32_and_finite():
    torch.manual_seed(10)
    model = cal.CrossAlignNet(**SMALL).train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(random_clouds())
    assert out["loss_gsa"].dtype == out["loss_rec"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
