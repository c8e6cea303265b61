"""Multi-view depth rendering of a point cloud (KR-MAE section "Multi-view 2D Rendering from 3D").

Implements
    Eq. (1): m_i = Project(P; theta_i),  m_i in R^{H x W x 3}
with PointCLIP V2's realistic projection, batched over clouds and views at once:
    rotate -> normalise per view -> Voxelize -> Densify (max-pool) -> Smooth (Gaussian) -> Squeeze (max over depth)
    -> 1 - depth / max -> 3 identical channels -> bilinear resize to H x W.
`project` sends any 3-D query point (later: the group centres) to its (row, col) pixel in every output image,
through exactly the same transform, so a point and the patch drawn from it can be paired (Part and Masking
Alignment).

Shapes: B clouds, N points, M query points, V views, H x W output image (H = W = image_size).

Paper symbol -> name
    P        -> points (B, N, 3)
    theta_i  -> rotations[i] (a 3 x 3 view rotation, see `view_rotations`)
    v        -> num_views
    m_i      -> images[:, i] (B, 3, H, W)
    H, W     -> image_size

Conventions (one for the whole file; NOTE(unspecified): the paper gives none, we take PointCLIP V2's)
    A view rotation M acts on column vectors: p' = M p.  M = Ry(tilt) @ Rx(a) @ Ry(b) @ Rz(c) with the
    right-handed axis rotations below, i.e. PointCLIP V2's R = Rx Ry Rz followed by the extra tilt about y.
    In the rotated frame the camera looks down -z from +z: a larger z' is nearer and is drawn darker.
    Image rows (first spatial axis) follow x', image columns follow y'; x' x y' = z', so the picture is not
    mirrored.  With c = pi/2 in every view, a y-up shape appears upright (+y towards row 0).

Demo: `python render.py [--out render_demo.png]` renders the 10 views of a small chair and marks a few
projected points on each view.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# PointCLIP V2 realistic-projection constants (docs/REFERENCE.md sec. 2).
DEPTH_BIAS = 0.2  # PointCLIP V2: zf = ((z + 1) / 2 + 0.2) / 1.2 * (depth_bins - 2)
SIDE_TILT = math.pi / 9  # PointCLIP V2: extra tilt of the 8 side views
TOP_TILT = math.pi / 15  # PointCLIP V2: extra tilt of the top and bottom views
# Images rendered at once on a CPU: 8 x 112 x 112 float32 voxels are 400 KB per image, so the grids of 8 images
# (3.2 MB) stay in the cache through every step. Measured on a 2-core CPU: 2 to 8 images equally fast, 6x faster
# than all 320 images of 32 clouds at once.
IMAGES_PER_CPU_CHUNK = 8


def axis_rotation(axis: str, angle: float) -> torch.Tensor:
    """Right-handed rotation by `angle` radians about the x, y or z axis, acting on column vectors."""
    c, s = math.cos(angle), math.sin(angle)
    matrices = {
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
        "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],
    }
    return torch.tensor(matrices[axis], dtype=torch.float64)  # (3, 3)


def view_rotations(num_views: int = 10) -> torch.Tensor:
    """The view rotations theta_1..theta_V of Eq. (1) as float32 matrices (V, 3, 3), p' = M p.

    Order (PointCLIP V2's): 0-3 oblique sides (x = pi/4, 3pi/4, 5pi/4, 7pi/4), 4-7 axis-aligned sides
    (x = 0, pi/2, pi, 3pi/2), all with y = 0, z = pi/2, tilt pi/9; 8 (0, -pi/2, pi/2) and 9 (0, pi/2, pi/2),
    tilt pi/15, PointCLIP V2's "top and bottom" (with our p' = M p and nearer = larger z', a y-up shape is seen
    from below in view 8 and from above in view 9).  num_views <= 10 takes the first num_views of these.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be at least 1, but {num_views} was given.")
    angles = [(k * math.pi / 4, 0.0, math.pi / 2, SIDE_TILT) for k in (1, 3, 5, 7)]  # PointCLIP V2 oblique
    angles += [(k * math.pi / 2, 0.0, math.pi / 2, SIDE_TILT) for k in range(4)]  # PointCLIP V2 axis sides
    angles += [(0.0, -math.pi / 2, math.pi / 2, TOP_TILT), (0.0, math.pi / 2, math.pi / 2, TOP_TILT)]
    # NOTE(unspecified): the paper uses the 10 PointCLIP V2 views; for more views we add a second ring of
    # E = num_views - 10 side views x = 2 pi (k + 1/2) / E seen from slightly below (tilt -pi/9), so that no
    # added view repeats one of the first ten.
    extra = num_views - 10
    angles += [(2 * math.pi * (k + 0.5) / extra, 0.0, math.pi / 2, -SIDE_TILT) for k in range(max(extra, 0))]
    rotations = [
        axis_rotation("y", tilt) @ axis_rotation("x", a) @ axis_rotation("y", b) @ axis_rotation("z", c)
        for a, b, c, tilt in angles[:num_views]
    ]
    return torch.stack(rotations).float()  # (V, 3, 3)


