"""Tests for data.py: synthetic shapes, every dataset reader on tiny datasets in the real layouts, augmentation."""

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import data

FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures"


def assert_unit_sphere(points):
    """Centroid at the origin and farthest point at distance 1 (Point-MAE pc_normalize)."""
    points = torch.as_tensor(points, dtype=torch.float64)
    assert points.mean(dim=0).abs().max() < 1e-5
    assert abs(points.norm(dim=1).max().item() - 1.0) < 1e-5


def slow_farthest_point_sample(points, num_samples):
    """Obvious FPS: pure Python loops over points."""
    selected = [0]
    for _ in range(num_samples - 1):
        best_index, best_distance = -1, -1.0
        for index in range(len(points)):
            distance = min(float(((points[index] - points[chosen]) ** 2).sum()) for chosen in selected)
            if distance > best_distance:
                best_index, best_distance = index, distance
        selected.append(best_index)
    return np.array(selected)


# ---------------------------------------------------------------- helpers

def test_normalize_unit_sphere_hand_case():
    points = np.array([[1.0, 1.0, 1.0], [3.0, 1.0, 1.0]])
    # Centroid (2, 1, 1); both points at distance 1 from it.
    np.testing.assert_allclose(data.normalize_unit_sphere(points), [[-1, 0, 0], [1, 0, 0]])
    assert_unit_sphere(data.normalize_unit_sphere(np.random.default_rng(0).normal(size=(50, 3)) * 7 + 3))


def test_check_points_messages():
    with pytest.raises(ValueError, match=r"some/file\.npy.*\(M, 3\).*\(10, 4\)"):
        data._check_points(np.zeros((10, 4)), "some/file.npy", 3)
    bad = np.zeros((10, 3))
    bad[2, 1] = np.nan
    bad[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"some/file\.npy contains 2 NaN or infinite"):
        data._check_points(bad, "some/file.npy", 3)
    data._check_points(np.zeros((10, 3)), "fine.npy", 3)  # no error


def test_numpy_fps_matches_slow_version_and_prefix_property():
    points = np.random.default_rng(1).normal(size=(60, 3))
    fast = data.farthest_point_sample_numpy(points, 12)
    np.testing.assert_array_equal(fast, slow_farthest_point_sample(points, 12))
    # FPS is greedy: a shorter run is the prefix of a longer one.
    np.testing.assert_array_equal(data.farthest_point_sample_numpy(points, 5), fast[:5])
    assert len(set(fast.tolist())) == 12


def test_text_table_reader_reports_bad_lines(tmp_path):
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("1,2,3,4,5,6\n1,2,3\n")
    with pytest.raises(ValueError, match=r"ragged\.txt: expected 6 numbers on every line"):
        data._read_text_table(ragged, 6)
    words = tmp_path / "words.txt"
    words.write_text("1 2 3 4 5 6 x\n")
    with pytest.raises(ValueError, match=r"words\.txt contains text that is not a number"):
        data._read_text_table(words, 7)
    good = tmp_path / "good.txt"
    good.write_text("1 2 3\n4 5 6\n\n")
    np.testing.assert_array_equal(data._read_text_table(good, 3), [[1, 2, 3], [4, 5, 6]])


