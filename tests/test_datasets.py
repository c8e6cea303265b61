"""Tests for datasets.py: helpers, FPS, every reader on tiny datasets written in the real layouts (and on the real
ModelNet40 fixture when present), the ModelNet40 FPS cache, and the augmentations."""

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import synthetic

FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures"
REPOSITORY = Path(__file__).resolve().parents[1]


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


class PlainNumpyUnpickler(pickle.Unpickler):
    """What a user's own loader would do: numpy arrays, lists and scalars only, nothing from this repository."""

    def find_class(self, module, name):
        if module.split(".")[0] != "numpy":
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def load_plain(path):
    with open(path, "rb") as handle:
        return PlainNumpyUnpickler(handle).load()


# ---------------------------------------------------------------- the two data files stand alone

def test_datasets_and_synthetic_do_not_import_each_other_and_twins_agree():
    for name, other in (("datasets.py", "synthetic"), ("synthetic.py", "datasets")):
        tree = ast.parse((REPOSITORY / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert other not in imported and "data" not in imported, f"{name} imports {sorted(imported)}"
    # The copied helpers are twins: the same numbers, bit for bit.
    cloud = np.random.default_rng(3).normal(size=(500, 3)) * 4 + 2
    assert np.array_equal(datasets.normalize_unit_sphere(cloud), synthetic.normalize_unit_sphere(cloud))
    for mine, twin in zip(datasets._to_tensors(cloud, 3, np.arange(4)), synthetic._to_tensors(cloud, 3, np.arange(4))):
        assert mine.dtype == twin.dtype and torch.equal(mine, twin)


# ---------------------------------------------------------------- helpers

def test_normalize_unit_sphere_hand_case():
    points = np.array([[1.0, 1.0, 1.0], [3.0, 1.0, 1.0]])
    # Centroid (2, 1, 1); both points at distance 1 from it.
    np.testing.assert_allclose(datasets.normalize_unit_sphere(points), [[-1, 0, 0], [1, 0, 0]])
    assert_unit_sphere(datasets.normalize_unit_sphere(np.random.default_rng(0).normal(size=(50, 3)) * 7 + 3))


def test_check_points_messages():
    with pytest.raises(ValueError, match=r"some/file\.npy.*\(M, 3\).*\(10, 4\)"):
        datasets._check_points(np.zeros((10, 4)), "some/file.npy", 3)
    bad = np.zeros((10, 3))
    bad[2, 1] = np.nan
    bad[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"some/file\.npy contains 2 NaN or infinite"):
        datasets._check_points(bad, "some/file.npy", 3)
    datasets._check_points(np.zeros((10, 3)), "fine.npy", 3)  # no error


def test_text_table_reader_reports_bad_lines(tmp_path):
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("1,2,3,4,5,6\n1,2,3\n")
    with pytest.raises(ValueError, match=r"ragged\.txt: expected 6 numbers on every line"):
        datasets._read_text_table(ragged, 6)
    words = tmp_path / "words.txt"
    words.write_text("1 2 3 4 5 6 x\n")
    with pytest.raises(ValueError, match=r"words\.txt contains text that is not a number"):
        datasets._read_text_table(words, 7)
    good = tmp_path / "good.txt"
    good.write_text("1 2 3\n4 5 6\n\n")
    np.testing.assert_array_equal(datasets._read_text_table(good, 3), [[1, 2, 3], [4, 5, 6]])


def general_text_table(path):
    """The reader's general path, alone: every comma or whitespace separates numbers, parsed one by one."""
    text = Path(path).read_text()
    columns = len(next(line for line in text.splitlines() if line.strip()).replace(",", " ").split())
    return np.array(text.replace(",", " ").split(), dtype=np.float32).reshape(-1, columns)


def test_text_table_fast_path_reads_the_values_of_the_general_path(tmp_path):
    # numpy's C reader (the fast path) against the one-number-at-a-time parse, bit for bit, on the real ModelNet40
    # files and on tables of every number format a file may use.
    source = FIXTURES / "modelnet40_normal_resampled"
    real = sorted(source.glob("*/*.txt")) if source.is_dir() else []
    rng = np.random.default_rng(8)
    values = rng.standard_normal((500, 6)) * 10.0 ** rng.integers(-8, 6, (500, 6))
    made = []
    for name, number, separator in (("fixed", "%f", ","), ("long", "%.17g", ","), ("exponent", "%.8e", " "),
                                    ("spaces", "%.9f", "  ")):
        made.append(tmp_path / f"{name}.txt")
        made[-1].write_text("\n".join(separator.join(number % v for v in row) for row in values) + "\n")
    for path in real + made:
        found, expected = datasets._read_text_table(path, 6), general_text_table(path)
        assert found.dtype == np.float32 and np.array_equal(found.view(np.int32), expected.view(np.int32)), path
    # Mixed separators are refused by the fast path and read by the general one.
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("1,2 3\n4 5,6\n")
    np.testing.assert_array_equal(datasets._read_text_table(mixed, 3), [[1, 2, 3], [4, 5, 6]])


def test_pickle_reader_refuses_non_numpy_globals(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": [print]}))
    with pytest.raises(ValueError, match="evil.pkl"):
        datasets._load_numpy_pickle(path)


# ---------------------------------------------------------------- FPS

def test_numpy_fps_matches_slow_version_and_prefix_property():
    points = np.random.default_rng(1).normal(size=(60, 3))
    fast = datasets.farthest_point_sample_numpy(points, 12)
    np.testing.assert_array_equal(fast, slow_farthest_point_sample(points, 12))
    # FPS is greedy: a shorter run is the prefix of a longer one.
    np.testing.assert_array_equal(datasets.farthest_point_sample_numpy(points, 5), fast[:5])
    assert len(set(fast.tolist())) == 12


def test_batched_fps_matches_the_numpy_reference_with_padding():
    rng = np.random.default_rng(4)
    counts = [50, 37, 50, 12]
    clouds = [rng.normal(size=(count, 3)).astype(np.float32) for count in counts]
    padded = torch.zeros(len(counts), 50, 3)  # (B, N, 3); the padding sits at the origin, inside every cloud
    for row, cloud in enumerate(clouds):
        padded[row, :len(cloud)] = torch.from_numpy(cloud)
    order = datasets.farthest_point_sample_batched(padded, 12, torch.tensor(counts))  # (B, 12)
    assert order.shape == (4, 12) and order.dtype == torch.long
    for row, cloud in enumerate(clouds):
        reference = datasets.farthest_point_sample_numpy(cloud.astype(np.float64), 12)
        np.testing.assert_array_equal(order[row].numpy(), reference)
        assert (order[row] < counts[row]).all()  # padding is never chosen
    # Sampling every point of a shape gives a permutation of its rows (and never touches the padding).
    everything = datasets.farthest_point_sample_batched(padded[3:], 12, torch.tensor([12]))[0]
    assert sorted(everything.tolist()) == list(range(12))


def dense_farthest_point_sample(points, num_samples, num_valid=None):
    """The dense batched FPS the block version replaces: every step updates all B x N distances."""
    batch_size, num_points, _ = points.shape
    planes = points.to(torch.float32).permute(2, 0, 1).contiguous()  # (3, B, N)
    nearest_distance = torch.full((batch_size, num_points), float("inf"))
    if num_valid is not None:
        nearest_distance.masked_fill_(torch.arange(num_points)[None, :] >= num_valid[:, None], float("-inf"))
    selected = torch.empty(batch_size, num_samples, dtype=torch.long)
    current = torch.zeros(batch_size, dtype=torch.long)
    for step in range(num_samples):
        selected[:, step] = current
        current_point = planes.gather(2, current.view(1, batch_size, 1).expand(3, batch_size, 1))  # (3, B, 1)
        distance = (planes[0] - current_point[0]).square_()
        for axis in (1, 2):
            term = planes[axis] - current_point[axis]
            distance.addcmul_(term, term)
        torch.minimum(nearest_distance, distance, out=nearest_distance)
        nearest_distance.scatter_(1, current[:, None], -1.0)
        current = nearest_distance.argmax(dim=1)
    return selected


@pytest.mark.parametrize("block_size", [1, 8, 64])
def test_block_fps_picks_exactly_what_the_dense_update_picks(block_size):
    rng = np.random.default_rng(6)
    counts = torch.tensor([300, 257, 64, 1, 300])
    clouds = torch.zeros(5, 300, 3)  # (B, N, 3) padded
    for row, count in enumerate(counts.tolist()):
        clouds[row, :count] = torch.from_numpy(rng.normal(size=(count, 3)).astype(np.float32) * (row + 1))
    clouds[4, 200:] = clouds[4, :100]  # duplicate points
    # A 5 x 5 x 5 grid: many exactly equal distances, so ties between and within blocks decide.
    grid = torch.stack(torch.meshgrid(*[torch.arange(5.0)] * 3, indexing="ij"), -1).reshape(1, 125, 3)
    for points, valid, samples in ((clouds, counts, 300), (grid, None, 125)):
        expected = dense_farthest_point_sample(points, samples, valid)
        found = datasets.farthest_point_sample_batched(points, samples, valid, block_size=block_size)
        for row in range(points.shape[0]):
            kept = samples if valid is None else int(valid[row])  # past its count a shape repeats chosen points
            assert torch.equal(found[row, :kept], expected[row, :kept]), (block_size, row)


def test_block_fps_picks_exactly_what_the_dense_update_picks_on_the_real_shapes():
    source = FIXTURES / "modelnet40_normal_resampled"
    if not source.is_dir():
        pytest.skip(f"the real ModelNet40 fixture is not at {source}")
    ids = (source / "modelnet40_train.txt").read_text().split()
    tables = [datasets._read_text_table(source / shape_id.rsplit("_", 1)[0] / f"{shape_id}.txt", 6) for shape_id in ids]
    points = torch.from_numpy(np.stack([table[:, :3] for table in tables]))  # (3, 10000, 3)
    # All 8192 samples of the cache: the block FPS and the dense update choose the same points at every step.
    assert torch.equal(datasets.farthest_point_sample_batched(points, 8192),
                       dense_farthest_point_sample(points, 8192))


def test_morton_codes_interleave_the_cell_bits_x_then_y_then_z():
    # Hand-made cells of a 1024^3 grid over the box [0, 1023]^3: the code's bit 3k + a is bit k of axis a's cell.
    cells = torch.tensor([[0, 0, 0], [1023, 1023, 1023], [1, 0, 0], [0, 1, 0], [0, 0, 1], [5, 3, 1000], [1023, 0, 512]])
    points = cells.float()[None]  # (1, 7, 3); the box is exactly the grid
    codes = datasets._morton_codes(points, torch.ones(1, 7, dtype=torch.bool))[0]
    expected = [sum(((cell[axis] >> bit) & 1) << (3 * bit + axis) for bit in range(10) for axis in range(3))
                for cell in cells.tolist()]
    assert codes.tolist() == expected
    assert expected[:5] == [0, 2 ** 30 - 1, 1, 2, 4]


def test_batched_fps_takes_every_point_once_even_with_duplicates():
    cloud = np.random.default_rng(5).normal(size=(10, 3)).astype(np.float32)
    cloud = np.concatenate([cloud, cloud[:4]])  # (14, 3): points 10..13 duplicate points 0..3
    order = datasets.farthest_point_sample_batched(torch.from_numpy(cloud)[None], 14)[0]
    assert sorted(order.tolist()) == list(range(14))
    # The ten distinct points come first (a duplicate is at distance 0 until they are all taken).
    assert sorted(order[:10].tolist()) == list(range(10))


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
    dataset = datasets.ShapeNet55(tmp_path, "train", num_points=64)  # the parent folder works too
    assert len(dataset) == 3 and dataset.num_classes == 3
    assert dataset.categories == ["02691156", "03001627", "04379243"]  # synsets of train + test, sorted
    assert [int(dataset[index][1]) for index in range(3)] == [0, 1, 0]
    assert int(datasets.ShapeNet55(tmp_path / "ShapeNet55-34", "test", num_points=64)[0][1]) == 2
    # The subset is torch.randperm of the global RNG, then normalised.
    torch.manual_seed(5)
    points, label = dataset[1]
    torch.manual_seed(5)
    subset = torch.randperm(300)[:64].numpy()
    stored = np.load(tmp_path / "ShapeNet55-34" / "shapenet_pc" / "03001627-bbb.npy")
    np.testing.assert_allclose(points.numpy(), datasets.normalize_unit_sphere(stored[subset].astype(np.float64)),
                               atol=1e-6)
    assert points.shape == (64, 3) and label.dtype == torch.long
    assert_unit_sphere(points)
    assert not torch.equal(dataset[1][0], dataset[1][0])  # a fresh random subset on every access


def test_shapenet55_errors_name_the_file_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="ShapeNet-55"):
        datasets.ShapeNet55(tmp_path)
    write_shapenet55(tmp_path)
    dataset = datasets.ShapeNet55(tmp_path, num_points=64)
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
        datasets.ShapeNet55(tmp_path, "test", num_points=64)[0]
    (tmp_path / "shapenet_pc" / "02691156-ccc.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"02691156-ccc\.npy"):
        dataset[2]


def test_shapenet55_empty_npy_names_the_file_and_the_expected_array(tmp_path):
    write_shapenet55(tmp_path)
    path = tmp_path / "shapenet_pc" / "02691156-aaa.npy"
    path.write_bytes(b"")  # numpy alone says "No data left in file" (an EOFError)
    with pytest.raises(ValueError) as error:
        datasets.ShapeNet55(tmp_path, num_points=64)[0]
    message = str(error.value)
    assert str(path) in message and "(M, 3)" in message and ".npy" in message and "empty file" in message


def test_shapenet55_text_file_named_npy_names_the_file_without_pickle_advice(tmp_path):
    write_shapenet55(tmp_path)
    path = tmp_path / "shapenet_pc" / "02691156-aaa.npy"
    path.write_text("0.1 0.2 0.3\n0.4 0.5 0.6\n")  # numpy alone advises allow_pickle=True
    with pytest.raises(ValueError) as error:
        datasets.ShapeNet55(tmp_path, num_points=64)[0]
    message = str(error.value)
    assert str(path) in message and "(M, 3)" in message and "without the .npy signature" in message
    assert "pickle" not in message


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
        tables[shape_id] = np.loadtxt(folder / f"{shape_id}.txt", delimiter=",", dtype=np.float32)
    return tables


def test_modelnet40_txt_builds_point_mae_cache_and_returns_all_points(tmp_path, capsys):
    root = tmp_path / "modelnet40_normal_resampled"
    tables = write_modelnet40_txt(root)
    dataset = datasets.ModelNet40(tmp_path, "train", num_points=16, fps_device="cpu")  # the parent folder works too
    printed = capsys.readouterr().out
    assert "building" in printed and "wrote" in printed
    assert len(dataset) == 2 and dataset.num_classes == 40 and dataset.categories[2] == "night_stand"
    # Point-MAE's cache, next to the data, readable without this repository: [list of (M, 6), list of (1,)].
    cache_path = root / "modelnet40_train_8192pts_fps.dat"
    points_list, labels_list = load_plain(cache_path)
    assert len(points_list) == len(labels_list) == 2
    assert [label.tolist() for label in labels_list] == [[0], [2]]
    assert all(label.shape == (1,) and label.dtype == np.int32 for label in labels_list)  # Point-MAE: int32
    for entry, shape_id in zip(points_list, ("airplane_0001", "night_stand_0002")):
        table = tables[shape_id]
        # 200 < 8192 stored points: all of them, in FPS order (rows of the file, normals included).
        assert entry.shape == (200, 6) and entry.dtype == np.float32
        np.testing.assert_array_equal(entry[np.lexsort(entry.T)], table[np.lexsort(table.T)])
        reference = datasets.farthest_point_sample_numpy(table[:, :3].astype(np.float64), 64)
        np.testing.assert_array_equal(entry[:64], table[reference])  # the first k are a k-point FPS
    # The dataset: ALL stored points, normalised over all of them (max norm 1, centroid 0).
    assert dataset.points_per_sample == 200
    points, label = dataset[1]
    assert int(label) == 2 and points.shape == (200, 3) and points.dtype == torch.float32
    expected = datasets.normalize_unit_sphere(points_list[1][:, :3].astype(np.float64))
    np.testing.assert_allclose(points.numpy(), expected, atol=1e-6)
    assert abs(points.double().norm(dim=1).max().item() - 1.0) < 1e-6
    assert points.double().mean(dim=0).abs().max() < 1e-6
    # Edits to a returned tensor do not reach the dataset.
    points.zero_()
    np.testing.assert_allclose(dataset[1][0].numpy(), expected, atol=1e-6)
    assert int(datasets.ModelNet40(tmp_path, "test", num_points=16)[0][1]) == 1


def test_modelnet40_cache_is_built_once(tmp_path, monkeypatch):
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    first = datasets.ModelNet40(root, "train", num_points=16)
    cache_path = root / "modelnet40_train_8192pts_fps.dat"
    stamp = cache_path.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache exists, so it must not be rebuilt")

    monkeypatch.setattr(datasets, "build_modelnet40_fps_cache", must_not_run)
    second = datasets.ModelNet40(root, "train", num_points=16)
    assert cache_path.stat().st_mtime_ns == stamp
    assert np.array_equal(first.points, second.points) and np.array_equal(first.labels, second.labels)


@pytest.mark.parametrize("failure", ["disk full", "interrupt", "kill"])
def test_modelnet40_cache_write_is_atomic(tmp_path, monkeypatch, capsys, failure):
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    final = root / "modelnet40_train_8192pts_fps.dat"
    reference = datasets.ModelNet40(root, "train", num_points=16)  # built and saved normally, then removed
    final.unlink()
    final.with_name(final.name + ".json").unlink()  # and its record

    def replace_fails(source, destination):
        # At the last moment before the rename, the complete pickle exists only under a temporary name beside it.
        assert Path(destination) == final and not final.exists()
        assert Path(source).parent == root and Path(source) != final and Path(source).stat().st_size > 0
        raise OSError("No space left on device") if failure == "disk full" else KeyboardInterrupt()

    monkeypatch.setattr(datasets.os, "replace", replace_fails)
    if failure == "kill":
        monkeypatch.setattr(datasets.os, "unlink", lambda path: None)  # a killed process cleans up nothing
    capsys.readouterr()
    if failure == "disk full":
        # A folder that cannot take the cache: the same arrays, in memory, and a message saying why.
        dataset = datasets.ModelNet40(root, "train", num_points=16)
        assert "could not be written" in capsys.readouterr().out
        assert np.array_equal(dataset.points, reference.points)
    else:
        with pytest.raises(KeyboardInterrupt):
            datasets.ModelNet40(root, "train", num_points=16)
    leftovers = sorted(path.name for path in root.iterdir() if path.is_file() and "8192pts" in path.name)
    # Never a file under the final name; a kill leaves one stray temporary file, an exception we see none.
    if failure == "kill":
        assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    else:
        assert leftovers == []
    assert not final.exists()


def test_modelnet40_dat_cache_is_used_and_all_its_points_returned(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    rng = np.random.default_rng(2)
    cached = [rng.normal(size=(100, 6)).astype(np.float32) for _ in range(3)]
    labels = [np.array([label], dtype=np.int32) for label in (5, 39, 0)]
    with open(root / "modelnet40_train_8192pts_fps.dat", "wb") as handle:
        pickle.dump([cached, labels], handle)
    # A cache without a record of its sources (as Point-MAE writes it) and a list of another count: refused.
    with pytest.raises(ValueError, match=r"modelnet40_train_8192pts_fps\.dat holds 3 shapes, but .*"
                                         r"modelnet40_train\.txt lists 2"):
        datasets.ModelNet40(root, "train", num_points=32)
    (root / "modelnet40_train.txt").unlink()  # the cache alone: used as it is, saying what cannot be checked
    dataset = datasets.ModelNet40(root, "train", num_points=32)
    assert len(dataset) == 3
    points, label = dataset[1]
    assert int(label) == 39 and points.shape == (100, 3) and dataset.points_per_sample == 100
    np.testing.assert_allclose(points.numpy(), datasets.normalize_unit_sphere(cached[1][:, :3].astype(np.float64)),
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"modelnet40_train_8192pts_fps\.dat \(entry 0\).*num_points=200.*found 100"):
        datasets.ModelNet40(root, "train", num_points=200)


def test_modelnet40_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="modelnet40_shape_names.txt"):
        datasets.ModelNet40(tmp_path)
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    airplane = root / "airplane" / "airplane_0001.txt"
    good_airplane = airplane.read_text()
    airplane.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"airplane_0001\.txt.*\(M, 6\).*\(2, 3\)"):
        datasets.ModelNet40(root, num_points=2)
    airplane.write_text(good_airplane)
    (root / "night_stand" / "night_stand_0002.txt").write_text("1,2,3,0,0,1\nnan,5,6,0,0,1\n")
    with pytest.raises(ValueError, match=r"night_stand_0002\.txt contains 1 NaN"):
        datasets.ModelNet40(root, num_points=2)
    assert not (root / "modelnet40_train_8192pts_fps.dat").exists()  # a failed build writes nothing
    (root / "bathtub" / "bathtub_0003.txt").write_text("1,2,3,0,0,1\n4,5,6,0,0,1\n")
    with pytest.raises(ValueError, match=r"bathtub_0003\.txt: expected at least num_points=16 points, found 2"):
        datasets.ModelNet40(root, "test", num_points=16)
    (root / "modelnet40_test.txt").unlink()
    (root / "modelnet40_test_8192pts_fps.dat").unlink()
    with pytest.raises(FileNotFoundError, match="modelnet40_test.txt"):
        datasets.ModelNet40(root, "test")


def test_modelnet40_empty_txt_is_reported_as_empty(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    path = root / "airplane" / "airplane_0001.txt"
    path.write_text("")
    with pytest.raises(ValueError) as error:
        datasets.ModelNet40(root, num_points=2, fps_device="cpu")
    message = str(error.value)
    assert str(path) in message and "empty" in message and "no points" in message
    assert "different lengths" not in message


def test_modelnet40_real_fixture(tmp_path):
    source = FIXTURES / "modelnet40_normal_resampled"
    if not source.is_dir():
        pytest.skip(f"the real ModelNet40 fixture is not at {source}")
    # A copy, so that the cache is written into the test's folder and never into the shared fixture.
    root = tmp_path / "modelnet40_normal_resampled"
    shutil.copytree(source, root)
    os.chmod(root, 0o755)
    train = datasets.ModelNet40(tmp_path, "train", num_points=1024, fps_device="cpu")
    assert (root / "modelnet40_train_8192pts_fps.dat").is_file()
    assert len(train) == 3 and len(train.categories) == 40 and train.points_per_sample == 8192
    # airplane = 0, bathtub = 1, bench = 3 in modelnet40_shape_names.txt.
    assert sorted(int(train[index][1]) for index in range(3)) == [0, 1, 3]
    points_list, _ = load_plain(root / "modelnet40_train_8192pts_fps.dat")
    ids = (root / "modelnet40_train.txt").read_text().split()
    table = datasets._read_text_table(root / ids[0].rsplit("_", 1)[0] / f"{ids[0]}.txt", 6)  # (10000, 6)
    reference = datasets.farthest_point_sample_numpy(table[:, :3].astype(np.float64), 256)
    np.testing.assert_array_equal(points_list[0][:256], table[reference])
    for index in range(3):
        points, _ = train[index]
        assert points.shape == (8192, 3) and torch.isfinite(points).all()
        assert_unit_sphere(points)
        # The first 1024 are an FPS: the closest pair is far apart compared with random sampling of the surface.
        head = points[:1024]
        distances = torch.cdist(head, head) + torch.eye(1024) * 10
        assert distances.min() > 0.01


# ---------------------------------------------------------------- ModelNet40 few-shot

def test_modelnet_few_shot_reads_a_fold_and_returns_all_points(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "ModelNetFewshot" / "5way_10shot"
    folder.mkdir(parents=True)
    train = [(rng.normal(size=(120, 6)).astype(np.float32) * 3 + 1, label % 5, 7 * label) for label in range(10)]
    test = [(rng.normal(size=(120, 6)).astype(np.float32), np.int64(3), np.int64(30))]
    with open(folder / "0.pkl", "wb") as handle:
        pickle.dump({"train": train, "test": test}, handle)
    dataset = datasets.ModelNetFewShot(tmp_path, way=5, shot=10, fold=0, split="train", num_points=50)
    assert len(dataset) == 10 and dataset.num_classes == 5 and dataset.points_per_sample == 120
    points, label = dataset[7]
    assert int(label) == 2 and points.shape == (120, 3)
    # Normalised over ALL stored points (Point-MAE's few-shot dataset): max norm 1, centroid 0.
    np.testing.assert_allclose(points.numpy(), datasets.normalize_unit_sphere(train[7][0][:, :3].astype(np.float64)),
                               atol=1e-6)
    assert abs(points.double().norm(dim=1).max().item() - 1.0) < 1e-6
    assert points.double().mean(dim=0).abs().max() < 1e-6
    assert int(datasets.ModelNetFewShot(tmp_path / "ModelNetFewshot", 5, 10, 0, "test", 50)[0][1]) == 3
    with pytest.raises(FileNotFoundError, match=r"5way_10shot.1\.pkl"):
        datasets.ModelNetFewShot(tmp_path, 5, 10, 1)
    with pytest.raises(ValueError, match=r"0\.pkl \('train' entry 0\).*M >= 500.*\(120, 6\)"):
        datasets.ModelNetFewShot(tmp_path, 5, 10, 0, num_points=500)


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
    train = datasets.ScanObjectNN(tmp_path, "obj_bg", "train")
    assert len(train) == 4 and train.num_classes == 15
    points, label = train[2]
    assert points.shape == (2048, 3) and int(label) == 2
    # Training shuffles the order only: the same set of points as stored, not normalised.
    order = np.lexsort(points.numpy().T)
    np.testing.assert_array_equal(points.numpy()[order], stored[2][np.lexsort(stored[2].T)])
    assert not np.array_equal(points.numpy(), stored[2])
    fixed = datasets.ScanObjectNN(tmp_path / "h5_files", "obj_bg", "train", shuffle_points=False)
    np.testing.assert_array_equal(fixed[2][0].numpy(), stored[2])
    assert len(datasets.ScanObjectNN(tmp_path, "obj_only", "test")) == 2
    assert len(datasets.ScanObjectNN(tmp_path, "pb_t50_rs", "test")) == 3
    assert len(datasets.ScanObjectNN(tmp_path / "main_split_nobg", "obj_only", "test")) == 2  # the split folder itself


def test_scanobjectnn_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"main_split.training_objectdataset_augmentedrot_scale75\.h5"):
        datasets.ScanObjectNN(tmp_path, "pb_t50_rs", "train")
    write_scanobjectnn(tmp_path / "main_split" / "test_objectdataset.h5", broken=True)
    with pytest.raises(ValueError, match=r"test_objectdataset\.h5 contains NaN or infinite"):
        datasets.ScanObjectNN(tmp_path, "obj_bg", "test")
    with pytest.raises(ValueError, match="variant"):
        datasets.ScanObjectNN(tmp_path, "hardest")


def test_scanobjectnn_file_that_is_not_hdf5_names_the_file_and_the_keys(tmp_path):
    path = tmp_path / "main_split" / "test_objectdataset.h5"
    path.parent.mkdir()
    path.write_bytes(np.random.default_rng(0).bytes(4096))  # h5py alone: "file signature not found"
    with pytest.raises(ValueError) as error:
        datasets.ScanObjectNN(tmp_path, "obj_bg", "test")
    message = str(error.value)
    assert str(path) in message and "HDF5" in message and "'data'" in message and "'label'" in message


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
    train = datasets.ShapeNetPart(tmp_path, "train", num_points=2048)
    assert len(train) == 3  # train + val
    assert train.num_classes == 16 and train.num_parts == 50
    assert [train.category_labels[index] for index in range(3)] == [0, 11, 15]  # Airplane, Mug, Table
    for index in range(3):
        points, category, parts = train[index]
        assert points.shape == (2048, 3) and category.shape == () and parts.shape == (2048,)
        first, count = datasets.SHAPENETPART_PART_RANGES[int(category)]
        assert ((parts >= first) & (parts < first + count)).all()
        assert points.norm(dim=1).max() <= 1 + 1e-5
    # 100 stored points, 2048 requested: every stored point appears, each with its own part label.
    points, _, parts = train[0]
    normalised = datasets.normalize_unit_sphere(tables["plane1"][:, :3])
    distances = torch.cdist(torch.tensor(normalised), points.double(),
                            compute_mode="donot_use_mm_for_euclid_dist")  # (100, 2048)
    assert distances.min(dim=1).values.max() < 1e-5
    nearest_stored = distances.argmin(dim=0)
    assert torch.equal(parts, torch.tensor(tables["plane1"][:, 6], dtype=torch.long)[nearest_stored])
    # 3000 stored points, 2048 requested: drawn without replacement.
    points, _, _ = train[1]
    assert torch.unique(points, dim=0).shape[0] == 2048
    test = datasets.ShapeNetPart(tmp_path, "test")
    assert len(test) == 1 and int(test[0][1]) == 0


def test_shapenetpart_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="synsetoffset2category.txt"):
        datasets.ShapeNetPart(tmp_path)
    write_shapenetpart(tmp_path)
    # A Mug point labelled with an Airplane part.
    mug = tmp_path / SYNSETS["Mug"] / "mug1.txt"
    mug.write_text("0 0 0 0 0 1 36\n1 0 0 0 0 1 3\n")
    with pytest.raises(ValueError, match=r"mug1\.txt: expected part labels 36\.\.37"):
        datasets.ShapeNetPart(tmp_path)[1]
    mug.write_text("0 0 0 0 0 1\n")
    with pytest.raises(ValueError, match=r"mug1\.txt.*\(M, 7\).*\(1, 6\)"):
        datasets.ShapeNetPart(tmp_path)[1]
    (tmp_path / SYNSETS["Table"] / "table1.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"table1\.txt"):
        datasets.ShapeNetPart(tmp_path)[2]


def test_shapenetpart_part_ranges_are_the_standard_ones():
    ranges = datasets.SHAPENETPART_PART_RANGES
    assert sum(count for _, count in ranges) == 50
    assert all(ranges[index + 1][0] == ranges[index][0] + ranges[index][1] for index in range(15))
    named = dict(zip(datasets.SHAPENETPART_CATEGORIES, ranges))
    assert named["Motorbike"] == (30, 6) and named["Table"] == (47, 3) and named["Earphone"] == (16, 3)


# ---------------------------------------------------------------- augmentation

def test_scale_and_translate_ranges_and_independence():
    generator = torch.Generator().manual_seed(0)
    zeros = torch.zeros(256, 5, 3, dtype=torch.float64)
    shift = datasets.scale_and_translate(zeros, generator=torch.Generator().manual_seed(0))
    scaled = datasets.scale_and_translate(zeros + 1, generator=torch.Generator().manual_seed(0))
    scale = scaled - shift  # the same random numbers: out(1) - out(0) = scale
    assert shift.dtype == torch.float64
    assert shift.min() >= -0.2 and shift.max() <= 0.2 and shift.abs().max() > 0.18
    assert scale.min() >= 2 / 3 - 1e-9 and scale.max() <= 1.5 + 1e-9
    # One draw per shape and axis: constant over the points, different across shapes and axes.
    assert torch.allclose(scale, scale[:, :1].expand_as(scale))
    assert scale[:, 0, 0].unique().numel() == 256 and not torch.allclose(scale[:, 0, 0], scale[:, 0, 1])
    # Same result as a slow per-shape loop with the same numbers.
    points = torch.randn(4, 10, 3, generator=generator)
    fast = datasets.scale_and_translate(points, generator=torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    scales = torch.rand(4, 1, 3, generator=replay) * (1.5 - 2 / 3) + 2 / 3
    shifts = torch.rand(4, 1, 3, generator=replay) * 0.4 - 0.2
    for index in range(4):
        torch.testing.assert_close(fast[index], points[index] * scales[index] + shifts[index])


def test_scale_and_shift_isotropic_uses_one_scale_per_shape():
    points = torch.randn(4096, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    augmented = datasets.scale_and_shift_isotropic(points, generator=torch.Generator().manual_seed(9))
    # Replay the same random numbers on 0 and 1 to read off t and s: out(0) = t, out(1) - out(0) = s.
    shift = datasets.scale_and_shift_isotropic(torch.zeros(4096, 1, 3, dtype=torch.float64),
                                               generator=torch.Generator().manual_seed(9))  # (B, 1, 3)
    scale = datasets.scale_and_shift_isotropic(torch.ones(4096, 1, 3, dtype=torch.float64),
                                               generator=torch.Generator().manual_seed(9)) - shift  # (B, 1, 3)
    # One factor for all three axes of a shape, and points_out = s * points_in + t exactly.
    assert torch.equal(scale, scale[..., :1].expand_as(scale))
    torch.testing.assert_close(augmented, points * scale[..., :1] + shift, rtol=0, atol=1e-12)
    # Point-MAE's ranges: s in [0.8, 1.25], t in [-0.1, 0.1] per axis, both reaching close to their ends.
    assert 0.8 - 1e-12 <= scale.min() < 0.81 and 1.24 < scale.max() <= 1.25 + 1e-12
    assert -0.1 - 1e-12 <= shift.min() < -0.099 and 0.099 < shift.max() <= 0.1 + 1e-12
    assert not torch.allclose(shift[:, 0, 0], shift[:, 0, 1])  # a separate shift per axis
    assert scale[:, 0, 0].unique().numel() > 4000 and augmented.dtype == torch.float64  # a fresh draw per shape
