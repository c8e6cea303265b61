"""Bad inputs to every reader of datasets.py: each gives a clear error naming the file, what was found and what was
expected, and no file runs code.

Three parts:
  1. The pickle allow-list: numpy's own pickles of every dtype the readers accept (protocols 0-5, numpy 1.x and 2
     module names) load; crafted pickles (dotted names, attributes of allowed modules, __reduce__ payloads,
     STACK_GLOBAL, EXT codes) are refused before they run, in-process and through finetune.py.
  2. The ModelNet40 cache's record: a cache from other files, a txt edited after the build, a list of another count.
  3. A table of bad files, one row per case: the reader, the expected exception and the words its message holds.
"""

import copyreg
import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import datasets
from test_datasets import SYNSETS, write_modelnet40_txt, write_scanobjectnn, write_shapenet55, write_shapenetpart

REPOSITORY = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures"
# Every dtype a reader accepts: real numbers for points, integers for labels.
ACCEPTED_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                   np.uint8, np.uint16, np.uint32, np.uint64]


# ---------------------------------------------------------------- 1. the pickle allow-list

class RecordingUnpickler(datasets._NumpyOnlyUnpickler):
    """The project's unpickler, noting every global a pickle names."""

    def __init__(self, handle):
        super().__init__(handle)
        self.named = set()

    def find_class(self, module, name):
        self.named.add((module, name))
        return super().find_class(module, name)


def numpy_pickles():
    """(description, object) of the arrays and scalars the dataset files hold, in every dtype the readers accept."""
    for dtype in ACCEPTED_DTYPES:
        array = (np.arange(24).reshape(4, 6) % 7).astype(dtype)
        yield f"{np.dtype(dtype)} C-order", array
        yield f"{np.dtype(dtype)} Fortran-order", np.asfortranarray(array)
        yield f"{np.dtype(dtype)} byte-swapped", array.astype(np.dtype(dtype).newbyteorder("S"))
        yield f"{np.dtype(dtype)} scalar", dtype(3)
    # The shapes of the two formats: a few-shot fold and Point-MAE's ModelNet40 cache.
    yield "few-shot fold", {"train": [(np.ones((8, 6), np.float32), 1, np.int64(7))], "test": []}
    yield "modelnet40 cache", [[np.ones((8, 6), np.float32)], [np.array([3], dtype=np.int32)]]


def rename_numpy_core(data):
    """The same pickle as numpy 1.x writes it: module names numpy.core.* instead of numpy._core.*.

    Protocols 4 and 5 prefix strings with their length and group opcodes into frames of a stated length, so both are
    rewritten along with the names.
    """
    operations = list(pickletools.genops(data))
    ends = [position for _, _, position in operations[1:]] + [len(data)]
    output, frame_starts = bytearray(), []
    for (opcode, argument, position), end in zip(operations, ends):
        chunk = data[position:end]
        if opcode.name == "FRAME":
            frame_starts.append(len(output))
        elif opcode.name == "SHORT_BINUNICODE" and argument.startswith("numpy._core"):
            name = argument.replace("numpy._core", "numpy.core").encode()
            chunk = b"\x8c" + bytes([len(name)]) + name
        elif opcode.name == "GLOBAL" and argument.startswith("numpy._core"):
            chunk = b"c" + argument.replace("numpy._core", "numpy.core").replace(" ", "\n").encode() + b"\n"
        output += chunk
    # Each frame's length: up to the next frame (or the end of the pickle).
    for index, start in enumerate(frame_starts):
        stop = frame_starts[index + 1] if index + 1 < len(frame_starts) else len(output)
        output[start + 1:start + 9] = struct.pack("<Q", stop - start - 9)
    return bytes(output)


@pytest.mark.filterwarnings("ignore:numpy.core.numeric is deprecated:DeprecationWarning")
def test_numpy_pickles_of_every_accepted_dtype_load_and_name_only_the_allow_list():
    named = set()
    for protocol in range(6):
        for description, obj in numpy_pickles():
            for data in (pickle.dumps(obj, protocol=protocol),
                         rename_numpy_core(pickle.dumps(obj, protocol=protocol))):  # numpy 2 and 1.x names
                unpickler = RecordingUnpickler(io.BytesIO(data))
                loaded = unpickler.load()
                named |= unpickler.named
                # The same object as an unrestricted pickle.load gives (our own pickle: safe to load plainly).
                assert pickle.dumps(loaded, protocol=protocol) == pickle.dumps(pickle.loads(data), protocol=protocol), \
                    (description, protocol)
    # Every allowed pair is one that numpy's pickles really name (nothing allowed "just in case") ...
    assert named == set(datasets._NumpyOnlyUnpickler.ALLOWED)
    # ... and no numpy.dtypes class and no dotted name is among them.
    assert not any(module == "numpy.dtypes" or "." in name for module, name in named)


