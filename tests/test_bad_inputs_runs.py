"""Bad inputs and faults of a run: the run folder's lock, a full disk, a torn log, checkpoints that are not what a flag
takes, out-of-range settings, and a kill -9 during a fine-tuning checkpoint write.

The table (CASES) calls build_config / check_config / the loaders directly; a handful of tests start real processes
(two runs on one folder, a killed fine-tuning run, a second cache build waiting for the first)."""
import dataclasses
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import downstream
import finetune
import point_mae_checkpoints
import pretrain
from util import checkpoints, weights

torch.set_num_threads(2)
REPOSITORY = Path(__file__).resolve().parent.parent

# pretrain.py: the tiny preset without the 2-D branch, 128 points in 8 groups, 16 shapes, one epoch: half a second.
PRETRAIN_FLAGS = ["--preset", "tiny", "--synthetic_size", "16", "--batch_size", "8", "--epochs", "1", "--no-progress",
                  "--picture_every", "0", "--num_points", "128", "--num_groups", "8", "--no-use_2d", "--masking",
                  "random"]
# finetune.py: the tiny preset, 256 points in 16 groups, 16 training and 4 test shapes, one epoch.
FINETUNE_FLAGS = ["--preset", "tiny", "--num_points", "256", "--num_groups", "16", "--batch_size", "8", "--epochs", "1",
                  "--no-progress", "--task", "modelnet40", "--data", "synthetic", "--synthetic_train_size", "16",
                  "--synthetic_test_size", "4"]
FINETUNE_RUN = Path("modelnet40_synthetic") / "seed0"  # the run folder under --out_dir


def pretrain_config(out_dir, *flags):
    return pretrain.build_config([*PRETRAIN_FLAGS, "--out_dir", str(out_dir), *flags])


def finetune_config(out_dir, *flags):
    return finetune.build_config([*FINETUNE_FLAGS, "--out_dir", str(out_dir), *flags])


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_lock(path, pid, host=None, **extra):
    Path(path).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier",
                                      "command": "pretrain.py", **extra}))


def epochs_in(log_path):
    return [json.loads(line)["epoch"] for line in open(log_path)]


