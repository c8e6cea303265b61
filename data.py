"""Data for KR-MAE: built-in synthetic shapes and readers for the paper's datasets.

The KR-MAE paper ("Experiments") pre-trains on ShapeNet (1,024 points per shape), fine-tunes on ScanObjectNN
(OBJ-BG, OBJ-ONLY, PB-T50-RS; 2,048 points), runs n-way m-shot classification on ModelNet40 and part
segmentation on ShapeNetPart (2,048 points, 50 part labels). This file holds one reader per dataset, in the
on-disk layouts users already have (REFERENCE.md section 5), plus a synthetic stand-in that needs no files.

Map of this file
  1. Shared helpers        normalize_unit_sphere (Point-MAE pc_normalize), _check_points, numpy FPS,
                           text / pickle readers that name the offending file in every error.
  2. Primitive surfaces    boxes, open tubes (cylinders and cone frusta), discs, spheres, hemispheres, tori,
                           each sampled uniformly by area, vectorised numpy.
  3. Synthetic categories  12 objects built from named parts (table, chair, lamp, airplane, mug, ...).
  4. Synthetic variants    "clean" (like OBJ-ONLY), "background" (like OBJ-BG), "perturbed" (like PB-T50-RS),
                           and the SyntheticShapes dataset.
  5. ShapeNet55            Point-BERT layout, pre-training.
  6. ModelNet40            modelnet40_normal_resampled txt files or Point-MAE's FPS cache (.dat).
  7. ModelNetFewShot       Point-BERT few-shot episodes ({way}way_{shot}shot/{fold}.pkl).
  8. ScanObjectNN          HDF5 files of the three variants.
  9. ShapeNetPart          part segmentation (16 categories, 50 parts).
 10. Augmentation          scale_and_translate (Point-MAE's only augmentation), batched torch.
 11. Demo                  python data.py [--out data_demo.png]

What every dataset returns
  classification:  (points FloatTensor (N, 3), label LongTensor ())
  segmentation:    (points FloatTensor (N, 3), category LongTensor (), parts LongTensor (N,))
  SyntheticShapes returns the segmentation triple for every variant (parts = -1 on background clutter), so the
  same synthetic data serves pre-training, classification (ignore parts) and part segmentation.

No equations of the paper live here. Paper -> code: "1,024 points" -> num_points=1024 (pre-training, ModelNet40),
"2,048 points" -> num_points=2048 (ScanObjectNN as stored, ShapeNetPart), n-way m-shot -> way, shot.

Shape legend: B batch, N points, M points stored in a file, 3 = xyz.
Conventions: y is the up axis (ShapeNet's convention); random object rotations turn about y.

Demo: `python data.py [--out data_demo.png]` prints one sample per synthetic category and variant, times the
generator (samples/s) and writes a picture of one sample per category plus the three variants of one shape.
"""

import argparse
import json
import math
import pickle
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


# ----------------------------------------------------------------------------------------------------------------
# 1. Shared helpers
# ----------------------------------------------------------------------------------------------------------------

def normalize_unit_sphere(points):
    """Centre a point cloud on its centroid and scale it into the unit sphere (Point-MAE's pc_normalize)."""
    # Subtract the mean of the points, not the bounding-box centre (Point-MAE pc_normalize).
    centered = points - points.mean(axis=0, keepdims=True)  # (N, 3)
    # The farthest point from the centroid ends up at distance exactly 1.
    radius = np.sqrt((centered ** 2).sum(axis=1)).max()
    # A cloud of identical points has radius 0: leave it at the origin instead of dividing by zero.
    return centered / radius if radius > 0 else centered


def _check_points(array, path, expected_columns, min_rows=1):
    """Raise a ValueError naming `path` unless `array` is a finite float table of shape (M, expected_columns)."""
    # Wrong rank or wrong number of columns: say what was found and what the reader expected.
    if array.ndim != 2 or array.shape[1] != expected_columns or array.shape[0] < min_rows:
        raise ValueError(
            f"{path}: expected an array of shape (M, {expected_columns}) with M >= {min_rows}, "
            f"found shape {tuple(array.shape)}.")
    # NaN or infinite coordinates would silently poison every loss downstream.
    finite = np.isfinite(array)
    if not finite.all():
        raise ValueError(
            f"{path} contains {int((~finite).sum())} NaN or infinite values; expected only finite numbers.")


def farthest_point_sample_numpy(points, num_samples, start_index=0):
    """Indices (num_samples,) of a farthest point sampling of points (N, 3), starting at `start_index`.

    Numpy twin of tokenizer.farthest_point_sample (batched torch). FPS is greedy, so the first k indices of a
    longer run are exactly a k-point FPS: that is why a prefix of Point-MAE's 8192-point cache is an FPS subsample.
    """
    # The loop runs over the samples (inherent to FPS); each step is vectorised over all N points.
    # Separate contiguous x, y, z arrays and in-place ufuncs: ~10x faster than reducing an (N, 3) array per step.
    coordinates = [np.ascontiguousarray(points[:, axis], dtype=np.float64) for axis in range(3)]  # 3 x (N,)
    selected = np.empty(num_samples, dtype=np.int64)  # (num_samples,)
    # Squared distance of every point to its nearest selected point so far.
    nearest_distance = np.full(points.shape[0], np.inf)  # (N,)
    distance, term = np.empty(points.shape[0]), np.empty(points.shape[0])  # (N,) scratch buffers
    current = start_index
    for step in range(num_samples):
        selected[step] = current
        # Squared distances to the point just selected shrink the running minimum.
        distance.fill(0.0)
        for axis_values in coordinates:
            np.subtract(axis_values, axis_values[current], out=term)
            distance += np.square(term, out=term)
        np.minimum(nearest_distance, distance, out=nearest_distance)
        # The next sample is the point farthest from all selected points (ties: lowest index).
        current = int(nearest_distance.argmax())
    return selected


def _resolve_root(root, markers, subfolders, dataset_name, layout):
    """Return the folder that holds one of `markers`: `root` itself or one of its usual subfolders."""
    root = Path(root)
    # Accept both the dataset folder itself and its parent (e.g. data/ or data/ShapeNet55-34/).
    for candidate in [root] + [root / name for name in subfolders]:
        if any((candidate / marker).exists() for marker in markers):
            return candidate
    raise FileNotFoundError(
        f"{dataset_name} data was not found under '{root}'. Expected layout: {layout}")


def _read_lines(path, dataset_name, layout):
    """Non-empty stripped lines of a list file; a missing file gives an error that shows the expected layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{dataset_name} list file '{path}' does not exist. Expected layout: {layout}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_text_table(path, expected_columns):
    """Read a text table of numbers separated by commas or spaces into float32 (M, C); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Point file '{path}' does not exist.")
    text = path.read_text()
    # Count the columns of the first line so that a table with the wrong width is reported, not reshaped.
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    num_columns = len(first_line.replace(",", " ").split())
    try:
        # Commas and whitespace both separate numbers (ModelNet40 uses commas, ShapeNetPart spaces).
        values = np.array(text.replace(",", " ").split(), dtype=np.float32)  # (M * C,)
    except ValueError as error:
        raise ValueError(f"{path} contains text that is not a number ({error}).") from None
    if num_columns == 0 or values.size % num_columns != 0:
        raise ValueError(
            f"{path}: expected {expected_columns} numbers on every line, found lines of different lengths.")
    table = values.reshape(-1, num_columns)  # (M, C)
    _check_points(table, path, expected_columns)
    return table


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and scalars but refuses every other global.

    The dataset caches (.dat, .pkl) are pickles; a plain pickle.load would run any code a tampered file names.
    NOTE(deviation): Point-MAE / Point-BERT use plain pickle.load; we accept only numpy arrays and scalars inside
    lists, tuples and dicts, which is all these files hold.
    """
    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        # numpy >= 1.25 also pickles dtypes as numpy.dtypes.<Name>DType classes.
        if (module, name) in self.ALLOWED or module == "numpy.dtypes":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'; only numpy arrays are expected")


def _load_numpy_pickle(path):
    """Load a pickle of lists, tuples, dicts and numpy arrays; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Pickle file '{path}' does not exist.")
    try:
        with open(path, "rb") as handle:
            return _NumpyOnlyUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as error:
        raise ValueError(f"{path} could not be read as a pickle of numpy arrays ({error}).") from None