def test_the_real_fixture_cache_reads_back_through_the_allow_list(tmp_path):
    source = FIXTURES / "modelnet40_normal_resampled"
    if not source.is_dir():
        pytest.skip(f"the real ModelNet40 fixture is not at {source}")
    root = tmp_path / "modelnet40_normal_resampled"
    shutil.copytree(source, root)
    os.chmod(root, 0o755)
    (root / "modelnet40_test.txt").write_text("bench_0001\n")  # one shape: the test stays short
    built = datasets.ModelNet40(root, "test", num_points=1024, fps_device="cpu")
    unpickler = RecordingUnpickler(open(root / "modelnet40_test_8192pts_fps.dat", "rb"))
    points, labels = unpickler.load()
    assert unpickler.named <= set(datasets._NumpyOnlyUnpickler.ALLOWED)
    assert points[0].shape == (8192, 6) and points[0].dtype == np.float32 and labels[0].tolist() == [3]
    assert np.array_equal(datasets.normalize_unit_sphere(points[0][:, :3].astype(np.float64)).astype(np.float32),
                          built.points[0])


def unicode(text):
    """BINUNICODE: a str of any length (protocols 1-5)."""
    encoded = text.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def global_named(module, name, protocol):
    """Push the global module.name: GLOBAL before protocol 4, STACK_GLOBAL (two strings) from protocol 4 on."""
    if protocol >= 4:
        return unicode(module) + unicode(name) + b"\x93"
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def call(function, *arguments):
    """function(*arguments): MARK, the arguments, TUPLE, REDUCE."""
    return function + b"(" + b"".join(arguments) + b"tR"


def as_pickle(body, protocol):
    return b"\x80" + bytes([protocol]) + body + b"."


