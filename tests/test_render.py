"""Tests for render.py: view rotations, hand-worked pixels, depth drawing, project() vs forward(), batching."""
import math

import numpy as np
import pytest
import torch

import render
from render import MultiViewRenderer, pixels_to_patches, view_rotations


def identity_renderer(image_size=110):
    """A one-view renderer with the identity rotation: rows follow x, columns y, depth z."""
    renderer = MultiViewRenderer(num_views=1, image_size=image_size)
    renderer.rotations = torch.eye(3).unsqueeze(0)  # (1, 3, 3) replaces the buffer
    return renderer


def slow_view_coordinates(cloud, rotation, grid_size=112, depth_bins=8, obj_ratio=0.8):
    """Obvious float64 numpy version of rotate + normalise + grid formulas for one cloud and one view:
    (rows, cols, depth bins, clipped depth zf). As PointCLIP V2: every index is rounded up, then clipped."""
    rotated = cloud @ rotation.T  # p' = M p for every row
    middle = (rotated.max(0) + rotated.min(0)) / 2
    extent = (rotated.max(0) - rotated.min(0)).max()
    normalised = (rotated - middle) / extent * 2
    normalised[:, :2] *= obj_ratio
    rows = np.clip(np.ceil((normalised[:, 0] + 1) / 2 * grid_size), 1, grid_size - 2).astype(np.int64)
    cols = np.clip(np.ceil((normalised[:, 1] + 1) / 2 * grid_size), 1, grid_size - 2).astype(np.int64)
    depth = ((normalised[:, 2] + 1) / 2 + 0.2) / 1.2 * (depth_bins - 2)
    bins = np.ceil(depth).astype(np.int64)  # before clipping the depth value
    return rows, cols, bins, np.clip(depth, 1, depth_bins - 2)


def random_cloud(batch=1, num_points=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_points, 3, generator=generator) * 2 - 1  # (B, N, 3)