def _to_tensors(points, *labels):
    """numpy points (N, 3) and integer labels -> (FloatTensor (N, 3), LongTensor ... )."""
    # torch.tensor copies, so a caller editing a sample in place never corrupts a dataset's in-memory cache.
    return (torch.tensor(np.asarray(points), dtype=torch.float32),
            *(torch.tensor(np.asarray(label), dtype=torch.long) for label in labels))


# ----------------------------------------------------------------------------------------------------------------
# 2. Primitive surfaces, sampled uniformly by area
# ----------------------------------------------------------------------------------------------------------------
# A primitive is a surface in its own local frame (axis of symmetry = local y), placed by a 3x3 linear map
# (a rotation, except the mirrored/squashed hemispheres of the "sphere" category) and an offset.
Primitive = namedtuple("Primitive", "kind params linear offset part")
IDENTITY = np.eye(3)


def _rotation(axis, angle):
    """3x3 rotation matrix by `angle` radians about the x, y or z axis (right-handed)."""
    cosine, sine = math.cos(angle), math.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, cosine, -sine], [0, sine, cosine]])
    if axis == "y":
        return np.array([[cosine, 0, sine], [0, 1, 0], [-sine, 0, cosine]])
    return np.array([[cosine, -sine, 0], [sine, cosine, 0], [0, 0, 1]])


def box(center, size, part, linear=IDENTITY):
    """Closed box surface with full edge lengths `size` = (sx, sy, sz)."""
    return Primitive("box", tuple(size), linear, np.asarray(center, dtype=float), part)


def tube(center, radius_bottom, radius_top, height, part, linear=IDENTITY):
    """Open lateral surface of a cone frustum along local y, centred: a cylinder when the radii are equal."""
    return Primitive("tube", (radius_bottom, radius_top, height), linear, np.asarray(center, dtype=float), part)


def disc(center, radius, part, inner_radius=0.0, linear=IDENTITY):
    """Flat disc (annulus when inner_radius > 0) in the local xz plane."""
    return Primitive("disc", (radius, inner_radius), linear, np.asarray(center, dtype=float), part)


def sphere(center, radius, part, linear=IDENTITY, upper_half_only=False):
    """Sphere surface, or only its upper half (local y >= 0, a dome open at the bottom)."""
    kind = "hemisphere" if upper_half_only else "sphere"
    return Primitive(kind, (radius,), linear, np.asarray(center, dtype=float), part)


def torus(center, major_radius, minor_radius, part, arc=(0.0, 2 * math.pi), tube_arc=(0.0, 2 * math.pi),
          linear=IDENTITY):
    """Torus lying in the local xz plane; `arc` limits the angle around y, `tube_arc` the angle around the tube."""
    params = (major_radius, minor_radius, *arc, *tube_arc)
    return Primitive("torus", params, linear, np.asarray(center, dtype=float), part)


def _area(primitive):
    """Surface area of a primitive in its local frame (exact for every kind)."""
    kind, params = primitive.kind, primitive.params
    if kind == "box":
        size_x, size_y, size_z = params
        return 2 * (size_x * size_y + size_y * size_z + size_z * size_x)
    if kind == "tube":
        radius_bottom, radius_top, height = params
        # Lateral area of a frustum: pi (r0 + r1) * slant height.
        return math.pi * (radius_bottom + radius_top) * math.hypot(height, radius_top - radius_bottom)
    if kind == "disc":
        return math.pi * (params[0] ** 2 - params[1] ** 2)
    if kind == "sphere":
        return 4 * math.pi * params[0] ** 2
    if kind == "hemisphere":
        return 2 * math.pi * params[0] ** 2
    # Torus patch: integral of r (R + r cos v) du dv over the two angle ranges.
    major, minor, arc_start, arc_end, tube_start, tube_end = params
    tube_integral = major * (tube_end - tube_start) + minor * (math.sin(tube_end) - math.sin(tube_start))
    return (arc_end - arc_start) * minor * tube_integral


def _sample_local(primitive, count, rng):
    """`count` points (count, 3) uniform on the primitive's surface, in its local frame."""
    kind, params = primitive.kind, primitive.params
    if kind == "box":
        half = np.asarray(params) / 2
        # Pick the axis of the face by area: two faces normal to x have area sy*sz each, and so on.
        face_area = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]])
        axis = np.searchsorted(np.cumsum(face_area) / face_area.sum(), rng.random(count))  # (count,)
        axis = np.minimum(axis, 2)  # guard against round-off at the top of the cumulative sum
        # Uniform inside the box, then pushed onto the chosen face (random side).
        points = (rng.random((count, 3)) * 2 - 1) * half  # (count, 3)
        side = np.where(rng.random(count) < 0.5, -1.0, 1.0)  # (count,)
        points[np.arange(count), axis] = side * half[axis]
        return points
    if kind == "tube":
        radius_bottom, radius_top, height = params
        # Area grows linearly with the radius along the axis, so r^2 is uniform between r0^2 and r1^2.
        radius = np.sqrt(radius_bottom ** 2 + rng.random(count) * (radius_top ** 2 - radius_bottom ** 2))
        if abs(radius_top - radius_bottom) > 1e-9:
            fraction = (radius - radius_bottom) / (radius_top - radius_bottom)  # position along the axis
        else:
            fraction = rng.random(count)  # a cylinder: uniform height
        angle = rng.random(count) * 2 * math.pi
        return np.stack([radius * np.cos(angle), (fraction - 0.5) * height, radius * np.sin(angle)], axis=1)
    if kind == "disc":
        outer, inner = params
        # Area inside radius r grows with r^2: sample r^2 uniformly.
        radius = np.sqrt(inner ** 2 + rng.random(count) * (outer ** 2 - inner ** 2))
        angle = rng.random(count) * 2 * math.pi
        return np.stack([radius * np.cos(angle), np.zeros(count), radius * np.sin(angle)], axis=1)
    if kind in ("sphere", "hemisphere"):
        # Normalised Gaussian vectors are uniform on the sphere.
        direction = rng.standard_normal((count, 3))  # (count, 3)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-12
        if kind == "hemisphere":
            direction[:, 1] = np.abs(direction[:, 1])  # fold the lower half onto the upper one
        return params[0] * direction
    # Torus: the area element is r (R + r cos v) du dv, so v is drawn by rejection against R + r.
    major, minor, arc_start, arc_end, tube_start, tube_end = params
    tube_angle = np.empty(0)
    while tube_angle.size < count:
        candidate = rng.uniform(tube_start, tube_end, 2 * count + 8)
        accept = rng.random(candidate.size) * (major + minor) < major + minor * np.cos(candidate)
        tube_angle = np.concatenate([tube_angle, candidate[accept]])
    tube_angle = tube_angle[:count]  # (count,)
    angle = rng.uniform(arc_start, arc_end, count)  # (count,)
    ring = major + minor * np.cos(tube_angle)  # distance from the y axis
    return np.stack([ring * np.cos(angle), minor * np.sin(tube_angle), ring * np.sin(angle)], axis=1)


def sample_surface(primitives, num_points, rng):
    """Sample num_points points on a union of primitives, proportionally to area.

    Returns points (N, 3) float64 and the `part` field of the primitive each point came from (N,) int64.
    """
    areas = np.array([_area(primitive) for primitive in primitives])  # (number of primitives,)
    # How many points each primitive receives: multinomial with probabilities proportional to area.
    counts = rng.multinomial(num_points, areas / areas.sum())
    chunks, part_chunks = [], []
    for primitive, count in zip(primitives, counts):
        if count == 0:
            continue
        local = _sample_local(primitive, count, rng)  # (count, 3)
        # Place the primitive: linear map, then offset.
        chunks.append(local @ primitive.linear.T + primitive.offset)  # (count, 3)
        part_chunks.append(np.full(count, primitive.part, dtype=np.int64))
    return np.concatenate(chunks), np.concatenate(part_chunks)  # (N, 3), (N,)


