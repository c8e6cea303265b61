"""Tests for joint_mae.py: the projection of Eq. (1) / (6) against a slow loop, the local-aligned attention mask, the
masked convolution of Eq. (2), gradients of Eq. (5)-(7), the fine-tuning contract and a tiny training step."""
import math

import pytest
import torch

import joint_mae
from kat import KATransformer
from masking import gather_tokens
from render import pixels_to_patches
from tokenizer import CenterEmbedding, PointTokenizer

TINY = dict(num_groups=16, group_size=8, dim=32, depth=2, num_heads=4, decoder_depth=2, decoder_heads=4,
            image_size=64, patch_size=16)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return joint_mae.JointMAE(**{**TINY, **overrides})


def random_clouds(batch=2, num_points=256, seed=1):
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(batch, num_points, 3, generator=generator)  # (B, N, 3)
    return points / points.norm(dim=-1, keepdim=True).amax(dim=1, keepdim=True)  # inside the unit sphere


# ---------------------------------------------------------------- Eq. (1): the projector against a slow loop
def slow_perspective_depth(camera_points, image_size, splat):
    """PointCLIP V1's points2depth one point and one splat pixel at a time: (R, M, 3) -> (R, H, W), max count."""
    depth = torch.zeros(camera_points.shape[0], image_size, image_size, dtype=torch.float64)
    most_points_in_a_pixel = 0
    for image in range(camera_points.shape[0]):
        inverse_sum, count = {}, {}
        for x, y, z in camera_points[image].tolist():
            if z <= joint_mae.NEAR_PLANE:
                continue  # behind the camera: dropped
            row, col = (x / z + 1) * image_size / 2, (y / z + 1) * image_size / 2
            for i in range(splat):
                for j in range(splat):
                    pixel = (math.ceil(row + i - splat / 2), math.ceil(col + j - splat / 2))
                    if 0 <= pixel[0] < image_size and 0 <= pixel[1] < image_size:  # outside: dropped
                        inverse_sum[pixel] = inverse_sum.get(pixel, 0.0) + 1 / z
                        count[pixel] = count.get(pixel, 0) + 1
        for pixel, hits in count.items():
            depth[image][pixel] = hits / inverse_sum[pixel]  # harmonic mean of the depths on the pixel
            most_points_in_a_pixel = max(most_points_in_a_pixel, hits)
    return depth, most_points_in_a_pixel


def camera_cloud(seed=0, count=60):
    generator = torch.Generator().manual_seed(seed)
    z = torch.rand(3, count, generator=generator, dtype=torch.float64) * 2.8 - 0.2  # some z' <= 0
    xy = (torch.rand(3, count, 2, generator=generator, dtype=torch.float64) * 2.6 - 1.3) * z.abs()[..., None]
    return torch.cat([xy, z[..., None]], dim=-1)  # (R, M, 3): some points fall outside the frame


@pytest.mark.parametrize("splat", [1, 2])
def test_perspective_depth_matches_slow_loop(splat):
    points = camera_cloud()
    expected, most = slow_perspective_depth(points, 8, splat)
    got = joint_mae.perspective_depth(points, 8, splat=splat)
    assert got.shape == (3, 8, 8)
    assert most >= 2  # some pixel averages several points, so the harmonic mean is exercised
    assert torch.allclose(got, expected, atol=1e-12)
    assert (got == 0).any() and (got > 0).any()  # background 0
    outside = (points[..., 2] <= 0) | ((points[..., :2] / points[..., 2:]).abs() > 1.0).any(-1)
    assert outside.any()  # dropped points exist in the cloud and the loop drops them too


def test_perspective_depth_single_point_and_leading_dims():
    point = torch.tensor([[[0.0, 0.0, 1.6]]])  # on the optical axis, PointCLIP V1's distance
    depth = joint_mae.perspective_depth(point, 8, splat=1)  # (1, 8, 8)
    assert depth[0, 4, 4] == pytest.approx(1.6) and depth.sum() == pytest.approx(1.6)  # ceil(4 - 0.5) = 4
    two = joint_mae.perspective_depth(point.expand(2, 3, 1, 3), 8, splat=2)  # (2, 3, 8, 8)
    assert two.shape == (2, 3, 8, 8) and torch.allclose(two[1, 2, 3:5, 3:5], torch.full((2, 2), 1.6))