def test_view_rotations_are_the_documented_rotations():
    rotations = view_rotations(10).double()
    assert rotations.shape == (10, 3, 3)
    # View 4 (x = 0, y = 0, z = pi/2, tilt pi/9) worked by hand: Ry(t) Rz(pi/2) = [[0, -c, s], [1, 0, 0], [0, s, c]].
    c, s = math.cos(math.pi / 9), math.sin(math.pi / 9)
    expected = torch.tensor([[0, -c, s], [1, 0, 0], [0, s, c]], dtype=torch.float64)
    assert torch.allclose(rotations[4], expected, atol=1e-6)
    # View 8 (0, -pi/2, pi/2), tilt pi/15: Ry(pi/15 - pi/2) Rz(pi/2), y'' = x and z'' = -cos(pi/15) y.
    assert torch.allclose(rotations[8, 1], torch.tensor([1.0, 0, 0], dtype=torch.float64), atol=1e-6)
    assert rotations[8, 2, 1].item() == pytest.approx(-math.cos(math.pi / 15), abs=1e-6)
    many = view_rotations(26).double()
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(many @ many.transpose(1, 2), eye.expand(26, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(many), torch.ones(26, dtype=torch.float64), atol=1e-6)
    assert torch.equal(many[:10], rotations)  # the first ten are PointCLIP V2's
    distances = (many[:, None] - many[None]).flatten(2).norm(dim=-1) + 10 * eye.new_ones(26).diag()
    assert distances.min() > 0.1  # no view repeats another
    assert torch.equal(view_rotations(3), view_rotations(10)[:3])


def test_hand_worked_identity_view_catches_row_col_swap():
    # Normalised (x, y) = 0.8 * (+-1, +-0.5): grid rows ceil(0.1 * 112) = 12 and ceil(0.9 * 112) = 101,
    # columns ceil(0.3 * 112) = 34 and ceil(0.7 * 112) = 79; depth map pixel = grid pixel - 1.
    cloud = torch.tensor([[[-1.0, -0.5, 0.0], [1.0, -0.5, 0.0], [1.0, 0.5, 0.0]]])  # (1, 3, 3)
    renderer = identity_renderer(110)
    pixels = renderer.project(cloud, cloud)[0, 0]  # (3, 2)
    assert pixels.tolist() == [[11, 33], [100, 33], [100, 78]]
    image = renderer(cloud)[0, 0, 0]  # (110, 110)
    assert image[100, 78] < 0.5 and image[11, 33] < 0.5
    assert image[11, 78] == 1.0 and image[78, 100] == 1.0  # empty corner; the swapped pixel is background
    # At 112 pixels: o = floor((j + 0.5) * 112 / 110) for j = 11, 100, 33, 78.
    assert identity_renderer(112).project(cloud, cloud)[0, 0].tolist() == [[11, 34], [102, 34], [102, 79]]


def test_hand_worked_side_view_is_upright_and_not_mirrored():
    # View 4: x' = -c y + s z, y' = x, z' = s y + c z.  A pole from y = -1 to 1 and a marker at (0.5, 0.1, 0):
    # extent 2c (the pole), middle (0, 0.25, 0).  Pole ends: normalised x = +-1 -> grid rows 101 / 12,
    # y = -0.25 / c -> grid column ceil((1 - 0.8 * 0.266) / 2 * 112) = 45.  Marker: x = -0.1 -> row
    # ceil(0.46 * 112) = 52, y = +0.266 -> column 68.  Output (112): floor((g - 0.5) * 112 / 110).
    cloud = torch.tensor([[[0.0, -1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.1, 0.0]]])  # (1, 3, 3)
    pixels = MultiViewRenderer(image_size=112).project(cloud, cloud)[0, 4]  # (3, 2)
    assert pixels.tolist() == [[102, 45], [11, 45], [52, 68]]  # top of the pole up, +x to the right
    # In every side view the top of a y-up pole is in a smaller row than its foot.
    all_views = MultiViewRenderer().project(cloud, cloud)[0]  # (V, 3, 2)
    assert (all_views[:8, 1, 0] < all_views[:8, 0, 0]).all()


def test_drawn_depth_comes_from_the_nearest_point_at_its_pixel():
    # A = (0, 0, 1) hides B = (0, 0, -1) at the same pixel; C = (1, 0.5, -1) lies far away.
    # zf(z = 1) = 6 (the image maximum) and zf(z = -1) = 1, so the image is 1 - 6/6 = 0 at A, 1 - 1/6 at C.
    cloud = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.5, -1.0]]])  # (1, 3, 3)
    renderer = identity_renderer(110)
    image = renderer(cloud)[0, 0, 0]  # (110, 110)
    pixels = renderer.project(cloud, cloud)[0, 0]  # (3, 2)
    assert pixels.tolist() == [[33, 44], [33, 44], [78, 67]]  # grid (34, 45) and (79, 68), minus 1
    assert image[33, 44].item() == pytest.approx(0.0, abs=1e-6)
    assert image[78, 67].item() == pytest.approx(1 - 1 / 6, abs=1e-6)
    assert image[33, 67] == 1.0 and image[78, 44] == 1.0 and image[0, 0] == 1.0


def test_project_matches_slow_reference_and_every_point_is_drawn_at_its_pixel():
    cloud = random_cloud(num_points=64, seed=1)  # (1, N, 3)
    renderer = MultiViewRenderer(image_size=110)  # identity resize: output pixel = depth map pixel
    images = renderer(cloud)[0, :, 0]  # (V, 110, 110)
    pixels = renderer.project(cloud, cloud)[0]  # (V, N, 2)
    for view in range(10):
        rotation = renderer.rotations[view].double().numpy()
        rows, cols, _, depth = slow_view_coordinates(cloud[0].double().numpy(), rotation)
        assert np.array_equal(pixels[view, :, 0].numpy(), rows - 1)
        assert np.array_equal(pixels[view, :, 1].numpy(), cols - 1)
        # The 3 x 3 Gaussian at the pixel only sees densified voxels that hold the point, so the drawn depth
        # there is at least the point's own zf, and the image at most 1 - zf / (largest zf).
        drawn = images[view, pixels[view, :, 0], pixels[view, :, 1]].numpy()
        assert (drawn <= 1 - depth / depth.max() + 1e-5).all()
        # Background: pixels more than 4 from every projected pixel (3 of max-pool, 1 of Gaussian) are exactly 1.
        grid_rows, grid_cols = torch.meshgrid(torch.arange(110), torch.arange(110), indexing="ij")
        reach = torch.maximum((grid_rows[..., None] - pixels[view, :, 0]).abs(),
                              (grid_cols[..., None] - pixels[view, :, 1]).abs()).amin(-1)  # (110, 110)
        assert (images[view][reach > 4] == 1).all() and (reach > 4).any()
        assert (images[view][reach <= 2] < 1).all()