# ----------------------------------------------------------------------------------------------------------------
# 3. Synthetic categories: objects from named parts with random proportions
# ----------------------------------------------------------------------------------------------------------------
# NOTE(unspecified): the paper trains on real datasets only; these synthetic shapes are our stand-in so that every
# script runs and is tested with no download. They are not a benchmark.
# Every builder takes a numpy Generator and returns primitives standing on the floor y = 0, part = local index
# into the category's part names. Sizes are in rough metres; every sample is later normalised to the unit sphere.

def _build_table(rng):
    u = rng.uniform
    height, thickness = u(0.6, 0.85), u(0.03, 0.07)
    if rng.random() < 0.3:
        # Round table on a central pedestal.
        radius, stem, foot = u(0.45, 0.75), u(0.03, 0.07), u(0.2, 0.35)
        parts = [disc((0, height, 0), radius, 0), disc((0, height - thickness, 0), radius, 0),
                 tube((0, height - thickness / 2, 0), radius, radius, thickness, 0),
                 tube((0, (height - thickness) / 2, 0), stem, stem, height - thickness, 1),
                 disc((0, 0.01, 0), foot, 1)]
        return parts
    # Rectangular top on four legs, optionally joined by crossbars.
    width, depth, leg, inset = u(1.0, 1.8), u(0.6, 1.0), u(0.04, 0.09), u(0.0, 0.1)
    leg_height = height - thickness
    leg_x, leg_z = width / 2 - leg / 2 - inset, depth / 2 - leg / 2 - inset
    parts = [box((0, height - thickness / 2, 0), (width, thickness, depth), 0)]
    parts += [box((sx * leg_x, leg_height / 2, sz * leg_z), (leg, leg_height, leg), 1)
              for sx in (-1, 1) for sz in (-1, 1)]
    if rng.random() < 0.6:
        bar_y, bar = u(0.1, 0.35) * leg_height, 0.6 * leg
        parts += [box((0, bar_y, sz * leg_z), (2 * leg_x, bar, bar), 2) for sz in (-1, 1)]
        parts += [box((sx * leg_x, bar_y, 0), (bar, bar, 2 * leg_z), 2) for sx in (-1, 1)]
    return parts


def _build_chair(rng):
    u = rng.uniform
    seat_width, seat_depth, seat_thickness, seat_height = u(0.4, 0.6), u(0.4, 0.6), u(0.04, 0.08), u(0.38, 0.5)
    back_height, back_thickness, tilt, leg = u(0.4, 0.7), u(0.03, 0.06), u(0.0, 0.25), u(0.03, 0.06)
    parts = [box((0, seat_height - seat_thickness / 2, 0), (seat_width, seat_thickness, seat_depth), 0)]
    # The back leans backwards (towards -z) by `tilt` radians about the x axis.
    back_center = (0, seat_height + back_height / 2 * math.cos(tilt),
                   -seat_depth / 2 + back_thickness / 2 - back_height / 2 * math.sin(tilt))
    parts.append(box(back_center, (seat_width, back_height, back_thickness), 1, _rotation("x", -tilt)))
    leg_height = seat_height - seat_thickness
    leg_x, leg_z = seat_width / 2 - leg / 2, seat_depth / 2 - leg / 2
    parts += [box((sx * leg_x, leg_height / 2, sz * leg_z), (leg, leg_height, leg), 2)
              for sx in (-1, 1) for sz in (-1, 1)]
    if rng.random() < 0.5:
        # Armrests: a bar on each side resting on a front post.
        arm_height, arm_x = u(0.18, 0.26), seat_width / 2 - 0.025
        parts += [box((sx * arm_x, seat_height + arm_height, 0), (0.05, 0.03, seat_depth * 0.9), 3)
                  for sx in (-1, 1)]
        parts += [box((sx * arm_x, seat_height + arm_height / 2, seat_depth * 0.35), (0.03, arm_height, 0.03), 3)
                  for sx in (-1, 1)]
    return parts


def _build_lamp(rng):
    u = rng.uniform
    base_radius, base_height = u(0.12, 0.22), u(0.02, 0.06)
    pole_height, pole_radius = u(0.7, 1.3), u(0.012, 0.025)
    pole_top = base_height + pole_height
    parts = [tube((0, base_height / 2, 0), base_radius, base_radius, base_height, 0),
             disc((0, base_height, 0), base_radius, 0), disc((0, 0, 0), base_radius, 0),
             tube((0, base_height + pole_height / 2, 0), pole_radius, pole_radius, pole_height, 1)]
    if rng.random() < 0.7:
        # Conical shade, wide at the bottom, around the top of the pole.
        shade_height = u(0.2, 0.35)
        parts.append(tube((0, pole_top - 0.1 * shade_height, 0), u(0.2, 0.35), u(0.06, 0.15), shade_height, 2))
    else:
        # Dome shade open at the bottom.
        parts.append(sphere((0, pole_top - 0.05, 0), u(0.18, 0.3), 2, upper_half_only=True))
    return parts


def _build_airplane(rng):
    u = rng.uniform
    along_x = _rotation("z", math.pi / 2)  # turns a local-y tube into one along x (local -y -> +x, the nose)
    length, radius = u(1.3, 1.9), u(0.06, 0.1)
    nose_length, tail_length = u(0.1, 0.25), u(0.2, 0.4)
    # Body: cylinder, a nose cone at +x and a tapering tail cone at -x.
    parts = [tube((0, 0, 0), radius, radius, length, 0, along_x),
             tube((length / 2 + nose_length / 2, 0, 0), 0.01, radius, nose_length, 0, along_x),
             tube((-length / 2 - tail_length / 2, 0, 0), radius, 0.3 * radius, tail_length, 0, along_x)]
    # Wings: one swept box per side, tips swept backwards by `sweep` radians.
    half_span, chord, sweep, wing_x = u(0.5, 0.85), u(0.15, 0.3), u(0.0, 0.5), u(-0.15, 0.1) * length
    for side in (-1, 1):
        center = (wing_x - math.sin(sweep) * half_span / 2, -0.3 * radius,
                  side * (radius + math.cos(sweep) * half_span / 2))
        parts.append(box(center, (chord, 0.025, half_span), 1, _rotation("y", -side * sweep)))
    # Tail: two small swept stabilisers and a vertical fin leaning backwards.
    tail_x, tail_span, tail_chord = -length / 2 - 0.5 * tail_length, u(0.15, 0.3), u(0.08, 0.15)
    for side in (-1, 1):
        center = (tail_x - math.sin(sweep) * tail_span / 2, 0, side * (0.3 * radius + math.cos(sweep) * tail_span / 2))
        parts.append(box(center, (tail_chord, 0.02, tail_span), 2, _rotation("y", -side * sweep)))
    fin_height, lean = u(0.15, 0.3), u(0.2, 0.6)
    parts.append(box((tail_x - math.sin(lean) * fin_height / 2, 0.3 * radius + math.cos(lean) * fin_height / 2, 0),
                     (tail_chord * 1.3, fin_height, 0.02), 2, _rotation("z", lean)))
    # Engines: 2 or 4 nacelles under the wings (most airliners), none on some planes.
    if rng.random() < 0.8:
        engine_radius, engine_length = u(0.035, 0.055), u(0.15, 0.3)
        spans = (0.35,) if rng.random() < 0.6 else (0.3, 0.65)
        for side in (-1, 1):
            for fraction in spans:
                reach = fraction * half_span  # distance of the engine from the wing root
                center = (wing_x - math.sin(sweep) * reach + 0.3 * chord, -0.3 * radius - engine_radius - 0.02,
                          side * (radius + math.cos(sweep) * reach))
                parts.append(tube(center, engine_radius, engine_radius, engine_length, 3, along_x))
    return parts