def test_perspective_pixels_match_slow_loop_and_depth_map():
    points = camera_cloud(seed=3)
    pixels, inside = joint_mae.perspective_pixels(points, 8)  # (R, M, 2), (R, M)
    for image in range(points.shape[0]):
        for index, (x, y, z) in enumerate(points[image].tolist()):
            if z <= joint_mae.NEAR_PLANE:
                assert not inside[image, index]
                continue
            row, col = math.ceil((x / z + 1) * 4 - 0.5), math.ceil((y / z + 1) * 4 - 0.5)
            assert bool(inside[image, index]) == (0 <= row < 8 and 0 <= col < 8)
            if inside[image, index]:
                assert pixels[image, index].tolist() == [row, col]
    depth = joint_mae.perspective_depth(points, 8, splat=1)
    rows, cols = pixels[inside].unbind(-1)
    assert (depth[inside.nonzero()[:, 0], rows, cols] > 0).all()  # a visible point's pixel is drawn


def test_view_rotation_is_a_rotation_and_keeps_shapes_upright():
    azimuth, elevation = torch.rand(5) * 6.28, torch.rand(5) - 0.5
    rotation = joint_mae.view_rotation(azimuth, elevation)  # (5, 3, 3)
    assert torch.allclose(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(5), atol=1e-6)
    up = joint_mae.camera_frame(torch.tensor([[[0.0, 0.5, 0.0]]]), torch.zeros(1, 1, 3), torch.ones(1, 1, 1),
                                joint_mae.view_rotation(torch.zeros(1, 1), torch.zeros(1, 1)))  # (1, 1, 1, 3)
    pixels, _ = joint_mae.perspective_pixels(up[0, 0], 64)
    assert pixels[0, 0] < 32 and pixels[0, 1] == 32  # +y lands in the upper half, on the middle column


def test_patchify_uses_the_patch_order_of_pixels_to_patches():
    image = torch.randn(2, 1, 32, 32)
    patches = joint_mae.patchify(image, 8)  # (B, P2, p, p)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    index = pixels_to_patches(torch.stack([rows, cols], dim=-1), 32, 8)  # (H, W)
    assert torch.equal(patches[:, index, rows % 8, cols % 8], image[:, 0])


# ---------------------------------------------------------------- section 3.3: the local-aligned mask
def test_local_aligned_mask_equals_hand_built():
    center_patch = torch.tensor([[5, -1], [7, 7]])  # (B, Gv): patch under each visible centre, -1 = outside
    visible_2d = torch.tensor([[2, 5, 7], [0, 7, 8]])  # (B, P2v)
    T, F = True, False
    # rows = queries [3-D 0, 3-D 1, 2-D 0, 2-D 1, 2-D 2], columns = keys in the same order
    both_local = torch.tensor([
        [[T, T, F, T, F], [T, T, F, F, F], [F, F, T, T, T], [T, F, T, T, T], [F, F, T, T, T]],
        [[T, T, F, T, F], [T, T, F, T, F], [F, F, T, T, T], [T, T, T, T, T], [F, F, T, T, T]]])
    only_3d_to_2d = both_local.clone()
    only_3d_to_2d[:, 2:, :2] = True  # 2-D queries see every 3-D key
    only_2d_to_3d = both_local.clone()
    only_2d_to_3d[:, :2, 2:] = True  # 3-D queries see every 2-D key
    for flags, expected in (((True, True), both_local), ((True, False), only_3d_to_2d),
                            ((False, True), only_2d_to_3d)):
        mask = joint_mae.local_aligned_mask(center_patch, visible_2d, *flags)
        assert mask.shape == (2, 1, 5, 5) and torch.equal(mask[:, 0], expected), flags
    assert joint_mae.local_aligned_mask(center_patch, visible_2d, False, False) is None  # global / global


