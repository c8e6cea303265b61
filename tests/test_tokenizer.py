"""Tests for tokenizer.py: FPS and KNN against slow references, grouping invariants, the frozen 2-D tower."""
import copy
import math

import numpy as np
import pytest
import torch

import tokenizer

TINY_TOWER = dict(width=64, layers=2, heads=2, patch_size=16)


def slow_farthest_point_sample(points, num_samples, start):
    """Textbook FPS for one cloud (N, 3) in float64 numpy."""
    chosen = [start]
    nearest = np.full(len(points), np.inf)
    for _ in range(num_samples - 1):
        nearest = np.minimum(nearest, ((points - points[chosen[-1]]) ** 2).sum(axis=1))
        chosen.append(int(np.argmax(nearest)))
    return chosen


def random_cloud(batch_size=3, num_points=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, num_points, 3, generator=generator) * 2 - 1


def test_fps_matches_slow_reference_and_picks_distinct_cloud_points():
    points = random_cloud()
    start_index = torch.tensor([0, 17, 299])
    index = tokenizer.farthest_point_sample(points, 32, start_index)
    assert index.shape == (3, 32) and index.dtype == torch.long
    for b in range(3):
        expected = slow_farthest_point_sample(points[b].double().numpy(), 32, int(start_index[b]))
        assert index[b].tolist() == expected
        assert len(set(index[b].tolist())) == 32  # distinct centres
    centers = tokenizer.gather_points(points, index)
    # Every centre is a point of the cloud (an exact coordinate match).
    assert ((centers[:, :, None, :] == points[:, None, :, :]).all(-1).any(-1)).all()
    # start_index None means point 0.
    zeros = torch.zeros(3, dtype=torch.long)
    assert torch.equal(tokenizer.farthest_point_sample(points, 32), tokenizer.farthest_point_sample(points, 32, zeros))


def preallocated_farthest_point_sample(points, num_samples, start_index, skip_near_origin=False):
    """The previous vectorised FPS (indices written column by column into a preallocated tensor), kept as the
    reference that the list-and-stack version must reproduce index for index."""
    batch = torch.arange(points.shape[0])
    selected = torch.empty(points.shape[0], num_samples, dtype=torch.long)  # (B, G)
    nearest_distance = torch.full(points.shape[:2], float("inf"))  # (B, N)
    skipped = (points ** 2).sum(-1) <= 1e-3  # (B, N)
    current = start_index
    for step in range(num_samples):
        selected[:, step] = current
        distance = ((points - points[batch, current][:, None]) ** 2).sum(-1)  # (B, N)
        nearest_distance = torch.minimum(nearest_distance, distance)
        candidates = nearest_distance.masked_fill(skipped, -1.0) if skip_near_origin else nearest_distance
        current = candidates.argmax(dim=-1)
    return selected


def clouds_with_ties(seed):
    """Paper-size clouds (B, 1024, 3): random; on a lattice of quarters (exact arithmetic, so many exactly tied
    distances); every point duplicated (ties between copies); a sphere with points near its centre (what
    skip_near_origin passes over); a small cloud far from the origin (where |c|^2 - 2 c.p + |p|^2 cancels)."""
    random = random_cloud(batch_size=4, num_points=1024, seed=seed)
    lattice = (random_cloud(batch_size=4, num_points=1024, seed=seed + 1) * 4).round() / 4
    duplicated = random_cloud(batch_size=4, num_points=512, seed=seed + 2).repeat(1, 2, 1)
    sphere = torch.nn.functional.normalize(random_cloud(batch_size=4, num_points=1024, seed=seed + 3), dim=-1)
    sphere[:, 1::9] *= 0.01  # squared norm 1e-4 <= 1e-3
    far = random_cloud(batch_size=4, num_points=1024, seed=seed + 4) * 0.1 + 30
    return {"random": random, "lattice": lattice, "duplicated": duplicated, "sphere": sphere, "far": far}