class ReducesToSystem:
    """An object whose pickle runs a shell command: the classic __reduce__ payload."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def payload(kind, marker, folder):
    """(pickle bytes, the refused global as the error names it) of a crafted pickle that would create `marker`."""
    code = f"open({str(marker)!r}, 'w').close()"
    touch = f"touch {marker}"
    if kind == "numpy.dtypes.__builtins__.get (dotted, protocol 4)":
        getter = global_named("numpy.dtypes", "__builtins__.get", 4)
        return as_pickle(call(call(getter, unicode("eval")), unicode(code)), 4), "numpy.dtypes.__builtins__.get"
    if kind == "numpy + dtypes.__builtins__.get (dotted, protocol 4)":
        getter = global_named("numpy", "dtypes.__builtins__.get", 4)
        return as_pickle(call(call(getter, unicode("eval")), unicode(code)), 4), "numpy.dtypes.__builtins__.get"
    if kind == "numpy.dtypes.__builtins__":
        return as_pickle(global_named("numpy.dtypes", "__builtins__", 4), 4), "numpy.dtypes.__builtins__"
    if kind == "numpy.dtypes.Float32DType (a module numpy's arrays never name)":
        return as_pickle(global_named("numpy.dtypes", "Float32DType", 2), 2), "numpy.dtypes.Float32DType"
    if kind == "_frombuffer.__builtins__.get (an allowed function's attribute)":
        getter = global_named("numpy._core.numeric", "_frombuffer.__builtins__.get", 4)
        return (as_pickle(call(call(getter, unicode("eval")), unicode(code)), 4),
                "numpy._core.numeric._frombuffer.__builtins__.get")
    if kind == "_reconstruct.__globals__ (numpy 1.x name)":
        return (as_pickle(global_named("numpy.core.multiarray", "_reconstruct.__globals__", 4), 4),
                "numpy.core.multiarray._reconstruct.__globals__")
    if kind == "numpy.load of a second pickle":
        inner = folder / "inner.pkl"
        inner.write_bytes(pickle.dumps(ReducesToSystem(touch)))
        loader = global_named("numpy", "load", 2)
        return as_pickle(call(loader, unicode(str(inner)), b"N", b"\x88"), 2), "numpy.load"  # np.load(f, None, True)
    if kind == "os.system":
        return as_pickle(call(global_named("os", "system", 2), unicode(touch)), 2), "os.system"
    if kind == "builtins.eval":
        return as_pickle(call(global_named("builtins", "eval", 2), unicode(code)), 2), "builtins.eval"
    if kind == "builtins.exec":
        return as_pickle(call(global_named("builtins", "exec", 2), unicode(code)), 2), "builtins.exec"
    if kind == "builtins.getattr(__import__('os'), 'system')":
        module = call(global_named("builtins", "__import__", 2), unicode("os"))
        system = call(global_named("builtins", "getattr", 2), module, unicode("system"))
        return as_pickle(call(system, unicode(touch)), 2), "builtins.getattr"
    if kind.startswith("__reduce__ protocol"):
        protocol = int(kind.split()[-1])
        return pickle.dumps(ReducesToSystem(touch), protocol=protocol), f"{os.system.__module__}.system"
    if kind == "__reduce__ inside a valid few-shot fold":
        fold = {"train": [(np.ones((8, 6), np.float32), 0, ReducesToSystem(touch))], "test": []}
        return pickle.dumps(fold, protocol=4), f"{os.system.__module__}.system"
    if kind == "protocol-4 STACK_GLOBAL with memoised names":
        body = (b"\x95" + struct.pack("<Q", 0) + b"\x8c\x02os\x94\x8c\x06system\x94\x93\x94" + unicode(touch)
                + b"\x85R")  # FRAME, memoised module and name, STACK_GLOBAL, TUPLE1, REDUCE
        data = bytearray(as_pickle(body, 4))
        data[3:11] = struct.pack("<Q", len(data) - 11 - 1)
        return bytes(data), "os.system"
    if kind == "EXT2 extension code for os.system":
        return as_pickle(b"\x83" + struct.pack("<H", 0x5F5F) + b"(" + unicode(touch) + b"tR", 2), "os.system"
    raise KeyError(kind)


PAYLOADS = ["numpy.dtypes.__builtins__.get (dotted, protocol 4)", "numpy + dtypes.__builtins__.get (dotted, protocol 4)",
            "numpy.dtypes.__builtins__", "numpy.dtypes.Float32DType (a module numpy's arrays never name)",
            "_frombuffer.__builtins__.get (an allowed function's attribute)",
            "_reconstruct.__globals__ (numpy 1.x name)", "numpy.load of a second pickle", "os.system",
            "builtins.eval", "builtins.exec", "builtins.getattr(__import__('os'), 'system')",
            "__reduce__ protocol 0", "__reduce__ protocol 2", "__reduce__ protocol 3", "__reduce__ protocol 5",
            "__reduce__ inside a valid few-shot fold", "protocol-4 STACK_GLOBAL with memoised names",
            "EXT2 extension code for os.system"]
# Payloads that only fetch an object (nothing to call without a further global): refused, but a plain pickle.load
# would not run them either, so there is no marker to see.
FETCH_ONLY = {"numpy.dtypes.__builtins__", "numpy.dtypes.Float32DType (a module numpy's arrays never name)",
              "_reconstruct.__globals__ (numpy 1.x name)"}


@pytest.fixture
def extension_code_for_os_system():
    """Register os.system under extension code 0x5F5F (what an EXT2 opcode names) for the test, then remove it."""
    copyreg.add_extension("os", "system", 0x5F5F)
    yield
    copyreg.remove_extension("os", "system", 0x5F5F)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_crafted_pickles_are_refused_before_they_run(tmp_path, kind, extension_code_for_os_system):
    marker = tmp_path / "marker"
    data, refused = payload(kind, marker, tmp_path)
    path = tmp_path / "crafted.pkl"
    path.write_bytes(data)
    with pytest.raises(ValueError) as error:
        datasets._load_numpy_pickle(path)
    message = str(error.value)
    assert str(path) in message and f"'{refused}'" in message and "refused" in message, message
    assert not marker.exists()
    if kind not in FETCH_ONLY:
        # The payload is real: a plain pickle.load runs it and the marker appears. (This runs second: the first
        # resolution of an extension code is cached by copyreg, and later loads skip find_class.)
        try:
            pickle.loads(data)
        except Exception:
            pass  # the payload ran before whatever failed next
        assert marker.exists(), f"the payload '{kind}' does not work, so refusing it proves nothing"


def test_crafted_pickles_are_refused_by_the_readers_themselves(tmp_path):
    marker = tmp_path / "marker"
    fold = tmp_path / "ModelNetFewshot" / "5way_10shot" / "0.pkl"
    fold.parent.mkdir(parents=True)
    fold.write_bytes(payload("__reduce__ inside a valid few-shot fold", marker, tmp_path)[0])
    with pytest.raises(ValueError, match=r"0\.pkl could not be read .*'(posix|os)\.system', which is refused"):
        datasets.ModelNetFewShot(tmp_path, way=5, shot=10, fold=0)
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    (root / "modelnet40_train_8192pts_fps.dat").write_bytes(
        payload("numpy.dtypes.__builtins__.get (dotted, protocol 4)", marker, tmp_path)[0])
    with pytest.raises(ValueError, match=r"fps\.dat could not be read .*'numpy\.dtypes\.__builtins__\.get'"):
        datasets.ModelNet40(root, "train", num_points=16)
    assert not marker.exists()


@pytest.mark.parametrize("task", ["fewshot", "modelnet40"])
def test_a_crafted_dataset_file_stops_finetune_py_with_a_clear_message(tmp_path, task):
    marker = tmp_path / "marker"
    data, refused = payload("numpy.dtypes.__builtins__.get (dotted, protocol 4)", marker, tmp_path)
    if task == "fewshot":
        root = tmp_path / "ModelNetFewshot"
        crafted = root / "5way_10shot" / "0.pkl"  # where finetune.py --way 5 --shot 10 --fold 0 looks
        crafted.parent.mkdir(parents=True)
        flags = ["--way", "5", "--shot", "10", "--fold", "0"]
    else:
        root = tmp_path / "modelnet40_normal_resampled"
        write_modelnet40_txt(root)
        crafted = root / "modelnet40_train_8192pts_fps.dat"
        flags = []
    crafted.write_bytes(data)
    result = subprocess.run([sys.executable, "finetune.py", "--task", task, "--data_root", str(root), "--device",
                             "cpu", "--out_dir", str(tmp_path / "runs"), *flags], cwd=REPOSITORY,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert f"{crafted} could not be read as a pickle of numpy arrays" in result.stderr, result.stderr[-2000:]
    assert f"'{refused}', which is refused" in result.stderr
    assert not marker.exists()


# ---------------------------------------------------------------- 2. the ModelNet40 cache's record

def test_a_cache_is_rebuilt_when_its_txt_files_or_list_change(tmp_path, capsys):
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    cache = root / "modelnet40_train_8192pts_fps.dat"
    first = datasets.ModelNet40(root, "train", num_points=16, fps_device="cpu")
    record = json.loads(cache.with_name(cache.name + ".json").read_text())
    assert record["ids"] == ["airplane_0001", "night_stand_0002"] and record["num_shapes"] == 2
    assert record["sampling"]["num_samples"] == 8192 and record["sampling"]["fps_start"] == 0
    assert record["cache_size_mtime_ns"] == [cache.stat().st_size, cache.stat().st_mtime_ns]
    capsys.readouterr()
    # Unchanged: read as it is.
    datasets.ModelNet40(root, "train", num_points=16)
    assert "rebuilding" not in capsys.readouterr().out
    # A txt file edited after the build: rebuilt, and the new points are the edited file's.
    airplane = root / "airplane" / "airplane_0001.txt"
    edited = np.random.default_rng(7).normal(size=(200, 6)).astype(np.float32)
    np.savetxt(airplane, edited, fmt="%.6f", delimiter=",")
    second = datasets.ModelNet40(root, "train", num_points=16)
    printed = capsys.readouterr().out
    assert "rebuilding" in printed and "airplane_0001.txt changed after the cache was built" in printed
    assert not np.array_equal(first.points[0], second.points[0])
    np.testing.assert_array_equal(second.points[1], first.points[1])  # the other shape is the same
    # A list naming other shapes (of the same count): rebuilt from them.
    (root / "modelnet40_train.txt").write_text("airplane_0001\nbathtub_0003\n")
    third = datasets.ModelNet40(root, "train", num_points=16)
    assert "differs from line 2 on" in capsys.readouterr().out and third.labels.tolist() == [0, 1]
    # A list of another count: rebuilt.
    (root / "modelnet40_train.txt").write_text("airplane_0001\n")
    fourth = datasets.ModelNet40(root, "train", num_points=16)
    assert "built from 2 shapes" in capsys.readouterr().out and len(fourth) == 1


def test_a_cache_from_other_files_is_rebuilt_or_refused(tmp_path, capsys):
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    cache = root / "modelnet40_train_8192pts_fps.dat"
    datasets.ModelNet40(root, "train", num_points=16)
    # Another cache put in its place (its record stays behind and describes a different file): rebuilt.
    other = [[np.ones((20, 6), np.float32) * index for index in range(3)], [np.array([0], np.int32)] * 3]
    with open(cache, "wb") as handle:
        pickle.dump(other, handle)
    capsys.readouterr()
    rebuilt = datasets.ModelNet40(root, "train", num_points=16)
    assert "is not the file its record" in capsys.readouterr().out and len(rebuilt) == 2
    # The same foreign cache without any record (as Point-MAE writes one) and txt files missing: refused, not used.
    with open(cache, "wb") as handle:
        pickle.dump(other, handle)
    cache.with_name(cache.name + ".json").unlink()
    with pytest.raises(ValueError, match=r"fps\.dat holds 3 shapes, but .*modelnet40_train\.txt lists 2"):
        datasets.ModelNet40(root, "train", num_points=16)
    # A record whose txt files are gone cannot be rebuilt: refused when the list differs.
    datasets.ModelNet40(root, "test", num_points=16)
    shutil.rmtree(root / "bathtub")
    (root / "modelnet40_test.txt").write_text("bathtub_0004\n")
    with pytest.raises(FileNotFoundError, match=r"bathtub_0004\.txt' is listed in .*modelnet40_test\.txt"):
        datasets.ModelNet40(root, "test", num_points=16)


def test_a_point_mae_cache_without_record_is_checked_by_count_and_labels(tmp_path, capsys):
    root = tmp_path / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    cache = root / "modelnet40_train_8192pts_fps.dat"
    points = [np.random.default_rng(index).normal(size=(20, 6)).astype(np.float32) for index in range(2)]
    with open(cache, "wb") as handle:  # list order airplane (0), night_stand (2), as Point-MAE builds it
        pickle.dump([points, [np.array([0], np.int32), np.array([2], np.int32)]], handle)
    dataset = datasets.ModelNet40(root, "train", num_points=16)
    assert len(dataset) == 2 and "whether the txt files changed since cannot be checked" in capsys.readouterr().out
    with open(cache, "wb") as handle:
        pickle.dump([points, [np.array([2], np.int32), np.array([0], np.int32)]], handle)
    with pytest.raises(ValueError, match=r"fps\.dat entry 0 has label 2, but .*line 1 is airplane_0001 \(label 0\)"):
        datasets.ModelNet40(root, "train", num_points=16)


# ---------------------------------------------------------------- 3. the table of bad files

def edit_modelnet40(tmp, edit):
    root = tmp / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    edit(root)
    return lambda: datasets.ModelNet40(root, "train", num_points=16, fps_device="cpu")


def modelnet40_cache(tmp, points=None, labels=None, keep_list=False):
    """A Point-MAE cache (no record) of two shapes with the given points / labels; the list removed unless kept."""
    root = tmp / "modelnet40_normal_resampled"
    write_modelnet40_txt(root)
    points = points if points is not None else [np.ones((20, 6), np.float32) * index for index in (1, 2)]
    labels = labels if labels is not None else [np.array([0], np.int32), np.array([2], np.int32)]
    with open(root / "modelnet40_train_8192pts_fps.dat", "wb") as handle:
        pickle.dump([points, labels], handle)
    if not keep_list:
        (root / "modelnet40_train.txt").unlink()
    return lambda: datasets.ModelNet40(root, "train", num_points=16)


def few_shot(tmp, train=None, content=None, raw=None):
    """A 5-way 10-shot fold 0 holding `train` (default: two good shapes), or `content`, or the bytes `raw`."""
    path = tmp / "ModelNetFewshot" / "5way_10shot" / "0.pkl"
    path.parent.mkdir(parents=True)
    good = [(np.random.default_rng(index).normal(size=(64, 6)).astype(np.float32), index, 7) for index in range(2)]
    if raw is not None:
        path.write_bytes(raw)
    else:
        with open(path, "wb") as handle:
            pickle.dump(content if content is not None else {"train": train if train is not None else good,
                                                             "test": good}, handle)
    return lambda: datasets.ModelNetFewShot(tmp, way=5, shot=10, fold=0, split="train", num_points=32)


def scan(tmp, data=None, label=None, num_points=None):
    """A ScanObjectNN OBJ-BG training file with the given 'data' / 'label' (default: 4 good clouds of 2048)."""
    import h5py
    path = tmp / "main_split" / "training_objectdataset.h5"
    write_scanobjectnn(path)
    if data is not None or label is not None:
        with h5py.File(path, "r+") as handle:
            for key, value in (("data", data), ("label", label)):
                if value is not None:
                    del handle[key]
                    handle[key] = value
    return lambda: datasets.ScanObjectNN(tmp, "obj_bg", "train", num_points=num_points)


def edit_shapenetpart(tmp, edit, split="train"):
    write_shapenetpart(tmp)
    edit(tmp)
    return lambda: datasets.ShapeNetPart(tmp, split)[1]


def split_json(tmp, name="train"):
    return tmp / "train_test_split" / f"shuffled_{name}_file_list.json"


def edit_shapenet55(tmp, edit):
    write_shapenet55(tmp)
    edit(tmp)
    return lambda: datasets.ShapeNet55(tmp, "train", num_points=64)[0]


def npy(tmp, array):
    np.save(tmp / "shapenet_pc" / "02691156-aaa.npy", array, allow_pickle=True)


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"  # the start of an image saved under a txt name
SHAPE = (30, 6)

# (case id, reader(tmp_path) -> a function that reads, exception type, words the message must hold)
CASES = [
    # ModelNet40 txt files and lists
    ("modelnet40 binary shape txt", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "airplane" / "airplane_0001.txt").write_bytes(BINARY)),
     ValueError, ["airplane_0001.txt", "is not a text file", "byte 0 is b'\\x89'", "lines of 6 numbers"]),
    ("modelnet40 binary list", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "modelnet40_train.txt").write_bytes(BINARY)),
     ValueError, ["modelnet40_train.txt", "is not a text file", "one shape id"]),
    ("modelnet40 binary names file", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "modelnet40_shape_names.txt").write_bytes(b"airplane\n" + BINARY)),
     ValueError, ["modelnet40_shape_names.txt", "is not a text file", "byte 9"]),
    ("modelnet40 empty list", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "modelnet40_train.txt").write_text("\n\n")),
     ValueError, ["modelnet40_train.txt is empty", "found no entries", "one shape id"]),
    ("modelnet40 word in a txt", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "airplane" / "airplane_0001.txt").write_text("1,2,abc,0,0,1\n")),
     ValueError, ["airplane_0001.txt", "not a number", "abc"]),
    ("modelnet40 ragged txt", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "airplane" / "airplane_0001.txt").write_text("1,2,3,0,0,1\n1,2\n")),
     ValueError, ["airplane_0001.txt", "expected 6 numbers on every line"]),
    ("modelnet40 unknown class in list", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "modelnet40_train.txt").write_text("zebra_0001\n")),
     ValueError, ["modelnet40_train.txt", "zebra"]),
    ("modelnet40 listed txt missing", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "night_stand" / "night_stand_0002.txt").unlink()),
     FileNotFoundError, ["night_stand_0002.txt", "is listed in", "1 of 2 missing"]),
    ("modelnet40 too few points", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "airplane" / "airplane_0001.txt").write_text("1,2,3,0,0,1\n" * 5)),
     ValueError, ["airplane_0001.txt", "num_points=16", "found 5"]),
    ("modelnet40 nan in a txt", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "airplane" / "airplane_0001.txt").write_text("nan,2,3,0,0,1\n" * 20)),
     ValueError, ["airplane_0001.txt", "contains 20 NaN"]),
    # ModelNet40 caches
    ("modelnet40 cache complex points", lambda tmp: modelnet40_cache(tmp, [np.ones(SHAPE, np.complex64)] * 2),
     ValueError, ["fps.dat (entry 0)", "found dtype complex64", "real numbers"]),
    ("modelnet40 cache bool points", lambda tmp: modelnet40_cache(tmp, [np.ones(SHAPE, bool)] * 2),
     ValueError, ["fps.dat (entry 0)", "found dtype bool"]),
    ("modelnet40 cache string points", lambda tmp: modelnet40_cache(tmp, [np.full(SHAPE, "0.5")] * 2),
     ValueError, ["fps.dat (entry 0)", "found dtype <U3"]),
    ("modelnet40 cache object points", lambda tmp: modelnet40_cache(tmp, [np.ones(SHAPE, object)] * 2),
     ValueError, ["fps.dat (entry 0)", "found dtype object"]),
    ("modelnet40 cache float labels", lambda tmp: modelnet40_cache(tmp, labels=[np.array([0.0]), np.array([2.7])]),
     ValueError, ["fps.dat (entry 0)", "found dtype float64", "integers in 0..39"]),
    ("modelnet40 cache string labels", lambda tmp: modelnet40_cache(tmp, labels=[np.array(["0"])] * 2),
     ValueError, ["fps.dat (entry 0)", "found dtype <U1"]),
    ("modelnet40 cache label out of range", lambda tmp: modelnet40_cache(tmp, labels=[np.array([45], np.int32)] * 2),
     ValueError, ["fps.dat (entry 0)", "0..39", "found 45..45"]),
    ("modelnet40 cache with two labels for a shape", lambda tmp: modelnet40_cache(
        tmp, labels=[np.array([0], np.int32), np.array([2, 3], np.int32)]),
     ValueError, ["fps.dat (entry 1)", "one label per shape", "found shape (2,)"]),
    ("modelnet40 cache of another count", lambda tmp: modelnet40_cache(
        tmp, [np.ones(SHAPE, np.float32)] * 3, [np.array([0], np.int32)] * 3, keep_list=True),
     ValueError, ["fps.dat holds 3 shapes", "modelnet40_train.txt lists 2", "Delete it"]),
    ("modelnet40 cache in another order", lambda tmp: modelnet40_cache(
        tmp, labels=[np.array([2], np.int32), np.array([0], np.int32)], keep_list=True),
     ValueError, ["fps.dat entry 0 has label 2", "airplane_0001 (label 0)"]),
    ("modelnet40 cache that is text", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "modelnet40_train_8192pts_fps.dat").write_text("not a pickle\n")),
     ValueError, ["fps.dat could not be read as a pickle of numpy arrays"]),
    ("modelnet40 cache of the wrong structure", lambda tmp: edit_modelnet40(
        tmp, lambda root: (root / "modelnet40_train_8192pts_fps.dat").write_bytes(pickle.dumps({"points": 1}))),
     ValueError, ["fps.dat: expected a pickle of [list of point arrays, list of labels]", "found dict"]),
    ("modelnet40 empty cache", lambda tmp: modelnet40_cache(tmp, [], []),
     ValueError, ["modelnet40_normal_resampled holds no shapes"]),
    # ModelNet40 few-shot folds
    ("few-shot float label", lambda tmp: few_shot(tmp, [(np.ones((64, 6), np.float32), 2.7, 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "found dtype float64", "integers in 0..4"]),
    ("few-shot string label", lambda tmp: few_shot(tmp, [(np.ones((64, 6), np.float32), "2", 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "found dtype <U1"]),
    ("few-shot bool label", lambda tmp: few_shot(tmp, [(np.ones((64, 6), np.float32), True, 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "found dtype bool"]),
    ("few-shot label out of range", lambda tmp: few_shot(tmp, [(np.ones((64, 6), np.float32), 7, 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "found 7..7", "0..4"]),
    ("few-shot label of two values", lambda tmp: few_shot(tmp, [(np.ones((64, 6), np.float32), np.array([1, 2]), 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "one integer", "found shape (2,)"]),
    ("few-shot complex points", lambda tmp: few_shot(tmp, [(np.ones((64, 6), np.complex128), 1, 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "found dtype complex128"]),
    ("few-shot bool points", lambda tmp: few_shot(tmp, [(np.ones((64, 6), bool), 1, 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "found dtype bool"]),
    ("few-shot string points", lambda tmp: few_shot(tmp, [(np.full((64, 6), "x"), 1, 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "found dtype <U1"]),
    ("few-shot too few points", lambda tmp: few_shot(tmp, [(np.ones((10, 6), np.float32), 1, 7)]),
     ValueError, ["0.pkl ('train' entry 0)", "M >= 32", "(10, 6)"]),
    ("few-shot not a dict", lambda tmp: few_shot(tmp, content=[1, 2]),
     ValueError, ["0.pkl", "expected a dict with keys 'train' and 'test'", "found list"]),
    ("few-shot entry not a tuple", lambda tmp: few_shot(tmp, [np.ones((64, 6), np.float32)]),
     ValueError, ["0.pkl ('train' entry 0)", "expected a tuple (points, episode label, original label)"]),
    ("few-shot empty list", lambda tmp: few_shot(tmp, []),
     ValueError, ["0.pkl", "the 'train' list is empty"]),
    ("few-shot truncated pickle", lambda tmp: few_shot(tmp, raw=pickle.dumps({"train": [1, 2, 3]})[:-5]),
     ValueError, ["0.pkl could not be read as a pickle of numpy arrays"]),
    ("few-shot text file", lambda tmp: few_shot(tmp, raw=b"train,test\n"),
     ValueError, ["0.pkl could not be read as a pickle of numpy arrays"]),
    # ScanObjectNN
    ("scanobjectnn clouds shorter than num_points", lambda tmp: scan(tmp, num_points=4096),
     ValueError, ["training_objectdataset.h5", "num_points=4096", "found 2048 per cloud"]),
    ("scanobjectnn 512-point clouds", lambda tmp: scan(tmp, data=np.ones((4, 512, 3), np.float32), num_points=2048),
     ValueError, ["training_objectdataset.h5", "num_points=2048", "found 512"]),
    ("scanobjectnn complex data", lambda tmp: scan(tmp, data=np.ones((4, 2048, 3), np.complex64)),
     ValueError, ["training_objectdataset.h5 'data'", "found dtype complex64"]),
    ("scanobjectnn bool data", lambda tmp: scan(tmp, data=np.ones((4, 2048, 3), bool)),
     ValueError, ["training_objectdataset.h5 'data'", "found dtype bool"]),
    ("scanobjectnn string data", lambda tmp: scan(tmp, data=np.full((4, 2048, 3), b"1")),
     ValueError, ["training_objectdataset.h5 'data'", "found dtype |S1"]),
    ("scanobjectnn float labels", lambda tmp: scan(tmp, label=np.array([0.0, 1.5, 2.0, 3.0], np.float32)),
     ValueError, ["training_objectdataset.h5 'label'", "found dtype float32", "integers in 0..14"]),
    ("scanobjectnn string labels", lambda tmp: scan(tmp, label=np.array([b"bag", b"bin", b"box", b"bed"])),
     ValueError, ["training_objectdataset.h5 'label'", "found dtype |S3"]),
    ("scanobjectnn label out of range", lambda tmp: scan(tmp, label=np.array([0, 1, 2, 15])),
     ValueError, ["training_objectdataset.h5 'label'", "0..14", "found 0..15"]),
    ("scanobjectnn empty file", lambda tmp: scan(tmp, data=np.zeros((0, 2048, 3), np.float32),
                                                 label=np.zeros(0, np.int64)),
     ValueError, ["training_objectdataset.h5 holds 0 shapes", "(0, 2048, 3)"]),
    # ShapeNetPart
    ("shapenetpart broken json", lambda tmp: edit_shapenetpart(
        tmp, lambda root: split_json(root).write_text('["shape_data/02691156/plane1", ')),
     ValueError, ["shuffled_train_file_list.json is not valid JSON", "expected a JSON list of strings"]),
    ("shapenetpart json dict", lambda tmp: edit_shapenetpart(
        tmp, lambda root: split_json(root).write_text('{"plane1": 1}')),
     ValueError, ["shuffled_train_file_list.json", "found a JSON dict"]),
    ("shapenetpart json entry without folder", lambda tmp: edit_shapenetpart(
        tmp, lambda root: split_json(root).write_text('["plane1"]')),
     ValueError, ["shuffled_train_file_list.json", "found the entry 'plane1'"]),
    ("shapenetpart json number entry", lambda tmp: edit_shapenetpart(
        tmp, lambda root: split_json(root).write_text("[3]")),
     ValueError, ["shuffled_train_file_list.json", "found the entry 3"]),
    ("shapenetpart binary json", lambda tmp: edit_shapenetpart(
        tmp, lambda root: split_json(root).write_bytes(BINARY)),
     ValueError, ["shuffled_train_file_list.json is not a text file", "byte 0"]),
    ("shapenetpart binary category file", lambda tmp: edit_shapenetpart(
        tmp, lambda root: (root / "synsetoffset2category.txt").write_bytes(BINARY)),
     ValueError, ["synsetoffset2category.txt is not a text file"]),
    ("shapenetpart binary shape txt", lambda tmp: edit_shapenetpart(
        tmp, lambda root: (root / SYNSETS["Mug"] / "mug1.txt").write_bytes(BINARY)),
     ValueError, ["mug1.txt is not a text file", "lines of 7 numbers"]),
    ("shapenetpart fractional part label", lambda tmp: edit_shapenetpart(
        tmp, lambda root: (root / SYNSETS["Mug"] / "mug1.txt").write_text("0 0 0 0 0 1 36\n1 0 0 0 0 1 36.5\n")),
     ValueError, ["mug1.txt", "whole-number part labels", "found 36.5 on point 1"]),
    ("shapenetpart empty lists", lambda tmp: edit_shapenetpart(
        tmp, lambda root: split_json(root, "test").write_text("[]"), split="test"),
     ValueError, ["'test' lists test", "train_test_split name no shapes"]),
    # ShapeNet55
    ("shapenet55 complex npy", lambda tmp: edit_shapenet55(tmp, lambda root: npy(root, np.ones((300, 3), np.complex64))),
     ValueError, ["02691156-aaa.npy", "found dtype complex64", "real numbers"]),
    ("shapenet55 bool npy", lambda tmp: edit_shapenet55(tmp, lambda root: npy(root, np.ones((300, 3), bool))),
     ValueError, ["02691156-aaa.npy", "found dtype bool"]),
    ("shapenet55 string npy", lambda tmp: edit_shapenet55(tmp, lambda root: npy(root, np.full((300, 3), "1.0"))),
     ValueError, ["02691156-aaa.npy", "found dtype <U3"]),
    ("shapenet55 object npy", lambda tmp: edit_shapenet55(tmp, lambda root: npy(root, np.ones((300, 3), object))),
     ValueError, ["02691156-aaa.npy", "could not read as a numeric array", "Object arrays"]),
    ("shapenet55 npy of 4 columns", lambda tmp: edit_shapenet55(
        tmp, lambda root: npy(root, np.ones((300, 4), np.float32))),
     ValueError, ["02691156-aaa.npy", "(M, 3)", "(300, 4)"]),
    ("shapenet55 empty list", lambda tmp: edit_shapenet55(
        tmp, lambda root: (root / "ShapeNet-55" / "train.txt").write_text("")),
     ValueError, ["train.txt is empty", "found no entries"]),
    ("shapenet55 binary list", lambda tmp: edit_shapenet55(
        tmp, lambda root: (root / "ShapeNet-55" / "train.txt").write_bytes(BINARY)),
     ValueError, ["train.txt is not a text file", "byte 0"]),
]


@pytest.mark.parametrize("case_id, reader, exception, words", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gives_a_clear_error(tmp_path, case_id, reader, exception, words):
    read = reader(tmp_path)
    with pytest.raises(exception) as error:
        read()
    message = str(error.value)
    assert type(error.value) is exception, f"{case_id}: {type(error.value).__name__}: {message}"
    missing = [word for word in words if word not in message]
    assert not missing, f"{case_id}: {missing} not in: {message}"