# ---------------------------------------------------------------- Eq. (2): masked convolution
def pixel_flags(visible, grid, patch):
    return visible.view(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (B,1,H,W)


def test_masked_convolution_keeps_visible_tokens_blind_to_masked_pixels():
    torch.manual_seed(0)
    tokenizer = joint_mae.ConvTokenizer2D(dim=16, patch_size=16)
    image = torch.rand(2, 1, 64, 64)  # 4 x 4 patches
    visible = torch.zeros(2, 16, dtype=torch.bool)
    visible[:, [0, 5, 6, 10]] = True  # masked neighbours all around
    changed = torch.where(pixel_flags(visible, 4, 16), image, 5 * torch.rand_like(image))  # masked pixels only
    before, after = tokenizer(image, visible), tokenizer(changed, visible)  # (B, P2, D)
    assert before.shape == (2, 16, 16)
    assert torch.allclose(before[:, visible[0]], after[:, visible[0]], atol=1e-6)
    # control: without the mask a 3x3 conv leaks, so the same change reaches the same tokens
    everything = torch.ones_like(visible)
    leaked = tokenizer(changed, everything)[:, visible[0]] - tokenizer(image, everything)[:, visible[0]]
    assert leaked.abs().max() > 1e-3
    # and a visible patch's own pixels do move its own token (row-major token order)
    own = image.clone()
    own[:, :, 16:32, 16:32] += 1.0  # patch 5 = row 1, column 1
    assert (tokenizer(own, visible)[:, 5] - before[:, 5]).abs().max() > 1e-3


# ---------------------------------------------------------------- gradients and switches
def test_cross_loss_gradient_reaches_the_predicted_depth_only():
    model = tiny_model(cross_views=1)
    out = model(random_clouds())
    gradient, = torch.autograd.grad(out["loss_cross"], out["predicted"])  # (B, Gm, K, 3)
    assert gradient.abs().sum() > 0
    # one view: a z-buffer is differentiable in depth only, so every gradient lies along the camera axis
    axis = out["rotation"][:, 2]  # (B, 3): row z' of p' = R p
    across = torch.linalg.cross(gradient, axis[:, None, None].expand_as(gradient))
    assert across.abs().max() <= 1e-5 * gradient.abs().max()


def test_total_loss_reaches_every_learned_part():
    model = tiny_model()
    out = model(random_clouds())
    out["loss"].backward()
    parts = ["tokenizer_3d.", "encoder_pos.", "encoder.", "tokenizer_2d.", "pos_embed_2d", "modality_token_2d",
             "modality_token_3d", "mask_token_3d", "mask_token_2d", "decoder_pos.", "decoder_pos_2d",
             "shared_decoder.", "specific_decoder_3d.", "specific_decoder_2d.", "reconstruction_head.",
             "reconstruction_head_2d."]
    named = dict(model.named_parameters())
    assert all(any(name.startswith(part) for part in parts) for name in named)  # the list covers the model
    for part in parts:
        gradients = [p.grad for name, p in named.items() if name.startswith(part)]
        assert gradients and all(g is not None for g in gradients), part
        assert sum(g.abs().sum() for g in gradients) > 0, part


def test_modality_token_switch():
    with_token = dict(tiny_model().named_parameters())
    assert with_token["modality_token_3d"].shape == (1, 1, 32) and with_token["modality_token_3d"].requires_grad
    model = tiny_model(modality_token_3d=False)
    assert model.modality_token_3d is None
    assert "modality_token_3d" not in dict(model.named_parameters()) and "modality_token_3d" not in model.state_dict()
    assert "modality_token_2d" in dict(model.named_parameters())
    assert torch.isfinite(model(random_clouds())["loss"])


def test_fine_tuning_contract_names_and_shapes():
    model = tiny_model()
    reference = torch.nn.ModuleDict(dict(
        tokenizer_3d=PointTokenizer(num_groups=16, group_size=8, dim=32),
        encoder_pos=CenterEmbedding(dim=32),
        encoder=KATransformer(dim=32, depth=2, num_heads=4)))
    prefixes = ("tokenizer_3d.", "encoder_pos.", "encoder.")
    ours = {name: value.shape for name, value in model.state_dict().items() if name.startswith(prefixes)}
    assert ours == {name: value.shape for name, value in reference.state_dict().items()}
    assert isinstance(model.tokenizer_3d, PointTokenizer) and isinstance(model.encoder, KATransformer)


# ---------------------------------------------------------------- Eq. (4) and (6): which tokens each part reads
def test_each_specific_decoder_reads_its_own_modality():
    """Eq. (4): D'_3D = SpeDec_3D(D_3D, E^v_3D), D'_2D = SpeDec_2D(D_2D, E^v_2D). The queries of each modal-specific
    decoder are its modality's masked rows of the shared decoder's output, its keys / values its modality's rows of
    the encoder output, and each reconstruction head reads its own decoder. Here Gv = P2v = 4 and Gm = P2m = 12, so a
    swap of the two contexts (or of the query rows) runs without a shape error: only this test sees it."""
    model = tiny_model().eval()
    seen = {}
    for name in ("encoder", "shared_decoder", "specific_decoder_3d", "specific_decoder_2d"):
        getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: seen.__setitem__(name, (args, output)))
    out = model(random_clouds())
    visible, masked = out["visible_index"].shape[1], out["masked_index"].shape[1]
    visible_2d = out["visible_index_2d"].shape[1]
    assert (visible, masked) == (visible_2d, out["masked_index_2d"].shape[1]) == (4, 12)  # shapes cannot tell
    encoded, decoded = seen["encoder"][1], seen["shared_decoder"][1]  # (B, Gv + P2v, D), (B, G + P2, D)
    length = visible + visible_2d
    (queries_3d, pos_3d, context_3d), output_3d = seen["specific_decoder_3d"]
    (queries_2d, pos_2d, context_2d), output_2d = seen["specific_decoder_2d"]
    assert torch.equal(context_3d, encoded[:, :visible])  # E^v_3D: the 3-D rows of [3-D; 2-D]
    assert torch.equal(context_2d, encoded[:, visible:])  # E^v_2D
    assert torch.equal(queries_3d, decoded[:, length:length + masked])  # D_3D, masked rows (after [E^v_3D; E^v_2D])
    assert torch.equal(queries_2d, decoded[:, length + masked:])  # D_2D, masked rows
    masked_centers = gather_tokens(out["centers"], out["masked_index"])  # (B, Gm, 3)
    assert torch.equal(pos_3d, model.decoder_pos(masked_centers))
    assert torch.equal(pos_2d, model.decoder_pos_2d[0, out["masked_index_2d"]])
    assert torch.equal(out["predicted"], model.reconstruction_head(output_3d).reshape(out["predicted"].shape))
    assert torch.equal(out["predicted_2d"], model.reconstruction_head_2d(output_2d).reshape(out["predicted_2d"].shape))