@pytest.mark.parametrize("skip_near_origin", [False, True])
def test_fps_gives_the_indices_of_the_preallocated_version_including_ties(skip_near_origin):
    start_index = torch.tensor([0, 5, 1023, 700])
    for name, points in clouds_with_ties(seed=10).items():
        expected = preallocated_farthest_point_sample(points, 64, start_index, skip_near_origin)
        found = tokenizer.farthest_point_sample(points, 64, start_index, skip_near_origin)
        assert torch.equal(found, expected), name
        # Under bf16 autocast the distances stay float32, so nothing changes.
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            assert torch.equal(tokenizer.farthest_point_sample(points, 64, start_index, skip_near_origin), expected)
    # On the sphere plain FPS picks centre points early, so skipping them does change the centres.
    sphere = clouds_with_ties(seed=10)["sphere"]
    skips = preallocated_farthest_point_sample(sphere, 64, start_index, True)
    assert not torch.equal(skips, preallocated_farthest_point_sample(sphere, 64, start_index, False))
    assert tokenizer.farthest_point_sample(points, 1, start_index).tolist() == [[0], [5], [1023], [700]]
    with pytest.raises(ValueError, match="expected 1 <= num_samples"):
        tokenizer.farthest_point_sample(points, 0)


def test_knn_gives_the_indices_of_cdist_including_exact_ties_and_duplicates():
    # The previous implementation, torch.cdist's exact (no matrix product) mode: the same neighbours in the same
    # order. (Its CPU kernel sums with fused multiply-adds, so where two distances are equal in exact arithmetic
    # but not in float32 - e.g. a lattice of thirds - rounding may order them differently.)
    for name, points in clouds_with_ties(seed=20).items():
        centers = tokenizer.gather_points(points, tokenizer.farthest_point_sample(points, 64))  # (B, G, 3)
        index = tokenizer.knn_indices(points, centers, 32)  # (B, G, K)
        distance = torch.cdist(centers, points, compute_mode="donot_use_mm_for_euclid_dist")  # (B, G, N)
        assert torch.equal(index, distance.topk(32, dim=-1, largest=False, sorted=True).indices), name
        # And the indices of the one-line difference form, which a reader can check by eye.
        squared = ((centers[:, :, None] - points[:, None]) ** 2).sum(-1)  # (B, G, N)
        assert torch.equal(index, squared.topk(32, dim=-1, largest=False, sorted=True).indices), name
        if name == "duplicated":  # every centre has an exact copy: distance 0 twice
            assert (torch.gather(squared, 2, index[:, :, :2]) == 0).all()


def test_knn_matches_brute_force():
    points = random_cloud(batch_size=2, num_points=200, seed=1)
    centers = random_cloud(batch_size=2, num_points=10, seed=2)
    index = tokenizer.knn_indices(points, centers, 16)
    assert index.shape == (2, 10, 16)
    distance = ((centers[:, :, None] - points[:, None]) ** 2).sum(-1).double()  # (B, G, N)
    expected = distance.sort(dim=-1).values[..., :16]
    found = torch.gather(distance, 2, index)
    torch.testing.assert_close(found, expected)  # nearest first, same distances as brute force
    for b in range(2):
        for g in range(10):
            brute = set(distance[b, g].argsort()[:16].tolist())
            assert set(index[b, g].tolist()) == brute


def test_groups_hold_k_distinct_points_relative_to_their_centre():
    points = random_cloud(batch_size=2, num_points=256, seed=3)
    centers, neighborhoods = tokenizer.group_points(points, num_groups=16, group_size=32)
    assert centers.shape == (2, 16, 3) and neighborhoods.shape == (2, 16, 32, 3)
    index = tokenizer.knn_indices(points, centers, 32)
    for b in range(2):
        for g in range(16):
            assert len(set(index[b, g].tolist())) == 32
    torch.testing.assert_close(neighborhoods + centers[:, :, None], tokenizer.gather_points(points, index))
    # The nearest neighbour of a centre is the centre itself, at the origin.
    assert torch.equal(neighborhoods[:, :, 0], torch.zeros(2, 16, 3))


