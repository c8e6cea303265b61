"""Saving and resuming a run safely: the run folder's lock, the checkpoint file, the random generators' state, the log.

Shared by pretrain.py and finetune.py (not a paper section: the plumbing every run needs).
  folder_lock(lock_path, what)      one run per folder: a lock file created with O_EXCL holding the pid, host and start
                                     time of its holder; a stale lock (its process on this host is gone) is taken over
                                     and said so; a live one, or one of another host, is an error naming the folder and
                                     the holder; released when the block ends, also on an exception.
  save_checkpoint(path, checkpoint)  written to a temporary file unique to the process, flushed to disk, then renamed: a
                                     crash, a kill or a full disk never leaves a half-written checkpoint, and the
                                     previous one stays whole. remove_stale_temporaries(path) removes what a killed
                                     writer left.
  load_checkpoint(path)              torch.load's safe loader (weights_only=True): tensors, numbers, strings, lists,
                                     tuples, dicts and numpy arrays/scalars only, so a crafted .pth cannot run code;
                                     a file that is no PyTorch file, or a tensor holding NaN or inf, is refused.
  load_resumable(path, script)       a checkpoint that `script` itself wrote to continue a run, or an error saying what
                                     the file is and which flag takes it; check_fits(...) its tensors against the model.
  rng_state() / set_rng_state(s)     torch (CPU and CUDA), numpy and Python's random, so a resumed run draws the
                                     same numbers it would have drawn without the interruption.
  check_log / append_log / truncate_log   the run's log.jsonl: a torn last line (a kill during its write) is dropped
                                     and said so, any other broken line is an error found before the first epoch;
                                     write_log_line(path, record, start_epoch) the loops' one line per epoch.
  stop_if_not_finite(sums, ...)      a non-finite loss stops the run before anything more is written.
  check_same_run(saved, cfg, ...)    a resumed run must be the run the command describes.
"""
import contextlib
import errno
import json
import math
import os
import pickle
import random
import secrets
import socket
import sys
import time

import numpy as np
import torch

import point_mae_checkpoints


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


# ---------------------------------------------------------------------------------------------------------------
# The lock: one run per folder, one build per cache
# ---------------------------------------------------------------------------------------------------------------
LOCK_NAME = "run.lock"  # in a run folder; a cache file's lock is "<cache file>.lock" beside it


def _process_state(pid):
    """(state letter, start time in clock ticks since boot) of a process from Linux's /proc, or None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        return fields[0], int(fields[19])  # proc(5): field 3 is the state, field 22 the start time
    except (OSError, ValueError, IndexError):
        return None


def _this_process():
    """What a lock records of its holder: pid, host, start time (so a reused pid is not mistaken for it), command."""
    state = _process_state(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": state[1] if state else None,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
            "token": secrets.token_hex(8)}


def _is_running(holder):
    """Whether the holder recorded in a lock is a running process of this host."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: take the holder as running
        return True
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    state = _process_state(holder["pid"])
    if state is None:  # no /proc: the pid exists, take it as the holder
        return True
    same_process = holder.get("process_start") in (None, state[1])
    return state[0] != "Z" and same_process  # a zombie has exited; another start time is a reused pid


def _read_lock(lock_path):
    """The holder recorded in a lock file, or None when it is unreadable (torn by a kill while it was written)."""
    for _ in range(5):  # a lock created a moment ago may not hold its record yet
        try:
            with open(lock_path) as handle:
                holder = json.load(handle)
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and "host" in holder:
                return holder
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return None


def _describe(holder):
    if holder is None:
        return "an unreadable lock (its writer was killed while writing it)"
    return (f"process {holder['pid']} on host {holder['host']!r}, started {holder.get('started', '?')} "
            f"({holder.get('command', '')!r})")