def _build_mug(rng):
    u = rng.uniform
    radius, height, wall = u(0.3, 0.45), u(0.6, 1.0), 0.03
    # Body: outer and inner walls, bottom and rim, open at the top.
    parts = [tube((0, height / 2, 0), radius, radius, height, 0),
             tube((0, height / 2 + 0.02, 0), radius - wall, radius - wall, height - 0.04, 0),
             disc((0, 0, 0), radius, 0), disc((0, height, 0), radius, 0, inner_radius=radius - wall)]
    # Handle: half a torus standing in the xy plane, attached to the +x side.
    handle_radius, handle_thickness = u(0.2, 0.35) * height, u(0.025, 0.05)
    parts.append(torus((radius, height / 2, 0), handle_radius, handle_thickness, 1,
                       arc=(-math.pi / 2, math.pi / 2), linear=_rotation("x", math.pi / 2)))
    return parts


def _build_bottle(rng):
    u = rng.uniform
    radius, body_height, shoulder = u(0.18, 0.3), u(0.5, 0.9), u(0.1, 0.25)
    neck_radius, neck_height = u(0.25, 0.4) * radius, u(0.15, 0.35)
    cap_radius, cap_height = neck_radius * u(1.1, 1.3), u(0.05, 0.1)
    neck_top = body_height + shoulder + neck_height
    return [tube((0, body_height / 2, 0), radius, radius, body_height, 0), disc((0, 0, 0), radius, 0),
            tube((0, body_height + shoulder / 2, 0), radius, neck_radius, shoulder, 0),
            tube((0, body_height + shoulder + neck_height / 2, 0), neck_radius, neck_radius, neck_height, 1),
            tube((0, neck_top + cap_height / 2, 0), cap_radius, cap_radius, cap_height, 2),
            disc((0, neck_top + cap_height, 0), cap_radius, 2)]


def _build_bench(rng):
    u = rng.uniform
    length, depth, seat_thickness, seat_height = u(1.4, 2.2), u(0.35, 0.5), u(0.04, 0.08), u(0.4, 0.5)
    leg_height = seat_height - seat_thickness
    parts = [box((0, seat_height - seat_thickness / 2, 0), (length, seat_thickness, depth), 0)]
    end_x = length / 2 - u(0.05, 0.2)
    if rng.random() < 0.5:
        # Two solid end slabs.
        parts += [box((sx * end_x, leg_height / 2, 0), (0.05, leg_height, depth * 0.9), 1) for sx in (-1, 1)]
    else:
        # Four posts.
        parts += [box((sx * end_x, leg_height / 2, sz * (depth / 2 - 0.03)), (0.05, leg_height, 0.05), 1)
                  for sx in (-1, 1) for sz in (-1, 1)]
    if rng.random() < 0.6:
        # Backrest: 1-3 horizontal slats on two posts along the rear edge.
        slat_height, gap = u(0.06, 0.12), u(0.03, 0.08)
        slats = int(rng.integers(1, 4))
        back_height = slats * (slat_height + gap)
        parts += [box((0, seat_height + gap + slat_height / 2 + index * (slat_height + gap), -depth / 2 + 0.015),
                      (length, slat_height, 0.03), 2) for index in range(slats)]
        parts += [box((sx * end_x, seat_height + back_height / 2, -depth / 2 + 0.015), (0.04, back_height, 0.04), 2)
                  for sx in (-1, 1)]
    return parts


def _build_sphere(rng):
    # Two hemispheres squashed or stretched along y by the same factor (the lower one mirrored).
    # The linear map changes both areas alike, so the split of points between the halves stays fair.
    squash = rng.uniform(0.75, 1.25)
    return [sphere((0, 0, 0), 1.0, 0, np.diag([1.0, squash, 1.0]), upper_half_only=True),
            sphere((0, 0, 0), 1.0, 1, np.diag([1.0, -squash, 1.0]), upper_half_only=True)]


def _build_box(rng):
    u = rng.uniform
    width, height, depth, lid = u(0.5, 1.5), u(0.4, 1.2), u(0.5, 1.5), u(0.03, 0.08)
    return [box((0, height / 2, 0), (width, height, depth), 0),
            box((0, height + lid / 2, 0), (width * 1.04, lid, depth * 1.04), 1)]


def _build_cylinder(rng):
    radius, height = rng.uniform(0.25, 0.6), rng.uniform(0.5, 1.5)
    return [tube((0, height / 2, 0), radius, radius, height, 0),
            disc((0, 0, 0), radius, 1), disc((0, height, 0), radius, 1)]


def _build_cone(rng):
    radius, height = rng.uniform(0.3, 0.6), rng.uniform(0.6, 1.4)
    return [tube((0, height / 2, 0), radius, rng.uniform(0.0, 0.05), height, 0), disc((0, 0, 0), radius, 1)]


def _build_torus(rng):
    # A ring lying flat; its upper and lower halves (around the tube) are the two parts.
    minor = rng.uniform(0.15, 0.45)
    return [torus((0, 0, 0), 1.0, minor, 0, tube_arc=(0.0, math.pi)),
            torus((0, 0, 0), 1.0, minor, 1, tube_arc=(math.pi, 2 * math.pi))]


# Category name -> (builder, part names). The order fixes the class labels 0..11.
_CATEGORY_TABLE = {
    "table": (_build_table, ("top", "legs", "crossbars")),
    "chair": (_build_chair, ("seat", "back", "legs", "armrests")),
    "lamp": (_build_lamp, ("base", "pole", "shade")),
    "airplane": (_build_airplane, ("body", "wings", "tail", "engines")),
    "mug": (_build_mug, ("body", "handle")),
    "bottle": (_build_bottle, ("body", "neck", "cap")),
    "bench": (_build_bench, ("seat", "legs", "backrest")),
    "sphere": (_build_sphere, ("upper half", "lower half")),
    "box": (_build_box, ("body", "lid")),
    "cylinder": (_build_cylinder, ("side", "caps")),
    "cone": (_build_cone, ("side", "base")),
    "torus": (_build_torus, ("upper half", "lower half")),
}
SYNTHETIC_CATEGORIES = tuple(_CATEGORY_TABLE)
SYNTHETIC_PART_NAMES = {name: parts for name, (_, parts) in _CATEGORY_TABLE.items()}
# (first global part label, number of parts) per category: contiguous ranges, like ShapeNetPart.
SYNTHETIC_PART_RANGES = []
for _parts in SYNTHETIC_PART_NAMES.values():
    SYNTHETIC_PART_RANGES.append((sum(count for _, count in SYNTHETIC_PART_RANGES), len(_parts)))
SYNTHETIC_NUM_PARTS = sum(count for _, count in SYNTHETIC_PART_RANGES)


# ----------------------------------------------------------------------------------------------------------------
# 4. Synthetic variants and the SyntheticShapes dataset
# ----------------------------------------------------------------------------------------------------------------
SYNTHETIC_VARIANTS = ("clean", "background", "perturbed")
SYNTHETIC_SPLITS = {"train": 0, "test": 1, "val": 2}  # split -> id mixed into the seed
SYNTHETIC_DEFAULT_SIZES = {"train": 2048, "test": 512, "val": 512}