@pytest.mark.parametrize("image_size", [64, 112, 224])
def test_project_agrees_with_forward_blob_centres_on_every_view(image_size):
    # Two points far apart: each draws a separate blob whose centre must be the projected pixel.
    cloud = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.7, 0.4]]])  # (1, 2, 3)
    renderer = MultiViewRenderer(image_size=image_size)
    images = renderer(cloud)[0, :, 0]  # (V, H, W)
    pixels = renderer.project(cloud, cloud)[0].float()  # (V, 2, 2)
    scale = image_size / 110  # output pixels per depth map pixel
    rows, cols = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    for view in range(10):
        assert (pixels[view, 0] - pixels[view, 1]).abs().max() > 12 * scale  # blobs do not touch
        for point in range(2):
            row_distance = (rows - pixels[view, point, 0]).abs()  # (H, W)
            col_distance = (cols - pixels[view, point, 1]).abs()  # (H, W)
            near = (row_distance <= 6 * scale) & (col_distance <= 6 * scale)  # (H, W)
            blob = (images[view] < 1) & near  # (H, W) everything drawn near the point
            centre = torch.stack([rows[blob].float().mean(), cols[blob].float().mean()])
            assert (centre - pixels[view, point]).abs().max() <= 1.0, (view, point, centre, pixels[view, point])


@pytest.mark.parametrize("num_views,image_size", [(1, 64), (3, 112), (10, 224), (12, 112)])
def test_shapes_range_and_background(num_views, image_size):
    cloud = random_cloud(batch=2, num_points=128, seed=2)
    renderer = MultiViewRenderer(num_views=num_views, image_size=image_size)
    images = renderer(cloud)  # (B, V, 3, H, W)
    assert images.shape == (2, num_views, 3, image_size, image_size) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images[:, :, 0], images[:, :, 2])  # identical channels (paper footnote 1)
    assert (images[..., 0, 0] == 1).all()  # corners: background
    assert (images.flatten(2).amin(-1) < 0.05).all()  # the nearest surface of every image is dark
    pixels = renderer.project(cloud, cloud[:, :5])  # (B, V, M, 2)
    assert pixels.shape == (2, num_views, 5, 2) and pixels.dtype == torch.long
    assert pixels.min() >= 0 and pixels.max() < image_size


def test_rotating_the_input_by_a_view_rotation_equals_rendering_that_view():
    cloud = random_cloud(num_points=256, seed=3)  # (1, N, 3)
    renderer = MultiViewRenderer(image_size=112)
    images = renderer(cloud)  # (1, V, 3, H, W)
    identity = identity_renderer(112)
    for view in range(10):
        rotated = cloud @ renderer.rotations[view].T  # p' = M p
        assert torch.allclose(identity(rotated)[0, 0], images[0, view], atol=1e-5)
        assert torch.equal(identity.project(rotated, rotated)[0, 0], renderer.project(cloud, cloud)[0, view])
    assert not torch.allclose(images[0, 0], images[0, 4])  # the views do differ