def test_pickle_reader_refuses_non_numpy_globals(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": [print]}))
    with pytest.raises(ValueError, match="evil.pkl"):
        data._load_numpy_pickle(path)


# ---------------------------------------------------------------- primitive surfaces

def test_box_faces_get_points_proportional_to_area():
    rng = np.random.default_rng(0)
    points, parts = data.sample_surface([data.box((0, 0, 0), (1.0, 2.0, 3.0), 7)], 20000, rng)
    assert (parts == 7).all()
    on_x_face = np.isclose(np.abs(points[:, 0]), 0.5)
    on_y_face = np.isclose(np.abs(points[:, 1]), 1.0)
    on_z_face = np.isclose(np.abs(points[:, 2]), 1.5)
    assert (on_x_face | on_y_face | on_z_face).all()  # every point lies on the surface
    # Face areas: x faces 2*3, y faces 1*3, z faces 1*2 (twice each); total 22.
    assert abs(on_x_face.mean() - 12 / 22) < 0.015
    assert abs(on_y_face.mean() - 6 / 22) < 0.015


def test_frustum_disc_sphere_torus_lie_on_their_surfaces_and_are_uniform():
    rng = np.random.default_rng(0)
    count = 20000
    # Cone frustum r 0.5 -> 0.1 over height 1: the radius is linear in y; the lower half holds (0.5+0.3)/(0.5+0.1)
    # /2 of the area = 2/3.
    frustum = data._sample_local(data.tube((0, 0, 0), 0.5, 0.1, 1.0, 0), count, rng)
    radius = np.hypot(frustum[:, 0], frustum[:, 2])
    np.testing.assert_allclose(radius, 0.5 + (frustum[:, 1] + 0.5) * (0.1 - 0.5), atol=1e-9)
    assert abs((frustum[:, 1] < 0).mean() - 2 / 3) < 0.015
    # Disc: a fraction r^2 of the points inside radius r.
    flat = data._sample_local(data.disc((0, 0, 0), 2.0, 0), count, rng)
    assert np.allclose(flat[:, 1], 0) and np.hypot(flat[:, 0], flat[:, 2]).max() <= 2.0
    assert abs((np.hypot(flat[:, 0], flat[:, 2]) < 1.0).mean() - 0.25) < 0.015
    # Hemisphere: on the sphere and y >= 0.
    dome = data._sample_local(data.sphere((0, 0, 0), 0.7, 0, upper_half_only=True), count, rng)
    np.testing.assert_allclose(np.linalg.norm(dome, axis=1), 0.7)
    assert (dome[:, 1] >= 0).all()
    # Torus R = 1, r = 0.4: the outer half (cos v > 0) holds (pi R + 2 r) / (2 pi R) of the area.
    ring = data._sample_local(data.torus((0, 0, 0), 1.0, 0.4, 0), count, rng)
    distance_to_axis = np.hypot(ring[:, 0], ring[:, 2])
    np.testing.assert_allclose((distance_to_axis - 1.0) ** 2 + ring[:, 1] ** 2, 0.16, atol=1e-9)
    expected_outer = (math.pi + 0.8) / (2 * math.pi)
    assert abs((distance_to_axis > 1.0).mean() - expected_outer) < 0.015
    # Exact areas of the primitives.
    assert math.isclose(data._area(data.torus((0, 0, 0), 1.0, 0.4, 0)), 4 * math.pi ** 2 * 0.4)
    assert math.isclose(data._area(data.tube((0, 0, 0), 1.0, 1.0, 2.0, 0)), 4 * math.pi)


# ---------------------------------------------------------------- synthetic shapes

def test_synthetic_constants_are_consistent():
    assert len(data.SYNTHETIC_CATEGORIES) >= 12
    assert len(data.SYNTHETIC_PART_RANGES) == len(data.SYNTHETIC_CATEGORIES)
    next_first = 0
    for (first, count), name in zip(data.SYNTHETIC_PART_RANGES, data.SYNTHETIC_CATEGORIES):
        assert first == next_first and count == len(data.SYNTHETIC_PART_NAMES[name]) >= 2
        next_first += count
    assert next_first == data.SYNTHETIC_NUM_PARTS


def test_synthetic_samples_are_deterministic():
    first = data.SyntheticShapes("train", num_points=256, seed=3)
    again = data.SyntheticShapes("train", num_points=256, seed=3)
    for index in (0, 5, 17):
        for a, b in zip(first[index], again[index]):
            assert torch.equal(a, b)
    # Different index, split or seed: different points.
    assert not torch.equal(first[0][0], first[12][0])  # same category, next sample
    assert not torch.equal(first[0][0], data.SyntheticShapes("test", num_points=256, seed=3)[0][0])
    assert not torch.equal(first[0][0], data.SyntheticShapes("train", num_points=256, seed=4)[0][0])


@pytest.mark.parametrize("variant", data.SYNTHETIC_VARIANTS)
def test_synthetic_samples_follow_the_contract(variant):
    dataset = data.SyntheticShapes("train", num_points=512, variant=variant)
    assert len(dataset) == 2048 and len(data.SyntheticShapes("test")) == 512
    assert dataset.num_classes == len(dataset.categories) == len(dataset.part_ranges)
    for index in range(2 * dataset.num_classes):
        points, label, parts = dataset[index]
        assert points.shape == (512, 3) and points.dtype == torch.float32
        assert label.shape == () and label.dtype == torch.long and int(label) == index % dataset.num_classes
        assert parts.shape == (512,) and parts.dtype == torch.long
        assert torch.isfinite(points).all()
        first, count = dataset.part_ranges[int(label)]
        object_parts = parts[parts >= 0]
        assert ((object_parts >= first) & (object_parts < first + count)).all()
        if variant != "perturbed":  # (the perturbed cut may remove a whole small part, e.g. a mug's handle)
            assert object_parts.unique().numel() >= 2  # every category shows more than one part
        if variant == "clean":
            assert (parts >= 0).all()
        else:
            assert (parts == -1).any()  # scan-like variants carry clutter
            assert (parts == -1).sum() < 0.5 * 512  # but the object dominates
        if variant != "perturbed":
            assert_unit_sphere(points)


def test_synthetic_variants_differ_as_intended():
    clean = data.SyntheticShapes("test", num_points=1024, variant="clean")
    background = data.SyntheticShapes("test", num_points=1024, variant="background")
    perturbed = data.SyntheticShapes("test", num_points=1024, variant="perturbed")
    for index in range(12):
        clean_points, _, clean_parts = clean[index]
        _, _, background_parts = background[index]
        perturbed_points, _, perturbed_parts = perturbed[index]
        assert (background_parts == -1).sum() > 100
        assert (perturbed_parts == -1).any()
        # Perturbed shapes are moved and scaled after normalisation: not centred or not of radius 1.
        moved = perturbed_points.mean(dim=0).norm() > 0.02 or abs(perturbed_points.norm(dim=1).max() - 1) > 0.02
        assert moved
        # Clean and background share the object: the same part labels appear (the variants are of one shape).
        assert set(clean_parts.unique().tolist()) == set(background_parts[background_parts >= 0].unique().tolist())
        # The clean variant is centred in the unit sphere (Point-MAE's normalisation); perturbed need not be.
        assert clean_points.mean(dim=0).norm() < 1e-4 and abs(clean_points.norm(dim=1).max() - 1) < 1e-4


def test_cut_away_removes_the_requested_fraction_beyond_a_plane():
    rng_points = np.random.default_rng(0)
    points = rng_points.normal(size=(4000, 3))
    object_mask = np.arange(4000) < 3000
    keep = data._cut_away(points, object_mask, np.random.default_rng(7), 0.25)
    # Removed fraction of the object points as requested.
    assert abs((~keep[object_mask]).mean() - 0.25) < 0.002
    # Kept and removed points are separated by a plane (replay the direction from the same seed).
    direction = np.random.default_rng(7).standard_normal(3)
    projection = points @ direction
    assert projection[keep].max() < projection[~keep].min()
    # Clutter beyond the plane goes too (the crop cuts the whole scan, like PB-T50-RS's shifted boxes).
    assert (~keep[~object_mask]).any() and keep[~object_mask].any()


def test_synthetic_dataset_collates_and_rejects_bad_arguments():
    loader = torch.utils.data.DataLoader(data.SyntheticShapes("train", num_points=128, size=24), batch_size=8)
    points, labels, parts = next(iter(loader))
    assert points.shape == (8, 128, 3) and labels.shape == (8,) and parts.shape == (8, 128)
    with pytest.raises(ValueError, match="variant"):
        data.SyntheticShapes(variant="noisy")
    with pytest.raises(ValueError, match="split"):
        data.SyntheticShapes(split="validation")
    with pytest.raises(IndexError):
        data.SyntheticShapes(size=4)[4]


# ---------------------------------------------------------------- ShapeNet55

def write_shapenet55(root, stored_points=300):
    rng = np.random.default_rng(0)
    (root / "ShapeNet-55").mkdir(parents=True)
    (root / "shapenet_pc").mkdir()
    train = ["02691156-aaa.npy", "03001627-bbb.npy", "02691156-ccc.npy"]
    test = ["04379243-ddd.npy"]
    (root / "ShapeNet-55" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "ShapeNet-55" / "test.txt").write_text("\n".join(test) + "\n")
    for name in train + test:
        np.save(root / "shapenet_pc" / name, rng.normal(size=(stored_points, 3)).astype(np.float32) * 3 + 1)
    return train, test


def test_shapenet55_reads_the_point_bert_layout(tmp_path):
    write_shapenet55(tmp_path / "ShapeNet55-34")
    dataset = data.ShapeNet55(tmp_path, "train", num_points=64)  # the parent folder works too
    assert len(dataset) == 3 and dataset.num_classes == 3
    assert dataset.categories == ["02691156", "03001627", "04379243"]  # synsets of train + test, sorted
    assert [int(dataset[index][1]) for index in range(3)] == [0, 1, 0]
    assert int(data.ShapeNet55(tmp_path / "ShapeNet55-34", "test", num_points=64)[0][1]) == 2
    # The subset is torch.randperm of the global RNG, then normalised.
    torch.manual_seed(5)
    points, label = dataset[1]
    torch.manual_seed(5)
    subset = torch.randperm(300)[:64].numpy()
    stored = np.load(tmp_path / "ShapeNet55-34" / "shapenet_pc" / "03001627-bbb.npy")
    np.testing.assert_allclose(points.numpy(), data.normalize_unit_sphere(stored[subset].astype(np.float64)),
                               atol=1e-6)
    assert points.shape == (64, 3) and label.dtype == torch.long
    assert_unit_sphere(points)
    assert not torch.equal(dataset[1][0], dataset[1][0])  # a fresh random subset on every access


def test_shapenet55_errors_name_the_file_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="ShapeNet-55"):
        data.ShapeNet55(tmp_path)
    write_shapenet55(tmp_path)
    dataset = data.ShapeNet55(tmp_path, num_points=64)
    np.save(tmp_path / "shapenet_pc" / "02691156-aaa.npy", np.zeros((300, 4), np.float32))
    with pytest.raises(ValueError, match=r"02691156-aaa\.npy.*\(300, 4\)"):
        dataset[0]
    broken = np.zeros((300, 3), np.float32)
    broken[10] = np.nan
    np.save(tmp_path / "shapenet_pc" / "03001627-bbb.npy", broken)
    with pytest.raises(ValueError, match=r"03001627-bbb\.npy contains 3 NaN"):
        dataset[1]
    (tmp_path / "shapenet_pc" / "04379243-ddd.npy").write_text("not an array")
    with pytest.raises(ValueError, match=r"04379243-ddd\.npy could not be read"):
        data.ShapeNet55(tmp_path, "test", num_points=64)[0]
    (tmp_path / "shapenet_pc" / "02691156-ccc.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"02691156-ccc\.npy"):
        dataset[2]


# ---------------------------------------------------------------- ModelNet40

def write_modelnet40_txt(root, stored_points=200):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("airplane\nbathtub\nnight_stand\n")
    (root / "modelnet40_train.txt").write_text("airplane_0001\nnight_stand_0002\n")
    (root / "modelnet40_test.txt").write_text("bathtub_0003\n")
    tables = {}
    for shape_id in ("airplane_0001", "night_stand_0002", "bathtub_0003"):
        folder = root / shape_id.rsplit("_", 1)[0]
        folder.mkdir(exist_ok=True)
        table = rng.normal(size=(stored_points, 6)).astype(np.float32)
        np.savetxt(folder / f"{shape_id}.txt", table, fmt="%.6f", delimiter=",")
        tables[shape_id] = np.loadtxt(folder / f"{shape_id}.txt", delimiter=",")
    return tables


def test_modelnet40_txt_reader_runs_fps_and_normalises(tmp_path):
    tables = write_modelnet40_txt(tmp_path / "modelnet40_normal_resampled")
    dataset = data.ModelNet40(tmp_path, "train", num_points=16)
    assert len(dataset) == 2 and dataset.num_classes == 40 and dataset.categories[2] == "night_stand"
    points, label = dataset[1]
    assert int(label) == 2 and points.shape == (16, 3)
    xyz = tables["night_stand_0002"][:, :3]
    expected = data.normalize_unit_sphere(xyz[slow_farthest_point_sample(xyz, 16)])
    np.testing.assert_allclose(points.numpy(), expected, atol=1e-5)
    # Cached and stable across accesses; edits to a returned tensor do not reach the cache.
    points.zero_()
    np.testing.assert_allclose(dataset[1][0].numpy(), expected, atol=1e-5)
    assert int(data.ModelNet40(tmp_path, "test", num_points=16)[0][1]) == 1


def test_modelnet40_dat_cache_is_used_and_its_prefix_taken(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    rng = np.random.default_rng(2)
    cached = [rng.normal(size=(100, 6)).astype(np.float32) for _ in range(3)]
    labels = [np.array([label], dtype=np.int32) for label in (5, 39, 0)]
    with open(root / "modelnet40_train_8192pts_fps.dat", "wb") as handle:
        pickle.dump([cached, labels], handle)
    dataset = data.ModelNet40(root, "train", num_points=32)
    assert len(dataset) == 3  # the cache wins over the txt lists (2 shapes)
    points, label = dataset[1]
    assert int(label) == 39
    np.testing.assert_allclose(points.numpy(), data.normalize_unit_sphere(cached[1][:32, :3].astype(np.float64)),
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"modelnet40_train_8192pts_fps\.dat \(entry 0\).*M >= 200.*\(100, 6\)"):
        data.ModelNet40(root, "train", num_points=200)[0]


def test_modelnet40_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="modelnet40_shape_names.txt"):
        data.ModelNet40(tmp_path)
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    (root / "airplane" / "airplane_0001.txt").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"airplane_0001\.txt.*\(M, 6\).*\(2, 3\)"):
        data.ModelNet40(root, num_points=2)[0]
    (root / "night_stand" / "night_stand_0002.txt").write_text("1,2,3,0,0,1\nnan,5,6,0,0,1\n")
    with pytest.raises(ValueError, match=r"night_stand_0002\.txt contains 1 NaN"):
        data.ModelNet40(root, num_points=2)[1]
    (root / "modelnet40_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="modelnet40_test.txt"):
        data.ModelNet40(root, "test")


def test_modelnet40_real_fixture():
    root = FIXTURES / "modelnet40_normal_resampled"
    if not root.is_dir():
        pytest.skip(f"the real ModelNet40 fixture is not at {root}")
    train = data.ModelNet40(FIXTURES, "train", num_points=1024)
    test = data.ModelNet40(root, "test", num_points=1024)
    assert len(train) == 3 and len(test) == 3 and len(train.categories) == 40
    # airplane = 0, bathtub = 1, bench = 3 in modelnet40_shape_names.txt.
    assert sorted(int(train[index][1]) for index in range(3)) == [0, 1, 3]
    for index in range(3):
        points, _ = test[index]
        assert points.shape == (1024, 3) and torch.isfinite(points).all()
        assert_unit_sphere(points)
        # FPS spreads the points: the closest pair is far apart compared with random sampling of the surface.
        distances = torch.cdist(points, points) + torch.eye(1024) * 10
        assert distances.min() > 0.01


# ---------------------------------------------------------------- ModelNet40 few-shot

def test_modelnet_few_shot_reads_a_fold(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "ModelNetFewshot" / "5way_10shot"
    folder.mkdir(parents=True)
    train = [(rng.normal(size=(120, 6)).astype(np.float32), label % 5, 7 * label) for label in range(10)]
    test = [(rng.normal(size=(120, 6)).astype(np.float32), np.int64(3), np.int64(30))]
    with open(folder / "0.pkl", "wb") as handle:
        pickle.dump({"train": train, "test": test}, handle)
    dataset = data.ModelNetFewShot(tmp_path, way=5, shot=10, fold=0, split="train", num_points=50)
    assert len(dataset) == 10 and dataset.num_classes == 5
    points, label = dataset[7]
    assert int(label) == 2 and points.shape == (50, 3)
    np.testing.assert_allclose(points.numpy(), data.normalize_unit_sphere(train[7][0][:50, :3].astype(np.float64)),
                               atol=1e-6)
    assert int(data.ModelNetFewShot(tmp_path / "ModelNetFewshot", 5, 10, 0, "test", 50)[0][1]) == 3
    with pytest.raises(FileNotFoundError, match=r"5way_10shot.1\.pkl"):
        data.ModelNetFewShot(tmp_path, 5, 10, 1)
    with pytest.raises(ValueError, match=r"0\.pkl \('train' entry 0\).*M >= 500.*\(120, 6\)"):
        data.ModelNetFewShot(tmp_path, 5, 10, 0, num_points=500)[0]


# ---------------------------------------------------------------- ScanObjectNN

def write_scanobjectnn(path, samples=4, points=2048, broken=False):
    import h5py
    path.parent.mkdir(parents=True, exist_ok=True)
    cloud = np.random.default_rng(0).normal(size=(samples, points, 3)).astype(np.float32)
    if broken:
        cloud[1, 3, 0] = np.inf
    with h5py.File(path, "w") as handle:
        handle["data"] = cloud
        handle["label"] = np.arange(samples) % 15
    return cloud


def test_scanobjectnn_reads_the_three_variants(tmp_path):
    stored = write_scanobjectnn(tmp_path / "h5_files" / "main_split" / "training_objectdataset.h5")
    write_scanobjectnn(tmp_path / "main_split_nobg" / "test_objectdataset.h5", samples=2)
    write_scanobjectnn(tmp_path / "main_split" / "test_objectdataset_augmentedrot_scale75.h5", samples=3)
    train = data.ScanObjectNN(tmp_path, "obj_bg", "train")
    assert len(train) == 4 and train.num_classes == 15
    points, label = train[2]
    assert points.shape == (2048, 3) and int(label) == 2
    # Training shuffles the order only: the same set of points as stored, not normalised.
    order = np.lexsort(points.numpy().T)
    np.testing.assert_array_equal(points.numpy()[order], stored[2][np.lexsort(stored[2].T)])
    assert not np.array_equal(points.numpy(), stored[2])
    fixed = data.ScanObjectNN(tmp_path / "h5_files", "obj_bg", "train", shuffle_points=False)
    np.testing.assert_array_equal(fixed[2][0].numpy(), stored[2])
    assert len(data.ScanObjectNN(tmp_path, "obj_only", "test")) == 2
    assert len(data.ScanObjectNN(tmp_path, "pb_t50_rs", "test")) == 3
    assert len(data.ScanObjectNN(tmp_path / "main_split_nobg", "obj_only", "test")) == 2  # the split folder itself


def test_scanobjectnn_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"main_split.training_objectdataset_augmentedrot_scale75\.h5"):
        data.ScanObjectNN(tmp_path, "pb_t50_rs", "train")
    write_scanobjectnn(tmp_path / "main_split" / "test_objectdataset.h5", broken=True)
    with pytest.raises(ValueError, match=r"test_objectdataset\.h5 contains NaN or infinite"):
        data.ScanObjectNN(tmp_path, "obj_bg", "test")
    with pytest.raises(ValueError, match="variant"):
        data.ScanObjectNN(tmp_path, "hardest")


# ---------------------------------------------------------------- ShapeNetPart

SYNSETS = {"Airplane": "02691156", "Bag": "02773838", "Cap": "02954340", "Car": "02958343", "Chair": "03001627",
           "Earphone": "03261776", "Guitar": "03467517", "Knife": "03624134", "Lamp": "03636649",
           "Laptop": "03642806", "Motorbike": "03790512", "Mug": "03797390", "Pistol": "03948459",
           "Rocket": "04099429", "Skateboard": "04225987", "Table": "04379243"}


def write_shapenetpart(root):
    rng = np.random.default_rng(0)
    (root / "train_test_split").mkdir(parents=True)
    (root / "synsetoffset2category.txt").write_text("".join(f"{name}\t{synset}\n" for name, synset in SYNSETS.items()))
    shapes = {"plane1": ("Airplane", 100, (0, 4)), "mug1": ("Mug", 3000, (36, 2)), "table1": ("Table", 2500, (47, 3)),
              "plane2": ("Airplane", 2100, (0, 4))}
    tables = {}
    for shape_id, (name, count, (first, parts)) in shapes.items():
        folder = root / SYNSETS[name]
        folder.mkdir(exist_ok=True)
        table = np.concatenate([rng.normal(size=(count, 6)), (first + np.arange(count) % parts)[:, None]], axis=1)
        np.savetxt(folder / f"{shape_id}.txt", table, fmt="%.6f", delimiter=" ")
        tables[shape_id] = np.loadtxt(folder / f"{shape_id}.txt")
    lists = {"train": ["plane1", "mug1"], "val": ["table1"], "test": ["plane2"]}
    for split, ids in lists.items():
        entries = [f"shape_data/{SYNSETS[shapes[shape_id][0]]}/{shape_id}" for shape_id in ids]
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))
    return tables


