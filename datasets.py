"""Readers of the paper's datasets in the on-disk formats users already have, and the point-cloud augmentations.

The KR-MAE paper ("Experiments") pre-trains on ShapeNet (1,024 points per shape), fine-tunes on ScanObjectNN
(OBJ-BG, OBJ-ONLY, PB-T50-RS; 2,048 points), runs n-way m-shot classification on ModelNet40 and part
segmentation on ShapeNetPart (2,048 points, 50 part labels), following Point-MAE's recipe (docs/REFERENCE.md sections
5 and 8). This file holds one reader per dataset and the augmentations; the built-in synthetic shapes that need no
files are in synthetic.py. Neither file imports the other: copy either one alone.

Map of this file
  1. Shared helpers        normalize_unit_sphere (Point-MAE pc_normalize), dtype / points / label checks, text
                           and pickle readers that name the offending file in every error (the pickle reader allows
                           numpy's array constructors and nothing else), an atomic pickle writer.
  2. FPS                   farthest_point_sample_numpy (one shape, the obvious reference) and
                           farthest_point_sample_batched (many shapes at once, torch, CPU or CUDA; it updates only
                           the blocks of points a new sample can reach).
  3. ShapeNet55            Point-BERT layout, pre-training.
  4. ModelNet40            modelnet40_normal_resampled txt files, turned once into Point-MAE's FPS cache (.dat).
  5. ModelNetFewShot       Point-BERT few-shot episodes ({way}way_{shot}shot/{fold}.pkl).
  6. ScanObjectNN          HDF5 files of the three variants.
  7. ShapeNetPart          part segmentation (16 categories, 50 parts).
  8. Augmentation          scale_and_translate (classification) and scale_and_shift_isotropic (part segmentation),
                           Point-MAE's two augmentations, batched torch.
  9. Demo                  python datasets.py [--modelnet40 ROOT] [--split test]

What every dataset returns
  classification:  (points FloatTensor (N, 3), label LongTensor ())
  segmentation:    (points FloatTensor (N, 3), category LongTensor (), parts LongTensor (N,))
  ModelNet40 and ModelNetFewShot return ALL stored points (M = 8192 for the real data), normalised over all of
  them, as Point-MAE's datasets do; the N = 1024 the model sees are chosen later, per step, by the training script.

No equations of the paper live here. Paper -> code: "1,024 points" -> num_points=1024 (pre-training, ModelNet40),
"2,048 points" -> num_points=2048 (ScanObjectNN as stored, ShapeNetPart), n-way m-shot -> way, shot.

Shape legend: B batch, N points, M points stored per shape (8192 in Point-MAE's ModelNet40 files), S shapes in a
split, 3 = xyz, 6 = xyz + normal.

Demo: `python datasets.py` writes a tiny ModelNet40 folder of random shapes to a temporary directory, builds its
FPS cache and times the reads; `python datasets.py --modelnet40 data/ModelNet/modelnet40_normal_resampled` does the
same on the real data (building the cache next to it on the first run). No picture: these are the inputs, and
synthetic.py draws shapes.
"""

import argparse
import io
import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from util import checkpoints


# ----------------------------------------------------------------------------------------------------------------
# 1. Shared helpers
# ----------------------------------------------------------------------------------------------------------------

def normalize_unit_sphere(points):
    """Centre a point cloud on its centroid and scale it into the unit sphere (Point-MAE's pc_normalize).

    Twin of synthetic.normalize_unit_sphere (copied so that each file stands alone; keep the two identical).
    """
    # Subtract the mean of the points, not the bounding-box centre (Point-MAE pc_normalize).
    centered = points - points.mean(axis=0, keepdims=True)  # (N, 3)
    # The farthest point from the centroid ends up at distance exactly 1.
    radius = np.sqrt((centered ** 2).sum(axis=1)).max()
    # A cloud of identical points has radius 0: leave it at the origin instead of dividing by zero.
    return centered / radius if radius > 0 else centered


# dtype kinds (numpy's dtype.kind) the readers accept: real numbers for coordinates, integers for labels. Refused:
# bool 'b', complex 'c', object 'O', bytes 'S', str 'U', void 'V' (structured), datetimes 'M' / 'm'.
NUMBER_KINDS, INTEGER_KINDS = "fiu", "iu"


def _check_dtype(array, path, what, kinds, expected):
    """Raise a ValueError naming `path` unless `array` (anything np.asarray takes) has a dtype of one of `kinds`."""
    dtype = np.asarray(array).dtype
    if dtype.kind not in kinds:
        raise ValueError(f"{path}: expected {what} of {expected}, found dtype {dtype}.")


def _check_points(array, path, expected_columns, min_rows=1):
    """Raise a ValueError naming `path` unless `array` is a finite real table of shape (M, expected_columns)."""
    array = np.asarray(array)
    # A complex array would lose its imaginary part, a bool array train as 0 / 1, a string array fail in isfinite.
    _check_dtype(array, path, f"points (M, {expected_columns})", NUMBER_KINDS, "real numbers (a float dtype)")
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


def _check_labels(labels, path, num_classes, what="labels"):
    """Integer labels in 0..num_classes-1 as int64 (S,); a float, bool or string label is an error naming `path`."""
    labels = np.asarray(labels)
    # A float label would be truncated (2.7 -> 2) and a string one fail later in int(): refuse both here.
    _check_dtype(labels, path, what, INTEGER_KINDS, f"integers in 0..{num_classes - 1}")
    labels = labels.reshape(-1).astype(np.int64)  # (S,)
    if labels.size and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"{path}: expected {what} in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}.")
    return labels


def _resolve_root(root, markers, subfolders, dataset_name, layout):
    """Return the folder that holds one of `markers`: `root` itself or one of its usual subfolders."""
    root = Path(root)
    # Accept both the dataset folder itself and its parent (e.g. data/ or data/ShapeNet55-34/).
    for candidate in [root] + [root / name for name in subfolders]:
        if any((candidate / marker).exists() for marker in markers):
            return candidate
    raise FileNotFoundError(
        f"{dataset_name} data was not found under '{root}'. Expected layout: {layout}")