def test_grouping_is_float32_and_unchanged_under_autocast():
    points = random_cloud(batch_size=2, num_points=256, seed=4)
    reference_centers, reference_neighborhoods = tokenizer.group_points(points, 16, 8)
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        centers, neighborhoods = tokenizer.group_points(points, 16, 8)
    assert centers.dtype == torch.float32
    assert torch.equal(centers, reference_centers) and torch.equal(neighborhoods, reference_neighborhoods)


def test_point_tokens_are_invariant_to_point_order():
    torch.manual_seed(0)
    model = tokenizer.PointTokenizer(num_groups=16, group_size=16, dim=32)
    model.train()
    model(random_cloud(batch_size=4, num_points=256, seed=5))  # non-trivial BatchNorm running statistics
    model.eval()
    points = random_cloud(batch_size=2, num_points=256, seed=6)
    permutation = torch.randperm(256)
    permuted = points[:, permutation]
    # The same physical start point: where point 0 went.
    start_index = torch.argsort(permutation)[0].repeat(2)
    with torch.no_grad():
        tokens, centers, _ = model(points)
        permuted_tokens, permuted_centers, _ = model(permuted, start_index)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(permuted_centers, centers)
    torch.testing.assert_close(permuted_tokens, tokens, atol=1e-5, rtol=1e-5)
    assert tokens.std() > 0  # not a degenerate constant output


def test_center_embedding_shape_and_dependence_on_position():
    embedding = tokenizer.CenterEmbedding(dim=48)
    centers = random_cloud(batch_size=2, num_points=5, seed=7)
    out = embedding(centers)
    assert out.shape == (2, 5, 48)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_image_tokens_have_one_token_per_patch():
    model = tokenizer.ImagePatchTokenizer(dim=32, image_size=112, random_tower=TINY_TOWER)
    assert model.visual_is_pretrained is False and model.num_patches == 49
    images = torch.rand(2, 3, 3, 112, 112)
    assert model(images).shape == (2, 3, 49, 32)
    with pytest.raises(ValueError, match="Expected images"):
        model(torch.rand(2, 3, 3, 64, 64))


def test_patch_path_matches_clip_forward_on_the_class_token():
    # Our manual walk through the tower (layout, class token, positions) must agree with CLIP's own forward.
    model = tokenizer.ImagePatchTokenizer(dim=32, image_size=112, random_tower=TINY_TOWER)
    images = torch.rand(3, 3, 112, 112)
    with torch.no_grad():
        ours = model.run_tower(images)[:, 0] @ model.visual.proj
        clips = model.visual(images)
    torch.testing.assert_close(ours, clips, atol=1e-5, rtol=1e-5)


def test_gradients_reach_proj_and_pos_embed_but_not_the_frozen_tower():
    model = tokenizer.ImagePatchTokenizer(dim=32, image_size=112, random_tower=TINY_TOWER).train()
    model(torch.rand(2, 2, 3, 112, 112)).square().mean().backward()
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in model.visual.parameters())
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_train_mode_leaves_the_tower_in_eval_mode():
    model = tokenizer.ImagePatchTokenizer(dim=32, image_size=112, random_tower=TINY_TOWER)
    container = torch.nn.ModuleDict({"image_tokenizer": model})
    container.train()
    assert model.training and model.proj.training
    assert not any(module.training for module in model.visual.modules())