def test_shapenetpart_reads_the_layout(tmp_path):
    tables = write_shapenetpart(tmp_path / "shapenetcore_partanno_segmentation_benchmark_v0_normal")
    train = data.ShapeNetPart(tmp_path, "train", num_points=2048)
    assert len(train) == 3  # train + val
    assert train.num_classes == 16 and train.num_parts == 50
    assert [train.category_labels[index] for index in range(3)] == [0, 11, 15]  # Airplane, Mug, Table
    for index in range(3):
        points, category, parts = train[index]
        assert points.shape == (2048, 3) and category.shape == () and parts.shape == (2048,)
        first, count = data.SHAPENETPART_PART_RANGES[int(category)]
        assert ((parts >= first) & (parts < first + count)).all()
        assert points.norm(dim=1).max() <= 1 + 1e-5
    # 100 stored points, 2048 requested: every stored point appears, each with its own part label.
    points, _, parts = train[0]
    normalised = data.normalize_unit_sphere(tables["plane1"][:, :3])
    distances = torch.cdist(torch.tensor(normalised), points.double(),
                            compute_mode="donot_use_mm_for_euclid_dist")  # (100, 2048)
    assert distances.min(dim=1).values.max() < 1e-5
    nearest_stored = distances.argmin(dim=0)
    assert torch.equal(parts, torch.tensor(tables["plane1"][:, 6], dtype=torch.long)[nearest_stored])
    # 3000 stored points, 2048 requested: drawn without replacement.
    points, _, _ = train[1]
    assert torch.unique(points, dim=0).shape[0] == 2048
    test = data.ShapeNetPart(tmp_path, "test")
    assert len(test) == 1 and int(test[0][1]) == 0