def _read_text(path, expected):
    """The text of a UTF-8 (or ASCII) file; binary bytes give an error naming the file, the offset and `expected`."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a text file: byte {error.start} is {data[error.start:error.start + 1]!r}, "
                         f"which is not UTF-8 text; expected {expected}.") from None


def _read_lines(path, dataset_name, layout, expected="one entry per line"):
    """Non-empty stripped lines of a list file; a missing, binary or empty file gives an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{dataset_name} list file '{path}' does not exist. Expected layout: {layout}")
    lines = [line.strip() for line in _read_text(path, f"a text file of {expected}").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty: expected {expected}, found no entries. Expected layout: {layout}")
    return lines


def _read_text_table(path, expected_columns):
    """Read a text table of numbers separated by commas or spaces into float32 (M, C); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Point file '{path}' does not exist.")
    text = _read_text(path, f"lines of {expected_columns} numbers")
    # Count the columns of the first line so that a table with the wrong width is reported, not reshaped.
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    num_columns = len(first_line.replace(",", " ").split())
    if num_columns == 0:
        raise ValueError(f"{path} is empty: expected lines of {expected_columns} numbers (one point per line), "
                         f"found no points.")
    # Fast path (1.2-1.4x faster per ModelNet40 file, docs/RELIABILITY.md): numpy's C reader, for a table with one
    # kind of separator, commas (ModelNet40) or whitespace (ShapeNetPart). It gives the same float32 values as the
    # general path (tests/test_datasets.py checks both on the real files); whatever it refuses is read by the
    # general path, which accepts mixed separators and names what is wrong.
    try:
        table = np.loadtxt(io.StringIO(text), delimiter="," if "," in first_line else None, dtype=np.float32,
                           comments=None, ndmin=2)  # (M, C)
    except ValueError:
        table = None
    if table is not None and table.shape[1] == num_columns:
        _check_points(table, path, expected_columns)
        return table
    try:
        # Commas and whitespace both separate numbers (ModelNet40 uses commas, ShapeNetPart spaces).
        values = np.array(text.replace(",", " ").split(), dtype=np.float32)  # (M * C,)
    except ValueError as error:
        raise ValueError(f"{path} contains text that is not a number ({error}).") from None
    if values.size % num_columns != 0:
        raise ValueError(
            f"{path}: expected {expected_columns} numbers on every line, found lines of different lengths.")
    table = values.reshape(-1, num_columns)  # (M, C)
    _check_points(table, path, expected_columns)
    return table


try:  # numpy 2 keeps its internals in numpy._core; numpy 1.x in numpy.core
    from numpy._core import multiarray as _numpy_multiarray, numeric as _numpy_numeric
except ImportError:
    from numpy.core import multiarray as _numpy_multiarray, numeric as _numpy_numeric


def _latin1_bytes(text, encoding):
    """What `_codecs.encode(text, 'latin1')` gives: the bytes of a protocol 0-2 pickle, and nothing else."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as pickle's latin1 bytes helper, found "
                                     f"encoding {encoding!r} for a {type(text).__name__}")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and scalars inside lists, tuples and dicts, and refuses every other global.

    The dataset caches (.dat, .pkl) are pickles; a plain pickle.load would run any code a tampered file names.
    ALLOWED is the exact list of (module, name) pairs that numpy's own array and scalar pickles name, under numpy 1.x
    (numpy.core...) and numpy 2 (numpy._core...), protocols 0 to 5 (tests/test_bad_inputs_readers.py pickles every
    dtype the readers accept under each protocol and checks that nothing else is named). The pair is looked up as it
    is, never resolved by its dots, so ('numpy', 'core.multiarray.os') or ('numpy.dtypes', '__builtins__.get') is
    refused like ('os', 'system'). Lists, tuples, dicts, strings and numbers need no global at all.
    NOTE(deviation): Point-MAE / Point-BERT use plain pickle.load; we refuse everything else these files never hold.
    """
    ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,  # the class _reconstruct builds
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_multiarray._reconstruct,  # numpy 1.x, protocols 0-4
        ("numpy._core.multiarray", "_reconstruct"): _numpy_multiarray._reconstruct,  # numpy 2
        ("numpy.core.multiarray", "scalar"): _numpy_multiarray.scalar,  # numpy scalars (np.int64(3))
        ("numpy._core.multiarray", "scalar"): _numpy_multiarray.scalar,
        ("numpy.core.numeric", "_frombuffer"): _numpy_numeric._frombuffer,  # protocol 5
        ("numpy._core.numeric", "_frombuffer"): _numpy_numeric._frombuffer,
        ("_codecs", "encode"): _latin1_bytes,  # protocols 0-2 store bytes as _codecs.encode(text, 'latin1')
    }

    def find_class(self, module, name):
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"it names the global '{module}.{name}', which is refused: only numpy's array and scalar "
                f"constructors are allowed (any other global could run code)")
        if isinstance(target, type):
            return target  # np.ndarray and np.dtype: built-in types, which a pickle cannot modify
        # A fresh wrapper per use, so that a pickle's BUILD opcode can never set attributes on a shared function.
        return lambda *args: target(*args)


def _load_numpy_pickle(path):
    """Load a pickle of lists, tuples, dicts and numpy arrays; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Pickle file '{path}' does not exist.")
    try:
        with open(path, "rb") as handle:
            return _NumpyOnlyUnpickler(handle).load()
    except Exception as error:  # a broken or hostile file: whatever fails, say which file and why
        raise ValueError(f"{path} could not be read as a pickle of numpy arrays: {error} "
                         f"({type(error).__name__}).") from None


def _to_tensors(points, *labels):
    """numpy points (N, 3) and integer labels -> (FloatTensor (N, 3), LongTensor ... ).

    Twin of synthetic._to_tensors.
    """
    # torch.tensor copies, so a caller editing a sample in place never corrupts a dataset's in-memory cache.
    return (torch.tensor(np.asarray(points), dtype=torch.float32),
            *(torch.tensor(np.asarray(label), dtype=torch.long) for label in labels))


def _write_pickle_atomically(content, path):
    """Pickle `content` to `path` so that `path` is either absent or complete, never half written.

    The pickle goes to a temporary file in the same folder (so the rename cannot cross file systems), is flushed
    and fsync'ed to disk, and only then renamed over `path` by os.replace, which is atomic on POSIX and Windows.
    A crash or a kill before the rename leaves at most a stray '<name>.<pid>.<ns>.tmp' file; any exception we see
    removes it.
    Raises OSError when the folder is not writable or the disk is full.
    """
    path = Path(path)
    # A name no other writer uses (host, process id, a random token: checkpoints.temporary_path), opened exclusively;
    # unlike tempfile.mkstemp (mode 0600) the file gets the permissions of the user's umask, like any file the user
    # writes.
    temporary = Path(checkpoints.temporary_path(path))
    handle = open(temporary, "xb")  # OSError here (read-only folder): nothing was created, nothing to remove
    try:
        with handle:
            # Protocol 4 is readable by every Python 3 from 3.4 on, like the caches Point-MAE writes.
            pickle.dump(content, handle, protocol=4)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        # BaseException: also KeyboardInterrupt, so an interrupted build leaves no temporary file behind.
        try:
            os.unlink(temporary)
        except OSError:
            pass  # already renamed or already gone
        raise


# ----------------------------------------------------------------------------------------------------------------
# 2. Farthest point sampling: the obvious one-shape reference and the batched version that builds the caches
# ----------------------------------------------------------------------------------------------------------------

