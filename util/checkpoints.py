"""Saving and resuming a run safely: the checkpoint file, the random generators' state, the log.

Shared by pretrain.py and finetune.py (not a paper section: the plumbing every run needs).
  save_checkpoint(path, checkpoint)  written to a temporary file, flushed to disk, then renamed: a crash or a kill
                                     never leaves a half-written checkpoint, and the previous one stays whole.
  load_checkpoint(path)              torch.load's safe loader (weights_only=True): tensors, numbers, strings, lists,
                                     tuples, dicts and numpy arrays/scalars only, so a crafted .pth cannot run code.
  rng_state() / set_rng_state(s)     torch (CPU and CUDA), numpy and Python's random, so a resumed run draws the
                                     same numbers it would have drawn without the interruption.
  truncate_log(path, start_epoch)    a resumed or restarted run's log keeps only the epochs before it.
  write_log_line(path, record, ...)  one JSON line per epoch; the first of a run first drops the lines it replaces.
  stop_if_not_finite(sums, ...)      a non-finite loss stops the run before anything more is written.
  check_same_run(saved, cfg, ...)    a resumed run must be the run the command describes.
"""
import json
import math
import os
import pickle
import random

import numpy as np
import torch


def rng_state():
    """Every random generator a run draws from, so that a resumed run continues exactly.

    numpy's state (np.random.get_state(): name, 624 uint32 keys, position, has_gauss, cached_gaussian) holds a numpy
    array, which the safe checkpoint loader refuses; its keys are stored as an int64 tensor instead (exact)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    # Back to numpy's uint32 array; a checkpoint written before the tensor format holds that array itself.
    keys = keys.numpy().astype(np.uint32) if torch.is_tensor(keys) else keys
    np.random.set_state((name, keys, *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves a half-written checkpoint."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        torch.save(checkpoint, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# The globals of numpy arrays and scalars, and nothing else: checkpoints written before rng_state stored numpy's state
# as a tensor hold np.random.get_state()'s array, and Point-MAE's part_seg.pth holds numpy scalars (its accuracies).
# np.zeros(1).__reduce__()[0] is numpy's array rebuilder (_reconstruct) and np.float64(1).__reduce__()[0] its scalar
# rebuilder (scalar); with the array class and the dtypes they rebuild a value from its dtype and raw bytes and call
# nothing else, so allowing them keeps the loader safe. Files written with numpy 1.x name them under numpy.core,
# numpy 2 under numpy._core: both names are allowed.
_ARRAY, _SCALAR = np.zeros(1).__reduce__()[0], np.float64(1).__reduce__()[0]
NUMPY_GLOBALS = [_ARRAY, (_ARRAY, "numpy.core.multiarray._reconstruct"), _SCALAR,
                 (_SCALAR, "numpy.core.multiarray.scalar"), np.ndarray, np.dtype,
                 *{type(np.dtype(kind)) for kind in (np.uint32, np.int32, np.int64, np.float32, np.float64, np.bool_)}]


def load_checkpoint(path):
    """Read a checkpoint with torch.load's safe loader (weights_only=True): it rebuilds tensors, numbers, strings,
    lists, tuples and dicts (and, here, numpy arrays and scalars) but never calls a function the file names, so a
    crafted .pth cannot run code. Every checkpoint this project writes, and Point-MAE's released files, hold only
    those types."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist; pass the path of a .pth file this script wrote.")
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the safe loader met something it does not rebuild
        # torch's own text advises weights_only=False, exactly what must not be done with such a file; keep its reason.
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(" Please use")[0]
        raise RuntimeError(f"Refused to load {path!r}: it is not a checkpoint this project wrote. It holds more than "
                           f"tensors, numbers, strings, lists, tuples and dicts ({reason}); such a file may contain "
                           f"code that runs when it is loaded, so it was not loaded.") from None
    except Exception as error:  # a truncated or foreign file
        raise RuntimeError(f"Could not read checkpoint {path!r} ({type(error).__name__}: {error}); expected a .pth "
                           f"file this project wrote.") from error


def truncate_log(log_path, start_epoch):
    """Keep only the log lines of epochs before start_epoch: 0 empties the log of an earlier run; a resumed run drops
    the epochs it redoes (a run killed between its log line and its checkpoint)."""
    if os.path.isfile(log_path):
        with open(log_path) as handle:
            kept = [line for line in handle if line.strip() and json.loads(line)["epoch"] < start_epoch]
        with open(log_path, "w") as handle:
            handle.writelines(kept)


def write_log_line(log_path, record, start_epoch):
    """Append the epoch's record as one JSON line. Only with the run's first epoch done (record["epoch"] ==
    start_epoch) are the log lines it replaces dropped: an earlier run's whole log (a fresh run, --overwrite) or the
    lines of the epochs a resumed run redoes (a kill between a log line and its checkpoint). Until then the earlier
    run's log and last.pth are untouched."""
    if record["epoch"] == start_epoch:
        truncate_log(log_path, start_epoch)
    with open(log_path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def stop_if_not_finite(sums, epoch, first_step, step, log_every, last_good, run=""):
    """Raise FloatingPointError when a loss (a name starting with "loss") in `sums` (name -> its sum over the epoch so
    far, read every --log_every steps) is not finite. last_good: the path of this run's last checkpoint, or "" when
    it has none yet.

    NOTE(unspecified): a non-finite loss is therefore caught up to --log_every steps late (a NaN or inf keeps the
    epoch's sum non-finite, so no step of the epoch escapes the check), and the weights may by then have taken that
    many bad steps. Nothing is written after it: checkpoints are written only at the end of an epoch, after this
    check, so the last good checkpoint stays as it was. Under torchrun every rank reads the same sums at the same
    steps, so all of them stop there."""
    if all(math.isfinite(value) for name, value in sums.items() if name.startswith("loss")):
        return
    advice = (f"The last good checkpoint {last_good!r} is untouched: resume from it with a lower --lr." if last_good
              else "No checkpoint of this run was written yet (one is written at the end of every epoch): lower --lr "
                   "and start again.")
    raise FloatingPointError(f"{run}A loss term became non-finite at epoch {epoch}, at a step from {first_step} to "
                             f"{step} (the losses are read every --log_every {log_every} steps; sums over the epoch "
                             f"so far: {sums}); the weights may have taken up to {step - first_step + 1} steps since, "
                             f"so nothing more is written. {advice}")


def check_same_run(saved, cfg, names, path):
    """A resumed or read-back run must be the run this command describes; refuse one started with other settings
    (it would be continued, or reported, under this command's header): the settings `names` (finetune.RUN_SETTINGS)
    must be equal. Fields a checkpoint lacks are not compared."""
    differing = [f"--{name} {saved[name]!r} there, {getattr(cfg, name)!r} here" for name in names
                 if name in saved and saved[name] != getattr(cfg, name)]
    if differing:
        raise ValueError(f"{path!r} was started with other settings than this command: {'; '.join(differing)}. Pass "
                         f"its settings to continue it, --overwrite without --resume to start it again, or another "
                         f"--out_dir.")