def test_positional_interpolation_keeps_class_position_and_gives_7x7_grid(monkeypatch):
    table = torch.randn(1 + 14 * 14, 24)
    resized = tokenizer.interpolate_positional_embedding(table, 7)
    assert resized.shape == (1 + 7 * 7, 24)
    assert torch.equal(resized[0], table[0])
    # A constant patch table stays constant (bicubic weights sum to one).
    constant = torch.cat([torch.zeros(1, 4), torch.full((196, 4), 0.3)])
    torch.testing.assert_close(tokenizer.interpolate_positional_embedding(constant, 7)[1:], torch.full((49, 4), 0.3))
    # Same grid: untouched.
    assert torch.equal(tokenizer.interpolate_positional_embedding(table, 14), table)
    # Inside the tokenizer, as with pre-trained CLIP: a tower built for 224 pixels (14 x 14), read at 112 (7 x 7).
    build = tokenizer.build_random_tower
    monkeypatch.setattr(tokenizer, "build_random_tower", lambda image_size, **tower: build(224, **tower))
    model = tokenizer.ImagePatchTokenizer(dim=8, image_size=112, random_tower=TINY_TOWER)
    original = model.visual.positional_embedding
    assert original.shape == (197, 64)  # CLIP's own parameter is left as it was
    assert model.tower_positional_embedding.shape == (50, 64)
    assert torch.equal(model.tower_positional_embedding[0], original[0].detach())
    assert model(torch.rand(1, 2, 3, 112, 112)).shape == (1, 2, 49, 8)


def test_missing_checkpoint_gives_a_clear_error():
    with pytest.raises(RuntimeError) as error:
        tokenizer.ImagePatchTokenizer(clip_model="/nonexistent/ViT-B-16.pt")
    message = str(error.value)
    assert "/nonexistent/ViT-B-16.pt" in message and "local path" in message and "random_tower" in message
    # The scripts' flags, not only the Python keywords: the local path, and a random tower of ViT-B/16's size.
    assert "--clip_model" in message and "--clip_random_tower width,layers,heads" in message and "768,12,12" in message