def test_batch_items_do_not_interact_and_dtypes_agree():
    clouds = random_cloud(batch=3, num_points=100, seed=4) * torch.tensor([1.0, 0.3, 2.0])  # (3, N, 3)
    clouds[1] = clouds[1] * 0.1 + 5  # a small, shifted second cloud
    renderer = MultiViewRenderer(num_views=4)
    images = renderer(clouds)  # (3, V, 3, H, W)
    pixels = renderer.project(clouds, clouds)  # (3, V, N, 2)
    for b in range(3):
        assert torch.equal(images[b], renderer(clouds[b : b + 1])[0])
        assert torch.equal(pixels[b], renderer.project(clouds[b : b + 1], clouds[b : b + 1])[0])
    assert not torch.allclose(images[0], images[2])
    as_double = renderer(clouds.double())  # computed in float32 all the same
    assert as_double.dtype == torch.float32 and torch.allclose(as_double, images, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = renderer(clouds)
    assert under_autocast.dtype == torch.float32 and torch.allclose(under_autocast, images, atol=1e-5)


def test_single_point_is_centred_and_finite():
    renderer = MultiViewRenderer(image_size=110)
    point = torch.tensor([[[0.3, -0.2, 0.9]]])  # (1, 1, 3): zero extent in every view
    images = renderer(point)  # (1, V, 3, 110, 110)
    assert torch.isfinite(images).all()
    # Normalised (0, 0): grid pixel ceil(56) = 56 -> depth map pixel 55 in every view.
    assert (renderer.project(point, point) == 55).all()
    assert (images[0, :, 0, 55, 55] == 0).all() and (images[0, :, 0, 40, 40] == 1).all()


def test_voxelize_matches_slow_loop():
    clouds = random_cloud(batch=2, num_points=40, seed=5)  # (2, N, 3)
    renderer = MultiViewRenderer(num_views=3, grid_size=32, depth_bins=8)
    grid = renderer.voxelize(clouds)  # (B, V, 8, 32, 32)
    expected = np.zeros((2, 3, 8, 32, 32))
    for b in range(2):
        for view in range(3):
            rotation = renderer.rotations[view].double().numpy()
            rows, cols, bins, depth = slow_view_coordinates(clouds[b].double().numpy(), rotation, grid_size=32)
            for row, col, bin_index, value in zip(rows, cols, bins, depth):
                expected[b, view, bin_index, row, col] = max(expected[b, view, bin_index, row, col], value)
    assert np.allclose(grid.numpy(), expected, atol=1e-5)
    assert (grid > 0).sum() > 40  # points spread over many voxels


def test_pixels_to_patches_and_errors():
    pixels = torch.tensor([[17, 40], [0, 0], [111, 111], [15, 16]])  # (4, 2) (row, col)
    assert pixels_to_patches(pixels, 112).tolist() == [1 * 7 + 2, 0, 48, 1]
    assert pixels_to_patches(pixels.view(2, 2, 2), 112).shape == (2, 2)
    with pytest.raises(ValueError, match="multiple"):
        pixels_to_patches(pixels, 100)
    with pytest.raises(ValueError, match="odd"):
        MultiViewRenderer(densify_kernel=6)
    with pytest.raises(ValueError, match="N >= 1"):
        MultiViewRenderer()(torch.zeros(1, 0, 3))
    with pytest.raises(ValueError, match="query"):
        MultiViewRenderer().project(torch.zeros(2, 5, 3), torch.zeros(1, 5, 3))


def test_depth_bin_is_rounded_up_before_the_depth_is_clipped_as_in_pointclip_v2():
    # Identity view, z = 0.4 and 0.5 (x = -+0.04 only separates the pixels). In float32: extent = 0.5 - 0.4 =
    # 0.099999994, middle = 0.44999999, so the top point's normalised z is 0.050000012 / 0.099999994 * 2 =
    # 1.0000004 and zf = ((1.0000004 + 1) / 2 + 0.2) / 1.2 * 6 = 6.0000014. PointCLIP V2 rounds up first: bin 7,
    # then writes the clipped value 6. Clipping first would give bin ceil(6) = 6. The bottom point: zf = 1.0000007,
    # bin 2 in either order. Rows: normalised x = -+0.64 -> ceil(0.18 * 112) = 21, ceil(0.82 * 112) = 92; column 56.
    cloud = torch.tensor([[[-0.04, 0.0, 0.4], [0.04, 0.0, 0.5]]])  # (1, 2, 3)
    renderer = identity_renderer(110)
    rows, cols, bins, depth = renderer.grid_coordinates(renderer.normalise(cloud))  # 4 x (1, 1, 2)
    assert rows.flatten().tolist() == [21, 92] and cols.flatten().tolist() == [56, 56]
    unclipped = depth.new_tensor([1.0000007152557373, 6.000001430511475])  # zf as computed above, float32
    assert bins.flatten().tolist() == [2, 7] and torch.ceil(unclipped.clamp(1, 6)).tolist() == [2, 6]
    assert depth.flatten().tolist() == [1.0000007152557373, 6.0]
    grid = renderer.voxelize(cloud)[0, 0]  # (8, 112, 112)
    assert grid[7, 92, 56] == 6.0 and grid[6, 92, 56] == 0 and grid[2, 21, 56] == unclipped[0]
    assert (grid > 0).sum() == 2
    assert renderer(cloud)[0, 0, 0, 91, 55] == 0  # drawn at full depth: grid pixel (92, 56) minus 1


def test_sliding_max_is_max_pool_and_the_separable_gaussian_is_the_3x3_one():
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    values = torch.rand(6, 9, 23, generator=generator) * (torch.rand(6, 9, 23, generator=generator) > 0.8)  # >= 0
    for size, padding in [(3, 0), (3, 1), (5, 1), (7, 2), (7, 3), (9, 3)]:
        # max_pool pads with -inf; the zero padding is the same for values >= 0. Exact equality.
        pooled_columns = F.max_pool2d(values[:, None], (1, size), stride=1, padding=(0, padding))[:, 0]
        assert torch.equal(render.sliding_max(values, -1, size, padding), pooled_columns), (size, padding)
        pooled_rows = F.max_pool2d(values[:, None], (size, 1), stride=1, padding=(padding, 0))[:, 0]
        assert torch.equal(render.sliding_max(values, -2, size, padding), pooled_rows), (size, padding)
    weights = render.gaussian_profile(3.0)  # (3,)
    assert weights.sum().item() == pytest.approx(1.0) and weights[0] == weights[2] and weights[1] > weights[0]
    kernel = pointclip_gaussian_kernel(3.0)  # (1, 1, 1, 3, 3)
    smooth = render.smooth_along(render.smooth_along(values, -1, weights.tolist()), -2, weights.tolist())
    expected = F.conv2d(values[:, None], kernel[0], padding=1)[:, 0]  # (6, 9, 23)
    assert (smooth - expected).abs().max() <= 1e-6
    assert (render.smooth_along(values, -1, weights.tolist()) - expected).abs().max() > 1e-2  # one pass is not it


def pointclip_gaussian_kernel(sigma, size=3):
    """PointCLIP V2's smoothing weight: the normalised 2-D Gaussian (1, 1, 1, size, size), built in float64."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2  # (size,)
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))  # (size, size)
    return (kernel / kernel.sum()).float().view(1, 1, 1, size, size)


@pytest.mark.parametrize("sizes", [dict(), dict(num_views=4, image_size=64, grid_size=64),
                                   dict(num_views=2, image_size=32, grid_size=16, densify_kernel=5, depth_bins=5)])
def test_forward_equals_the_pipeline_written_with_plain_3d_operations(sizes, monkeypatch):
    # PointCLIP V2's pipeline as it writes it: a (1, 7, 7) max_pool3d, a (1, 3, 3) Gaussian conv3d, max over depth,
    # 1 - depth / max, resize, 3 channels, on the same voxel grid. The renderer's separable pools must give the same
    # values exactly and its separable Gaussian the same up to float32 rounding (measured: below 4e-7).
    import torch.nn.functional as F

    renderer = MultiViewRenderer(**sizes)
    points = torch.rand(2, 1024, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (B, N, 3)
    points[1] *= torch.tensor([1.0, 0.3, 2.0])  # a flat, long second cloud
    grid = renderer.voxelize(points).flatten(0, 1).unsqueeze(1)  # (B * V, 1, d, g, g)
    k, pad = renderer.densify_kernel, renderer.densify_padding
    dense = F.max_pool3d(grid, kernel_size=(1, k, k), stride=1, padding=(0, pad, pad))
    smooth = F.conv3d(dense, pointclip_gaussian_kernel(3.0), padding=(0, 1, 1))
    depth_map = smooth.amax(dim=2)
    image = 1 - depth_map / depth_map.amax(dim=(-2, -1), keepdim=True)
    size = (renderer.image_size, renderer.image_size)
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    expected = image.repeat(1, 3, 1, 1).view(2, renderer.num_views, 3, *size)
    images = renderer(points)  # (B, V, 3, H, W)
    assert (images - expected).abs().max() <= 1e-6
    assert (images < 1).float().mean() > 0.05  # something is drawn
    # The images are rendered a few at a time on the CPU; any chunk size gives the same bits.
    for images_per_chunk in (1, 3, 1000):
        monkeypatch.setattr(render, "IMAGES_PER_CPU_CHUNK", images_per_chunk)
        assert torch.equal(renderer(points), images)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_points_and_queries_are_refused_with_their_count(bad):
    renderer = MultiViewRenderer(num_views=2, image_size=32, grid_size=32)
    points, query = random_cloud(batch=2, num_points=64), random_cloud(batch=2, num_points=5, seed=1)
    broken = points.clone()
    broken[1, 7, 0] = bad
    # Before: forward failed with an unrelated index error, project returned pixel (0, 0) silently.
    for call in (lambda: renderer(broken), lambda: renderer.project(broken, query)):
        with pytest.raises(ValueError, match=r"found 1 NaN or infinite values in points of shape \(2, 64, 3\)"):
            call()
    broken_query = query.clone()
    broken_query[0, 2, 1] = bad
    with pytest.raises(ValueError, match=r"found 1 NaN or infinite values in query of shape \(2, 5, 3\)"):
        renderer.project(points, broken_query)