def gaussian_profile(sigma: float, size: int = 3) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,). PointCLIP V2's (1, size, size) smoothing kernel is its outer product (a 2-D
    Gaussian is separable), so the smoothing runs as one pass along rows and one along columns."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2  # (size,)
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))  # (size,)
    return (profile / profile.sum()).float()  # (size,)


def pad_along(values: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """Zero padding along dim (-1 or -2) only."""
    return F.pad(values, (0, 0) * (-1 - dim) + (before, after))


def sliding_max(values: torch.Tensor, dim: int, size: int, padding: int) -> torch.Tensor:
    """A 1-D max-pool along dim (-1 or -2), stride 1, for values >= 0: length L -> L + 2 padding - size + 1.

    Zero padding gives exactly max_pool's -inf padding here: every window holds at least one real value, and the
    real values are >= 0.  Windows double in width (the max over [i, i + 2w) is the max of two w-wide windows)
    until one more, overlapping, step covers `size`: 3 maxima for size 7 instead of 6.
    """
    window = pad_along(values, dim, padding, padding)  # window i of width 1: the padded value i itself
    width = 1
    while 2 * width <= size:
        length = window.shape[dim] - width
        window = torch.maximum(window.narrow(dim, 0, length), window.narrow(dim, width, length))
        width *= 2
    # Now width <= size < 2 width: [i, i + size) is the union of [i, i + width) and [i + size - width, i + size).
    length = window.shape[dim] - (size - width)
    return torch.maximum(window.narrow(dim, 0, length), window.narrow(dim, size - width, length))


def smooth_along(values: torch.Tensor, dim: int, weights: list) -> torch.Tensor:
    """1-D convolution along dim (-1 or -2) with an odd number of weights, zero padding, same length."""
    radius, length = len(weights) // 2, values.shape[dim]
    padded = pad_along(values, dim, radius, radius)
    smooth = weights[0] * padded.narrow(dim, 0, length)
    for offset in range(1, len(weights)):
        smooth = torch.add(smooth, padded.narrow(dim, offset, length), alpha=weights[offset])
    return smooth


def pixels_to_patches(pixels: torch.Tensor, image_size: int, patch_size: int = 16) -> torch.Tensor:
    """Index of the patch_size x patch_size patch holding each (row, col) pixel: (..., 2) -> (...) long."""
    if image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
    if pixels.shape[-1] != 2:
        raise ValueError(f"pixels must end in a (row, col) axis of size 2, but have shape {tuple(pixels.shape)}.")
    rows, cols = pixels.long().unbind(-1)  # (...), (...)
    # Row-major patch order, as a ViT flattens its patch grid (docs/REFERENCE.md sec. 3).
    return (rows // patch_size) * (image_size // patch_size) + cols // patch_size  # (...)


def check_finite(points, name):
    """Raise a ValueError naming the shape and the count of NaN / inf values unless every value is finite.
    Twin of tokenizer.check_finite (copied so that each stage module stands alone).
    Left out under torch.compile: a branch on a tensor's values would split the compiled graph in two (and wait for
    the GPU); the data readers already refuse non-finite points when they load a file (datasets.py)."""
    if torch.compiler.is_compiling():
        return
    if not torch.isfinite(points).all():  # one host sync on CUDA; the count below only runs on the error path
        bad = int((~torch.isfinite(points)).sum())
        raise ValueError(f"Expected finite {name}; found {bad} NaN or infinite values in {name} of shape "
                         f"{tuple(points.shape)}.")


class MultiViewRenderer(nn.Module):
    """Project(P; theta_i) of Eq. (1) for all V views: points (B, N, 3) -> images (B, V, 3, H, W)."""

    def __init__(self, num_views=10, image_size=112, grid_size=112, depth_bins=8, obj_ratio=0.8,
                 densify_kernel=7, smooth_sigma=3.0):
        super().__init__()
        if densify_kernel < 3 or densify_kernel % 2 == 0:
            raise ValueError(f"densify_kernel must be an odd number >= 3, but {densify_kernel} was given.")
        if grid_size < 8 or depth_bins < 3 or image_size < 1:
            raise ValueError(f"Need grid_size >= 8, depth_bins >= 3 and image_size >= 1, but got {grid_size}, "
                             f"{depth_bins} and {image_size}.")
        self.num_views, self.image_size = num_views, image_size
        self.grid_size, self.depth_bins, self.obj_ratio = grid_size, depth_bins, obj_ratio  # PointCLIP V2: 112, 8, 0.8
        self.densify_kernel = densify_kernel  # PointCLIP V2: 7
        # NOTE(unspecified): PointCLIP V2 pads the 7-wide window by 2; padding (k - 3) / 2 keeps that for k = 7
        # and keeps its 2-pixel shrink (112 -> 110) and 1-pixel window offset for any odd kernel k.
        self.densify_padding = (densify_kernel - 3) // 2
        self.map_size = grid_size - 2  # side of the depth map after Densify (110 for a 112 grid)
        # Derived from the arguments, so not saved in checkpoints.
        self.register_buffer("rotations", view_rotations(num_views), persistent=False)  # (V, 3, 3)
        # Plain floats, not a buffer: they are multipliers of whole tensors and need no device.
        self.smooth_weights = gaussian_profile(smooth_sigma).tolist()  # 3 floats, PointCLIP V2: sigma 3

    def normalise(self, points: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate into every view, centre on the view's bounding-box middle, longest extent -> [-1, 1], x, y times
        obj_ratio.  The box comes from `points`; it is applied to `query` (default: the points themselves)."""
        if points.dim() != 3 or points.shape[-1] != 3 or points.shape[1] == 0:
            raise ValueError(f"points must have shape (B, N, 3) with N >= 1, but have {tuple(points.shape)}.")
        query = points if query is None else query
        if query.dim() != 3 or query.shape[-1] != 3 or query.shape[0] != points.shape[0]:
            raise ValueError(f"query must have shape (B, M, 3) with B = {points.shape[0]}, "
                             f"but has {tuple(query.shape)}.")
        columns = self.rotations.to(points.device)[None, :, None]  # (1, V, 1, 3, 3)

        def rotate(cloud):  # (B, M, 3) -> (B, V, M, 3)
            cloud = cloud.float()[:, None, :, None, :]  # (B, 1, M, 1, 3)
            # p' = M p written as three explicit terms: a point gets bit-identical coordinates whether it is
            # rendered or queried, so forward() and project() agree to the pixel.
            return (cloud[..., 0] * columns[..., 0] + cloud[..., 1] * columns[..., 1]
                    + cloud[..., 2] * columns[..., 2])  # (B, V, M, 3)

        rotated_points = rotate(points)  # (B, V, N, 3)
        rotated_query = rotated_points if query is points else rotate(query)  # (B, V, M, 3)
        upper = rotated_points.amax(dim=2, keepdim=True)  # (B, V, 1, 3)
        lower = rotated_points.amin(dim=2, keepdim=True)  # (B, V, 1, 3)
        middle = (upper + lower) / 2  # (B, V, 1, 3)
        # Guard a single point (zero extent): it then sits at the centre of the image.
        extent = (upper - lower).amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, V, 1, 1)
        normalised = (rotated_query - middle) / extent * 2  # (B, V, M, 3) in [-1, 1] on the longest axis
        ratio = normalised.new_tensor([self.obj_ratio, self.obj_ratio, 1.0])  # (3,) PointCLIP V2: 0.8
        return normalised * ratio  # (B, V, M, 3)

    def grid_coordinates(self, normalised: torch.Tensor):
        """Voxel (row, col), depth bin and continuous depth zf of normalised points, docs/REFERENCE.md sec. 2 formulas
        exactly: each of row, col and bin is rounded up, then clipped where PointCLIP V2 clips it.
        NOTE(deviation): PointCLIP V2 writes the grid at (x, y) and reads the image back at (y, x); we use one
        convention everywhere: row from x', column from y' (the layout of PointCLIP V2's rendered images)."""
        x, y, z = normalised.unbind(-1)  # 3 x (B, V, M)
        g, d = self.grid_size, self.depth_bins
        rows = torch.ceil((x + 1) / 2 * g).clamp(1, g - 2).long()  # (B, V, M) in [1, g - 2]
        cols = torch.ceil((y + 1) / 2 * g).clamp(1, g - 2).long()  # (B, V, M) in [1, g - 2]
        depth = ((z + 1) / 2 + DEPTH_BIAS) / (1 + DEPTH_BIAS) * (d - 2)  # (B, V, M) zf, in [(d - 2) / 6, d - 2]
        # PointCLIP V2 takes the bin from zf BEFORE clipping zf. For the top point of a cloud, float32 rounding
        # can put the normalised z a little above 1 and zf above d - 2: that point goes to bin d - 1 (7 of 0..7),
        # which clipping first would never reach. Rounding error is far below 1, so bins stay in [1, d - 1].
        bins = torch.ceil(depth).long()  # (B, V, M) in [1, d - 1]
        return rows, cols, bins, depth.clamp(1, d - 2)  # the value written is clipped to [1, d - 2]

    def voxel_targets(self, points: torch.Tensor):
        """Where each point is written in its own image's flattened (depth_bins, g, g) grid, and the zf it writes:
        points (B, N, 3) -> index (B * V, N) long, depth (B * V, N)."""
        rows, cols, bins, depth = self.grid_coordinates(self.normalise(points))  # 4 x (B, V, N)
        g = self.grid_size
        index = (bins * g + rows) * g + cols  # (B, V, N)
        return index.flatten(0, 1), depth.flatten(0, 1)  # (B * V, N), (B * V, N)

    def scatter_voxels(self, index: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Voxelize: each voxel keeps the largest zf of its points, empty voxels 0 -> (n, depth_bins, g, g) for
        the n images of index (n, N) and depth (n, N) (a max does not depend on the order the points arrive)."""
        g, d = self.grid_size, self.depth_bins
        grid = depth.new_zeros(index.shape[0], d * g * g)  # (n, d * g * g)
        grid.scatter_reduce_(1, index, depth, reduce="amax", include_self=True)
        return grid.view(-1, d, g, g)  # (n, depth_bins, g, g)

    def voxelize(self, points: torch.Tensor) -> torch.Tensor:
        """Voxelize every view of every cloud: points (B, N, 3) -> grids (B, V, depth_bins, g, g)."""
        grid = self.scatter_voxels(*self.voxel_targets(points))  # (B * V, d, g, g)
        return grid.view(points.shape[0], -1, *grid.shape[1:])  # (B, V, depth_bins, g, g)

    def depth_maps(self, grid: torch.Tensor) -> torch.Tensor:
        """Densify, Smooth and Squeeze the grids of n images: (n, depth_bins, g, g) -> (n, g - 2, g - 2)."""
        # Bin 0 is never written (zf > 0, so its bin ceil(zf) >= 1) and stays 0 through the max-pool and the
        # Gaussian, while every other bin is >= 0, so leaving it out of the max over depth changes nothing.
        grid = grid[:, 1:]  # (n, d - 1, g, g)
        k, pad = self.densify_kernel, self.densify_padding
        # Densify: PointCLIP V2's (1, 7, 7) max-pool fills the holes between projected points; 112 -> 110. A max
        # over a rectangle is the max over its rows of the max along each row, so it runs as a 7-wide max along
        # the columns, then along the rows: exactly the same values, and no 3-D pooling kernel.
        dense = sliding_max(grid, -1, k, pad)  # (n, d - 1, g, 110)
        dense = sliding_max(dense, -2, k, pad)  # (n, d - 1, 110, 110)
        # Smooth: PointCLIP V2's Gaussian (1, 3, 3), sigma 3, within each depth slice. It is the outer product of
        # a 1-D Gaussian with itself, so it runs as a 1-D pass along the columns, then one along the rows: the same
        # sums in another order, equal to the 3 x 3 convolution up to float32 rounding (below 4e-7 on the images).
        smooth = smooth_along(dense, -1, self.smooth_weights)  # (n, d - 1, 110, 110)
        smooth = smooth_along(smooth, -2, self.smooth_weights)  # (n, d - 1, 110, 110)
        # Squeeze: the nearest (largest) depth along each pixel's ray.
        return smooth.amax(dim=1)  # (n, 110, 110)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Eq. (1) for every view: points (B, N, 3) -> images (B, V, 3, H, W) in [0, 1], background 1.
        The 3 identical channels are one expanded channel (copy the images before writing into them)."""
        # A NaN or inf would make the bounding box, hence every voxel index, garbage (an unrelated index error or a
        # silently wrong image). One host sync per call on CUDA, once per batch: accepted at this entry point.
        check_finite(points, "points")
        with torch.autocast(device_type=points.device.type, enabled=False):  # depth maps stay float32
            index, depth = self.voxel_targets(points)  # (B * V, N), (B * V, N)
            # Images are independent, so they can be rendered a few at a time with the same result. On a CPU,
            # IMAGES_PER_CPU_CHUNK images keep every intermediate grid in the cache (several times faster than one
            # pass over a grid of hundreds of MB); a GPU takes them all at once (fewest kernel launches).
            chunk = IMAGES_PER_CPU_CHUNK if points.device.type == "cpu" else index.shape[0]
            depth_map = torch.cat([self.depth_maps(self.scatter_voxels(index_chunk, depth_chunk))
                                   for index_chunk, depth_chunk in zip(index.split(chunk), depth.split(chunk))])
            depth_map = depth_map.unsqueeze(1)  # (B * V, 1, 110, 110) from B * V / chunk pieces (chunk, 110, 110)
            # Guard an image with nothing drawn: the division then leaves 0 and the image stays background 1.
            peak = depth_map.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)  # (BV, 1, 1, 1)
            image = 1 - depth_map / peak  # (BV, 1, 110, 110) PointCLIP V2: near surfaces dark
            size = (self.image_size, self.image_size)
            # NOTE(deviation): PointCLIP V2 resizes with align_corners=True; we keep False, PyTorch's default,
            # under which a pixel's centre maps to a pixel's centre, as project() assumes. At 112 x 112 the two
            # differ by less than 0.004 (0.0039 at most on random clouds and spheres).
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)  # (BV, 1, H, W)
            image = image.clamp(0, 1).expand(-1, 3, -1, -1)  # (BV, 3, H, W), paper footnote 1: identical channels
        return image.view(points.shape[0], -1, 3, *size)  # (B, V, 3, H, W)

    def project(self, points: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """(row, col) pixel of every query point in every output image: (B, M, 3) -> (B, V, M, 2) long.

        Grid pixel g (row or col, in [1, grid - 2]) -> output pixel o:
          Densify output pixel j reads grid pixels j - pad .. j - pad + k - 1, centred on j + (k - 1) / 2 - pad
          = j + 1, so grid pixel g is the centre of depth-map pixel j = g - 1 (in [0, map_size - 1]).
          Bilinear resizing (align_corners=False) puts the centre of depth-map pixel j at output coordinate
          (j + 0.5) * H / map_size - 0.5, whose nearest output pixel is o = floor((j + 0.5) * H / map_size),
          computed in integers as ((2 j + 1) H) // (2 map_size), then clamped to [0, H - 1].
        """
        # Without this a NaN point or query lands silently on pixel (0, 0) (NaN -> long). One host sync per call on
        # CUDA for both tensors; check_finite then names the one at fault.
        if not torch.compiler.is_compiling() and not (torch.isfinite(points).all() & torch.isfinite(query).all()):
            check_finite(points, "points")
            check_finite(query, "query")
        with torch.autocast(device_type=points.device.type, enabled=False):
            rows, cols, _, _ = self.grid_coordinates(self.normalise(points, query))  # 2 x (B, V, M)
        grid_pixels = torch.stack([rows, cols], dim=-1)  # (B, V, M, 2) row from x', col from y'
        map_pixels = grid_pixels - ((self.densify_kernel - 1) // 2 - self.densify_padding)  # (B, V, M, 2)
        pixels = ((2 * map_pixels + 1) * self.image_size) // (2 * self.map_size)  # (B, V, M, 2)
        return pixels.clamp(0, self.image_size - 1)  # (B, V, M, 2)


if __name__ == "__main__":
    import argparse

    import numpy as np
    from PIL import Image, ImageDraw

    parser = argparse.ArgumentParser(description="Render the 10 views of a small chair and mark projected points.")
    parser.add_argument("--out", default="render_demo.png", help="where to write the PNG grid of views")
    args = parser.parse_args()

    # A chair, y up: seat, backrest at the back (-z), four legs.  Points on the box surfaces, about 2048.
    boxes = np.array([  # (min x, min y, min z, max x, max y, max z)
        [-0.5, 0.0, -0.5, 0.5, 0.1, 0.5],  # seat
        [-0.5, 0.1, -0.5, 0.5, 1.0, -0.4],  # backrest
        *[[x - 0.05, -0.8, z - 0.05, x + 0.05, 0.0, z + 0.05] for x in (-0.4, 0.4) for z in (-0.4, 0.4)],  # legs
    ])
    generator = np.random.default_rng(0)
    sides = boxes[:, 3:] - boxes[:, :3]  # (6, 3)
    areas = 2 * (sides[:, 0] * sides[:, 1] + sides[:, 1] * sides[:, 2] + sides[:, 0] * sides[:, 2])  # (6,)
    box_of_point = generator.choice(len(boxes), size=2048, p=areas / areas.sum())  # (N,)
    low, side = boxes[box_of_point, :3], sides[box_of_point]  # (N, 3), (N, 3)
    cloud = low + generator.random((2048, 3)) * side  # (N, 3) inside the boxes
    # Snap each point onto a face: the face's axis drawn in proportion to the face area.
    face_area = np.stack([side[:, 1] * side[:, 2], side[:, 0] * side[:, 2], side[:, 0] * side[:, 1]], 1)  # (N, 3)
    axis = (generator.random((2048, 1)) * face_area.sum(1, keepdims=True) > np.cumsum(face_area, 1)).sum(1)  # (N,)
    upper_face = generator.random(2048) < 0.5  # (N,)
    cloud[np.arange(2048), axis] = low[np.arange(2048), axis] + upper_face * side[np.arange(2048), axis]
    points = torch.from_numpy(cloud).float().unsqueeze(0)  # (1, N, 3)
    marked = torch.tensor([[0.0, 1.0, -0.45], [0.4, -0.8, 0.4], [0.0, 0.1, 0.5], [-0.4, -0.8, -0.4]])  # (M, 3)
    colours = [(230, 30, 30), (30, 90, 230), (20, 170, 60), (240, 170, 0)]  # backrest top, legs, seat front

    renderer = MultiViewRenderer()
    print("points", tuple(points.shape), "rotations", tuple(renderer.rotations.shape))
    print("voxel grid", tuple(renderer.voxelize(points).shape))
    images = renderer(points)  # (1, V, 3, H, W)
    print("images", tuple(images.shape), f"values in [{images.min():.3f}, {images.max():.3f}]")
    pixels = renderer.project(points, marked.unsqueeze(0))  # (1, V, M, 2)
    print("projected pixels", tuple(pixels.shape), "patch indices",
          tuple(pixels_to_patches(pixels, renderer.image_size).shape))
    print("view 4 pixels (row, col):", pixels[0, 4].tolist())

    scale, size = 2, renderer.image_size
    canvas = Image.new("RGB", (5 * size * scale, 2 * size * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for view in range(renderer.num_views):
        grey = (images[0, view, 0].numpy() * 255).round().astype(np.uint8)  # (H, W)
        tile = Image.fromarray(grey).convert("RGB").resize((size * scale, size * scale), Image.NEAREST)
        top, left = (view // 5) * size * scale, (view % 5) * size * scale
        canvas.paste(tile, (left, top))
        for (row, col), colour in zip(pixels[0, view].tolist(), colours):
            y, x = top + row * scale, left + col * scale  # rows are the image's vertical axis
            draw.rectangle([x - 2, y - 2, x + 3, y + 3], fill=colour)
        draw.text((left + 4, top + 4), f"view {view}", fill=(0, 0, 0))
    canvas.save(args.out)
    print("wrote", args.out)