def test_shapenetpart_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="synsetoffset2category.txt"):
        data.ShapeNetPart(tmp_path)
    write_shapenetpart(tmp_path)
    # A Mug point labelled with an Airplane part.
    mug = tmp_path / SYNSETS["Mug"] / "mug1.txt"
    mug.write_text("0 0 0 0 0 1 36\n1 0 0 0 0 1 3\n")
    with pytest.raises(ValueError, match=r"mug1\.txt: expected part labels 36\.\.37"):
        data.ShapeNetPart(tmp_path)[1]
    mug.write_text("0 0 0 0 0 1\n")
    with pytest.raises(ValueError, match=r"mug1\.txt.*\(M, 7\).*\(1, 6\)"):
        data.ShapeNetPart(tmp_path)[1]
    (tmp_path / SYNSETS["Table"] / "table1.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"table1\.txt"):
        data.ShapeNetPart(tmp_path)[2]


def test_shapenetpart_part_ranges_are_the_standard_ones():
    ranges = data.SHAPENETPART_PART_RANGES
    assert sum(count for _, count in ranges) == 50
    assert all(ranges[index + 1][0] == ranges[index][0] + ranges[index][1] for index in range(15))
    named = dict(zip(data.SHAPENETPART_CATEGORIES, ranges))
    assert named["Motorbike"] == (30, 6) and named["Table"] == (47, 3) and named["Earphone"] == (16, 3)


# ---------------------------------------------------------------- augmentation

def test_scale_and_translate_ranges_and_independence():
    generator = torch.Generator().manual_seed(0)
    zeros = torch.zeros(256, 5, 3, dtype=torch.float64)
    shift = data.scale_and_translate(zeros, generator=torch.Generator().manual_seed(0))
    scaled = data.scale_and_translate(zeros + 1, generator=torch.Generator().manual_seed(0))
    scale = scaled - shift  # the same random numbers: out(1) - out(0) = scale
    assert shift.dtype == torch.float64
    assert shift.min() >= -0.2 and shift.max() <= 0.2 and shift.abs().max() > 0.18
    assert scale.min() >= 2 / 3 - 1e-9 and scale.max() <= 1.5 + 1e-9
    # One draw per shape and axis: constant over the points, different across shapes and axes.
    assert torch.allclose(scale, scale[:, :1].expand_as(scale))
    assert scale[:, 0, 0].unique().numel() == 256 and not torch.allclose(scale[:, 0, 0], scale[:, 0, 1])
    # Same result as a slow per-shape loop with the same numbers.
    points = torch.randn(4, 10, 3, generator=generator)
    fast = data.scale_and_translate(points, generator=torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    scales = torch.rand(4, 1, 3, generator=replay) * (1.5 - 2 / 3) + 2 / 3
    shifts = torch.rand(4, 1, 3, generator=replay) * 0.4 - 0.2
    for index in range(4):
        torch.testing.assert_close(fast[index], points[index] * scales[index] + shifts[index])