def slow_cross_reconstruction(model, predicted, centers, neighborhoods, visible_index, masked_index, origin, radius,
                              azimuth, elevation):
    """Eq. (6) one shape and one view at a time: the visible ground-truth groups plus the predicted masked groups
    (both back in the cloud's frame) against all ground-truth groups, each projected by Eq. (1)."""
    errors = []
    for b in range(predicted.shape[0]):
        visible = neighborhoods[b, visible_index[b]] + centers[b, visible_index[b], None]  # (Gv, K, 3)
        masked = predicted[b] + centers[b, masked_index[b], None]  # (Gm, K, 3)
        reconstruction = torch.cat([visible, masked]).reshape(1, -1, 3)  # (1, G*K, 3)
        truth = (neighborhoods[b] + centers[b, :, None]).reshape(1, -1, 3)  # (1, G*K, 3)
        for view in range(model.cross_views):
            rotation = joint_mae.view_rotation(azimuth[b] + 2 * math.pi * view / model.cross_views,
                                               elevation[b]).view(1, 1, 3, 3)
            images = [joint_mae.perspective_depth(joint_mae.camera_frame(cloud, origin[b:b + 1], radius[b:b + 1],
                                                                         rotation)[0, 0], model.image_size)
                      for cloud in (reconstruction, truth)]  # 2 x (H, W)
            errors.append((images[0] - images[1]).pow(2).mean())
    return torch.stack(errors).mean()  # every image has H x W pixels: the mean over all of them