def farthest_point_sample_numpy(points, num_samples, start_index=0):
    """Indices (num_samples,) of a farthest point sampling of points (N, 3), starting at `start_index`.

    Numpy twin of tokenizer.farthest_point_sample, in float64: the obvious reference that the tests check
    farthest_point_sample_batched and the ModelNet40 cache against. FPS is greedy, so the first k indices of a
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


def _spread_bits(count=1024):
    """(count,) long: value i with its 10 bits moved to bits 0, 3, 6, ...: one axis of a Z-order code."""
    values = torch.arange(count)
    spread = torch.zeros(count, dtype=torch.long)
    for bit in range(10):
        spread |= ((values >> bit) & 1) << (3 * bit)
    return spread


_SPREAD_BITS = _spread_bits()  # (1024,) a lookup table: 3 lookups per point instead of 30 bit operations


def _morton_codes(points, valid):
    """(B, N, 3) -> (B, N) long: the Z-order code of each point's cell in a 1024^3 grid over its shape's box."""
    largest = torch.finfo(torch.float32).max
    low = torch.where(valid[..., None], points, largest).amin(dim=1, keepdim=True)  # (B, 1, 3) over real points
    high = torch.where(valid[..., None], points, -largest).amax(dim=1, keepdim=True)  # (B, 1, 3)
    cells = ((points - low) / (high - low).clamp_min(1e-12) * 1023).clamp(0, 1023).long()  # (B, N, 3)
    spread = _SPREAD_BITS.to(points.device)[cells]  # (B, N, 3) the bits of x, y, z, each spread 3 apart
    return spread[..., 0] | (spread[..., 1] << 1) | (spread[..., 2] << 2)  # interleaved: x0 y0 z0 x1 y1 z1 ...


@torch.no_grad()
def farthest_point_sample_batched(points, num_samples, num_valid=None, block_size=64):
    """Farthest point sampling of many shapes at once: points (B, N, 3) -> indices (B, num_samples) long.

    The same choices as tokenizer.farthest_point_sample's algorithm (start at point 0, squared distances in
    float32, ties to the lowest index as argmax does), with two additions for the cache builder, neither of which
    changes the result on shapes of distinct points:
      - num_valid (B,) long: row b holds num_valid[b] real points, the rest of it is padding that is never chosen,
        so shapes stored with different numbers of points share one batch;
      - a chosen point's distance is set to -1, so a shape with duplicate points (distance 0 to a chosen one) still
        gets every one of its points before any is repeated: sampling all N gives a permutation of them.
    How it saves work: late in FPS a new sample is near few points, and only those can get closer to the chosen
    set. The points are sorted along a Z-order curve and cut into blocks of block_size neighbours with a bounding
    box each; a step updates only the blocks whose box is nearer to the new sample than their farthest point's
    distance (about 5 of 157 blocks per shape on ModelNet40's 10000 points); the next sample is the first
    maximum of the block(s) holding the largest distance. The distances it computes are the same float32 operations as the dense update's, so the
    indices are identical (tests/test_datasets.py checks them against the dense version on the real shapes).
    Runs on points.device.
    """
    batch_size, num_points, _ = points.shape
    device = points.device
    points = points.to(torch.float32)
    counts = (num_valid.to(device) if num_valid is not None
              else torch.full((batch_size,), num_points, dtype=torch.long, device=device))  # (B,)
    num_blocks = -(-num_points // block_size)  # nb
    padded_points = num_blocks * block_size  # Np = nb * L
    positions = torch.arange(padded_points, device=device)  # (Np,)
    valid = positions[None, :num_points] < counts[:, None]  # (B, N)
    # 1. Order: Z-order (padding last), cut into blocks; inside a block by index, so a block's first maximum is
    #    its lowest-index one. `order` maps a sorted position to the original index; num_points marks padding.
    code = _morton_codes(points, valid).masked_fill_(~valid, 1 << 40)  # (B, N)
    order = code.argsort(dim=1, stable=True)  # (B, N)
    order = order.masked_fill(~valid.gather(1, order), num_points)
    order = torch.cat([order, order.new_full((batch_size, padded_points - num_points), num_points)], dim=1)
    order = order.view(batch_size, num_blocks, block_size).sort(dim=2).values.view(batch_size, padded_points)
    real = order < num_points  # (B, Np)
    # Padding slots copy their block's first point (a real one when the block holds any), so boxes stay tight;
    # their distance stays -inf.
    block_first = order.view(batch_size, num_blocks, 1, block_size)[..., 0].expand(-1, -1, block_size)  # (B, nb, L)
    block_first = block_first.reshape(batch_size, padded_points)  # (B, Np)
    source = torch.where(real, order, torch.where(block_first < num_points, block_first, order[:, :1]))  # (B, Np)
    planes = points.gather(1, source[..., None].expand(-1, -1, 3)).permute(2, 0, 1).contiguous()  # (3, B, Np)
    inverse = torch.zeros(batch_size, num_points + 1, dtype=torch.long, device=device)  # original -> sorted position
    inverse.scatter_(1, order, positions.expand(batch_size, -1).contiguous())
    # 2. Squared distance of every point to its nearest chosen point so far (padding -inf), and per block its
    #    box and its largest distance.
    nearest = torch.full((batch_size, padded_points), float("inf"), device=device).masked_fill_(~real, float("-inf"))
    block_planes = planes.view(3, batch_size * num_blocks, block_size)  # (3, B * nb, L)
    block_nearest = nearest.view(batch_size * num_blocks, block_size)  # (B * nb, L)
    flat_order, flat_planes, flat_nearest = order.view(-1), planes.view(3, -1), nearest.view(-1)  # (B * Np)
    box_low = block_planes.amin(dim=2).view(3, batch_size, num_blocks)  # (3, B, nb)
    box_high = block_planes.amax(dim=2).view(3, batch_size, num_blocks)  # (3, B, nb)
    block_max = block_nearest.amax(dim=1)  # (B * nb,)
    row_offset = torch.arange(batch_size, device=device) * padded_points  # (B,)
    # A box bound is computed in float32 too; shrinking it by 1e-4 (far above float32's rounding) keeps a block
    # whose points could tie or get closer, so skipping never changes a distance.
    shrink = 1 - 1e-4
    selected = torch.empty(batch_size, num_samples, dtype=torch.long, device=device)  # (B, num_samples)
    current = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) start at point 0, like the twin
    for step in range(num_samples):
        # The loop runs over the samples (inherent to FPS); every step is vectorised over the B shapes.
        selected[:, step] = current
        flat_position = inverse.gather(1, current[:, None]).squeeze(1) + row_offset  # (B,)
        center = flat_planes.index_select(1, flat_position)  # (3, B) the point just chosen
        flat_nearest.index_fill_(0, flat_position, -1.0)  # the chosen point is never chosen again
        # Lower bound of the squared distance from the new sample to each block's box.
        gap = torch.maximum(box_low - center[..., None], center[..., None] - box_high).clamp_min_(0)  # (3, B, nb)
        bound = gap.square_().sum(dim=0).view(-1)  # (B * nb,)
        active = (bound.mul_(shrink) <= block_max).nonzero().squeeze(1)  # (A,) blocks that can change
        block_points = block_planes.index_select(1, active)  # (3, A, L)
        block_center = center.index_select(1, active // num_blocks)[..., None]  # (3, A, 1)
        # Squared distance to the point just chosen: (x - cx)^2 + (y - cy)^2 + (z - cz)^2, the dense update's ops.
        distance = (block_points[0] - block_center[0]).square_()  # (A, L)
        for axis in (1, 2):
            term = block_points[axis] - block_center[axis]  # (A, L)
            distance.addcmul_(term, term)
        updated = torch.minimum(block_nearest.index_select(0, active), distance)  # (A, L)
        block_nearest.index_copy_(0, active, updated)
        block_max.index_copy_(0, active, updated.amax(dim=1))
        # The next sample is the point farthest from everything chosen so far (ties: lowest index). Inside a block
        # the points are in index order, so its first maximum is its lowest-index one; when several blocks of a
        # shape hold the largest distance (rare), the lowest of their first maxima wins.
        maxima = block_max.view(batch_size, num_blocks)  # (B, nb)
        holders = (maxima == maxima.amax(dim=1, keepdim=True)).view(-1).nonzero().squeeze(1)  # (C,) C >= B
        first = block_nearest.index_select(0, holders).argmax(dim=1)  # (C,)
        candidates = flat_order.index_select(0, holders * block_size + first)  # (C,) original indices
        current = candidates.new_full((batch_size,), num_points).scatter_reduce_(
            0, holders // num_blocks, candidates, "amin")  # (B,)
    return selected


# ----------------------------------------------------------------------------------------------------------------
# 3. ShapeNet55 (pre-training, Point-BERT layout)
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
        except (ValueError, OSError, EOFError) as error:
            # numpy's own messages mislead here: "No data left in file" for an empty file, and for a text file a
            # hint to pass allow_pickle=True (never do: a pickle can run code). Say what the file is instead.
            with open(path, "rb") as handle:
                signature = handle.read(6)
            found = ("an empty file" if not signature else
                     "a file without the .npy signature (a text file or another format?)" if signature != b"\x93NUMPY"
                     else f"a .npy file numpy could not read as a numeric array ({error})")
            raise ValueError(f"{path} could not be read: expected a .npy file holding a float array of shape (M, 3) "
                             f"(written by numpy.save), found {found}.") from None
        _check_points(stored, path, 3, min_rows=self.num_points)
        # Point-BERT / Point-MAE: a random subset first, normalisation second.
        subset = torch.randperm(stored.shape[0])[:self.num_points].numpy()  # (N,)
        return _to_tensors(normalize_unit_sphere(stored[subset].astype(np.float64)), self.labels[index])


# ----------------------------------------------------------------------------------------------------------------
# 4. ModelNet40 (txt files, turned once into Point-MAE's FPS cache)
# ----------------------------------------------------------------------------------------------------------------
MODELNET40_LAYOUT = ("ROOT/modelnet40_shape_names.txt, ROOT/modelnet40_{train,test}.txt (ids like airplane_0001) "
                     "and ROOT/<class>/<id>.txt (10000 lines 'x,y,z,nx,ny,nz'), or Point-MAE's cache "
                     "ROOT/modelnet40_{train,test}_8192pts_fps.dat; ROOT may also be the parent of "
                     "modelnet40_normal_resampled/.")
MODELNET40_CACHE_POINTS = 8192  # Point-MAE / Point-BERT: N_POINTS 8192, hence the cache name ..._8192pts_fps.dat
# Shapes per FPS batch: each step of the block FPS costs a few dozen small torch calls whatever the batch, so
# bigger batches spread that cost (256 shapes of 10000 points: about 60 MB of decoded text and 40 MB of FPS state
# on the CPU; 1024 on a GPU: about 250 MB on the device, and as much in decoded text files on the host).
MODELNET40_FPS_CHUNK = {"cpu": 256, "cuda": 1024}
# How the cache's points are chosen, kept in its record: a cache sampled otherwise is rebuilt.
MODELNET40_CACHE_SAMPLING = {"num_samples": MODELNET40_CACHE_POINTS, "fps_start": 0, "fps_distance": "float32",
                             "columns": "x,y,z,nx,ny,nz"}


def build_modelnet40_fps_cache(paths, labels, num_samples=MODELNET40_CACHE_POINTS, device=None, chunk_size=None,
                               title="ModelNet40"):
    """Decode every txt file once and order its points by FPS: the content of Point-MAE's cache.

    Returns [list of (M, 6) float32 arrays, list of (1,) int32 arrays], M = min(num_samples, points in the file):
    the rows of each file in farthest-point order, so every prefix of an entry is an FPS subsample of the shape.
    A file with fewer than num_samples points (test fixtures, small files) keeps all its points, in FPS order.
    device: where the FPS runs (None: CUDA when available, else the CPU). Shapes are processed chunk_size at a time,
    which bounds the memory to one chunk of decoded files plus the result.
    NOTE(deviation): Point-MAE starts each FPS at a random point; we start at point 0, so the cache is
    deterministic (the same files give the same cache on every machine and every run).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    chunk_size = chunk_size or MODELNET40_FPS_CHUNK.get(device.type, 32)
    stored_points, stored_labels = [], []
    start = last_report = time.perf_counter()
    for first in range(0, len(paths), chunk_size):
        # Decode a chunk of files (18-20 ms per 10000-line file on one CPU thread; docs/RELIABILITY.md).
        tables = [_read_text_table(path, 6) for path in paths[first:first + chunk_size]]  # each (N_i, 6)
        counts = torch.tensor([table.shape[0] for table in tables])  # (B,)
        # Pad the chunk to its largest shape; padding rows are never chosen (num_valid).
        padded = np.zeros((len(tables), int(counts.max()), 3), dtype=np.float32)  # (B, N, 3)
        for row, table in enumerate(tables):
            padded[row, :table.shape[0]] = table[:, :3]
        samples = min(num_samples, int(counts.max()))
        order = farthest_point_sample_batched(torch.from_numpy(padded).to(device), samples, counts)  # (B, samples)
        order = order.cpu().numpy()
        for row, table in enumerate(tables):
            kept = min(num_samples, table.shape[0])  # M of this shape
            stored_points.append(table[order[row, :kept]])  # (M, 6) rows of the file, FPS order
        # Point-MAE / Point-BERT store each label as np.array([class]).astype(np.int32).
        stored_labels += [np.array([label], dtype=np.int32) for label in labels[first:first + chunk_size]]
        now = time.perf_counter()
        if now - last_report > 10 or len(stored_points) == len(paths):
            last_report = now
            left = (now - start) / len(stored_points) * (len(paths) - len(stored_points))
            print(f"{title}: {len(stored_points)}/{len(paths)} shapes FPS-ordered on {device.type}, "
                  f"{now - start:.0f} s so far, about {left:.0f} s left", flush=True)
    return [stored_points, stored_labels]


class ModelNet40(Dataset):
    """ModelNet40 shapes: ALL stored points, xyz only, unit-sphere normalised over all of them (Point-MAE).

    Returns (points (M, 3) float32, label ()), M = self.points_per_sample: 8192 with Point-MAE's cache, which is
    already in farthest-point order (so its first N points are an N-point FPS). num_points (the N the model needs,
    1024) is only checked: a shape with fewer points is an error. The N-point subsets are drawn later, per step,
    by the training script (docs/REFERENCE.md section 8).

    Data on disk: Point-MAE's cache modelnet40_{split}_8192pts_fps.dat when it is in the folder; otherwise the txt
    files are decoded ONCE, on the first use of a split, and that cache is written next to them (atomically: a
    temporary file, fsync, rename), in Point-MAE's own layout so that its code can read it too. If the folder is
    not writable, the same arrays are built in memory by the constructor (in the main process, before any
    DataLoader worker starts) and a message says why the cache could not be written. Every later access is an
    in-memory slice (the constructor reads the cache in about 1 ms per shape, a read takes about 0.03 ms).
    The build's time per shape is in docs/RELIABILITY.md, with the command that measures it.

    What the cache was built from is recorded beside it, in modelnet40_{split}_8192pts_fps.dat.json: the list's
    ids, each txt file's size and modification time, the sampling settings, and the cache file's own size and
    modification time. A cache whose record no longer matches (another cache in its place, a txt edited after
    the build, a list with other ids or another count) is rebuilt, saying why; when its txt files are gone it
    cannot be rebuilt and the missing file is named. A cache without a record (Point-MAE's download) is checked
    by its count and label order against the list (Point-MAE writes the shapes in list order) and refused when
    they differ; when they agree, a message says that whether the txt files changed cannot be checked.
    NOTE(unspecified): sizes and modification times, not a hash of the 9,843 txt files (which every run would
    have to read again): an edit that keeps a file's size and modification time is not seen, and a copy that
    does not keep modification times (cp without -p) leads to one rebuild.

    fps_device: where the one-time FPS runs (None: CUDA when available, else the CPU).
    """

    def __init__(self, root, split="train", num_points=1024, fps_device=None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', found '{split}'.")
        cache_name = f"modelnet40_{split}_{MODELNET40_CACHE_POINTS}pts_fps.dat"
        self.root = _resolve_root(root, [cache_name, "modelnet40_shape_names.txt"],
                                  ["modelnet40_normal_resampled", "ModelNet/modelnet40_normal_resampled"],
                                  "ModelNet40", MODELNET40_LAYOUT)
        self.split, self.num_points, self.num_classes = split, num_points, 40
        names_path = self.root / "modelnet40_shape_names.txt"
        self.categories = _read_lines(names_path, "ModelNet40", MODELNET40_LAYOUT) if names_path.is_file() else None
        self.cache_path = self.root / cache_name
        self.record_path = self.cache_path.with_name(cache_name + ".json")  # what the cache was built from
        listing = self._read_list()  # (ids, paths, labels), or None when the list files are absent
        stale = None  # why an existing cache must be rebuilt
        if self.cache_path.is_file():
            stored_points, labels = self._load_cache()
            sources = [f"{self.cache_path} (entry {index})" for index in range(len(stored_points))]
            stale = self._check_cache(listing, labels)
        if not self.cache_path.is_file() or stale:
            if listing is None:
                self._list_text_files()  # raises the FileNotFoundError that names the missing list file
            ids, paths, labels = listing
            self._check_text_files(paths)
            if stale:
                print(f"ModelNet40 {self.split}: rebuilding {self.cache_path}: {stale}", flush=True)
            sources = [str(path) for path in paths]
            stored_points, labels = self._build_cache(ids, paths, labels, fps_device, stale_cache=self._file_stamp())
        wrong_size = next((index for index, label in enumerate(labels) if np.size(label) != 1), None)
        if wrong_size is not None:
            raise ValueError(f"{sources[wrong_size]}: expected one label per shape (Point-MAE: an array of shape "
                             f"(1,)), found shape {np.shape(labels[wrong_size])}.")
        self.labels = np.concatenate([_check_labels(label, sources[index], 40, "a label")
                                      for index, label in enumerate(labels)]) if labels else np.zeros(0, np.int64)
        self.points = self._normalise(stored_points, sources)  # (S, M, 3)
        self.points_per_sample = self.points.shape[1]  # M

    def _read_list(self):
        """(ids, txt paths, labels) of the split's list, or None when the names file or the list file is absent."""
        if self.categories is None or not (self.root / f"modelnet40_{self.split}.txt").is_file():
            return None
        return self._list_text_files()

    def _list_text_files(self):
        """Ids, paths of the split's txt files and their labels, from the list files."""
        names_path = self.root / "modelnet40_shape_names.txt"
        if self.categories is None:
            raise FileNotFoundError(f"ModelNet40 file '{names_path}' does not exist. Layout: {MODELNET40_LAYOUT}")
        list_path = self.root / f"modelnet40_{self.split}.txt"
        ids = _read_lines(list_path, "ModelNet40", MODELNET40_LAYOUT, "one shape id (like airplane_0001) per line")
        class_index = {name: index for index, name in enumerate(self.categories)}
        # The class is the id without its trailing _NNNN ('night_stand_0001' -> 'night_stand').
        class_names = [shape_id.rsplit("_", 1)[0] for shape_id in ids]
        unknown = sorted(set(class_names) - set(class_index))
        if unknown:
            raise ValueError(f"{list_path} names classes missing from {names_path}: {unknown[:5]}.")
        paths = [self.root / name / f"{shape_id}.txt" for name, shape_id in zip(class_names, ids)]
        return ids, paths, [class_index[name] for name in class_names]

    def _check_text_files(self, paths):
        missing = [path for path in paths if not path.is_file()]
        if missing:
            list_path = self.root / f"modelnet40_{self.split}.txt"
            raise FileNotFoundError(f"ModelNet40 shape '{missing[0]}' is listed in {list_path} but missing "
                                    f"({len(missing)} of {len(paths)} missing). Expected layout: {MODELNET40_LAYOUT}")

    def _record(self, ids, paths):
        """What a cache is built from: the list's ids, each txt file's size and modification time, the sampling."""
        stats = [path.stat() for path in paths]  # taken before decoding: an edit during the build shows as stale
        return {"ids": list(ids), "num_shapes": len(ids), "txt_size_mtime_ns": [[st.st_size, st.st_mtime_ns]
                                                                                 for st in stats],
                "sampling": MODELNET40_CACHE_SAMPLING}

    def _check_cache(self, listing, labels):
        """None when the cache matches the list and the txt files it was built from; else why it must be rebuilt.

        A cache without our record (Point-MAE's own download) is checked by its count and label order against the
        list (Point-MAE writes the shapes in list order) and refused, not replaced, when they differ.
        """
        if not self.record_path.is_file():
            if listing is None:
                print(f"ModelNet40 {self.split}: {self.cache_path} carries no record of what it was built from and "
                      f"modelnet40_{self.split}.txt is absent: its provenance cannot be checked.", flush=True)
                return None
            list_labels = np.array(listing[2], dtype=np.int64)
            if len(labels) != len(list_labels):
                raise ValueError(f"{self.cache_path} holds {len(labels)} shapes, but "
                                 f"{self.root / f'modelnet40_{self.split}.txt'} lists {len(list_labels)}: the cache "
                                 f"was built from other files. Delete it to rebuild it from the txt files.")
            cached = np.array([np.asarray(label).reshape(-1)[:1] for label in labels]).reshape(-1)  # (S,)
            mismatch = np.flatnonzero(cached != list_labels)
            if mismatch.size:
                raise ValueError(f"{self.cache_path} entry {mismatch[0]} has label {cached[mismatch[0]]}, but "
                                 f"{self.root / f'modelnet40_{self.split}.txt'} line {mismatch[0] + 1} is "
                                 f"{listing[0][mismatch[0]]} (label {list_labels[mismatch[0]]}): the cache was built "
                                 f"from other files. Delete it to rebuild it from the txt files.")
            print(f"ModelNet40 {self.split}: {self.cache_path} carries no record of what it was built from (as "
                  f"Point-MAE writes it): its {len(labels)} shapes and their labels match the list, but whether the "
                  f"txt files changed since cannot be checked.", flush=True)
            return None
        try:
            record = json.loads(_read_text(self.record_path, "a JSON record"))
            built = record["cache_size_mtime_ns"], record["ids"], record["txt_size_mtime_ns"], record["sampling"]
        except (ValueError, KeyError, TypeError) as error:  # a torn or foreign record: rebuild rather than trust
            return f"its record {self.record_path} cannot be read ({error})."
        cache_stat = self.cache_path.stat()
        if built[0] != [cache_stat.st_size, cache_stat.st_mtime_ns]:
            return (f"{self.cache_path} is not the file its record {self.record_path} describes (size and "
                    f"modification time {built[0]}, found {[cache_stat.st_size, cache_stat.st_mtime_ns]}).")
        if len(labels) != len(built[1]):
            return f"it holds {len(labels)} shapes, its record {len(built[1])}."
        if built[3] != MODELNET40_CACHE_SAMPLING:
            return f"it was sampled with {built[3]}, this code samples with {MODELNET40_CACHE_SAMPLING}."
        if listing is None:
            print(f"ModelNet40 {self.split}: modelnet40_{self.split}.txt is absent, so the cache {self.cache_path} "
                  f"cannot be checked against the list and txt files it was built from.", flush=True)
            return None
        ids, paths, _ = listing
        if list(ids) != built[1]:
            changed = next((index for index, (now, then) in enumerate(zip(ids, built[1])) if now != then),
                           min(len(ids), len(built[1])))
            return (f"it was built from {len(built[1])} shapes, {self.root / f'modelnet40_{self.split}.txt'} lists "
                    f"{len(ids)} and differs from line {changed + 1} on.")
        if not all(path.is_file() for path in paths):
            print(f"ModelNet40 {self.split}: some txt files are absent, so whether they changed since the cache "
                  f"{self.cache_path} was built cannot be checked; its ids match the list.", flush=True)
            return None
        for path, then in zip(paths, built[2]):
            now = path.stat()
            if [now.st_size, now.st_mtime_ns] != then:
                return (f"{path} changed after the cache was built (size and modification time {then}, found "
                        f"{[now.st_size, now.st_mtime_ns]}).")
        return None

    def _write_record(self, record):
        """Save the record beside the cache, bound to the cache file's size and modification time.

        Written after the cache: a kill in between leaves a record that describes another file (or none), so the
        next run rebuilds (or checks the count). A torn record does not parse and also means a rebuild.
        """
        cache_stat = self.cache_path.stat()
        record = {"cache_size_mtime_ns": [cache_stat.st_size, cache_stat.st_mtime_ns], **record}
        self.record_path.write_text(json.dumps(record))

    def _file_stamp(self):
        """(size, modification time) of the cache file, or None when there is none."""
        if not self.cache_path.is_file():
            return None
        stat = self.cache_path.stat()
        return stat.st_size, stat.st_mtime_ns

    def _build_cache(self, ids, paths, labels, fps_device, stale_cache=None):
        """Decode and FPS-order every txt file once, then try to save Point-MAE's cache next to the data, with the
        record of what it was built from. One process builds a cache at a time, holding '<cache>.lock' beside it
        (checkpoints.folder_lock): another one that needs the same cache waits for it, then reads the finished
        cache; a temporary file of a killed build is removed before the next build writes."""
        with checkpoints.folder_lock(f"{self.cache_path}.lock", f"ModelNet40 {self.split} cache", wait=True,
                                     optional=True):  # optional: a read-only folder builds in memory, unlocked
            # A cache other than the stale one this process found (stale_cache: its size and modification time) was
            # written, with its record, by the process this one waited for: read it if it matches the list.
            if self.cache_path.is_file() and self._file_stamp() != stale_cache:
                cached_points, cached_labels = self._load_cache()
                if self._check_cache((ids, paths, labels), cached_labels) is None:
                    return cached_points, cached_labels
            checkpoints.remove_stale_temporaries(self.cache_path)
            print(f"ModelNet40 {self.split}: building {self.cache_path} from {len(paths)} txt files "
                  f"(once; later runs read the cache)...", flush=True)
            start = time.perf_counter()
            record = self._record(ids, paths)
            content = build_modelnet40_fps_cache(paths, labels, device=fps_device, title=f"ModelNet40 {self.split}")
            elapsed = time.perf_counter() - start
            try:
                _write_pickle_atomically(content, self.cache_path)
                self._write_record(record)
                print(f"ModelNet40 {self.split}: wrote {self.cache_path} in {elapsed:.1f} s "
                      f"({1000 * elapsed / max(len(paths), 1):.0f} ms per shape).", flush=True)
            except OSError as error:
                # A read-only dataset folder: keep the arrays in memory for this run; the next run builds them again.
                print(f"ModelNet40 {self.split}: the cache {self.cache_path} could not be written ({error}); using "
                      f"the {len(paths)} shapes FPS-ordered in memory ({elapsed:.1f} s), rebuilt on every run.",
                      flush=True)
            return content

    def _load_cache(self):
        """Point-MAE's cache: a pickle of [list of (M, 6) point arrays, list of (1,) label arrays]."""
        content = _load_numpy_pickle(self.cache_path)
        if not (isinstance(content, (list, tuple)) and len(content) == 2 and len(content[0]) == len(content[1])):
            raise ValueError(f"{self.cache_path}: expected a pickle of [list of point arrays, list of labels] "
                             f"of equal length, found {type(content).__name__}.")
        return list(content[0]), list(content[1])

    def _normalise(self, stored_points, sources):
        """Check every shape, keep xyz and normalise it over all its points: (S, M, 3) float32."""
        if not stored_points:
            raise ValueError(f"ModelNet40 {self.split} split under {self.root} holds no shapes; expected at least one.")
        for index, stored in enumerate(stored_points):
            _check_points(np.asarray(stored), sources[index], 6)  # (M, 6), finite
        counts = [len(stored) for stored in stored_points]
        short = [index for index, count in enumerate(counts) if count < self.num_points]
        if short:
            raise ValueError(f"{sources[short[0]]}: expected at least num_points={self.num_points} points, found "
                             f"{counts[short[0]]} ({len(short)} of {len(counts)} shapes have too few).")
        # NOTE(unspecified): every sample has the same M so that batches stack: when shapes hold different numbers
        # of points (only in small hand-made folders; Point-MAE's cache holds 8192 for every shape) we keep the
        # first min(counts) of each, which is still an FPS subsample since the points are in FPS order.
        count = min(counts)
        points = np.empty((len(stored_points), count, 3), dtype=np.float32)  # (S, M, 3)
        for index, stored in enumerate(stored_points):
            # Point-MAE: pc_normalize over ALL stored points, before any sub-sampling (docs/REFERENCE.md section 8).
            points[index] = normalize_unit_sphere(np.asarray(stored)[:count, :3].astype(np.float64))  # (M, 3)
        return points

    def __len__(self):
        return self.labels.shape[0]

    def __getitem__(self, index):
        # An in-memory slice; _to_tensors copies it, so edits to the returned tensor never reach self.points.
        return _to_tensors(self.points[index], self.labels[index])  # (M, 3), ()


# ----------------------------------------------------------------------------------------------------------------
# 5. ModelNet40 few-shot episodes (Point-BERT layout)
# ----------------------------------------------------------------------------------------------------------------
FEWSHOT_LAYOUT = ("ROOT/{way}way_{shot}shot/{fold}.pkl (e.g. ROOT/5way_10shot/0.pkl), each a dict "
                  "{'train': [...], 'test': [...]} of (points (8192, 6), episode label, ModelNet40 label); "
                  "ROOT may also be the parent of ModelNetFewshot/.")


class ModelNetFewShot(Dataset):
    """One n-way m-shot fold: ALL stored points (M = 8192), xyz, unit-sphere normalised over all of them.

    Returns (points (M, 3) float32, episode label ()), M = self.points_per_sample, like Point-MAE's few-shot dataset
    (pc_normalize on all stored points). num_points (the N the model needs) is only checked: a shape with fewer
    points is an error. The whole fold is checked and normalised once, in the constructor.
    """

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
        self.num_points, self.num_classes, self.split = num_points, way, split
        items = list(content[split])
        if not items:
            raise ValueError(f"{self.path}: the '{split}' list is empty; expected at least one shape.")
        stored_points, labels = [], []
        for index, item in enumerate(items):
            where = f"{self.path} ('{split}' entry {index})"
            if not (isinstance(item, (tuple, list)) and len(item) == 3):
                raise ValueError(f"{where}: expected a tuple (points, episode label, original label).")
            stored = np.asarray(item[0])  # (M, 6)
            _check_points(stored, where, 6, min_rows=num_points)
            if np.size(item[1]) != 1:
                raise ValueError(f"{where}: expected the episode label as one integer, found shape "
                                 f"{np.shape(item[1])}.")
            label = int(_check_labels(item[1], where, way, "the episode label")[0])
            stored_points.append(stored)
            labels.append(label)
        # NOTE(unspecified): as in ModelNet40, samples of different lengths are cut to the shortest so that batches
        # stack (Point-BERT's folds hold 8192 points for every shape, so nothing is cut there).
        count = min(len(stored) for stored in stored_points)
        self.points = np.empty((len(items), count, 3), dtype=np.float32)  # (S, M, 3)
        for index, stored in enumerate(stored_points):
            # Point-MAE's few-shot dataset: pc_normalize over all stored points.
            self.points[index] = normalize_unit_sphere(stored[:count, :3].astype(np.float64))  # (M, 3)
        self.labels = np.array(labels, dtype=np.int64)  # (S,)
        self.points_per_sample = count  # M

    def __len__(self):
        return self.labels.shape[0]

    def __getitem__(self, index):
        return _to_tensors(self.points[index], self.labels[index])  # (M, 3), ()


# ----------------------------------------------------------------------------------------------------------------
# 6. ScanObjectNN (HDF5)
# ----------------------------------------------------------------------------------------------------------------
# variant -> (folder, training file, test file) inside the ScanObjectNN download (h5_files/).
SCANOBJECTNN_FILES = {
    "obj_bg": ("main_split", "training_objectdataset.h5", "test_objectdataset.h5"),
    "obj_only": ("main_split_nobg", "training_objectdataset.h5", "test_objectdataset.h5"),
    "pb_t50_rs": ("main_split", "training_objectdataset_augmentedrot_scale75.h5",
                  "test_objectdataset_augmentedrot_scale75.h5"),
}
SCANOBJECTNN_LAYOUT = ("ROOT/main_split/ and ROOT/main_split_nobg/ (or ROOT/h5_files/main_split/ ...), holding "
                      "training_objectdataset.h5, test_objectdataset.h5 and, in main_split/, the "
                      "*_augmentedrot_scale75.h5 files of PB-T50-RS; each an HDF5 file with keys 'data' (S, 2048, 3) "
                      "and 'label' (S,).")
# ScanObjectNN's label order (its shape_names.txt).
SCANOBJECTNN_CATEGORIES = ("bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
                           "bed", "pillow", "sink", "sofa", "toilet")


class ScanObjectNN(Dataset):
    """ScanObjectNN: points exactly as stored (N = 2048, Point-MAE does not normalise them), 15 classes.

    root is the folder holding main_split/ and main_split_nobg/ (or h5_files/ above them, or the split folder
    itself). NOTE(unspecified): like Point-MAE, the training split shuffles the point order on every access
    (torch RNG), so FPS starting at point 0 starts at a random point; set shuffle_points=False to disable.
    num_points (optional): the N the model reads; clouds stored with fewer points are an error naming the file.
    """

    def __init__(self, root, variant="obj_bg", split="train", shuffle_points=None, num_points=None):
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
                                    f"split '{split}'); download ScanObjectNN and pass the folder holding {folder}/. "
                                    f"Expected layout: {SCANOBJECTNN_LAYOUT}")
        try:
            handle = h5py.File(self.path, "r")
        except OSError as error:  # h5py's message ("file signature not found") names neither the file nor the format
            raise ValueError(f"{self.path} could not be opened as an HDF5 file ({error}); expected an HDF5 file with "
                             f"keys 'data' (S, 2048, 3) and 'label' (S,), as ScanObjectNN ships.") from None
        with handle:
            if "data" not in handle or "label" not in handle:
                raise ValueError(f"{self.path}: expected HDF5 keys 'data' and 'label', found {sorted(handle)}.")
            points, labels = handle["data"][()], handle["label"][()]
        # dtype first: astype(float32) would drop a complex part and turn bools and int labels into numbers silently.
        _check_dtype(points, f"{self.path} 'data'", "points (S, 2048, 3)", NUMBER_KINDS, "real numbers (float32)")
        self.labels = _check_labels(labels, f"{self.path} 'label'", 15)  # (S,) int64 in 0..14
        self.points = np.asarray(points, dtype=np.float32)  # (S, 2048, 3)
        if self.points.ndim != 3 or self.points.shape[2] != 3 or self.points.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.path}: expected 'data' of shape (S, 2048, 3) and 'label' of shape (S,), "
                             f"found {self.points.shape} and {np.shape(labels)}.")
        if self.points.shape[0] == 0:
            raise ValueError(f"{self.path} holds 0 shapes ('data' of shape {self.points.shape}); expected at least "
                             f"one.")
        if num_points is not None and self.points.shape[1] < num_points:
            raise ValueError(f"{self.path}: expected clouds of at least num_points={num_points} points, found "
                             f"{self.points.shape[1]} per cloud ('data' of shape {self.points.shape}).")
        if not np.isfinite(self.points).all():
            raise ValueError(f"{self.path} contains NaN or infinite values in 'data'; expected only finite numbers.")
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
# 7. ShapeNetPart (part segmentation)
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