# ---------------------------------------------------------------- files the table reads (built once)

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pre-training run's last.pth, a fine-tuning run's last.pth, official Point-MAE files and broken files."""
    root = tmp_path_factory.mktemp("checkpoints")
    pretrain.main(pretrain_config(root / "pretrain"))
    finetune.main(finetune_config(root / "finetune"))
    paths = {"pretrain": root / "pretrain" / "last.pth", "finetune": root / "finetune" / FINETUNE_RUN / "last.pth"}
    own = torch.load(paths["pretrain"], weights_only=True)

    def save(name, value):
        paths[name] = root / f"{name}.pth"
        torch.save(value, paths[name])

    generator = torch.Generator().manual_seed(0)
    # Point-MAE's pre-training file (docs/REFERENCE.md sec. 7): base_model, optimizer, epoch, metrics.
    save("official_pretrain", {"base_model": point_mae_checkpoints.official_pretrain_state(
        dim=96, depth=4, decoder_depth=2, group_size=16, prefix="module.", generator=generator),
        "optimizer": {}, "epoch": 299, "metrics": {}})
    save("official_classifier", {"base_model": point_mae_checkpoints.official_finetuned_state(
        num_classes=40, dim=96, depth=4, generator=generator), "epoch": 299})
    save("weights_only", {"model": own["model"], "config": own["config"]})
    save("unknown_setting", {**own, "config": {**own["config"], "mask_schedule": "linear"}})
    save("missing_setting", {**own, "config": {name: value for name, value in own["config"].items()
                                               if name != "fusion"}})
    nan_state = {name: value.clone() for name, value in own["model"].items()}
    nan_state["encoder.norm.weight"][3] = float("nan")
    save("nan_weight", {**own, "model": nan_state})
    save("a_list", [1, 2, 3])
    fine = torch.load(paths["finetune"], weights_only=True)
    save("finetune_unknown_setting", {**fine, "config": {**fine["config"], "label_smoothing": 0.1}})
    paths["text"] = root / "notes.pth"
    paths["text"].write_text("epoch 12: loss 0.31\n")
    paths["empty"] = root / "empty.pth"
    paths["empty"].write_bytes(b"")
    paths["truncated"] = root / "truncated.pth"
    paths["truncated"].write_bytes(paths["pretrain"].read_bytes()[:5000])
    return {name: str(path) for name, path in paths.items()}


def into_finetune_run(files, tmp_path, name):
    """A finetune.py --resume command whose run folder holds files[name] as its last.pth."""
    run_dir = tmp_path / FINETUNE_RUN
    run_dir.mkdir(parents=True)
    shutil.copy(files[name], run_dir / "last.pth")
    return lambda: finetune.main(finetune_config(tmp_path, "--resume"))


def pretrain_check(*flags):
    return lambda files, tmp_path: pretrain.check_config(pretrain.build_config(["--preset", "tiny", *flags]))


def finetune_check(*flags):
    return lambda files, tmp_path: finetune.check_config(finetune.build_config(["--preset", "tiny", *flags]))


def tiny_classifier():
    cfg = finetune.build_config(["--preset", "tiny"])
    return downstream.Classifier(40, **downstream.backbone_arguments(cfg)), cfg


# (case, call of (files, tmp_path), exception type, words its message holds; "{name}" is files[name])
CASES = [
    # --- pretrain.py --resume of a file that is not its own resumable checkpoint
    ("resume official pretrain", lambda f, t: pretrain.build_config(["--resume", f["official_pretrain"]]), ValueError,
     ["{official_pretrain}", "official Point-MAE pre-training", "'base_model'", "expected a checkpoint that pretrain.py",
      "--init_from {official_pretrain}"]),
    ("resume official classifier", lambda f, t: pretrain.build_config(["--resume", f["official_classifier"]]),
     ValueError, ["{official_classifier}", "Point-MAE classifier", "finetune.py --checkpoint {official_classifier}"]),
    ("resume fine-tuned last.pth", lambda f, t: pretrain.build_config(["--resume", f["finetune"]]), ValueError,
     ["{finetune}", "a checkpoint of finetune.py (--task modelnet40)", "finetune.py --checkpoint {finetune}"]),
    ("resume weights only", lambda f, t: pretrain.build_config(["--resume", f["weights_only"]]), ValueError,
     ["{weights_only}", "without ['optimizer', 'epoch', 'step', 'rng']", "--init_from {weights_only}"]),
    ("resume unknown setting", lambda f, t: pretrain.build_config(["--resume", f["unknown_setting"]]), ValueError,
     ["{unknown_setting}", "another version of pretrain.py", "['mask_schedule']", "--init_from"]),
    ("resume other --dim", lambda f, t: pretrain.main(pretrain.build_config(["--resume", f["pretrain"], "--dim", "64"])),
     ValueError, ["{pretrain}", "does not fit", "(96,) there, (64,) here", "--dim 96 there, 64 here", "--init_from"]),
    ("resume other --method", lambda f, t: pretrain.main(pretrain.build_config(
        ["--resume", f["pretrain"], "--method", "crossalignnet", "--image_size", "32"])), ValueError,
     ["{pretrain}", "does not fit", "--method 'kr_mae' there, 'crossalignnet' here"]),
    ("resume a list", lambda f, t: pretrain.build_config(["--resume", f["a_list"]]), ValueError,
     ["{a_list}", "a list, not a dict", "the last.pth of a pretrain.py run"]),
    ("resume text file", lambda f, t: pretrain.build_config(["--resume", f["text"]]), RuntimeError,
     ["{text}", "is not a PyTorch checkpoint", "b'epoch 12'", "(text)"]),
    ("resume empty file", lambda f, t: pretrain.build_config(["--resume", f["empty"]]), RuntimeError,
     ["{empty}", "is not a PyTorch checkpoint", "is empty"]),
    ("resume truncated file", lambda f, t: pretrain.build_config(["--resume", f["truncated"]]), RuntimeError,
     ["{truncated}", "Could not read checkpoint"]),
    ("resume missing file", lambda f, t: pretrain.build_config(["--resume", f["pretrain"] + ".missing"]),
     FileNotFoundError, ["{pretrain}.missing", "does not exist"]),
    ("resume NaN weight", lambda f, t: pretrain.build_config(["--resume", f["nan_weight"]]), ValueError,
     ["{nan_weight}", "1 non-finite values", "'model/encoder.norm.weight'"]),
    # --- --init_from and --checkpoint
    ("init_from NaN weight", lambda f, t: weights.initialise_from(pretrain.build_model(pretrain_config(t)),
                                                                     f["nan_weight"]), ValueError,
     ["{nan_weight}", "non-finite", "'model/encoder.norm.weight'"]),
    ("init_from text file", lambda f, t: weights.initialise_from(pretrain.build_model(pretrain_config(t)), f["text"]),
     RuntimeError, ["{text}", "is not a PyTorch checkpoint"]),
    ("checkpoint NaN weight", lambda f, t: weights.load_pretrained(*tiny_classifier()[:1], f["nan_weight"],
                                                                    tiny_classifier()[1]), ValueError,
     ["{nan_weight}", "non-finite", "'model/encoder.norm.weight'"]),
    ("checkpoint text file", lambda f, t: weights.load_pretrained(*tiny_classifier()[:1], f["text"],
                                                                   tiny_classifier()[1]), RuntimeError,
     ["{text}", "is not a PyTorch checkpoint"]),
    ("checkpoint empty file", lambda f, t: weights.load_pretrained(*tiny_classifier()[:1], f["empty"],
                                                                    tiny_classifier()[1]), RuntimeError,
     ["{empty}", "is empty"]),
    # --- finetune.py --resume of a run folder whose last.pth is not a fine-tuning run's
    ("finetune resume of a pretrain.py checkpoint", lambda f, t: into_finetune_run(f, t, "pretrain")(), ValueError,
     ["last.pth", "a checkpoint of pretrain.py", "expected a checkpoint that finetune.py", "--checkpoint"]),
    ("finetune resume of an official file", lambda f, t: into_finetune_run(f, t, "official_classifier")(), ValueError,
     ["last.pth", "official Point-MAE classifier", "--checkpoint"]),
    ("finetune resume unknown setting", lambda f, t: into_finetune_run(f, t, "finetune_unknown_setting")(), ValueError,
     ["last.pth", "another version of finetune.py", "['label_smoothing']"]),
    ("finetune resume text file", lambda f, t: into_finetune_run(f, t, "text")(), RuntimeError,
     ["last.pth", "is not a PyTorch checkpoint"]),
    # --- pretrain.py settings, before any work
    ("--masking_heads 5", pretrain_check("--masking_heads", "5"), ValueError,
     ["--masking_heads must be a divisor of --dim (96)", "got 5"]),
    ("--drop_path 2", pretrain_check("--drop_path", "2"), ValueError, ["--drop_path", "[0, 1)", "got 2.0"]),
    ("--image_size 72", pretrain_check("--image_size", "72"), ValueError,
     ["--image_size", "multiple of the image patch size (16)", "got 72"]),
    ("--image_size 0", pretrain_check("--image_size", "0"), ValueError, ["--image_size", "at least 16", "got 0"]),
    ("--image_size of i2p_mae", pretrain_check("--method", "i2p_mae", "--image_size", "100"), ValueError,
     ["--image_size", "(16)", "got 100"]),
    ("--image_size of crossalignnet", pretrain_check("--method", "crossalignnet", "--image_size", "200"), ValueError,
     ["--image_size", "got 200"]),
    ("--policy_weight nan", pretrain_check("--policy_weight", "nan"), ValueError,
     ["--policy_weight must be a finite number", "nan"]),
    ("--policy_weight -1", pretrain_check("--policy_weight", "-1"), ValueError, ["--policy_weight", "0 or more"]),
    ("--lr inf", pretrain_check("--lr", "inf"), ValueError, ["--lr must be a finite number", "inf"]),
    ("--min_lr above --lr", pretrain_check("--min_lr", "0.1"), ValueError, ["--min_lr must be at most --lr (0.001)"]),
    ("--num_heads 5", pretrain_check("--num_heads", "5"), ValueError, ["--num_heads", "divisor of --dim (96)"]),
    ("--decoder_heads 7", pretrain_check("--decoder_heads", "7"), ValueError, ["--decoder_heads", "got 7"]),
    ("--depth 0", pretrain_check("--depth", "0"), ValueError, ["--depth must be at least 1", "got 0"]),
    ("--weight_decay -1", pretrain_check("--weight_decay", "-1"), ValueError, ["--weight_decay", "got -1.0"]),
    ("--seed -1", pretrain_check("--seed", "-1"), ValueError, ["--seed", "[0, 2^32)", "got -1"]),
    ("--num_workers -2", pretrain_check("--num_workers", "-2"), ValueError, ["--num_workers", "got -2"]),
    ("--picture_every -1", pretrain_check("--picture_every", "-1"), ValueError, ["--picture_every", "got -1"]),
    ("--joint_weight_2d -1", pretrain_check("--method", "joint_mae", "--joint_weight_2d", "-1"), ValueError,
     ["--joint_weight_2d", "got -1.0"]),
    # --- finetune.py settings, before any work
    ("--fold -3", finetune_check("--task", "fewshot", "--fold", "-3"), ValueError, ["--fold", "0..9", "got -3"]),
    ("--folds 0,12", finetune_check("--task", "fewshot", "--folds", "0,12"), ValueError, ["--folds", "'0,12'"]),
    ("--folds 0,x", finetune_check("--task", "fewshot", "--folds", "0,x"), ValueError,
     ["--folds expects comma-separated integers", "'0,x'"]),
    ("finetune --drop_path 2", finetune_check("--drop_path", "2"), ValueError, ["--drop_path", "got 2.0"]),
    ("finetune --grad_clip 0", finetune_check("--grad_clip", "0"), ValueError, ["--grad_clip must be positive"]),
    ("finetune --num_heads 5", finetune_check("--num_heads", "5"), ValueError, ["--num_heads", "(96)", "got 5"]),
    ("finetune --lr nan", finetune_check("--lr", "nan"), ValueError, ["--lr must be positive", "got nan"]),
    ("--fewshot_head_classes below --way", finetune_check("--task", "fewshot", "--way", "10", "--fewshot_head_classes",
                                                          "5"), ValueError, ["--fewshot_head_classes", "--way (10)"]),
    ("--queries 0", finetune_check("--queries", "0"), ValueError, ["--queries must be at least 1", "got 0"]),
    ("--seeds 0,-1", finetune_check("--seeds", "0,-1"), ValueError, ["--seeds", "'0,-1'"]),
]


@pytest.mark.parametrize("case, call, error_type, words", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_a_clear_error(files, tmp_path, case, call, error_type, words):
    with pytest.raises(error_type) as error:
        call(files, tmp_path)
    message = str(error.value)
    for word in words:
        assert word.format(**files) in message, (word, message)


def test_a_setting_an_earlier_version_did_not_record_is_named_and_takes_the_default(files, capsys):
    cfg = pretrain.build_config(["--resume", files["missing_setting"]])
    assert cfg.fusion == pretrain.Config.fusion
    assert f"{files['missing_setting']}: written by an earlier version of pretrain.py, it does not record " \
           f"['--fusion']" in capsys.readouterr().out
    pretrain.build_config(["--resume", files["missing_setting"], "--fusion", "cross"])  # given: nothing to say
    assert "does not record" not in capsys.readouterr().out


def test_the_table_covers_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({case[0] for case in CASES}) == len(CASES)


# ---------------------------------------------------------------- the run folder's lock

def test_a_live_lock_is_an_error_naming_the_folder_and_its_holder(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        tmp_path.mkdir(exist_ok=True)
        write_lock(tmp_path / checkpoints.LOCK_NAME, holder.pid)
        with pytest.raises(RuntimeError) as error:
            pretrain.main(pretrain_config(tmp_path))
        message = str(error.value)
        assert str(tmp_path) in message and f"process {holder.pid}" in message and "which is running" in message
        assert not (tmp_path / "log.jsonl").exists() and (tmp_path / checkpoints.LOCK_NAME).exists()
        # finetune.py holds its label folder the same way.
        label_dir = tmp_path / "fine" / FINETUNE_RUN.parent
        label_dir.mkdir(parents=True)
        write_lock(label_dir / checkpoints.LOCK_NAME, holder.pid)
        with pytest.raises(RuntimeError, match="is in use by another run"):
            finetune.main(finetune_config(tmp_path / "fine"))
        assert not (label_dir / "seed0").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_of_another_host_is_an_error_that_says_how_to_clear_it(tmp_path):
    lock = tmp_path / checkpoints.LOCK_NAME
    write_lock(lock, 1, host="another-host.example")
    with pytest.raises(RuntimeError) as error:
        pretrain.main(pretrain_config(tmp_path))
    assert "another-host.example" in str(error.value) and f"delete {str(lock)!r}" in str(error.value)


@pytest.mark.parametrize("stale", ["dead process", "reused pid", "torn lock file"])
def test_a_stale_lock_is_taken_over_and_said_so_and_released_at_the_end(tmp_path, capsys, stale):
    lock = tmp_path / checkpoints.LOCK_NAME
    tmp_path.mkdir(exist_ok=True)
    if stale == "dead process":
        write_lock(lock, dead_pid())
    elif stale == "reused pid":  # this process's pid, but another start time: the pid of a process long gone
        if checkpoints._process_state(os.getpid()) is None:
            pytest.skip("no /proc: process start times cannot be read on this system")
        write_lock(lock, os.getpid(), process_start=1)
    else:
        lock.write_text('{"pid": 12')  # a kill while the lock was written
    pretrain.main(pretrain_config(tmp_path))
    assert "took over the stale lock" in capsys.readouterr().out
    assert epochs_in(tmp_path / "log.jsonl") == [0] and not lock.exists()


def test_the_lock_is_released_when_the_run_raises(tmp_path, monkeypatch):
    def killed(num_samples, seed, epoch):
        raise KeyboardInterrupt("simulated interrupt")

    monkeypatch.setattr(pretrain, "epoch_order", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(pretrain_config(tmp_path))
    assert not (tmp_path / checkpoints.LOCK_NAME).exists()
    monkeypatch.undo()
    pretrain.main(pretrain_config(tmp_path, "--overwrite"))  # the folder is free again
    assert epochs_in(tmp_path / "log.jsonl") == [0]


def test_two_runs_started_together_on_one_folder_one_runs_the_other_is_refused(tmp_path):
    # Real processes: both start at once, only the lock decides. 64 shapes, 3 epochs: the winner holds the folder for
    # longer than the other's start-up.
    flags = [*PRETRAIN_FLAGS, "--synthetic_size", "64", "--epochs", "3", "--out_dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {seed: subprocess.Popen([sys.executable, "pretrain.py", *flags, "--seed", str(seed)], cwd=REPOSITORY,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for seed in (1, 2)}
    outputs = {seed: process.communicate(timeout=600) for seed, process in processes.items()}
    codes = {seed: process.returncode for seed, process in processes.items()}
    assert sorted(codes.values()) == [0, 1], outputs
    winner = next(seed for seed, code in codes.items() if code == 0)
    loser = 3 - winner
    message = outputs[loser][1]
    assert "is in use by another run" in message and str(tmp_path / "run") in message
    assert f"process {processes[winner].pid}" in message and f"--seed {winner}" in message
    # The folder holds the winner's run alone: its 3 epochs once each, its checkpoint, no lock, no temporary file.
    assert epochs_in(tmp_path / "run" / "log.jsonl") == [0, 1, 2]
    assert checkpoints.load_checkpoint(str(tmp_path / "run" / "last.pth"))["config"]["seed"] == winner
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["last.pth", "log.jsonl"]


# ---------------------------------------------------------------- temporary files

def test_checkpoint_temporaries_are_unique_per_process_and_only_dead_writers_ones_are_removed(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    names = [checkpoints.temporary_path(str(path)) for _ in range(2)]
    assert names[0] != names[1] and all(f".{socket.gethostname()}.{os.getpid()}." in name for name in names)
    live = Path(names[0])  # this process: running
    dead = Path(f"{path}.{socket.gethostname()}.{dead_pid()}.0a1b.tmp")
    legacy = [Path(f"{path}.tmp"), Path(f"{path}.{dead_pid()}.{time.time_ns()}.tmp")]  # earlier versions' names
    other = tmp_path / "notes.tmp"
    for file in (live, dead, *legacy, other):
        file.write_bytes(b"half a checkpoint")
    checkpoints.remove_stale_temporaries(str(path))
    assert live.exists() and other.exists() and not dead.exists() and not any(file.exists() for file in legacy)


def test_a_killed_cache_build_leaves_a_temporary_the_next_build_removes(tmp_path):
    root = write_modelnet40(tmp_path / "modelnet40_normal_resampled")
    cache = root / "modelnet40_train_8192pts_fps.dat"
    dead = Path(f"{cache}.{socket.gethostname()}.{dead_pid()}.77aa.tmp")  # the name a killed build left
    live = Path(checkpoints.temporary_path(str(cache)))  # a build of this (running) process: kept
    dead.write_bytes(b"half a cache")
    live.write_bytes(b"a cache being written")
    datasets.ModelNet40(root, "train", num_points=16, fps_device="cpu")
    assert cache.is_file() and not dead.exists() and live.exists()
    assert not Path(f"{cache}.lock").exists()


def write_modelnet40(root, stored_points=64):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("airplane\nbathtub\n")
    (root / "modelnet40_train.txt").write_text("airplane_0001\nbathtub_0002\n")
    (root / "modelnet40_test.txt").write_text("bathtub_0003\n")
    for shape_id in ("airplane_0001", "bathtub_0002", "bathtub_0003"):
        (root / shape_id.rsplit("_", 1)[0]).mkdir(exist_ok=True)
        np.savetxt(root / shape_id.rsplit("_", 1)[0] / f"{shape_id}.txt", rng.normal(size=(stored_points, 6)),
                   fmt="%.6f", delimiter=",")
    return root


def test_a_second_cache_build_waits_for_the_first_and_reads_its_cache(tmp_path, capsys):
    root = write_modelnet40(tmp_path / "modelnet40_normal_resampled")
    cache = root / "modelnet40_train_8192pts_fps.dat"
    # A real process builds the cache, slowed down by 3 s so that this one meets its lock.
    builder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, datasets\n"
        "build = datasets.build_modelnet40_fps_cache\n"
        "datasets.build_modelnet40_fps_cache = lambda *a, **k: (time.sleep(3), build(*a, **k))[1]\n"
        f"datasets.ModelNet40({str(root)!r}, 'train', num_points=16, fps_device='cpu')\n")],
        cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not Path(f"{cache}.lock").exists() and builder.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    capsys.readouterr()
    dataset = datasets.ModelNet40(root, "train", num_points=16, fps_device="cpu")
    printed = capsys.readouterr().out
    assert builder.wait(timeout=120) == 0, builder.communicate()
    assert f"waiting for process {builder.pid}" in printed and "building" not in printed
    assert len(dataset) == 2 and cache.is_file() and not Path(f"{cache}.lock").exists()


# ---------------------------------------------------------------- a full disk during the checkpoint write

def full_disk_open(room):
    """open() of a disk with `room` bytes left: a file opened for writing takes that many, then ENOSPC."""
    real_open = open

    class FullDiskFile:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            if len(data) > room[0]:
                self.handle.write(bytes(data[:room[0]]))
                room[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room[0] -= len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            self.handle.close()

    def opened(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDiskFile(handle) if "x" in mode or "w" in mode else handle

    return opened


def test_a_full_disk_during_the_checkpoint_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    checkpoints.save_checkpoint(path, {"value": 1})
    monkeypatch.setattr(checkpoints, "open", full_disk_open([2000]), raising=False)
    with pytest.raises(OSError) as error:
        checkpoints.save_checkpoint(path, {"value": torch.zeros(10000)})
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert f"No space left on device while writing {path!r}; the previous checkpoint is intact" in str(error.value)
    assert checkpoints.load_checkpoint(path)["value"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # the partial temporary file is gone


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 1 MiB mounted for the test, or a skip saying why it cannot be (mounting needs root)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs for a real full disk needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_real_full_disk_during_the_checkpoint_write(small_tmpfs):
    path = str(small_tmpfs / "last.pth")
    checkpoints.save_checkpoint(path, {"value": torch.ones(150_000)})  # 600 kB of the 1 MiB
    with pytest.raises(OSError) as error:
        checkpoints.save_checkpoint(path, {"value": torch.zeros(150_000)})  # does not fit beside it
    assert error.value.errno == errno.ENOSPC and f"while writing {path!r}; the previous checkpoint is intact" in str(
        error.value)
    assert torch.equal(checkpoints.load_checkpoint(path)["value"], torch.ones(150_000))
    assert os.listdir(small_tmpfs) == ["last.pth"]
    checkpoints.save_checkpoint(path, {"value": torch.zeros(1000)})  # the space of the partial file came back


# ---------------------------------------------------------------- a torn log

def test_a_torn_last_log_line_is_dropped_with_a_message_and_the_run_resumes(tmp_path, capsys):
    pretrain.main(pretrain_config(tmp_path))
    with open(tmp_path / "log.jsonl", "a") as handle:
        handle.write('{"epoch": 1, "step": 4, "lr": 0.00')  # a kill during the next epoch's log line
    capsys.readouterr()
    pretrain.main(pretrain.build_config(["--resume", str(tmp_path / "last.pth"), "--epochs", "2"]))
    assert "its last line is torn" in capsys.readouterr().out
    assert epochs_in(tmp_path / "log.jsonl") == [0, 1]


def test_a_broken_log_line_is_an_error_before_the_first_epoch(tmp_path, monkeypatch):
    pretrain.main(pretrain_config(tmp_path))
    log = tmp_path / "log.jsonl"
    log.write_text("not a record\n" + log.read_text())
    epochs_started = []
    order = pretrain.epoch_order
    monkeypatch.setattr(pretrain, "epoch_order", lambda *args: epochs_started.append(args) or order(*args))
    with pytest.raises(ValueError) as error:
        pretrain.main(pretrain.build_config(["--resume", str(tmp_path / "last.pth"), "--epochs", "2"]))
    assert f"{str(log)!r} line 1 of 2" in str(error.value) and "'not a record'" in str(error.value)
    assert epochs_started == []  # found before any work


def test_a_torn_fine_tuning_log_is_dropped_too(tmp_path, capsys, monkeypatch):
    order = finetune.epoch_order

    def killed_at_second_epoch(num_samples, seed, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        return order(num_samples, seed, epoch)

    monkeypatch.setattr(finetune, "epoch_order", killed_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune_config(tmp_path, "--epochs", "2"))
    monkeypatch.undo()
    log = tmp_path / FINETUNE_RUN / "log.jsonl"
    with open(log, "a") as handle:
        handle.write('{"epoch": 1, "ste')
    finetune.main(finetune_config(tmp_path, "--resume", "--epochs", "2"))
    assert "its last line is torn" in capsys.readouterr().out and epochs_in(log) == [0, 1]


# ---------------------------------------------------------------- a kill -9 during a fine-tuning checkpoint write

# Run finetune.py's main in a fresh process whose second checkpoint write is killed (SIGKILL: no clean-up of any kind)
# halfway through its temporary file.
KILLED_DURING_SECOND_WRITE = """
import os, signal, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import finetune
save, writes = torch.save, []
def killed_during_second_write(value, handle, *args, **kwargs):
    writes.append(1)
    if len(writes) == 2:
        handle.write(b"PK\\x03\\x04 half a checkpoint")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(value, handle, *args, **kwargs)