def test_cross_reconstruction_projects_visible_and_predicted_groups_together():
    """Eq. (6) as implemented (its NOTE(deviation)): Project(visible ground-truth groups + predicted masked groups)
    against Project(all ground-truth groups). A perfect prediction scores 0, which a loss projecting the predicted
    groups alone cannot (the visible groups' pixels would be missing); any prediction matches the slow loop."""
    model = tiny_model(cross_views=4)
    points = random_clouds()
    _, centers, neighborhoods = model.tokenizer_3d(points)  # (B, G, 3), (B, G, K, 3)
    generator = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(16, generator=generator) for _ in range(2)])  # (B, G)
    visible_index, masked_index = order[:, :4], order[:, 4:]  # (B, Gv), (B, Gm)
    origin, radius = joint_mae.unit_sphere_frame(points)
    azimuth, elevation = torch.tensor([0.3, 2.0]), torch.tensor([0.1, -0.2])
    arguments = (centers, neighborhoods, visible_index, masked_index, origin, radius, azimuth, elevation)
    perfect = gather_tokens(neighborhoods, masked_index)  # (B, Gm, K, 3)
    assert model.cross_reconstruction_loss(perfect, *arguments) < 1e-10  # sums in another order: rounding only
    predicted = perfect + 0.05 * torch.randn(perfect.shape, generator=generator)
    loss = model.cross_reconstruction_loss(predicted, *arguments)
    expected = slow_cross_reconstruction(model, predicted, *arguments)
    assert loss > 1e-4 and torch.allclose(loss, expected, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- a tiny end-to-end run
def test_tiny_training_step_shapes_and_determinism():
    model = tiny_model()
    points = random_clouds()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(5)
    out = model(points)
    expected = dict(centers=(2, 16, 3), neighborhoods=(2, 16, 8, 3), visible_index=(2, 4), masked_index=(2, 12),
                    predicted=(2, 12, 8, 3), image=(2, 1, 64, 64), visible_index_2d=(2, 4), masked_index_2d=(2, 12),
                    predicted_2d=(2, 12, 16, 16), center_patch=(2, 16), attention_mask=(2, 1, 8, 8))
    assert {key: tuple(out[key].shape) for key in expected} == expected
    for key in ("loss", "loss_rec", "loss_2d", "loss_cross", "loss_2d_foreground"):
        assert out[key].dim() == 0 and torch.isfinite(out[key]), key
    assert torch.allclose(out["loss"], out["loss_rec"] + out["loss_2d"] + out["loss_cross"])  # Eq. (7), 1:1:1
    assert out["loss_cross"] > 0 and out["loss_2d"] > 0
    # the pixel under every centre is drawn in the depth map (same camera for both)
    rows, cols = out["center_pixels"].unbind(-1)  # (B, G)
    assert (out["image"][torch.arange(2)[:, None], 0, rows, cols] > 0).all()
    before = model.encoder.blocks[0].attn.qkv.weight.detach().clone()
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    assert not torch.equal(before, model.encoder.blocks[0].attn.qkv.weight)
    # every random draw comes from torch's global RNG: the same seed repeats the step exactly
    model.eval()
    torch.manual_seed(7)
    first = model(points)
    torch.manual_seed(7)
    second = model(points)
    assert torch.equal(first["loss"], second["loss"]) and torch.equal(first["image"], second["image"])


def test_switches_global_attention_no_cross_term_and_realistic_projection():
    points = random_clouds()
    out = tiny_model(local_3d_to_2d=False, local_2d_to_3d=False, cross_views=0)(points)
    assert out["attention_mask"] is None and out["loss_cross"] == 0
    assert torch.allclose(out["loss"], out["loss_rec"] + out["loss_2d"])
    model = tiny_model(projection="realistic", cross_views=2)
    out = model(points)
    assert out["image"].shape == (2, 1, 64, 64) and out["image"].min() >= 0 and out["image"].max() <= 1
    assert torch.isfinite(out["loss"]) and (out["center_patch"] >= 0).all()
    gradient, = torch.autograd.grad(out["loss_cross"], out["predicted"], retain_graph=True)
    assert gradient.abs().sum() > 0
    out["loss"].backward()
    with pytest.raises(ValueError, match="projection"):
        tiny_model(projection="orthographic")
    with pytest.raises(ValueError, match="mask_ratio_2d"):
        tiny_model(mask_ratio_2d=0.01)  # no 2-D token would be masked