def _background_clutter(object_points, count, rng, max_margin):
    """`count` clutter points in the object's bounding box, grown on each axis by 5% to `max_margin` of its size:
    the floor under the object, 1-2 wall fragments on the box's sides and sometimes a small neighbouring object.

    Mimics ScanObjectNN, whose objects are cut out of scanned rooms with their bounding box, so the background is
    what lies inside that box (OBJ-BG) or inside a box shifted by up to half its size (PB-T50-RS).
    """
    u = rng.uniform
    low, high = object_points.min(axis=0), object_points.max(axis=0)  # (3,) bounding box of the object
    margin = (high - low) * rng.uniform(0.05, max_margin, 3)  # (3,)
    low, high = low - margin, high + margin
    size, center = high - low, (low + high) / 2  # (3,), (3,)
    floor_y = object_points[:, 1].min() - u(0.0, 0.02)  # the object stands on the floor
    pieces = [box((center[0], floor_y - 0.005, center[2]), (size[0], 0.01, size[2]), -1)]
    for side in rng.choice(4, int(rng.integers(1, 3)), replace=False):
        # A wall fragment on one side of the box: sides 0, 1 are at low / high x, sides 2, 3 at low / high z.
        height, coverage = u(0.4, 1.0) * (high[1] - floor_y), u(0.5, 1.0)
        if side < 2:
            wall_x = low[0] if side == 0 else high[0]
            pieces.append(box((wall_x, floor_y + height / 2, center[2]), (0.01, height, coverage * size[2]), -1))
        else:
            wall_z = low[2] if side == 2 else high[2]
            pieces.append(box((center[0], floor_y + height / 2, wall_z), (coverage * size[0], height, 0.01), -1))
    if rng.random() < 0.3:
        # A small neighbouring object standing in a corner of the box.
        side = u(0.1, 0.25) * size.max()
        corner_x, corner_z = rng.choice([low[0], high[0]]), rng.choice([low[2], high[2]])
        pieces.append(box((corner_x, floor_y + side / 2, corner_z), (side, side, side), -1))
    points, _ = sample_surface(pieces, count, rng)  # (count, 3)
    return points