def _read_shapenetpart_list(list_path):
    """The entries 'shape_data/<synset>/<id>' of a split json; a broken file gives an error naming it."""
    expected = "a JSON list of strings 'shape_data/<synset>/<id>'"
    try:
        entries = json.loads(_read_text(list_path, expected))
    except json.JSONDecodeError as error:
        raise ValueError(f"{list_path} is not valid JSON ({error}); expected {expected}.") from None
    if not isinstance(entries, list):
        raise ValueError(f"{list_path}: expected {expected}, found a JSON {type(entries).__name__}.")
    for entry in entries:
        if not (isinstance(entry, str) and entry.count("/") >= 1 and all(entry.split("/")[-2:])):
            raise ValueError(f"{list_path}: expected {expected}, found the entry {entry!r}.")
    return entries


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
        lists = ("train", "val") if split == "train" else ("test",)
        for list_name in lists:
            list_path = self.root / "train_test_split" / f"shuffled_{list_name}_file_list.json"
            if not list_path.is_file():
                raise FileNotFoundError(f"ShapeNetPart list '{list_path}' does not exist. "
                                        f"Expected layout: {SHAPENETPART_LAYOUT}")
            for entry in _read_shapenetpart_list(list_path):
                synset, shape_id = entry.split("/")[-2:]
                if synset not in category_by_synset:
                    raise ValueError(f"{list_path}: entry '{entry}' names synset {synset}, which is not in "
                                     f"{category_path}.")
                self.files.append(self.root / synset / f"{shape_id}.txt")
                self.category_labels.append(category_by_synset[synset])
        if not self.files:
            raise ValueError(f"ShapeNetPart '{split}' lists {', '.join(lists)} under {self.root / 'train_test_split'} "
                             f"name no shapes; expected at least one entry 'shape_data/<synset>/<id>'.")
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
        fractional = np.flatnonzero(table[:, 6] != np.rint(table[:, 6]))
        if fractional.size:  # rounding 3.5 to a part label would be a guess: refuse it
            raise ValueError(f"{path}: expected whole-number part labels in the 7th column, found "
                             f"{table[fractional[0], 6]} on point {fractional[0]} ({fractional.size} such points).")
        parts = table[:, 6].astype(np.int64)  # (M,) global part labels 0..49
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
# 8. Augmentation
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