def take_lock(lock_path, what, wait=False):
    """Create `lock_path` with O_EXCL (it fails when the file exists, atomically, even between two processes that try
    at the same instant) and write this process's record into it. When it exists: a holder that is no longer running
    on this host (killed, crashed without its clean-up) left a stale lock, which is taken over and said so; a running
    holder, or one on another host (whose processes cannot be seen from here), is a RuntimeError naming `what` and
    the holder, or with wait=True is waited for. Returns the record, for release_lock."""
    record, announced = _this_process(), False
    while True:
        try:
            descriptor = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(record, handle)
                handle.flush()
                os.fsync(handle.fileno())
            return record
        try:
            holder = _read_lock(lock_path)
        except FileNotFoundError:
            continue  # released meanwhile: try again
        stale = holder is None or (holder["host"] == record["host"] and not _is_running(holder))
        if stale:
            # Take it over by renaming it to a name of our own: of two processes that both found it stale, one
            # renames it, the other finds it gone and competes for a fresh lock above. The renamed file is checked
            # to be the stale one (not a lock a third process created in between), else put back.
            aside = f"{lock_path}.{record['host']}.{record['pid']}.{record['token']}.stale"
            try:
                os.rename(lock_path, aside)
            except FileNotFoundError:
                continue
            renamed = _read_lock(aside)
            if renamed != holder:
                with contextlib.suppress(OSError):
                    os.link(aside, lock_path)  # back under its name, unless another lock took the name
            os.remove(aside)
            if renamed == holder:
                print(f"{what}: took over the stale lock {lock_path!r} of {_describe(holder)}, which is no longer "
                      f"running.", flush=True)
            continue
        if not wait:
            on_this_host = holder["host"] == record["host"]
            raise RuntimeError(
                f"{what} is in use by another run: {lock_path!r} is held by {_describe(holder)}"
                + (", which is running. " if on_this_host else
                   ", another host (whether it still runs cannot be seen from here). ")
                + "Two runs in one folder would overwrite each other's checkpoint and log: wait for it to finish or "
                  "pass another --out_dir"
                + ("." if on_this_host else f"; if that process is gone, delete {lock_path!r}."))
        if not announced:
            print(f"{what}: waiting for {_describe(holder)}, which holds {lock_path!r} (if that process is gone, "
                  f"delete the file).", flush=True)
            announced = True
        time.sleep(1.0)


def release_lock(lock_path, record):
    """Remove the lock if it is still this process's own (never a lock another process took over)."""
    with contextlib.suppress(FileNotFoundError):
        if _read_lock(lock_path) == record:
            os.remove(lock_path)


@contextlib.contextmanager
def folder_lock(lock_path, what, wait=False, enabled=True, optional=False):
    """Hold take_lock's lock for the block; it is released when the block ends, by an exception too (a kill -9
    leaves it, stale, for the next run to take over). enabled=False holds nothing (the ranks other than 0 under
    torchrun); optional=True goes on without a lock in a folder where none can be created (read-only data)."""
    record = None
    if enabled:
        os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
        try:
            record = take_lock(lock_path, what, wait)
        except OSError:  # FileExistsError is handled inside; this is a folder that cannot be written
            if not optional:
                raise
    try:
        yield record
    finally:
        if record is not None:
            release_lock(lock_path, record)