torch.save = killed_during_second_write
finetune.main(finetune.build_config(sys.argv[2:]))
"""


def test_kill_9_during_a_fine_tuning_checkpoint_write_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    flags = ["--epochs", "2"]
    finetune.main(finetune_config(tmp_path / "straight", *flags))
    command = [*FINETUNE_FLAGS, "--out_dir", str(tmp_path / "killed"), *flags]
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_SECOND_WRITE, str(torch.get_num_threads()), *command],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "killed" / FINETUNE_RUN
    leftovers = sorted(path.name for path in run.iterdir() if path.name.endswith(".tmp"))
    assert len(leftovers) == 1  # the half-written temporary file
    assert checkpoints.load_checkpoint(str(run / "last.pth"))["epoch"] == 0  # the previous checkpoint is whole
    assert (run.parent / checkpoints.LOCK_NAME).exists()  # the killed process left its lock
    capsys.readouterr()
    finetune.main(finetune_config(tmp_path / "killed", *flags, "--resume"))
    printed = capsys.readouterr().out
    assert "took over the stale lock" in printed and f"removed {str(run / leftovers[0])!r}" in printed
    straight = checkpoints.load_checkpoint(str(tmp_path / "straight" / FINETUNE_RUN / "last.pth"))
    resumed = checkpoints.load_checkpoint(str(run / "last.pth"))
    assert straight["model"].keys() == resumed["model"].keys()
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for (_, a), (_, b) in zip(sorted(straight["optimizer"]["state"].items()),
                              sorted(resumed["optimizer"]["state"].items())):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert straight["best"] == resumed["best"] and epochs_in(run / "log.jsonl") == [0, 1]
    assert sorted(path.name for path in run.iterdir()) == ["last.pth", "log.jsonl"]


def test_a_full_disk_during_the_log_write_names_the_log(tmp_path, monkeypatch):
    log = str(tmp_path / "log.jsonl")
    checkpoints.append_log(log, {"epoch": 0})
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):  # appending to the log: the disk is full
        if "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", full_disk, raising=False)
    with pytest.raises(OSError) as error:
        checkpoints.append_log(log, {"epoch": 1})
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC and repr(log) in str(error.value) and "resume" in str(error.value)
    assert epochs_in(log) == [0]