def scale_and_shift_isotropic(points, generator=None):
    """Point-MAE's part-segmentation augmentation: per shape ONE scale U[0.8, 1.25] for all three axes, then a
    shift U[-0.1, 0.1] per axis (its provider.random_scale_point_cloud, then provider.shift_point_cloud).

    points (B, N, 3) -> (B, N, 3) = s * points + t with s (B, 1, 1) and t (B, 1, 3), on points.device.
    Unlike scale_and_translate, the shape keeps its proportions. `generator` (optional) is a torch.Generator; the
    random numbers are drawn on its device and moved to the points.
    """
    batch = points.shape[0]
    device = generator.device if generator is not None else points.device
    # One scale per shape, shared by x, y and z; one shift per shape and axis; both broadcast over the N points.
    scale = torch.rand(batch, 1, 1, generator=generator, device=device) * (1.25 - 0.8) + 0.8  # (B, 1, 1) Point-MAE
    shift = torch.rand(batch, 1, 3, generator=generator, device=device) * 0.2 - 0.1  # (B, 1, 3) Point-MAE: 0.1
    scale, shift = scale.to(points.device, points.dtype), shift.to(points.device, points.dtype)
    return points * scale + shift  # (B, N, 3)


# ----------------------------------------------------------------------------------------------------------------
# 9. Demo: build a ModelNet40 cache and time the reads
# ----------------------------------------------------------------------------------------------------------------

