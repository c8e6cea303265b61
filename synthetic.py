"""Built-in synthetic point clouds for KR-MAE: 12 categories of objects made of named parts, no files needed.

The KR-MAE paper ("Experiments") trains on real datasets only (ShapeNet, ScanObjectNN, ModelNet40, ShapeNetPart;
their readers are in datasets.py). These synthetic shapes are this project's stand-in, so that every script runs
and is tested with no download. They are not from the paper and are no benchmark. This file does not import
datasets.py (nor the reverse): copy either one alone.

Map of this file
  1. Helpers               normalize_unit_sphere (Point-MAE pc_normalize) and _to_tensors, copies of their twins in
                           datasets.py so that this file stands alone.
  2. Primitive surfaces    boxes, open tubes (cylinders and cone frusta), discs, spheres, hemispheres, tori,
                           each sampled uniformly by area, vectorised numpy.
  3. Synthetic categories  12 objects built from named parts (table, chair, lamp, airplane, mug, ...).
  4. Synthetic variants    "clean" (like ScanObjectNN's OBJ-ONLY), "background" (like OBJ-BG), "perturbed" (like
                           PB-T50-RS), the SyntheticShapes dataset, and synthetic_episode: finetune.py --task
                           fewshot's n-way m-shot episodes of these shapes.
  5. Demo                  python synthetic.py [--out synthetic_demo.png]

What SyntheticShapes returns, for every variant
  (points FloatTensor (N, 3), label LongTensor (), parts LongTensor (N,)), parts = -1 on background clutter, so
  the same data serves pre-training, classification (ignore parts) and part segmentation, like the segmentation
  triple of datasets.ShapeNetPart.

No equations of the paper live here. Paper -> code: "1,024 points" -> num_points=1024 (pre-training),
"2,048 points" -> num_points=2048 (ScanObjectNN-like fine-tuning, part segmentation).

Shape legend: N points, 3 = xyz.
Conventions: y is the up axis (ShapeNet's convention); random object rotations turn about y.
Reproducibility: sample i of a split is a pure function of (seed, split, i, num_points, variant), drawn from
numpy's Generator seeded with [seed, split_id, i]; tests/test_synthetic.py pins a few samples bit for bit.

Demo: `python synthetic.py [--out synthetic_demo.png]` prints one sample per category and variant, times the
generator (samples/s) and writes a picture of one sample per category plus the three variants of one shape.
"""

import argparse
import math
import time
from collections import namedtuple

import numpy as np
import torch
from torch.utils.data import Dataset


# ----------------------------------------------------------------------------------------------------------------
# 1. Helpers (copies of their twins in datasets.py, so that each file can be copied alone)
# ----------------------------------------------------------------------------------------------------------------

def normalize_unit_sphere(points):
    """Centre a point cloud on its centroid and scale it into the unit sphere (Point-MAE's pc_normalize).

    Twin of datasets.normalize_unit_sphere (kept identical: the synthetic samples are pinned bit for bit).
    """
    # Subtract the mean of the points, not the bounding-box centre (Point-MAE pc_normalize).
    centered = points - points.mean(axis=0, keepdims=True)  # (N, 3)
    # The farthest point from the centroid ends up at distance exactly 1.
    radius = np.sqrt((centered ** 2).sum(axis=1)).max()
    # A cloud of identical points has radius 0: leave it at the origin instead of dividing by zero.
    return centered / radius if radius > 0 else centered


def _to_tensors(points, *labels):
    """numpy points (N, 3) and integer labels -> (FloatTensor (N, 3), LongTensor ... ).

    Twin of datasets._to_tensors.
    """
    # torch.tensor copies, so a caller editing a sample in place never touches the generator's arrays.
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


# Synthetic stand-ins of ModelNet40 (which stores 8192 points) store this many times num_points per shape.
STORED_FACTOR = 2


def synthetic_episode(way, shot, fold, num_points, queries=20, pool=1000):
    """An n-way m-shot episode of the synthetic shapes, a pure function of (way, shot, fold, num_points):
    `way` of the 12 classes, `shot` training shapes of each (train split) and `queries` test shapes of each
    (test split), labelled 0..way-1. SyntheticShapes labels sample i with i % 12: shape j of class c is c + 12 j.
    Each shape stores 2 * num_points points, from which training resamples (see downstream.training_points)."""
    num_classes = len(SYNTHETIC_CATEGORIES)
    if way > num_classes:
        raise ValueError(f"The synthetic shapes have {num_classes} classes; a {way}-way episode is impossible.")
    # NOTE(unspecified): the episode depends on (way, shot, fold) only, like Point-BERT's fixed episode files.
    rng = np.random.default_rng([way, shot, fold])
    classes = rng.choice(num_classes, way, replace=False)  # (way,) the episode's classes, in label order
    episode = []
    for split, count in (("train", shot), ("test", queries)):
        shapes = SyntheticShapes(split, STORED_FACTOR * num_points, size=num_classes * pool, seed=0)
        index = classes[:, None] + num_classes * rng.choice(pool, (way, count), replace=False)  # (way, count)
        points = torch.stack([shapes[i][0] for i in index.flatten().tolist()])  # (way * count, 2N, 3)
        labels = torch.arange(way).repeat_interleave(count)  # (way * count,): class k of the episode -> k
        episode.append(torch.utils.data.TensorDataset(points, labels))
    return episode  # [train, test]


# ----------------------------------------------------------------------------------------------------------------
# 5. Demo
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
    parser.add_argument("--out", default="synthetic_demo.png", help="where to write the picture")
    parser.add_argument("--num-points", type=int, default=1024)
    args = parser.parse_args()
    from PIL import Image

    print(f"{len(SYNTHETIC_CATEGORIES)} categories, {SYNTHETIC_NUM_PARTS} part labels; up axis = y")
    by_variant = {variant: SyntheticShapes("train", args.num_points, variant=variant) for variant in SYNTHETIC_VARIANTS}
    panels = []
    for category, name in enumerate(SYNTHETIC_CATEGORIES):
        first, count = SYNTHETIC_PART_RANGES[category]
        print(f"{name:9s} parts {first}..{first + count - 1} {SYNTHETIC_PART_NAMES[name]}")
        for variant, dataset in by_variant.items():
            points, label, parts = dataset[category]  # sample index = category, so label = category
            print(f"    {variant:10s} points {tuple(points.shape)} label {tuple(label.shape)}={int(label)} "
                  f"parts {tuple(parts.shape)} distinct object parts {len(set(parts[parts >= 0].tolist()))} "
                  f"clutter points {int((parts < 0).sum())} max |p| {points.norm(dim=1).max():.2f}")
        points, _, parts = by_variant["clean"][category]
        panels.append(_draw_panel(points.numpy(), parts.numpy(), first, name))
    # The three variants of one chair (index 1 -> category 1).
    chair_first = SYNTHETIC_PART_RANGES[1][0]
    for variant, dataset in by_variant.items():
        points, _, parts = dataset[1]
        panels.append(_draw_panel(points.numpy(), parts.numpy(), chair_first, f"chair, {variant}"))

    # Timing: samples per second of the generator alone, one process.
    for variant, dataset in by_variant.items():
        start = time.perf_counter()
        for index in range(200):
            dataset[index]
        elapsed = time.perf_counter() - start
        print(f"timing {variant:10s}: {200 / elapsed:7.0f} samples/s ({1000 * elapsed / 200:.2f} ms per sample "
              f"of {args.num_points} points)")

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