def _cut_away(points, object_mask, rng, removed_fraction):
    """Boolean keep-mask (N,) that removes everything beyond a random plane cutting off `removed_fraction` of the
    object points (and whatever clutter lies beyond it), like PB-T50-RS's shifted bounding boxes."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    projection = points @ direction  # (N,)
    # The plane sits at the quantile of the object's projections that leaves 1 - removed_fraction of it.
    threshold = np.quantile(projection[object_mask], 1.0 - removed_fraction)
    return projection <= threshold  # (N,)


def synthetic_sample(category, num_points, variant, rng):
    """One synthetic shape: points (N, 3) float32 and global part labels (N,) int64 (-1 on clutter).

    The object's proportions and yaw are drawn first from `rng`, so the three variants of one (seed, split, index)
    show the same object.
    """
    builder, _ = _CATEGORY_TABLE[SYNTHETIC_CATEGORIES[category]]
    first_part = SYNTHETIC_PART_RANGES[category][0]
    primitives = builder(rng)
    yaw = rng.uniform(0, 2 * math.pi)  # random rotation about the up axis (y)
    # NOTE(unspecified): the perturbed variant oversamples 2.5x so that at least N points survive the cut.
    total = int(math.ceil(2.5 * num_points)) if variant == "perturbed" else num_points
    # 20-35% of the points are background clutter in the two scan-like variants.
    clutter_count = 0 if variant == "clean" else int(round(rng.uniform(0.2, 0.35) * total))
    points, parts = sample_surface(primitives, total - clutter_count, rng)  # (No, 3), (No,)
    points = normalize_unit_sphere(points @ _rotation("y", yaw).T)  # (No, 3)
    parts = parts + first_part  # local -> global part labels
    if variant != "clean":
        # PB-T50-RS shifts the box by up to half its size, so the perturbed variant gets a wider margin.
        # NOTE(unspecified): clutter = 20-35% of the points, inside the object's box grown by up to 20% (background)
        # or 40% (perturbed) per axis; the figures only aim at scans that look like ScanObjectNN's.
        max_margin = 0.4 if variant == "perturbed" else 0.2
        clutter = _background_clutter(points, clutter_count, rng, max_margin)  # (Nc, 3)
        points = np.concatenate([points, clutter])  # (No + Nc, 3)
        parts = np.concatenate([parts, np.full(clutter_count, -1, dtype=np.int64)])
        # Scanner noise on every point of the scan-like variants.
        points = points + rng.normal(0.0, 0.005, points.shape)
    if variant == "background":
        # Object and clutter together in the unit sphere.
        points = normalize_unit_sphere(points)
    if variant == "perturbed":
        # Cut away 10-30% of the object, then keep N random survivors.
        keep = _cut_away(points, parts >= 0, rng, rng.uniform(0.1, 0.3))  # (total,)
        survivors = np.flatnonzero(keep)
        chosen = rng.choice(survivors, num_points, replace=survivors.size < num_points)  # (N,)
        points, parts = points[chosen], parts[chosen]  # (N, 3), (N,)
        # Small tilt about x and z (up to 10 degrees), scaling and translation, applied after normalisation.
        # NOTE(unspecified): perturbed samples are NOT renormalised afterwards, so the shift and scale survive
        # (Point-MAE feeds ScanObjectNN points as stored, without normalising them).
        tilt = _rotation("x", rng.uniform(-0.17, 0.17)) @ _rotation("z", rng.uniform(-0.17, 0.17))
        scale = rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, 3)  # isotropic times a little per-axis
        points = (points @ tilt.T) * scale + rng.uniform(-0.15, 0.15, 3)  # (N, 3)
    # Shuffle so that point order carries no information about the parts.
    order = rng.permutation(points.shape[0])  # (N,)
    return points[order].astype(np.float32), parts[order]


class SyntheticShapes(Dataset):
    """Built-in synthetic point clouds: 12 categories with part labels, generated on the fly, no files.

    Sample i of a split is a pure function of (seed, split, i) (plus num_points and variant): numpy's Generator
    seeded with [seed, split_id, i]; the object's proportions and yaw depend on (seed, split, i) alone, so the
    variants of one index show the same object. Label = i % 12, so the classes are balanced.
    Variants: "clean" (object only, like OBJ-ONLY), "background" (object plus floor and wall clutter, like OBJ-BG),
    "perturbed" (clutter, a random part cut away, tilt, scale and shift, like PB-T50-RS).
    Returns (points (N, 3), label (), parts (N,)) with parts = -1 on clutter points.
    """

    def __init__(self, split="train", num_points=1024, size=None, seed=0, variant="clean"):
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"split must be one of {sorted(SYNTHETIC_SPLITS)}, found '{split}'.")
        if variant not in SYNTHETIC_VARIANTS:
            raise ValueError(f"variant must be one of {SYNTHETIC_VARIANTS}, found '{variant}'.")
        if seed < 0 or num_points < 1:
            raise ValueError(f"seed must be >= 0 and num_points >= 1, found seed={seed}, num_points={num_points}.")
        self.split, self.num_points, self.seed, self.variant = split, num_points, seed, variant
        # NOTE(unspecified): default sizes 2048 train / 512 test and val: big enough to learn, fast on a CPU.
        self.size = SYNTHETIC_DEFAULT_SIZES[split] if size is None else size
        self.categories = SYNTHETIC_CATEGORIES
        self.num_classes = len(SYNTHETIC_CATEGORIES)
        self.part_ranges = list(SYNTHETIC_PART_RANGES)
        self.num_parts = SYNTHETIC_NUM_PARTS

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is out of range for a SyntheticShapes split of size {self.size}.")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, SYNTHETIC_SPLITS[self.split], index])
        points, parts = synthetic_sample(label, self.num_points, self.variant, rng)  # (N, 3), (N,)
        return _to_tensors(points, label, parts)


# ----------------------------------------------------------------------------------------------------------------
# 5. ShapeNet55 (pre-training, Point-BERT layout)
# ----------------------------------------------------------------------------------------------------------------
SHAPENET55_LAYOUT = ("ROOT/ShapeNet-55/train.txt and test.txt (one '<synset>-<model>.npy' name per line) and "
                     "ROOT/shapenet_pc/<synset>-<model>.npy (8192 x 3 float each); ROOT may also be the parent "
                     "of a ShapeNet55-34/ folder.")


class ShapeNet55(Dataset):
    """ShapeNet55 point clouds: a random num_points subset of the 8192 stored points, then unit-sphere normalised.

    Label = index of the synset (file-name prefix) in the sorted list of synsets found in train.txt + test.txt.
    The subset uses torch's global RNG, so DataLoader workers and torch.manual_seed control it.
    """

    def __init__(self, root, split="train", num_points=1024):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', found '{split}'.")
        self.root = _resolve_root(root, ["ShapeNet-55"], ["ShapeNet55-34", "ShapeNet55"], "ShapeNet55",
                                  SHAPENET55_LAYOUT)
        self.num_points = num_points
        lists = {name: _read_lines(self.root / "ShapeNet-55" / f"{name}.txt", "ShapeNet55", SHAPENET55_LAYOUT)
                 for name in ("train", "test")}
        if not (self.root / "shapenet_pc").is_dir():
            raise FileNotFoundError(
                f"ShapeNet55 folder '{self.root / 'shapenet_pc'}' does not exist. Expected layout: {SHAPENET55_LAYOUT}")
        # The synset is the part of the file name before the first '-'.
        self.categories = sorted({name.split("-")[0] for names in lists.values() for name in names})
        synset_index = {synset: index for index, synset in enumerate(self.categories)}
        self.num_classes = len(self.categories)
        self.file_names = lists[split]
        self.labels = [synset_index[name.split("-")[0]] for name in self.file_names]

    def __len__(self):
        return len(self.file_names)

    def __getitem__(self, index):
        path = self.root / "shapenet_pc" / self.file_names[index]
        if not path.is_file():
            raise FileNotFoundError(f"ShapeNet55 point cloud '{path}' is listed but missing. "
                                    f"Expected layout: {SHAPENET55_LAYOUT}")
        try:
            stored = np.load(path, allow_pickle=False)  # (M, 3), M = 8192
        except (ValueError, OSError) as error:
            raise ValueError(f"{path} could not be read as a .npy array ({error}).") from None
        _check_points(stored, path, 3, min_rows=self.num_points)
        # Point-BERT / Point-MAE: a random subset first, normalisation second.
        subset = torch.randperm(stored.shape[0])[:self.num_points].numpy()  # (N,)
        return _to_tensors(normalize_unit_sphere(stored[subset].astype(np.float64)), self.labels[index])


# ----------------------------------------------------------------------------------------------------------------
# 6. ModelNet40 (txt files or Point-MAE's FPS cache)
# ----------------------------------------------------------------------------------------------------------------
MODELNET40_LAYOUT = ("ROOT/modelnet40_shape_names.txt, ROOT/modelnet40_{train,test}.txt (ids like airplane_0001) "
                     "and ROOT/<class>/<id>.txt (10000 lines 'x,y,z,nx,ny,nz'), or Point-MAE's cache "
                     "ROOT/modelnet40_{train,test}_8192pts_fps.dat; ROOT may also be the parent of "
                     "modelnet40_normal_resampled/.")


class ModelNet40(Dataset):
    """ModelNet40 shapes: the first num_points of a farthest point sampling, xyz only, unit-sphere normalised.

    Reads Point-MAE's cache modelnet40_{split}_8192pts_fps.dat when it is in the folder (already FPS-ordered, so
    its prefix is an FPS subsample); otherwise the txt files, running a numpy FPS once per shape.
    Decoded shapes are cached in memory per dataset instance.
    """

    def __init__(self, root, split="train", num_points=1024):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', found '{split}'.")
        cache_name = f"modelnet40_{split}_8192pts_fps.dat"
        self.root = _resolve_root(root, [cache_name, "modelnet40_shape_names.txt"],
                                  ["modelnet40_normal_resampled", "ModelNet/modelnet40_normal_resampled"],
                                  "ModelNet40", MODELNET40_LAYOUT)
        self.split, self.num_points, self.num_classes = split, num_points, 40
        self._cache = {}  # index -> normalised (N, 3) float32
        names_path = self.root / "modelnet40_shape_names.txt"
        self.categories = _read_lines(names_path, "ModelNet40", MODELNET40_LAYOUT) if names_path.is_file() else None
        self.cache_path = self.root / cache_name
        if self.cache_path.is_file():
            # Point-MAE's cache: pickle of [list of (8192, 6) arrays, list of (1,) label arrays].
            content = _load_numpy_pickle(self.cache_path)
            if not (isinstance(content, (list, tuple)) and len(content) == 2 and len(content[0]) == len(content[1])):
                raise ValueError(f"{self.cache_path}: expected a pickle of [list of point arrays, list of labels] "
                                 f"of equal length, found {type(content).__name__}.")
            self.stored_points = list(content[0])
            self.labels = [int(np.asarray(label).reshape(-1)[0]) for label in content[1]]
            self.paths = None
        else:
            self.stored_points = None
            if self.categories is None:
                raise FileNotFoundError(f"ModelNet40 file '{names_path}' does not exist. Layout: {MODELNET40_LAYOUT}")
            ids = _read_lines(self.root / f"modelnet40_{split}.txt", "ModelNet40", MODELNET40_LAYOUT)
            class_index = {name: index for index, name in enumerate(self.categories)}
            # The class is the id without its trailing _NNNN ('night_stand_0001' -> 'night_stand').
            class_names = [shape_id.rsplit("_", 1)[0] for shape_id in ids]
            unknown = sorted(set(class_names) - set(class_index))
            if unknown:
                raise ValueError(f"{self.root / f'modelnet40_{split}.txt'} names classes missing from "
                                 f"{names_path}: {unknown[:5]}.")
            self.paths = [self.root / name / f"{shape_id}.txt" for name, shape_id in zip(class_names, ids)]
            self.labels = [class_index[name] for name in class_names]

    def __len__(self):
        return len(self.labels)

    def _decode(self, index):
        """Normalised (N, 3) float32 points of shape `index`."""
        if self.stored_points is not None:
            stored = np.asarray(self.stored_points[index])  # (8192, 6), already FPS-ordered
            _check_points(stored, f"{self.cache_path} (entry {index})", 6, min_rows=self.num_points)
            sampled = stored[:self.num_points, :3]  # (N, 3) prefix of an FPS = an FPS subsample
        else:
            stored = _read_text_table(self.paths[index], 6)  # (10000, 6)
            if stored.shape[0] < self.num_points:
                raise ValueError(f"{self.paths[index]}: expected at least {self.num_points} points, "
                                 f"found {stored.shape[0]}.")
            # NOTE(deviation): Point-MAE starts FPS at a random point; we start at point 0 so loading is
            # deterministic (the .dat cache keeps whatever start it was built with).
            xyz = stored[:, :3].astype(np.float64)  # (M, 3)
            sampled = xyz[farthest_point_sample_numpy(xyz, self.num_points)]  # (N, 3)
        return normalize_unit_sphere(sampled.astype(np.float64)).astype(np.float32)

    def __getitem__(self, index):
        if index not in self._cache:
            self._cache[index] = self._decode(index)
        return _to_tensors(self._cache[index], self.labels[index])


# ----------------------------------------------------------------------------------------------------------------
# 7. ModelNet40 few-shot episodes (Point-BERT layout)
# ----------------------------------------------------------------------------------------------------------------
FEWSHOT_LAYOUT = ("ROOT/{way}way_{shot}shot/{fold}.pkl (e.g. ROOT/5way_10shot/0.pkl), each a dict "
                  "{'train': [...], 'test': [...]} of (points (8192, 6), episode label, ModelNet40 label); "
                  "ROOT may also be the parent of ModelNetFewshot/.")


class ModelNetFewShot(Dataset):
    """One n-way m-shot fold: first num_points points, xyz, unit-sphere normalised; label = episode label."""

    def __init__(self, root, way, shot, fold, split="train", num_points=1024):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', found '{split}'.")
        setting = f"{way}way_{shot}shot"
        self.root = _resolve_root(root, [setting], ["ModelNetFewshot"], "ModelNet40 few-shot", FEWSHOT_LAYOUT)
        self.path = self.root / setting / f"{fold}.pkl"
        if not self.path.is_file():
            raise FileNotFoundError(f"Few-shot fold '{self.path}' does not exist. Expected layout: {FEWSHOT_LAYOUT}")
        content = _load_numpy_pickle(self.path)
        if not (isinstance(content, dict) and split in content):
            raise ValueError(f"{self.path}: expected a dict with keys 'train' and 'test', "
                             f"found {type(content).__name__} {sorted(content) if isinstance(content, dict) else ''}.")
        self.items, self.num_points, self.num_classes = list(content[split]), num_points, way
        self.split = split

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        where = f"{self.path} ('{self.split}' entry {index})"
        item = self.items[index]
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            raise ValueError(f"{where}: expected a tuple (points, episode label, original label).")
        stored, label = np.asarray(item[0]), int(item[1])  # (8192, 6)
        _check_points(stored, where, 6, min_rows=self.num_points)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{where}: episode label {label} is outside 0..{self.num_classes - 1}.")
        points = normalize_unit_sphere(stored[:self.num_points, :3].astype(np.float64))  # (N, 3)
        return _to_tensors(points, label)


# ----------------------------------------------------------------------------------------------------------------
# 8. ScanObjectNN (HDF5)
# ----------------------------------------------------------------------------------------------------------------
# variant -> (folder, training file, test file) inside the ScanObjectNN download (h5_files/).
SCANOBJECTNN_FILES = {
    "obj_bg": ("main_split", "training_objectdataset.h5", "test_objectdataset.h5"),
    "obj_only": ("main_split_nobg", "training_objectdataset.h5", "test_objectdataset.h5"),
    "pb_t50_rs": ("main_split", "training_objectdataset_augmentedrot_scale75.h5",
                  "test_objectdataset_augmentedrot_scale75.h5"),
}
# ScanObjectNN's label order (its shape_names.txt).
SCANOBJECTNN_CATEGORIES = ("bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
                           "bed", "pillow", "sink", "sofa", "toilet")


class ScanObjectNN(Dataset):
    """ScanObjectNN: points exactly as stored (N = 2048, Point-MAE does not normalise them), 15 classes.

    root is the folder holding main_split/ and main_split_nobg/ (or h5_files/ above them, or the split folder
    itself). NOTE(unspecified): like Point-MAE, the training split shuffles the point order on every access
    (torch RNG), so FPS starting at point 0 starts at a random point; set shuffle_points=False to disable.
    """

    def __init__(self, root, variant="obj_bg", split="train", shuffle_points=None):
        if variant not in SCANOBJECTNN_FILES:
            raise ValueError(f"variant must be one of {sorted(SCANOBJECTNN_FILES)}, found '{variant}'.")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', found '{split}'.")
        import h5py  # imported here so that the rest of the file works without it
        folder, train_file, test_file = SCANOBJECTNN_FILES[variant]
        file_name = train_file if split == "train" else test_file
        root = Path(root)
        candidates = [root / folder / file_name, root / "h5_files" / folder / file_name]
        if root.name == folder:
            candidates.append(root / file_name)  # root already is main_split/ or main_split_nobg/
        self.path = next((path for path in candidates if path.is_file()), candidates[0])
        if not self.path.is_file():
            raise FileNotFoundError(f"ScanObjectNN file '{candidates[0]}' does not exist (variant '{variant}', "
                                    f"split '{split}'); download ScanObjectNN and pass the folder holding {folder}/.")
        with h5py.File(self.path, "r") as handle:
            if "data" not in handle or "label" not in handle:
                raise ValueError(f"{self.path}: expected HDF5 keys 'data' and 'label', found {sorted(handle)}.")
            self.points = np.asarray(handle["data"][:], dtype=np.float32)  # (S, 2048, 3)
            self.labels = np.asarray(handle["label"][:]).reshape(-1).astype(np.int64)  # (S,)
        if self.points.ndim != 3 or self.points.shape[2] != 3 or self.points.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.path}: expected 'data' of shape (S, 2048, 3) and 'label' of shape (S,), "
                             f"found {self.points.shape} and {self.labels.shape}.")
        if not np.isfinite(self.points).all():
            raise ValueError(f"{self.path} contains NaN or infinite values in 'data'; expected only finite numbers.")
        if self.labels.size and not (0 <= self.labels.min() and self.labels.max() < 15):
            raise ValueError(f"{self.path}: expected labels in 0..14, found {self.labels.min()}..{self.labels.max()}.")
        self.variant, self.split, self.num_classes = variant, split, 15
        self.categories = SCANOBJECTNN_CATEGORIES
        self.shuffle_points = split == "train" if shuffle_points is None else shuffle_points

    def __len__(self):
        return self.labels.shape[0]

    def __getitem__(self, index):
        points = torch.tensor(self.points[index])  # (N, 3), a copy of the stored points
        if self.shuffle_points:
            points = points[torch.randperm(points.shape[0])]  # (N, 3) same set, random order
        return points, torch.tensor(self.labels[index], dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# 9. ShapeNetPart (part segmentation)
# ----------------------------------------------------------------------------------------------------------------
SHAPENETPART_LAYOUT = ("ROOT/synsetoffset2category.txt ('<Category> <synset>' per line), "
                       "ROOT/train_test_split/shuffled_{train,val,test}_file_list.json (lists of "
                       "'shape_data/<synset>/<id>') and ROOT/<synset>/<id>.txt (lines 'x y z nx ny nz part'); "
                       "ROOT may also be the parent of shapenetcore_partanno_segmentation_benchmark_v0_normal/.")
SHAPENETPART_CATEGORIES = ("Airplane", "Bag", "Cap", "Car", "Chair", "Earphone", "Guitar", "Knife", "Lamp",
                           "Laptop", "Motorbike", "Mug", "Pistol", "Rocket", "Skateboard", "Table")
# (first part label, number of parts) per category, in the order above: 50 part labels in all.
SHAPENETPART_PART_RANGES = [(0, 4), (4, 2), (6, 2), (8, 4), (12, 4), (16, 3), (19, 3), (22, 2), (24, 4), (28, 2),
                            (30, 6), (36, 2), (38, 3), (41, 3), (44, 3), (47, 3)]
SHAPENETPART_NUM_PARTS = 50


class ShapeNetPart(Dataset):
    """ShapeNetPart shapes: unit-sphere normalised, resampled to num_points (torch RNG), global part labels.

    train = the official train + val lists (Point-MAE), test = the test list. Decoded files are cached.
    """

    def __init__(self, root, split="train", num_points=2048):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' (train + val) or 'test', found '{split}'.")
        self.root = _resolve_root(root, ["synsetoffset2category.txt"],
                                  ["shapenetcore_partanno_segmentation_benchmark_v0_normal"], "ShapeNetPart",
                                  SHAPENETPART_LAYOUT)
        category_path = self.root / "synsetoffset2category.txt"
        rows = [line.split() for line in _read_lines(category_path, "ShapeNetPart", SHAPENETPART_LAYOUT)]
        synset_by_name = {row[0]: row[1] for row in rows if len(row) == 2}
        if tuple(sorted(synset_by_name)) != SHAPENETPART_CATEGORIES:
            raise ValueError(f"{category_path}: expected the 16 ShapeNetPart categories {SHAPENETPART_CATEGORIES}, "
                             f"found {sorted(synset_by_name)}.")
        # Categories sorted by name; label = position, so the standard part ranges apply.
        category_by_synset = {synset_by_name[name]: index for index, name in enumerate(SHAPENETPART_CATEGORIES)}
        self.files, self.category_labels = [], []
        for list_name in (("train", "val") if split == "train" else ("test",)):
            list_path = self.root / "train_test_split" / f"shuffled_{list_name}_file_list.json"
            if not list_path.is_file():
                raise FileNotFoundError(f"ShapeNetPart list '{list_path}' does not exist. "
                                        f"Expected layout: {SHAPENETPART_LAYOUT}")
            for entry in json.loads(list_path.read_text()):
                # Entries look like 'shape_data/<synset>/<id>'.
                synset, shape_id = entry.split("/")[-2:]
                if synset not in category_by_synset:
                    raise ValueError(f"{list_path}: entry '{entry}' names synset {synset}, which is not in "
                                     f"{category_path}.")
                self.files.append(self.root / synset / f"{shape_id}.txt")
                self.category_labels.append(category_by_synset[synset])
        self.num_points, self.split = num_points, split
        self.categories, self.num_classes = SHAPENETPART_CATEGORIES, len(SHAPENETPART_CATEGORIES)
        self.part_ranges, self.num_parts = list(SHAPENETPART_PART_RANGES), SHAPENETPART_NUM_PARTS
        self._cache = {}  # index -> (normalised points (M, 3) float32, parts (M,) int64)

    def __len__(self):
        return len(self.files)

    def _decode(self, index):
        path, category = self.files[index], self.category_labels[index]
        if not path.is_file():
            raise FileNotFoundError(f"ShapeNetPart shape '{path}' is listed but missing. "
                                    f"Expected layout: {SHAPENETPART_LAYOUT}")
        table = _read_text_table(path, 7)  # (M, 7)
        parts = np.rint(table[:, 6]).astype(np.int64)  # (M,) global part labels 0..49
        first, count = SHAPENETPART_PART_RANGES[category]
        if parts.min() < first or parts.max() >= first + count:
            raise ValueError(f"{path}: expected part labels {first}..{first + count - 1} for category "
                             f"{SHAPENETPART_CATEGORIES[category]}, found {parts.min()}..{parts.max()}.")
        # Point-MAE (PartNormalDataset): normalise the whole file first, then resample.
        points = normalize_unit_sphere(table[:, :3].astype(np.float64)).astype(np.float32)  # (M, 3)
        return points, parts

    def __getitem__(self, index):
        if index not in self._cache:
            self._cache[index] = self._decode(index)
        points, parts = self._cache[index]  # (M, 3), (M,)
        stored = points.shape[0]
        # NOTE(deviation): Point-MAE always draws the N points with replacement. We draw without replacement when
        # the file has at least N points; otherwise we keep every stored point once and draw only the missing
        # N - M with replacement, so no stored point is lost and none is repeated needlessly.
        if stored >= self.num_points:
            chosen = torch.randperm(stored)[:self.num_points]  # (N,) without replacement
        else:
            chosen = torch.cat([torch.randperm(stored), torch.randint(stored, (self.num_points - stored,))])  # (N,)
        chosen = chosen.numpy()
        return _to_tensors(points[chosen], self.category_labels[index], parts[chosen])


# ----------------------------------------------------------------------------------------------------------------
# 10. Augmentation
# ----------------------------------------------------------------------------------------------------------------

def scale_and_translate(points, generator=None):
    """Point-MAE's augmentation: per shape and axis, scale by U[2/3, 3/2] then shift by U[-0.2, 0.2].

    points (B, N, 3) -> (B, N, 3), on points.device. `generator` (optional) is a torch.Generator; the random
    numbers are drawn on its device and moved to the points.
    """
    batch = points.shape[0]
    device = generator.device if generator is not None else points.device
    # One scale and one shift per shape and axis, broadcast over the N points.
    scale = torch.rand(batch, 1, 3, generator=generator, device=device) * (1.5 - 2 / 3) + 2 / 3  # (B, 1, 3)
    shift = torch.rand(batch, 1, 3, generator=generator, device=device) * 0.4 - 0.2  # (B, 1, 3)
    scale, shift = scale.to(points.device, points.dtype), shift.to(points.device, points.dtype)
    return points * scale + shift  # (B, N, 3)


# ----------------------------------------------------------------------------------------------------------------
# 11. Demo
# ----------------------------------------------------------------------------------------------------------------
_PART_COLORS = [(230, 80, 60), (60, 130, 220), (70, 180, 90), (240, 170, 40), (160, 90, 200), (40, 190, 190)]


def _draw_panel(points, parts, first_part, title, size=220):
    """Orthographic view of points (N, 3) from the front-right and above, coloured by part (clutter grey)."""
    from PIL import Image, ImageDraw
    # Turn the cloud 35 degrees about y, then tilt it 20 degrees towards the viewer (who looks down -z).
    view = _rotation("x", math.radians(20)) @ _rotation("y", math.radians(35))
    projected = points.astype(np.float64) @ view.T  # (N, 3)
    order = np.argsort(projected[:, 2])  # far points first, near points drawn on top
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    # Fit the whole cloud: perturbed shapes leave the unit sphere.
    scale = size / 2 / max(1.1, np.abs(projected[:, :2]).max() + 0.05)
    near, far = projected[:, 2].max(), projected[:, 2].min()
    for index in order:
        x, y, depth = projected[index]
        column, row = size / 2 + x * scale, size / 2 - y * scale + 8
        part = int(parts[index])
        color = (150, 150, 150) if part < 0 else _PART_COLORS[(part - first_part) % len(_PART_COLORS)]
        shade = 0.55 + 0.45 * (depth - far) / max(near - far, 1e-9)  # nearer = brighter
        draw.ellipse([column - 1.5, row - 1.5, column + 1.5, row + 1.5], fill=tuple(int(c * shade) for c in color))
    draw.text((6, 4), title, fill=(0, 0, 0))
    return image


def main():
    parser = argparse.ArgumentParser(description="Show and time the synthetic shapes.")
    parser.add_argument("--out", default="data_demo.png", help="where to write the picture")
    parser.add_argument("--num-points", type=int, default=1024)
    args = parser.parse_args()
    from PIL import Image

    print(f"{len(SYNTHETIC_CATEGORIES)} categories, {SYNTHETIC_NUM_PARTS} part labels; up axis = y")
    datasets = {variant: SyntheticShapes("train", args.num_points, variant=variant) for variant in SYNTHETIC_VARIANTS}
    panels = []
    for category, name in enumerate(SYNTHETIC_CATEGORIES):
        first, count = SYNTHETIC_PART_RANGES[category]
        print(f"{name:9s} parts {first}..{first + count - 1} {SYNTHETIC_PART_NAMES[name]}")
        for variant, dataset in datasets.items():
            points, label, parts = dataset[category]  # sample index = category, so label = category
            print(f"    {variant:10s} points {tuple(points.shape)} label {tuple(label.shape)}={int(label)} "
                  f"parts {tuple(parts.shape)} distinct object parts {len(set(parts[parts >= 0].tolist()))} "
                  f"clutter points {int((parts < 0).sum())} max |p| {points.norm(dim=1).max():.2f}")
        points, _, parts = datasets["clean"][category]
        panels.append(_draw_panel(points.numpy(), parts.numpy(), first, name))
    # The three variants of one chair (index 1 -> category 1).
    chair_first = SYNTHETIC_PART_RANGES[1][0]
    for variant, dataset in datasets.items():
        points, _, parts = dataset[1]
        panels.append(_draw_panel(points.numpy(), parts.numpy(), chair_first, f"chair, {variant}"))

    # Timing: samples per second of the generator alone, one process.
    for variant, dataset in datasets.items():
        start = time.perf_counter()
        for index in range(200):
            dataset[index]
        elapsed = time.perf_counter() - start
        print(f"timing {variant:10s}: {200 / elapsed:7.0f} samples/s ({1000 * elapsed / 200:.2f} ms per sample "
              f"of {args.num_points} points)")
    augmented = scale_and_translate(torch.stack([datasets["clean"][index][0] for index in range(4)]))
    print(f"scale_and_translate: {tuple(augmented.shape)} -> {tuple(augmented.shape)}")

    # Grid: 4 columns; 3 rows of categories, then one row with the three variants of a chair.
    columns, size = 4, panels[0].size[0]
    rows = math.ceil(len(panels) / columns)
    grid = Image.new("RGB", (columns * size, rows * size), (255, 255, 255))
    for index, panel in enumerate(panels):
        grid.paste(panel, ((index % columns) * size, (index // columns) * size))
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.size[0]}x{grid.size[1]})")


if __name__ == "__main__":
    main()