def _write_random_modelnet40(root, shapes=8, stored_points=10000):
    """A tiny ModelNet40 folder in the real layout: `shapes` random shapes (points on a unit sphere), 2 classes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet40_shape_names.txt").write_text("airplane\nbathtub\n")
    ids = [f"{('airplane', 'bathtub')[index % 2]}_{index:04d}" for index in range(shapes)]
    for split in ("train", "test"):
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
    for shape_id in ids:
        direction = rng.normal(size=(stored_points, 3))  # (M, 3)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        (root / shape_id.rsplit("_", 1)[0]).mkdir(exist_ok=True)
        np.savetxt(root / shape_id.rsplit("_", 1)[0] / f"{shape_id}.txt", np.concatenate([direction, direction], 1),
                   fmt="%.6f", delimiter=",")


def main():
    parser = argparse.ArgumentParser(description="Build (once) and time the ModelNet40 FPS cache; show the "
                                                 "augmentations' shapes.")
    parser.add_argument("--modelnet40", default="", help="a modelnet40_normal_resampled folder (default: a tiny "
                                                         "random one in a temporary directory)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--fps-device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # comparable timings on a shared machine
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.modelnet40) if args.modelnet40 else Path(scratch) / "modelnet40_normal_resampled"
        if not args.modelnet40:
            _write_random_modelnet40(root)
        start = time.perf_counter()
        dataset = ModelNet40(root, args.split, num_points=1024, fps_device=args.fps_device)
        print(f"constructor: {time.perf_counter() - start:.2f} s for {len(dataset)} shapes "
              f"(includes the one-time cache build when it ran)")
        points, label = dataset[0]
        print(f"sample: points {tuple(points.shape)} {points.dtype}, label {tuple(label.shape)}={int(label)}, "
              f"points_per_sample {dataset.points_per_sample}, max |p| {points.norm(dim=1).max():.6f}, "
              f"|centroid| {points.mean(dim=0).norm():.1e}")
        start = time.perf_counter()
        again = ModelNet40(root, args.split, num_points=1024)
        print(f"second constructor (reads the cache): {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        reads = 0
        while time.perf_counter() - start < 1.0:
            again[reads % len(again)]
            reads += 1
        print(f"read: {1e6 * (time.perf_counter() - start) / reads:.1f} us per shape (in memory)")
    batch = torch.stack([dataset[index % len(dataset)][0][:1024] for index in range(4)])  # (B, N, 3)
    print(f"scale_and_translate: {tuple(batch.shape)} -> {tuple(scale_and_translate(batch).shape)}")
    print(f"scale_and_shift_isotropic: {tuple(batch.shape)} -> {tuple(scale_and_shift_isotropic(batch).shape)}")


if __name__ == "__main__":
    main()