@pytest.mark.parametrize("shape", [(2, 256, 2), (256, 3), (2, 8, 3)])
def test_point_tokenizer_rejects_bad_input_with_a_clear_message(shape):
    model = tokenizer.PointTokenizer(num_groups=16, group_size=8, dim=32)
    with pytest.raises(ValueError, match=r"Expected points of shape \(B, N, 3\)"):
        model(torch.randn(*shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_point_tokenizer_rejects_non_finite_points_and_keeps_its_batchnorm_statistics(bad):
    model = tokenizer.PointTokenizer(num_groups=16, group_size=8, dim=32).train()
    points = random_cloud(batch_size=2, num_points=64)
    points[1, 5, 2], points[1, 9, 0] = bad, -bad
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with pytest.raises(ValueError, match=r"found 2 NaN or infinite values in points of shape \(2, 64, 3\)"):
        model(points)  # unchecked, NaN tokens for the whole batch, and NaN running statistics for good
    assert all(torch.equal(statistics[name], buffer) for name, buffer in model.named_buffers())


def stock_prefix(visual, images):
    """The tower's stock forward up to (not including) its last block, sequence first: (1 + P, M, C)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (M, P, C)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x).transpose(0, 1)  # (1 + P, M, C)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x


def test_run_tower_with_attention_hand_runs_the_last_block_as_the_stock_block():
    torch.manual_seed(0)
    visual = tokenizer.build_random_tower(64, **TINY_TOWER).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before_last = stock_prefix(visual, images)  # (1 + P, M, C)
        stock = visual.transformer.resblocks[-1](before_last).transpose(0, 1)  # (M, 1 + P, C)
        # With ln_post switched off the function returns the last block's own output for the patches.
        ln_post = visual.ln_post
        visual.ln_post = torch.nn.Identity()
        hand, _ = tokenizer.run_tower_with_attention(visual, images, project=False)
        visual.ln_post = ln_post
        torch.testing.assert_close(hand, stock[:, 1:], atol=1e-6, rtol=0)
        # With ln_post and proj: CLIP's own output map, (M, P, output_dim).
        features, attention = tokenizer.run_tower_with_attention(visual, images)
        torch.testing.assert_close(features, ln_post(stock[:, 1:]) @ visual.proj, atol=1e-5, rtol=1e-5)
        # The class token's row of the same walk matches CLIP's forward (its ln_post(class) @ proj).
        torch.testing.assert_close(ln_post(stock[:, 0]) @ visual.proj, visual(images), atol=1e-5, rtol=1e-5)
    assert features.shape == (3, 16, 64) and attention.shape == (3, 16)
    assert features.dtype == attention.dtype == torch.float32


def test_class_attention_rows_sum_to_at_most_one_and_match_a_slow_recomputation():
    torch.manual_seed(1)
    visual = tokenizer.build_random_tower(64, **TINY_TOWER).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, attention = tokenizer.run_tower_with_attention(visual, images)  # (M, P)
        x = visual.transformer.resblocks[-1].ln_1(stock_prefix(visual, images)).transpose(0, 1)  # (M, 1 + P, C)
    assert (attention >= 0).all() and (attention.sum(-1) <= 1 + 1e-6).all() and (attention.sum(-1) < 0.999).all()
    attn = visual.transformer.resblocks[-1].attn
    heads, width = attn.num_heads, x.shape[-1]
    q_weight, k_weight, _ = attn.in_proj_weight.detach().chunk(3)
    q_bias, k_bias, _ = attn.in_proj_bias.detach().chunk(3)
    for m in range(2):
        expected = torch.zeros(x.shape[1] - 1)
        for head in range(heads):
            rows = slice(head * width // heads, (head + 1) * width // heads)
            query = x[m, 0] @ q_weight[rows].T + q_bias[rows]  # the class token's query
            keys = x[m] @ k_weight[rows].T + k_bias[rows]  # (1 + P, C / heads)
            scores = torch.softmax(keys @ query / math.sqrt(width // heads), dim=0)  # over class + patches
            expected += scores[1:] / heads
        torch.testing.assert_close(attention[m], expected, atol=1e-6, rtol=1e-5)


def test_run_tower_with_attention_resamples_positions_for_another_image_size():
    visual = tokenizer.build_random_tower(224, **TINY_TOWER).eval()  # 14 x 14 positions, as pre-trained CLIP
    with torch.no_grad():
        features, attention = tokenizer.run_tower_with_attention(visual, torch.randn(2, 3, 64, 64), project=False)
    assert features.shape == (2, 16, 64) and attention.shape == (2, 16)
    assert visual.positional_embedding.shape == (197, 64)  # the tower itself is left as it was


# ---------------------------------------------------------------- the written-out tower blocks and the bf16 tower
HEADS_TOWER = dict(width=64, layers=2, heads=4, patch_size=16)  # 4 heads of 16 channels


def random_tower_tokenizer(seed):
    """An ImagePatchTokenizer on a random tower whose biases and LayerNorm weights are random too: CLIP's
    initialisation leaves them at 0 and 1, where a missing bias or a swapped LayerNorm would go unnoticed."""
    torch.manual_seed(seed)
    model = tokenizer.ImagePatchTokenizer(dim=32, image_size=112, random_tower=HEADS_TOWER)
    with torch.no_grad():
        for name, parameter in model.visual.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
            elif ".ln_" in name or name.startswith("ln_"):
                parameter.normal_(1.0, 0.1)
    return model


def stock_tower(visual, images):
    """clip's own module forward up to ln_post, all tokens, (M, 1 + P, C): the sequence-first walk through
    visual.transformer that run_tower made before its blocks were written out (at the tower's native size)."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (M, P, C)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # (M, 1 + P, C)
    x = visual.ln_pre(x + visual.positional_embedding.to(x.dtype))
    x = visual.transformer(x.transpose(0, 1)).transpose(0, 1)  # sequence first through the stock blocks
    return visual.ln_post(x)  # (M, 1 + P, C)


def test_tower_blocks_reproduce_clips_module_forward_bit_for_bit():
    model = random_tower_tokenizer(seed=0)
    visual = model.visual
    images = torch.rand(5, 3, 112, 112)
    with torch.no_grad():
        # The blocks alone, on (M, 1 + P, C) inputs: exactly the stock blocks (measured max difference 0.0).
        x = torch.randn(5, 50, 64)
        hand = x
        for block in visual.transformer.resblocks:
            hand = tokenizer.tower_block(block, hand)
        stock = visual.transformer(x.transpose(0, 1)).transpose(0, 1)
        assert torch.equal(hand, stock)
        # The whole tower, and CLIP's own forward on the class token (ln_post(class) @ proj).
        tokens = model.run_tower(images)  # (M, 1 + P, C)
        assert tokens.dtype == torch.float32 and torch.equal(tokens, stock_tower(visual, images))
        assert torch.equal(tokens[:, 0] @ visual.proj, visual(images))
        # run_tower_with_attention walks the same blocks: the same patch features.
        features, _ = tokenizer.run_tower_with_attention(visual, images, project=False,
                                                         positional_embedding=model.tower_positional_embedding)
        assert torch.equal(features, tokens[:, 1:])


def test_cast_frozen_tower_follows_clips_recipe():
    model = random_tower_tokenizer(seed=1)
    # CLIP's own recipe, which casts to float16, on a copy: the same parameters must change dtype.
    clips_recipe = copy.deepcopy(model.visual)
    tokenizer.import_clip().model.convert_weights(clips_recipe)
    clips_dtypes = {name: parameter.dtype for name, parameter in clips_recipe.named_parameters()}
    assert tokenizer.cast_frozen_tower(model.visual, torch.bfloat16) is model.visual
    matrices = ("conv1.weight", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                "attn.out_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    block_norms = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")  # beyond CLIP's recipe (CUDA's kernel)
    cast = []
    for name, parameter in model.visual.named_parameters():
        expected_cast = name == "proj" or name.endswith(matrices) or name.endswith(block_norms)
        assert parameter.dtype == (torch.bfloat16 if expected_cast else torch.float32), name
        assert (clips_dtypes[name] == torch.float16) == (expected_cast and not name.endswith(block_norms)), name
        cast.append(expected_cast)
    # conv1 and proj, and 8 + 4 per block; ln_pre, ln_post (2 each), the class and positional embeddings.
    assert sum(cast) == 2 + 12 * 2 and len(cast) - sum(cast) == 2 + 2 * 2


def bf16_tower_against_float32(device, seed=1):
    """The bf16 tower (cast_frozen_tower) against the float32 tower on `device`, with this file's bounds: it errs
    about as much as casting the weights under autocast at every call (the path before cast_frozen_tower), its
    outputs are those of autocast's call, and its class-token attention stays near float32's. Raises an
    AssertionError outside the bounds; returns the measured errors. Called by the test below on the CPU and by
    `python bench.py --suite` (speed_suite.py) on the GPU, so both hold the tower to the same bounds."""
    model = random_tower_tokenizer(seed).to(device)
    images = torch.rand(6, 3, 112, 112).to(device)  # drawn on the CPU: the same images on every device
    with torch.no_grad():
        reference = model.run_tower(images)  # (M, 1 + P, C) float32
        _, reference_attention = tokenizer.run_tower_with_attention(
            model.visual, images, positional_embedding=model.tower_positional_embedding)  # (M, P)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            autocast_output = stock_tower(model.visual, images)  # the previous path: weights cast at every call
    tokenizer.cast_frozen_tower(model.visual, torch.bfloat16)
    with torch.no_grad():
        output = model.run_tower(images)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            output_under_autocast = model.run_tower(images)
            tokens = model(images.view(2, 3, 3, 112, 112))  # the proj Linear takes the tower's bf16
            tokens_with_attention, _ = model(images.view(2, 3, 3, 112, 112), return_attention=True)
        features, attention = tokenizer.run_tower_with_attention(
            model.visual, images, positional_embedding=model.tower_positional_embedding)
    assert output.dtype == torch.bfloat16 and torch.equal(output, output_under_autocast)
    assert tokens.shape == (2, 3, 49, 32)
    # The same patch features either way; only proj's bf16 GEMM may round differently (CPU: a strided slice
    # [:, 1:] against a contiguous tensor), hence bf16's tolerance.
    torch.testing.assert_close(tokens, tokens_with_attention, atol=1e-2, rtol=1e-2)
    # Against the float32 tower, the bf16 tower errs about as much as autocast did. Measured here (torch 2.14 CPU,
    # 6 random towers): the mean error 1.01-1.05 times autocast's, the max 0.90-1.18 times (its blocks' LayerNorm
    # weights are bf16 too, which CUDA's kernel requires). A real loss of precision fails: rounding the MLP's
    # hidden activations to float8 gave a mean error 1.7 times autocast's.
    error = (output.float() - reference).abs()
    autocast_error = (autocast_output.float() - reference).abs()
    measured = {"device": str(device), "max_error": error.max().item(), "mean_error": error.mean().item(),
                "autocast_max_error": autocast_error.max().item(),
                "autocast_mean_error": autocast_error.mean().item(),
                "attention_max_difference": (attention - reference_attention).abs().max().item()}
    assert 0 < error.max() <= 1.25 * autocast_error.max(), measured
    assert error.mean() <= 1.1 * autocast_error.mean(), measured
    # The class-token attention stays float32 and near the float32 tower's (measured max difference 1.1e-4;
    # under autocast it was 1.5e-4).
    assert features.dtype == attention.dtype == torch.float32
    torch.testing.assert_close(attention, reference_attention, atol=1e-3, rtol=0)
    return measured


def test_the_bf16_tower_errs_as_autocast_did_against_float32():
    bf16_tower_against_float32(torch.device("cpu"))  # its assertions are the test


def test_autocast_is_off_inside_the_tower():
    # A float32 tower under bf16 autocast runs in float32: the same values as with autocast off, exactly.
    model = random_tower_tokenizer(seed=2)
    images = torch.rand(4, 3, 112, 112)
    with torch.no_grad():
        expected = model.run_tower(images)
        expected_features, expected_attention = tokenizer.run_tower_with_attention(model.visual, images)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            found = model.run_tower(images)
            features, attention = tokenizer.run_tower_with_attention(model.visual, images)
    assert found.dtype == torch.float32 and torch.equal(found, expected)
    assert torch.equal(features, expected_features) and torch.equal(attention, expected_attention)


def test_a_bf16_tower_feeds_the_float32_projection_outside_autocast():
    # Probes and pictures may call the tokenizer without autocast: the bf16 tower's output is then cast to the
    # projection's dtype (uncast: "expected both operands of the same dtype").
    model = random_tower_tokenizer(seed=3)
    images = torch.rand(1, 2, 3, 112, 112)
    tokenizer.cast_frozen_tower(model.visual, torch.bfloat16)
    with torch.no_grad():
        tokens = model(images)  # (1, 2, 49, 32)
        normalised = (images.flatten(0, 1) - model.image_mean) / model.image_std  # CLIP's normalisation
        expected = model.proj(model.run_tower(normalised)[:, 1:].float()) + model.pos_embed.squeeze(0)
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens[0], expected, atol=1e-6, rtol=1e-6)  # a GEMM on another memory layout


def test_frozen_clip_tower_is_frozen_and_refuses_bad_sizes():
    visual, grid = tokenizer.frozen_clip_tower(64, random_tower=dict(width=32, layers=1, heads=2))
    assert grid == 4 and not visual.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in visual.parameters())
    with pytest.raises(ValueError, match=r"multiple of the patch size 16; found 72"):
        tokenizer.frozen_clip_tower(72, random_tower=dict(width=32, layers=1, heads=2))
    with pytest.raises(ValueError, match=r"found also \['depth'\]"):
        tokenizer.frozen_clip_tower(64, random_tower=dict(width=32, layers=1, heads=2, depth=3))
