"""Tests for i2p_mae.py: proj2img against a hand-worked case and a slow loop, the bicubic back-projection and the
2-D target against slow loops, the 2D-guided masking law and its entropy, gradients and the frozen teacher, and a
tiny end-to-end step for both projections."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import i2p_mae
from kat import KATransformer
from masking import gather_tokens
from tokenizer import CenterEmbedding, PointTokenizer

TINY_TOWER = dict(width=64, layers=2, heads=2, patch_size=16)
TINY = dict(num_groups=16, group_size=8, dim=32, depth=2, num_heads=2, decoder_depth=2, decoder_heads=2,
            image_size=64, random_tower=TINY_TOWER)


def sigmoid(value):
    return 1.0 / (1.0 + math.exp(-value))


def unnormalise(images):
    """(..., 3, H, W) ImageNet-normalised -> the sigmoid values, channel 0."""
    return images[..., 0, :, :] * i2p_mae.IMAGENET_STD[0] + i2p_mae.IMAGENET_MEAN[0]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return i2p_mae.I2PMAE(**TINY)


def random_cloud(batch_size=2, num_points=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, num_points, 3, generator=generator) * 2 - 1


# ---------------------------------------------------------------- proj2img
def test_hand_worked_projection_orientation_and_lookup():
    # An L of three points, in units of 1/64 so that everything below is exact: pixel size = (61/64) / (64 - 3) = 1/64.
    # View 1 is (row x, column y, value z).
    a, b, c = [0.0, 0.0, -0.5], [61 / 64, 0.0, 0.25], [0.0, 20 / 64, 1.0]
    points = torch.tensor([[a, b, c]])  # (1, 3, 3)
    # proj2img's views: pts_1 = (x, y, z), pts_2 = cat(z, x, y), pts_3 = cat(y, z, x).
    views = i2p_mae.permute_views(torch.tensor([[[1.0, 2.0, 3.0]]]))  # (1, V, 1, 3)
    assert views[0, :, 0].tolist() == [[1, 2, 3], [3, 1, 2], [2, 3, 1]]
    images, frame = i2p_mae.orthographic_splat(points, image_size=64)
    assert images.shape == (1, 3, 3, 64, 64)
    # Rows: indices 0 .. 61, splat box -1 .. 64, middle floor(63 / 2) = 31, shift 32 - 31 - 1 = 0, pixel = index + 1.
    # Columns: indices 0 .. 20, box -1 .. 23, middle 11, shift 32 - 11 - 1 = 20, pixel = index + 21.
    pixels = i2p_mae.pixel_of(points, frame, 64)[0, 0]  # (3, 2) view 1
    assert pixels.tolist() == [[1, 21], [62, 21], [1, 41]]  # larger x -> lower row, larger y -> column to the right
    view = unnormalise(images[0, 0])  # (64, 64)
    expected = {
        (1, 41): sigmoid(1.0),  # C's own pixel holds C's value
        (3, 43): sigmoid(1.0),  # the corner of C's 5 x 5 splat
        (0, 41): sigmoid(2.0),  # row -1 moved back to row 0: C counted twice there (the official +1 fix)
        (1, 21): sigmoid(-0.5),
        (0, 19): sigmoid(-1.0),
        (62, 21): sigmoid(0.25),
        (63, 21): sigmoid(0.5),  # row 64 moved back to row 63
        (1, 44): 0.5,  # one column past C's splat: background, sigmoid(0)
        (30, 30): 0.5,
    }
    for (row, col), value in expected.items():
        assert view[row, col].item() == pytest.approx(value, abs=1e-6), (row, col)
    # Channels are one value normalised with ImageNet's three means and stds.
    for channel in range(3):
        value = images[0, 0, channel, 1, 41] * i2p_mae.IMAGENET_STD[channel] + i2p_mae.IMAGENET_MEAN[channel]
        assert value.item() == pytest.approx(sigmoid(1.0), abs=1e-6)
    # The lookup reads, at C's pixel, exactly what the image wrote there (full-resolution map: identity upsampling).
    read = i2p_mae.bicubic_sample(view[None, None, None], pixels[None, None], 64)  # (1, 1, 3, 1)
    assert read.flatten().tolist() == pytest.approx([sigmoid(-0.5), sigmoid(0.25), sigmoid(1.0)], abs=1e-6)


def slow_splat(points, image_size):
    """proj2img for one cloud (N, 3), point by point and offset by offset, with the official +-1 fix; float32 scalar
    arithmetic as in the vectorised version, so the pixel indices agree bit for bit. -> (V, H, W) sums."""
    sums = torch.zeros(3, image_size, image_size)
    for view, order in enumerate(i2p_mae.VIEW_PERMUTATIONS):
        cloud = points[:, list(order)]  # (N, 3)
        lower, upper = cloud.min(dim=0).values, cloud.max(dim=0).values
        size = torch.maximum(upper[0] - lower[0], upper[1] - lower[1]) / (image_size - 3)
        index = [[int(torch.floor((point[axis] - lower[axis]) / size)) for axis in range(2)] for point in cloud]
        shift = []
        for axis in range(2):
            low = min(i[axis] for i in index) - 2 + 1
            high = max(i[axis] for i in index) + 2 + 1
            shift.append(image_size // 2 - (low + high) // 2 - 1)
        for point, (row, col) in zip(cloud, index):
            for d_row in range(-2, 3):
                for d_col in range(-2, 3):
                    pixel = [row + d_row + 1 + shift[0], col + d_col + 1 + shift[1]]
                    pixel = [p + (p < 0) - (p > image_size - 1) for p in pixel]
                    assert all(0 <= p < image_size for p in pixel)
                    sums[view, pixel[0], pixel[1]] += point[2]
    return sums


def test_splat_sum_and_sigmoid_match_a_slow_loop():
    points = random_cloud(batch_size=2, num_points=20, seed=1) * torch.tensor([1.0, 0.4, 0.7])  # asymmetric box
    images, _ = i2p_mae.orthographic_splat(points, image_size=32)
    for b in range(2):
        expected = torch.sigmoid(slow_splat(points[b], 32))  # (V, H, W)
        torch.testing.assert_close(unnormalise(images[b]), expected, atol=1e-6, rtol=0)


def test_the_pixels_an_image_writes_for_a_point_are_centred_on_its_lookup_pixel():
    points = random_cloud(batch_size=2, num_points=40, seed=2)
    images, frame = i2p_mae.orthographic_splat(points, image_size=48)
    pixels = i2p_mae.pixel_of(points, frame, 48)  # (B, V, N, 2)
    assert pixels.min() >= 1 and pixels.max() <= 46  # points sit 2 pixels inside the splat box
    for view, order in enumerate(i2p_mae.VIEW_PERMUTATIONS):
        for n in range(0, 40, 3):
            # Change only point n's VALUE coordinate in this view: the view's frame (from the other two) stays, so
            # the image changes exactly on the pixels the splat writes for point n.
            moved = points.clone()
            moved[:, n, order[2]] += 0.5
            difference = unnormalise(i2p_mae.orthographic_splat(moved, 48)[0]) - unnormalise(images)  # (B, V, H, W)
            changed = difference[:, view].abs() > 1e-5  # (B, H, W)
            for b in range(2):
                row, col = pixels[b, view, n].tolist()
                block = torch.zeros(48, 48, dtype=torch.bool)
                block[max(row - 2, 0):row + 3, max(col - 2, 0):col + 3] = True  # 5 x 5, clipped at the border
                assert torch.equal(changed[b], block), (view, n, b)
    # The lookup path (pixel_of + bicubic_sample) reads the image's own values at those pixels.
    sigmoid_images = unnormalise(images)[:, :, None]  # (B, V, 1, H, W)
    read = i2p_mae.bicubic_sample(sigmoid_images, pixels, 48)[..., 0]  # (B, V, N)
    direct = torch.stack([sigmoid_images[b, v, 0][pixels[b, v, :, 0], pixels[b, v, :, 1]]
                          for b in range(2) for v in range(3)]).view(2, 3, 40)
    torch.testing.assert_close(read, direct, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- I2P: bicubic back-projection, targets, saliency
def test_bicubic_sample_matches_full_upsampling_and_a_gather_loop():
    generator = torch.Generator().manual_seed(3)
    maps = torch.randn(2, 3, 5, 4, 4, generator=generator)  # (B, V, C, g, g)
    pixels = torch.randint(0, 64, (2, 3, 9, 2), generator=generator)  # (B, V, Q, 2)
    pixels[0, 0, :4] = torch.tensor([[0, 0], [63, 63], [0, 63], [31, 32]])  # borders and the middle
    sampled = i2p_mae.bicubic_sample(maps, pixels, 64)  # (B, V, Q, C)
    assert sampled.shape == (2, 3, 9, 5)
    upsampled = F.interpolate(maps.flatten(0, 1), size=(64, 64), mode="bicubic", align_corners=False)  # (B*V, C, H, W)
    for b in range(2):
        for v in range(3):
            for q in range(9):
                row, col = pixels[b, v, q].tolist()
                torch.testing.assert_close(sampled[b, v, q], upsampled[b * 3 + v, :, row, col], atol=1e-5, rtol=1e-5)


def test_semantic_target_and_saliency_match_slow_loops(tiny_model):
    model = copy.copy(tiny_model)  # shallow: only the number of target points changes
    model.target_points = 3  # fewer than K = 8, so the nearest points must be the first ones
    points = random_cloud(batch_size=2, num_points=128, seed=4)
    images, frame = model.project(points)
    features, attention_maps = model.teacher(images)  # (B, V, C, g, g), (B, V, 1, g, g)
    num_features = features.shape[2]
    visible_centers = points[:, [5, 17, 40]]  # (B, Gv, 3): any centres
    target = model.semantic_target(points, frame, features, visible_centers)  # (B, Gv, T, V*C)
    assert target.shape == (2, 3, model.target_points, 3 * num_features)
    up_features = F.interpolate(features.flatten(0, 1), size=(64, 64), mode="bicubic", align_corners=False)
    up_attention = F.interpolate(attention_maps.flatten(0, 1), size=(64, 64), mode="bicubic", align_corners=False)
    for b in range(2):
        for j in range(3):
            distance = ((points[b] - visible_centers[b, j]) ** 2).sum(-1)  # (N,)
            nearest = distance.argsort()[:model.target_points]
            for t, n in enumerate(nearest.tolist()):
                pixel = i2p_mae.pixel_of(points[b:b + 1, n:n + 1], [part[b:b + 1] for part in frame], 64)[0, :, 0]
                expected = torch.cat([up_features[b * 3 + v, :, pixel[v, 0], pixel[v, 1]] for v in range(3)])
                torch.testing.assert_close(target[b, j, t], expected, atol=1e-5, rtol=1e-5)
    centers = points[:, :6]  # (B, G, 3)
    saliency = model.spatial_saliency(points, frame, attention_maps, centers)  # (B, G)
    pixels = model.pixels(points, frame, centers)  # (B, V, G, 2)
    for b in range(2):
        for g in range(6):
            values = [up_attention[b * 3 + v, 0, pixels[b, v, g, 0], pixels[b, v, g, 1]] for v in range(3)]
            assert saliency[b, g].item() == pytest.approx(sum(values).item() / 3, abs=1e-6)


# ---------------------------------------------------------------- mask_2D_guided
def inclusion_probabilities(probs, draws):
    """P(token i among the first `draws` draws without replacement), by enumerating the draw orders (G small)."""
    import itertools
    result = [0.0] * len(probs)
    for order in itertools.permutations(range(len(probs)), draws):
        chance, left = 1.0, 1.0
        for index in order:
            chance *= probs[index] / left
            left -= probs[index]
        for index in order:
            result[index] += chance
    return result


@pytest.mark.parametrize("mask_ratio, draws", [(0.75, 1), (0.5, 2)])
def test_guided_draw_follows_softmax_of_the_saliency(mask_ratio, draws):
    torch.manual_seed(5)
    saliency = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(40000, -1)  # (B, G)
    visible, masked, log_probs = i2p_mae.guided_masking(saliency, mask_ratio)
    assert visible.shape == (40000, draws) and masked.shape == (40000, 4 - draws)
    probs = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0).tolist()
    torch.testing.assert_close(log_probs.exp()[0], torch.tensor(probs))
    frequency = torch.zeros(4).index_add_(0, visible.flatten(), torch.ones(visible.numel())) / 40000
    expected = torch.tensor(inclusion_probabilities(probs, draws))
    torch.testing.assert_close(frequency, expected, atol=0.012, rtol=0)
    # visible and masked partition the tokens
    assert torch.equal(torch.cat([visible, masked], 1).sort(1).values, torch.arange(4).expand(40000, -1))


def test_peaked_saliency_keeps_the_peaks_visible_and_random_masking_ignores_them(tiny_model):
    torch.manual_seed(6)
    model = copy.copy(tiny_model)  # shallow: only the `guided` flag changes
    saliency = torch.zeros(2000, 16)
    saliency[:, [3, 7]] = 10.0  # G = 16, Gv = 16 - int(0.8 * 16) = 4
    visible, masked, entropy = model.choose_mask(saliency)
    assert visible.shape == (2000, 4) and masked.shape == (2000, 12)
    peak_rate = torch.isin(visible, torch.tensor([3, 7])).sum(1).float().mean() / 2  # per peak token
    assert peak_rate > 0.99  # chance would be 4 / 16
    assert entropy.ndim == 0 and entropy < 0.5
    model.guided = False
    visible, _, entropy = model.choose_mask(saliency)
    counts = torch.zeros(16).index_add_(0, visible.flatten(), torch.ones(visible.numel())) / 2000
    torch.testing.assert_close(counts, torch.full((16,), 0.25), atol=0.04, rtol=0)  # every token Gv / G
    assert entropy.item() == 1.0


def test_masking_entropy_is_one_for_uniform_and_the_hand_value_for_a_peak(tiny_model):
    model = copy.copy(tiny_model)
    _, _, entropy = model.choose_mask(torch.full((3, 4), 0.37))
    assert entropy.item() == pytest.approx(1.0, abs=1e-6)
    # softmax([log 5, 0, 0, 0]) = [5/8, 1/8, 1/8, 1/8]: H = 5/8 log(8/5) + 3/8 log 8 = 1.0735428, / log 4 = 0.7743975
    peaked = torch.tensor([[math.log(5.0), 0.0, 0.0, 0.0]])
    _, _, entropy = model.choose_mask(peaked)
    assert entropy.item() == pytest.approx(0.7743975, abs=1e-6)
    model.saliency_temperature = 2.0  # the temperature divides the saliency before the softmax
    _, _, entropy = model.choose_mask(2 * peaked)
    assert entropy.item() == pytest.approx(0.7743975, abs=1e-6)


# ---------------------------------------------------------------- the model
def test_each_head_reads_the_right_tokens_and_targets():
    """The two branches' inputs: the saliency is taken at the tokenizer's centres; the encoder reads the visible
    groups; the decoder [encoded ; mask tokens] at [visible ; masked] centres; rec_head_3d reads the decoder's MASKED
    rows against the masked groups, rec_head_2d its VISIBLE rows against the 2-D target at the visible centres. At
    mask ratio 0.5 (Gv = Gm = 8) swapping the rows or the centres runs without a shape error: only this test sees it."""
    torch.manual_seed(0)
    model = i2p_mae.I2PMAE(**{**TINY, "mask_ratio": 0.5}).train()
    seen = {}
    for name in ("tokenizer_3d", "encoder", "decoder", "reconstruction_head", "semantic_head"):
        getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, (args, output)))
    for name in ("spatial_saliency", "semantic_target"):
        method = getattr(model, name)
        setattr(model, name, lambda *args, method=method, name=name: seen.setdefault(name, (args, method(*args)))[1])
    out = model(random_cloud(batch_size=2, num_points=256, seed=8))
    visible, masked = out["visible_index"], out["masked_index"]  # (B, Gv), (B, Gm)
    assert visible.shape[1] == masked.shape[1] == 8  # shapes cannot tell the two sets apart
    tokens, centers, neighborhoods = seen["tokenizer_3d"][1]
    assert torch.equal(seen["spatial_saliency"][0][3], centers) and torch.equal(out["saliency"],
                                                                                seen["spatial_saliency"][1])
    visible_centers, masked_centers = gather_tokens(centers, visible), gather_tokens(centers, masked)
    (encoder_input, encoder_pos), encoded = seen["encoder"]
    assert torch.equal(encoder_input, gather_tokens(tokens, visible))
    assert torch.equal(encoder_pos, model.encoder_pos(visible_centers))
    (decoder_input, decoder_pos), decoded = seen["decoder"]
    assert torch.equal(decoder_input, torch.cat([encoded, model.mask_token.expand(2, 8, -1)], dim=1))
    assert torch.equal(decoder_pos, model.decoder_pos(torch.cat([visible_centers, masked_centers], dim=1)))
    assert torch.equal(seen["reconstruction_head"][0][0], decoded[:, 8:])  # masked rows, after the visible ones
    assert torch.equal(seen["semantic_head"][0][0], decoded[:, :8])  # visible rows
    assert torch.equal(seen["semantic_target"][0][3], visible_centers)  # the 2-D target of the visible tokens
    predicted_2d = seen["semantic_head"][1].reshape(seen["semantic_target"][1].shape)
    assert torch.equal(out["loss_2d"], F.mse_loss(predicted_2d, seen["semantic_target"][1]))
    target_3d = gather_tokens(neighborhoods, masked).flatten(0, 1)  # (B * Gm, K, 3)
    assert torch.equal(out["loss_rec"], i2p_mae.chamfer_distance(out["predicted"].flatten(0, 1), target_3d).mean())


def test_gradients_reach_every_trained_part_and_never_the_teacher():
    torch.manual_seed(7)
    model = i2p_mae.I2PMAE(**TINY).train()
    assert model.teacher.visual_is_pretrained is False
    assert not any(module.training for module in model.teacher.visual.modules())  # frozen tower stays in eval mode
    teacher_before = {name: value.clone() for name, value in model.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    out = model(random_cloud(batch_size=2, num_points=256, seed=8))
    out["loss"].backward()
    for part in ("tokenizer_3d", "encoder_pos", "encoder", "decoder", "decoder_pos", "reconstruction_head",
                 "semantic_head"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert all(g is not None for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    optimizer.step()
    assert all(torch.equal(teacher_before[name], value) for name, value in model.teacher.state_dict().items())


@pytest.mark.parametrize("projection, guided", [("orthographic", True), ("realistic", False)])
def test_tiny_end_to_end_step_has_the_contract_shapes(projection, guided):
    torch.manual_seed(9)
    model = i2p_mae.I2PMAE(**TINY, projection=projection, guided=guided).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    points = random_cloud(batch_size=2, num_points=256, seed=10)
    out = model(points)
    B, G, K, Gv = 2, 16, 8, 16 - int(0.8 * 16)
    assert out["centers"].shape == (B, G, 3) and out["neighborhoods"].shape == (B, G, K, 3)
    assert out["visible_index"].shape == (B, Gv) and out["masked_index"].shape == (B, G - Gv)
    assert out["predicted"].shape == (B, G - Gv, K, 3) and out["saliency"].shape == (B, G)
    for name in ("loss", "loss_rec", "loss_2d", "masking_entropy"):
        assert out[name].ndim == 0 and torch.isfinite(out[name]), name
    torch.testing.assert_close(out["loss"], out["loss_rec"] + out["loss_2d"])
    if not guided:
        assert out["masking_entropy"].item() == 1.0
    else:
        assert 0.9 < out["masking_entropy"].item() <= 1.0 + 1e-6  # raw attention probabilities: near-uniform
    before = model.semantic_head.weight.detach().clone()
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    assert not torch.equal(before, model.semantic_head.weight)
    # The 3-D path has exactly pretrain.KRMAE's parameter names under its three prefixes.
    expected = {f"{prefix}.{name}" for prefix, module in (
        ("tokenizer_3d", PointTokenizer(num_groups=16, group_size=8, dim=32)), ("encoder_pos", CenterEmbedding(dim=32)),
        ("encoder", KATransformer(dim=32, depth=2, num_heads=2))) for name in module.state_dict()}
    found = {name for name in model.state_dict() if name.startswith(("tokenizer_3d", "encoder_pos", "encoder."))}
    assert found == expected


def test_realistic_projection_renders_the_same_three_axis_views():
    model = i2p_mae.I2PMAE(**TINY, projection="realistic")
    points = random_cloud(batch_size=1, num_points=256, seed=13)
    images, frame = model.project(points)
    assert images.shape == (1, 3, 3, 64, 64) and frame is None
    # Moving a query along +x: view 1 (rows x, cols y) moves down a row, view 2 (rows z, cols x) moves right, and
    # view 3 (rows y, cols z, depth x) does not move.
    query = torch.tensor([[[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]])  # (1, 2, 3)
    first, second = model.pixels(points, frame, query)[0].unbind(1)  # 2 x (V, 2): (row, col) per view
    assert second[0, 0] > first[0, 0] and second[0, 1] == first[0, 1]
    assert second[1, 1] > first[1, 1] and second[1, 0] == first[1, 0]
    assert torch.equal(second[2], first[2])


def test_forward_under_bf16_autocast_gives_float32_losses(tiny_model):
    torch.manual_seed(11)
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = tiny_model(random_cloud(batch_size=2, num_points=256, seed=12))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="projection"):
        i2p_mae.I2PMAE(**TINY, projection="perspective")
    with pytest.raises(ValueError, match="target_points"):
        i2p_mae.I2PMAE(**TINY, target_points=9)
    with pytest.raises(ValueError, match="saliency_temperature"):
        i2p_mae.I2PMAE(**TINY, saliency_temperature=0.0)