# ---------------------------------------------------------------------------------------------------------------
# Writing a checkpoint
# ---------------------------------------------------------------------------------------------------------------
def temporary_path(path):
    """The name `path` is written under before its rename: unique to this process (host, pid, a random token), so
    two writers never share one, and remove_stale_temporaries can tell whose it is."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def remove_stale_temporaries(path):
    """Remove the temporary files of `path` whose writer is not running (a kill during a write leaves one):
    temporary_path's '<path>.<host>.<pid>.<token>.tmp', and the '<path>.tmp' and '<path>.<pid>.<ns>.tmp' of
    earlier versions. Call it holding the folder's lock: a writer on another host would hold that lock, so its
    temporaries are stale too; the temporary of a running process of this host is never touched."""
    folder, prefix = os.path.dirname(path) or ".", os.path.basename(path) + "."
    this_host = socket.gethostname()
    for name in os.listdir(folder):
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix):-len(".tmp")].rsplit(".", 2)  # host (may hold dots), pid, token
        if len(parts) == 3 and parts[1].isdigit():
            host, pid = parts[0], int(parts[1])
        elif len(parts) == 2 and all(part.isdigit() for part in parts):
            host, pid = this_host, int(parts[0])
        elif parts == [""]:  # '<path>.tmp'
            host, pid = None, None
        else:
            continue  # not a name this project writes
        if host == this_host and _is_running({"pid": pid}):
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or a read-only folder
            os.remove(os.path.join(folder, name))
            print(f"removed {os.path.join(folder, name)!r}, left by a write that was killed", flush=True)


class _RecordingWriter:
    """A file handle whose write() keeps the OSError it raised: torch.save reports a failed write (a full disk) only
    as its own RuntimeError ('enforce fail ... unexpected pos'), which names neither the file nor the cause."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.handle.flush()


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, flush it to disk, then rename: a crash never leaves a half-written checkpoint.
    A failed write (a full disk, an I/O error) removes the temporary file and raises an OSError naming `path` and
    the cause; the previous checkpoint, if any, is untouched."""
    temporary, writer = temporary_path(path), None
    try:
        with open(temporary, "xb") as handle:
            writer = _RecordingWriter(handle)
            torch.save(checkpoint, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)  # a full disk must not keep the partial file
        cause = error if isinstance(error, OSError) else writer and writer.error
        if not cause:
            raise  # an interrupt, or a checkpoint torch cannot serialise
        previous = ("the previous checkpoint is intact" if os.path.isfile(path) else
                    "no checkpoint was written (there was none before)")
        if cause.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"No space left on device while writing {path!r}; {previous}. Free some "
                                        f"space and resume.") from error
        raise OSError(cause.errno, f"Could not write the checkpoint {path!r} ({cause}); {previous}.") from error


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
    those types. A file that is no PyTorch file at all, and a tensor holding NaN or inf (weights trained into NaN
    would only show as a NaN loss later), are refused, naming the file and the tensor."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist; pass the path of a .pth file this script wrote.")
    with open(path, "rb") as handle:
        head = handle.read(8)
    # torch.save writes a zip archive ('PK\x03\x04'); files of torch before 1.6 are a pickle (protocol 2: '\x80\x02').
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        found = "is empty" if not head else f"begins with {head!r}" + (" (text)" if head.isascii() else "")
        raise RuntimeError(f"{path!r} is not a PyTorch checkpoint: it {found}, where a file of torch.save begins with "
                           f"b'PK\\x03\\x04' (a zip archive). Pass a .pth file that torch.save wrote.")
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the safe loader met something it does not rebuild
        # torch's own text advises weights_only=False, exactly what must not be done with such a file; keep its reason.
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(" Please use")[0]
        raise RuntimeError(f"Refused to load {path!r}: it is not a checkpoint this project wrote. It holds more than "
                           f"tensors, numbers, strings, lists, tuples and dicts ({reason}); such a file may contain "
                           f"code that runs when it is loaded, so it was not loaded.") from None
    except Exception as error:  # a truncated or foreign file
        raise RuntimeError(f"Could not read checkpoint {path!r} ({type(error).__name__}: {error}); expected a .pth "
                           f"file this project wrote.") from error
    check_finite(checkpoint, path)
    return checkpoint


def check_finite(value, path, name=""):
    """Every floating-point tensor in a loaded checkpoint (nested dicts, lists, tuples) holds finite values only;
    else a ValueError naming the file and the tensor ('model/encoder.norm.weight')."""
    if torch.is_tensor(value):
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"Checkpoint {path!r} holds {bad} non-finite values (NaN or inf) of "
                                 f"{value.numel()} in the tensor {name!r}; a model whose weights became NaN cannot be trained or tested "
                                 f"from: take an earlier checkpoint.")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, path, f"{name}/{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_finite(item, path, f"{name}/{index}" if name else str(index))


# ---------------------------------------------------------------------------------------------------------------
# Which checkpoint is this? Resuming only a run's own
# ---------------------------------------------------------------------------------------------------------------
RESUMABLE = ("model", "optimizer", "config", "epoch", "step", "rng")  # what pretrain.py and finetune.py write
FINETUNE_RESUMABLE = RESUMABLE + ("best", "last")  # finetune.py also keeps its best and last metrics


def checkpoint_kind(checkpoint):
    """What a loaded checkpoint is: (kind, description). kind: "pretrain" / "finetune" (a run of that script, with
    everything to continue it), "weights" (this project's model without the state to continue it), one of
    point_mae_checkpoints' official layouts, or "unknown"."""
    if not isinstance(checkpoint, dict):
        return "unknown", f"a {type(checkpoint).__name__}, not a dict"
    config = checkpoint.get("config")
    if isinstance(checkpoint.get("model"), dict) and isinstance(config, dict):
        script = "finetune.py" if "task" in config else "pretrain.py"  # (--method is newer than pretrain.py)
        needed = FINETUNE_RESUMABLE if script == "finetune.py" else RESUMABLE
        lacking = [key for key in needed if key not in checkpoint]
        setting = (f"--task {config['task']}" if script == "finetune.py" else
                   f"--method {config.get('method', 'kr_mae')}, --dim {config.get('dim')}")
        if not lacking:
            return script[:-3], (f"a checkpoint of {script} ({setting}) at the end of epoch "
                                 f"{checkpoint['epoch']}")
        return "weights", f"a model of {script} ({setting}) without {lacking}, the state a run continues from"
    try:
        layout, _, _ = point_mae_checkpoints.project_state(checkpoint, "")
    except ValueError:
        return "unknown", f"a dict with the keys {sorted(map(str, checkpoint))[:8]}"
    if layout == point_mae_checkpoints.OURS:
        return "weights", "a bare state dict (weights only, no settings)"
    container = next((key for key in point_mae_checkpoints.CONTAINER_KEYS if key in checkpoint), None)
    return layout, f"an official {layout} checkpoint" + (f" (its weights under {container!r})" if container else "")


def load_resumable(path, script, fields=None, explicit=None):
    """load_checkpoint, then make sure the file is a checkpoint `script` ("pretrain.py", "finetune.py") wrote to
    continue a run; otherwise a ValueError naming the file, what it holds, what was expected and the flag that
    takes it. fields: the script's settings; saved settings this version does not have are an error (the run
    cannot continue exactly). With `explicit` (the flags given on the command line) the settings this version has
    but the checkpoint does not record, and no flag gives, are named: they take this version's defaults."""
    checkpoint = load_checkpoint(path)
    kind, found = checkpoint_kind(checkpoint)
    wanted = script[:-3]
    if kind != wanted:
        fine_tuned = kind in ("finetune", point_mae_checkpoints.CLASSIFIER, point_mae_checkpoints.PART_SEG)
        if script == "pretrain.py":
            advice = (f"A fine-tuned model goes to finetune.py --checkpoint {path} (with --eval_only to test it); a "
                      f"fine-tuning run continues with finetune.py --resume and the command that started it."
                      if fine_tuned else f"To start a new pre-training run from its weights pass --init_from {path}."
                      if kind in ("weights", point_mae_checkpoints.PRETRAIN) else
                      "Pass the last.pth of a pretrain.py run.")
        else:
            advice = ("Pass the last.pth that finetune.py wrote in this run folder." if kind == "unknown" else
                      f"To fine-tune from its weights, pass it with --checkpoint {path} (a file outside the run "
                      f"folders), without --resume.")
        expected = FINETUNE_RESUMABLE if script == "finetune.py" else RESUMABLE
        raise ValueError(f"{path!r} is {found}; expected a checkpoint that {script} wrote to continue a run (a dict "
                         f"with {list(expected)}). {advice}")
    saved = checkpoint["config"]
    if fields is not None:
        unknown = sorted(set(saved) - set(fields))
        if unknown:
            raise ValueError(f"{path!r} was written by another version of {script}: its settings {unknown} do not exist "
                             f"in this version, so it cannot be continued exactly (continue it with the version that "
                             f"wrote it, or start a new run from its weights"
                             + (f" with --init_from {path})." if script == "pretrain.py" else ")."))
        missing = sorted(set(fields) - set(saved) - set(explicit)) if explicit is not None else []
        if missing:
            print(f"{path}: written by an earlier version of {script}, it does not record "
                  f"{['--' + name for name in missing]}: they take this version's defaults (pass a flag to set "
                  f"another value).", flush=True)
    return checkpoint


def check_fits(expected, saved, path, changed, advice):
    """Every tensor of the model (`expected`, a state dict) is in the checkpoint's `saved` state with the same
    shape, and nothing more; else a ValueError naming the file, the tensors that differ, the settings that differ
    from the checkpoint's (`changed`: name -> (there, here)) and `advice`."""
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    misfit = [f"{name} {tuple(saved[name].shape)} there, {tuple(expected[name].shape)} here" for name in expected
              if name in saved and saved[name].shape != expected[name].shape]
    if missing or unexpected or misfit:
        found = "; ".join(text for text in (
            f"other shapes: {misfit[:3]} (of {len(misfit)})" if misfit else "",
            f"missing from it: {missing[:4]} (of {len(missing)})" if missing else "",
            f"in it but not in this model: {unexpected[:4]} (of {len(unexpected)})" if unexpected else "") if text)
        settings = "; ".join(f"--{name} {there!r} there, {here!r} here" for name, (there, here) in changed.items())
        raise ValueError(f"{path!r} does not fit the model of this command: {found}."
                         + (f" Settings given here that differ from the checkpoint's: {settings}." if settings else "")
                         + f" {advice}")


# ---------------------------------------------------------------------------------------------------------------
# The log: one JSON line per epoch
# ---------------------------------------------------------------------------------------------------------------
def _log_lines(log_path):
    """(the log's non-empty lines, its torn last line or None). Any other line that is not a JSON record with an
    integer epoch is a ValueError naming the file and the line."""
    with open(log_path, "rb") as handle:
        lines = [line for line in handle.read().decode("utf-8", errors="replace").splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            valid = isinstance(record, dict) and isinstance(record.get("epoch"), int)
        except ValueError:
            valid = False
        if not valid and number == len(lines):
            return lines[:-1], line  # a kill during the write of the last line: nothing follows it
        if not valid:
            raise ValueError(f"{log_path!r} line {number} of {len(lines)} is not a record of this script's log "
                             f"({line[:80]!r}); expected one JSON object with an 'epoch' per line. The checkpoint is "
                             f"not affected: move the log away (the run then starts a new one) and resume.")
    return lines, None


def check_log(log_path, start_epoch):
    """Before the first epoch: read the log a resumed run will continue (start_epoch > 0), so that a broken line is
    an error now, not after an epoch of work; a torn last line is said to be dropped. A fresh run (start_epoch 0)
    replaces the whole log and reads nothing."""
    if start_epoch > 0 and os.path.isfile(log_path):
        _, torn = _log_lines(log_path)
        if torn is not None:
            print(f"{log_path}: its last line is torn (a kill while it was written), dropped: {torn[:80]!r}",
                  flush=True)


def append_log(log_path, record):
    """One JSON line for `record`; a failed write (a full disk) is an OSError naming the log."""
    try:
        with open(log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        raise OSError(error.errno, f"Could not append to the log {log_path!r} ({error.strerror}); the checkpoint of "
                                   f"the epoch before is intact: resume from it.") from error


def truncate_log(log_path, start_epoch):
    """Keep only the log lines of epochs before start_epoch: 0 empties the log of an earlier run; a resumed run drops
    the epochs it redoes (a run killed between its log line and its checkpoint) and a torn last line. Rewritten
    through a temporary file and a rename, so a kill meanwhile leaves the old log whole."""
    if not os.path.isfile(log_path):
        return
    kept = [line for line in _log_lines(log_path)[0] if json.loads(line)["epoch"] < start_epoch] if start_epoch else []
    temporary = temporary_path(log_path)
    with open(temporary, "w") as handle:
        handle.writelines(line + "\n" for line in kept)
    os.replace(temporary, log_path)


def write_log_line(log_path, record, start_epoch):
    """Append the epoch's record as one JSON line. Only with the run's first epoch done (record["epoch"] ==
    start_epoch) are the log lines it replaces dropped: an earlier run's whole log (a fresh run, --overwrite) or the
    lines of the epochs a resumed run redoes (a kill between a log line and its checkpoint). Until then the earlier
    run's log and last.pth are untouched."""
    if record["epoch"] == start_epoch:
        truncate_log(log_path, start_epoch)
    append_log(log_path, record)


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
