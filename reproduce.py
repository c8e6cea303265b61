"""One command from the data to the KR-MAE paper's Tables 1-3: pre-training, every downstream, the tables.

    python reproduce.py --data_root data                  (KR-MAE, the paper's protocol, on one GPU)
    python reproduce.py --data_root data --method kr_mae,point_mae --gpus 0,1,2,3
    python reproduce.py --data_root data --dry_run        (the plan: commands, GPU hours, data; runs nothing)
    python reproduce.py --preset tiny --data synthetic    (the whole chain on the built-in shapes, a CPU, minutes)

The plan, per --method (paper "Fine-tuning Setup", Point-MAE's recipe, docs/REFERENCE.md sec. 8):
    pretrain        python pretrain.py --method M                              ShapeNet55, 300 epochs, seed 0
    Table 1         python finetune.py --task scan_objectnn --variant V --seed S   V: obj_bg, obj_only, pb_t50_rs
    Table 2         python finetune.py --task fewshot --way n --shot m --folds 0,...,9   n: 5, 10; m: 10, 20
    Table 3         python finetune.py --task partseg --seed S                 mIoU_C (class), mIoU_I (instance)
    (extra)         python finetune.py --task modelnet40 --vote --seed S       with Point-MAE's 10-pass voting
A piece is one of these commands. It runs as a subprocess of the script's own command line (its flags are the
stable interface), in its own folder <out_dir>/<method>/<piece>/ (each run inside it with its own last.pth), with
its output in output.log there and its state in piece.json there:
  - piece.json "done": read back, not run again (the same command twice does no work twice);
  - piece.json "started" (interrupted, killed): run again with the script's --resume, which continues every run
    exactly from its last.pth and reads back the finished ones;
  - piece.json holding other settings than this command's: refused before anything runs, naming each setting.
The data every piece needs is checked before anything starts; a missing data set is named with its layout.
Several GPUs (--gpus 0,1,...): independent pieces run side by side, one per GPU (CUDA_VISIBLE_DEVICES); a method's
downstream pieces start once its pre-training is done. Each piece runs on one GPU; torchrun is not used here.

Seeds. NOTE(unspecified): the papers report one number per cell and name no seed. Pre-training uses seed 0;
Tables 1 and 3 and ModelNet40 run seeds 0, 1, 2 (--seeds) and report mean +- sample std (n - 1) over them; Table 2
runs seed 0 on the 10 folds (Point-BERT's fixed episodes) and reports mean +- std over the folds, as the papers do.
"best" is each run's best test epoch (what Point-MAE and the papers report: there is no validation split), "last"
its final epoch; both are shown.

Output: the tables on the console (markdown), <out_dir>/results.md (the same text) and <out_dir>/results.json
(every number in the tables, per method and task, with the runs each comes from).
Not a paper section: the driver of pretrain.py and finetune.py. docs/REPRODUCE.md: the GPU-hour estimate, the
resume semantics, the published rows' sources, the export of a pre-training to Point-MAE's layout.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("kr_mae", "point_mae", "joint_mae", "i2p_mae", "crossalignnet")  # pretrain.py's --method
PAPER_NAMES = {"kr_mae": "KR-MAE", "point_mae": "Point-MAE", "joint_mae": "Joint-MAE", "i2p_mae": "I2P-MAE",
               "crossalignnet": "CrossAlignNet"}
TASKS = ("pretrain", "scan_objectnn", "fewshot", "partseg", "modelnet40")  # what --only / --skip choose from
VARIANTS = ("obj_bg", "obj_only", "pb_t50_rs")  # Table 1's columns
FEWSHOT_SETTINGS = ((5, 10), (5, 20), (10, 10), (10, 20))  # Table 2's columns: (n-way, m-shot)
# Flags that change how a piece runs, not what it computes: left out of the settings a piece is compared by.
NOT_SETTINGS = ("resume", "progress", "num_workers", "device", "log_every")

# ---------------------------------------------------------------------------------------------------------------
# The published numbers, in %, None where a paper gives none.
# ---------------------------------------------------------------------------------------------------------------
PUBLISHED = {
    # Table 1 (OBJ-BG, OBJ-ONLY, PB-T50-RS): KR-MAE Table 1 for KR-MAE, Point-MAE and Joint-MAE (= Joint-MAE's own
    # Table 3); CrossAlignNet's own Table 2; I2P-MAE's supplement Table 1 (PB-T50-RS only: its OBJ-BG and OBJ-ONLY
    # are in its main paper, which is not at hand).
    "scan_objectnn": {"Point-MAE": (90.02, 88.29, 85.18), "Joint-MAE": (90.94, 88.86, 86.07),
                      "I2P-MAE": (None, None, 90.11), "CrossAlignNet": (88.5, 88.7, 84.5),
                      "KR-MAE": (94.45, 91.91, 89.28)},
    # Table 2 ((mean, std) per 5w10s, 5w20s, 10w10s, 10w20s): KR-MAE Table 2 for KR-MAE, Point-MAE, Joint-MAE and
    # I2P-MAE (the same as Joint-MAE Table 4 and I2P-MAE supplement Table 4); CrossAlignNet Table 3, whose 5w10s
    # cell is lost in the copy at hand (the other three assigned as docs/REPRODUCE.md says).
    "fewshot": {"Point-MAE": ((96.3, 2.5), (97.8, 1.8), (92.6, 4.1), (95.0, 3.0)),
                "Joint-MAE": ((96.7, 2.2), (97.9, 1.8), (92.6, 3.7), (95.1, 2.6)),
                "I2P-MAE": ((97.0, 1.8), (98.3, 1.3), (92.6, 5.0), (95.5, 3.0)),
                "CrossAlignNet": (None, (98.1, 1.4), (91.8, 4.5), (94.8, 3.5)),
                "KR-MAE": ((96.6, 1.7), (98.3, 1.6), (93.0, 4.3), (95.2, 2.8))},
    # Table 3 (mIoU_C, mIoU_I): KR-MAE Table 3 for KR-MAE and Point-MAE; Joint-MAE Table 5; CrossAlignNet Table 4
    # (its mIoUavg, mIoUins); I2P-MAE supplement Table 1 (one ShapeNetPart number, 86.76, shown as mIoU_I).
    "partseg": {"Point-MAE": (84.2, 86.1), "Joint-MAE": (85.41, 86.28), "I2P-MAE": (None, 86.76),
                "CrossAlignNet": (84.2, 85.9), "KR-MAE": (84.4, 86.2)},
    # ModelNet40 fine-tuning accuracy (not in the KR-MAE paper): Point-MAE 93.8 (with its voting) and Joint-MAE
    # 94.0 in Joint-MAE Table 2; I2P-MAE supplement Table 1; CrossAlignNet Table 1.
    "modelnet40": {"Point-MAE": 93.8, "Joint-MAE": 94.0, "I2P-MAE": 93.72, "CrossAlignNet": 93.2, "KR-MAE": None},
}

# ---------------------------------------------------------------------------------------------------------------
# Data: where each data set is looked for under --data_root, and how many shapes it has (for the estimate)
# ---------------------------------------------------------------------------------------------------------------
# name -> (folders under --data_root tried in order, files of which one must exist there, layout of datasets.py).
# The subfolder names are finetune.DATA_ROOTS' and pretrain.Config.data_root's (the readers also accept them).
DATA = {
    "ShapeNet55": (("ShapeNet55-34", "ShapeNet55", ""), ("ShapeNet-55/train.txt",), datasets.SHAPENET55_LAYOUT),
    "ScanObjectNN": (("ScanObjectNN", "ScanObjectNN/h5_files", ""), ("main_split/test_objectdataset.h5",),
                     datasets.SCANOBJECTNN_LAYOUT),
    "ModelNet40 few-shot": (("ModelNetFewshot", ""), ("5way_10shot/0.pkl",), datasets.FEWSHOT_LAYOUT),
    "ShapeNetPart": (("shapenetcore_partanno_segmentation_benchmark_v0_normal", ""), ("synsetoffset2category.txt",),
                     datasets.SHAPENETPART_LAYOUT),
    "ModelNet40": (("modelnet40_normal_resampled", ""), ("modelnet40_shape_names.txt",
                                                          "modelnet40_test_8192pts_fps.dat"),
                   datasets.MODELNET40_LAYOUT),
}
TASK_DATA = {"pretrain": "ShapeNet55", "scan_objectnn": "ScanObjectNN", "fewshot": "ModelNet40 few-shot",
             "partseg": "ShapeNetPart", "modelnet40": "ModelNet40"}
# (train, test) shapes, docs/REFERENCE.md sec. 5 (ShapeNetPart: its split files, train + val = 12137 + 1870, test 2874).
SIZES = {"pretrain": (41952, 0), "obj_bg": (2309, 581), "obj_only": (2309, 581), "pb_t50_rs": (11416, 2882),
         "partseg": (14007, 2874), "modelnet40": (9843, 2468)}


def find_data(name, data_root):
    """The folder under data_root holding data set `name`, or None."""
    folders, markers, _ = DATA[name]
    for folder in folders:
        candidate = os.path.join(data_root, folder) if folder else data_root
        if any(os.path.exists(os.path.join(candidate, marker)) for marker in markers):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------------------
# The plan: one piece per command
# ---------------------------------------------------------------------------------------------------------------
def flags_to_argv(flags):
    """{"epochs": 300, "vote": True, "amp": False} -> ["--epochs", "300", "--vote", "--no-amp"]."""
    argv = []
    for name, value in flags.items():
        if value is True or value is False:
            argv.append(f"--{name}" if value else f"--no-{name}")
        else:
            argv += [f"--{name}", str(value)]
    return argv


def argv_to_flags(text, option):
    """'--picture_every 0 --no-amp' (a --pretrain_flags / --finetune_flags string) -> {"picture_every": "0", ...}."""
    words, flags = text.split(), {}
    index = 0
    while index < len(words):
        word = words[index]
        if not word.startswith("--"):
            raise ValueError(f"--{option} expects flags such as '--picture_every 0 --no-amp', found {word!r} in "
                             f"{text!r}.")
        name, _, value = word[2:].partition("=")
        if value or index + 1 < len(words) and not words[index + 1].startswith("--"):
            if not value:
                index += 1
                value = words[index]
            flags[name] = value
        elif name.startswith("no-"):
            flags[name[3:]] = False
        else:
            flags[name] = True
        index += 1
    return flags


def build_plan(args):
    """Every piece of every --method: dict(method, task, name, folder, script, flags, needs, after, size)."""
    synthetic = args.data == "synthetic"
    common = {"preset": args.preset} if args.preset else {}
    pretrain_extra = argv_to_flags(args.pretrain_flags, "pretrain_flags")
    finetune_extra = argv_to_flags(args.finetune_flags, "finetune_flags")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    folds = args.folds
    plan = []
    for method in args.method.split(","):
        if method not in METHODS:
            raise ValueError(f"--method takes names of {METHODS} separated by commas, found {method!r}.")
        method_dir = os.path.join(args.out_dir, method)
        pretrain_dir = os.path.join(method_dir, "pretrain")
        data = ({"data": "synthetic"} if synthetic else
                {"data": "shapenet55", "data_root": find_data("ShapeNet55", args.data_root) or args.data_root})
        flags = {"method": method, **common, **data, "seed": 0, "out_dir": pretrain_dir,
                 **({"epochs": args.pretrain_epochs} if args.pretrain_epochs else {}), **pretrain_extra}
        plan.append(dict(method=method, task="pretrain", name="pretrain", folder=pretrain_dir, script="pretrain.py",
                         flags=flags, needs="ShapeNet55", after=None, size="pretrain"))
        checkpoint = os.path.join(pretrain_dir, "last.pth")

        def downstream(task, name, size, **task_flags):
            data_flags = ({"data": "synthetic"} if synthetic else
                          {"data": "real", "data_root": find_data(TASK_DATA[task], args.data_root)
                           or os.path.join(args.data_root, DATA[TASK_DATA[task]][0][0])})
            folder = os.path.join(method_dir, name)
            flags = {"task": task, **task_flags, **common, **data_flags, "checkpoint": checkpoint, "out_dir": folder,
                     **({"epochs": args.finetune_epochs} if args.finetune_epochs else {}), **finetune_extra}
            plan.append(dict(method=method, task=task, name=name, folder=folder, script="finetune.py", flags=flags,
                             needs=TASK_DATA[task], after="pretrain", size=size))

        for variant in VARIANTS:  # Table 1
            for seed in seeds:
                downstream("scan_objectnn", f"scan_objectnn_{variant}_seed{seed}", variant, variant=variant, seed=seed)
        for way, shot in FEWSHOT_SETTINGS:  # Table 2: one piece per setting, a run folder per fold inside it
            downstream("fewshot", f"fewshot_{way}way_{shot}shot", "fewshot", way=way, shot=shot, folds=folds, seed=0)
        for seed in seeds:  # Table 3
            downstream("partseg", f"partseg_seed{seed}", "partseg", seed=seed)
        for seed in seeds:  # extra: ModelNet40 with voting
            downstream("modelnet40", f"modelnet40_seed{seed}", "modelnet40", vote=True, seed=seed)
    chosen = [piece for piece in plan if (not args.only or piece["task"] in args.only.split(","))
              and piece["task"] not in args.skip.split(",")]
    return chosen, plan


def piece_state(piece):
    """piece.json of a piece's folder ({} when it never started)."""
    path = os.path.join(piece["folder"], "piece.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def write_state(piece, state):
    """piece.json, written to a temporary file and renamed: a kill never leaves half of it."""
    os.makedirs(piece["folder"], exist_ok=True)
    path = os.path.join(piece["folder"], "piece.json")
    with open(f"{path}.tmp", "w") as handle:
        json.dump(state, handle, indent=1)
    os.replace(f"{path}.tmp", path)


def comparable(flags):
    return {name: str(value) for name, value in flags.items() if name not in NOT_SETTINGS}


def settings_differences(piece, state):
    """The settings of this command that differ from those the piece on disk was started with, as flag text."""
    saved, wanted = state["settings"], comparable(piece["flags"])
    return [f"--{name} {saved.get(name, '(not given)')} there, {wanted.get(name, '(not given)')} here"
            for name in sorted(set(saved) | set(wanted)) if saved.get(name) != wanted.get(name)]


def same_value(saved, given):
    """A checkpoint's saved setting (typed) against a flag's value (typed, or text from --pretrain_flags)."""
    if str(saved) == str(given):
        return True
    try:
        return float(saved) == float(given)
    except (TypeError, ValueError):
        return False


def checkpoint_differences(piece):
    """A pre-training folder with a last.pth but no piece.json (a run started by hand, or piece.json removed): the
    settings saved in the checkpoint against this command's flags. (finetune.py's --resume compares its runs itself.)"""
    import torch  # only here: the plan, the dry run and the tables need no torch

    path = os.path.join(piece["folder"], "last.pth")
    try:  # the safe loader: a checkpoint cannot run code
        saved = torch.load(path, map_location="cpu", weights_only=True)["config"]
    except Exception as error:
        return [f"its {path!r} could not be read to compare its settings ({type(error).__name__}: {error})"]
    return [f"--{name} {saved[name]} there, {value} here" for name, value in piece["flags"].items()
            if name not in NOT_SETTINGS and name != "out_dir" and name in saved and not same_value(saved[name], value)]


def command(piece):
    """The piece's command line; --resume when it has run before (pretrain.py takes the checkpoint's path)."""
    flags = dict(piece["flags"], progress=False)
    last = os.path.join(piece["folder"], "last.pth")
    if piece["script"] == "finetune.py":
        flags["resume"] = True  # finished runs are read back, interrupted ones continue, new ones start
    elif os.path.isfile(last):
        flags["resume"] = last
    return [sys.executable, os.path.join(HERE, piece["script"]), *flags_to_argv(flags)]


def clip_warnings(pieces, args):
    """KR-MAE and I2P-MAE read CLIP ViT-B/16 (tokenizer.py: clip.load downloads it into ~/.cache/clip when online)."""
    flags = argv_to_flags(args.pretrain_flags, "pretrain_flags")
    if args.preset or "clip_random_tower" in flags:
        return []
    path = flags.get("clip_model", os.path.expanduser("~/.cache/clip/ViT-B-16.pt"))
    methods = sorted({piece["method"] for piece in pieces if piece["task"] == "pretrain"
                      and piece["method"] in ("kr_mae", "i2p_mae")})
    if not methods or os.path.isfile(path):
        return []
    return [f"CLIP's ViT-B/16 weights are not at {path!r}: the pre-training of {methods} downloads them (online), "
            f"or pass --pretrain_flags '--clip_model PATH' (the ViT-B-16.pt file of clip.load)."]


# ---------------------------------------------------------------------------------------------------------------
# The GPU-hour estimate
# ---------------------------------------------------------------------------------------------------------------
def load_bench(path):
    if not path or not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def estimate_seconds(piece, bench, args):
    """(seconds, the figure it comes from) for one piece at the paper's configuration, or (None, why not).

    Pre-training: epochs x steps per epoch x the measured step of bench.py (docs/bench_h100.json: <method>.step_seconds,
    batch 128 at the paper sizes). Fine-tuning: bench.py measures no fine-tuning step, so the step is DERIVED (not
    measured): Point-MAE's measured pre-training step scaled by (batch x groups) / (128 x 64); a test pass is counted
    as a third of a step per batch, every epoch, and voting as 10 test passes."""
    if bench is None:
        return None, "no bench.py measurement (--bench)"
    if args.preset or args.data == "synthetic":
        return None, "a CPU preset or the synthetic data: not estimated"
    if piece["task"] == "pretrain":
        measured = bench.get(piece["method"], {}).get("step_seconds")
        if measured is None:
            return None, f"no measured step of {piece['method']} in {args.bench} (run bench.py --method ...)"
        epochs = int(piece["flags"].get("epochs", 300))
        steps = SIZES["pretrain"][0] // 128
        return epochs * steps * measured, f"{args.bench} {piece['method']}.step_seconds {measured:.4f} s, measured"
    base = bench.get("point_mae", {}).get("step_seconds")
    if base is None:
        return None, f"no point_mae.step_seconds in {args.bench}"
    groups, batch = {"modelnet40": (64, 32), "fewshot": (64, 32), "partseg": (128, 16)}.get(piece["task"], (128, 32))
    step = base * batch * groups / (128 * 64)
    if piece["task"] == "fewshot":
        way, shot = piece["flags"]["way"], piece["flags"]["shot"]
        train, test, runs = way * shot, way * 20, 10
    else:
        (train, test), runs = SIZES[piece["size"]], 1
    epochs = int(piece["flags"].get("epochs", 150 if piece["task"] == "fewshot" else 300))
    test_batches = -(-test // batch)
    seconds = runs * (epochs * (train // batch * step + test_batches * step / 3)
                      + (10 * test_batches * step / 3 if piece["flags"].get("vote") else 0))
    return seconds, f"derived from {args.bench} point_mae.step_seconds {base:.4f} s x {batch}x{groups}/(128x64)"


# ---------------------------------------------------------------------------------------------------------------
# Running the pieces: one at a time, or side by side on --gpus
# ---------------------------------------------------------------------------------------------------------------
def read_result(piece):
    """A finished piece's numbers: pretrain.py's last log line, or finetune.py's summary.json (its runs)."""
    if piece["task"] == "pretrain":
        with open(os.path.join(piece["folder"], "log.jsonl")) as handle:
            return json.loads(handle.read().strip().splitlines()[-1])
    summaries = [os.path.join(piece["folder"], name, "summary.json") for name in sorted(os.listdir(piece["folder"]))
                 if os.path.isfile(os.path.join(piece["folder"], name, "summary.json"))]
    if len(summaries) != 1:
        raise RuntimeError(f"{piece['folder']!r} should hold one <task>/summary.json of finetune.py; found "
                           f"{summaries}.")
    with open(summaries[0]) as handle:
        return json.load(handle)["runs"]


def run_pieces(pieces, plan, slots, states):
    """Run every piece not done: a piece starts on a free slot (a GPU, or None: the CPU) once its method's
    pre-training is done. Returns the pieces that failed. A piece's output goes to <folder>/output.log."""
    done = {(piece["method"], piece["name"]) for piece in plan if states[id(piece)].get("state") == "done"}
    waiting = [piece for piece in pieces if (piece["method"], piece["name"]) not in done]
    running, failed = {}, []
    try:
        while waiting or running:
            if not running and waiting and not any(piece["after"] is None or (piece["method"], "pretrain") in done
                                                   for piece in waiting):
                # main() refuses a plan whose pre-training is neither chosen nor done, so never here
                raise RuntimeError(f"{len(waiting)} pieces wait for a pre-training that is not running.")
            for slot in [slot for slot in slots if slot not in running]:
                ready = [piece for piece in waiting if piece["after"] is None or (piece["method"], "pretrain") in done]
                if not ready:
                    break
                piece = ready[0]
                waiting.remove(piece)
                argv = command(piece)
                interrupted = states[id(piece)].get("state") == "started"
                states[id(piece)] = {"state": "started", "settings": comparable(piece["flags"]), "command": argv,
                                     "slot": slot, "started_at": time.time()}
                write_state(piece, states[id(piece)])
                environment = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
                log = open(os.path.join(piece["folder"], "output.log"), "a")
                print(f"[{piece['method']}/{piece['name']}] start{' on GPU ' + slot if slot is not None else ''}"
                      f"{' (it was interrupted: --resume)' if interrupted else ''}: output in {log.name}", flush=True)
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment)
                running[slot] = (piece, process, log, time.time())
            for slot, (piece, process, log, started) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[slot]
                label = f"[{piece['method']}/{piece['name']}]"
                if process.returncode != 0:
                    failed.append(piece)
                    with open(log.name) as handle:
                        tail = "".join(handle.readlines()[-8:])
                    print(f"{label} FAILED (exit {process.returncode}) after {time.time() - started:.0f} s; the end "
                          f"of {log.name}:\n{tail}", flush=True)
                    if piece["task"] == "pretrain":  # its downstream pieces cannot start
                        failed += [other for other in waiting if other["method"] == piece["method"]]
                        waiting = [other for other in waiting if other["method"] != piece["method"]]
                    continue
                state = {**states[id(piece)], "state": "done", "finished_at": time.time(),
                         "result": read_result(piece)}
                write_state(piece, state)
                states[id(piece)] = state
                done.add((piece["method"], piece["name"]))
                print(f"{label} done in {time.time() - started:.0f} s", flush=True)
            if running:
                time.sleep(0.2)
    finally:  # Ctrl-C or an error here: stop the pieces still running; their piece.json says "started"
        for piece, process, log, _ in running.values():
            process.terminate()
            process.wait()
            log.close()
    return failed


# ---------------------------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------------------------
def mean_std(values):
    """{"mean", "std" (sample, n - 1; 0 for one value), "n"} of a list, or None when it is empty."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def collect(pieces, states):
    """results[method][task][column][best|last|voted] = mean_std over the runs (seeds, or few-shot folds)."""
    results = {}
    for piece in pieces:
        state = states[id(piece)]
        if state.get("state") != "done" or piece["task"] == "pretrain":
            continue
        column = {"scan_objectnn": piece["flags"].get("variant"), "partseg": "partseg", "modelnet40": "modelnet40",
                  "fewshot": f"{piece['flags'].get('way')}way_{piece['flags'].get('shot')}shot"}[piece["task"]]
        runs = results.setdefault(piece["method"], {}).setdefault(piece["task"], {}).setdefault(column, [])
        runs.extend(state["result"])
    metrics = {"partseg": {"class_miou": "class_miou", "instance_miou": "instance_miou"}}
    table = {}
    for method, tasks in results.items():
        for task, columns in tasks.items():
            for column, runs in columns.items():
                cell = table.setdefault(method, {}).setdefault(task, {}).setdefault(column, {})
                for key in metrics.get(task, {"accuracy": "accuracy"}):
                    for kind in ("best", "last", "voted"):
                        values = [run[f"{kind}_{key}"] for run in runs if f"{kind}_{key}" in run]
                        if values:
                            cell[f"{kind}_{key}"] = mean_std(values)
                cell["runs"] = [{name: run[name] for name in ("seed", "fold", "best_epoch") if name in run}
                                for run in runs]
    return table


def text_of(cell, digits=2):
    if cell is None:
        return "–"
    if isinstance(cell, dict):
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"
    if isinstance(cell, tuple):
        return f"{cell[0]:.1f} ± {cell[1]:.1f}"
    return f"{cell:.2f}"


def markdown_table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def tables(table, methods, args):
    """The paper's Tables 1-3 (and ModelNet40) in its layout: the published rows, then ours (best and last epoch)."""
    preset = f", --preset {args.preset}" if args.preset else ""
    source = (f"our runs on the BUILT-IN SYNTHETIC STAND-INS (--data synthetic{preset}): these numbers say nothing "
              f"about the paper's" if args.data == "synthetic" else "our runs on the real data")
    blocks = [f"Published rows: the papers' tables (reproduce.py's PUBLISHED names each source); ours: {source}, "
              f"mean ± std over the runs (n).\n"]

    def our_rows(task, columns, metrics, kinds=("best", "last")):
        rows = []
        for method in methods:
            for kind in kinds:
                cells = [table.get(method, {}).get(task, {}).get(column, {}).get(f"{kind}_{metric}")
                         for column in columns for metric in metrics]
                count = max((cell["n"] for cell in cells if cell), default=0)
                rows.append([f"ours: {PAPER_NAMES[method]}, {kind} epoch" if kind != "voted" else
                             f"ours: {PAPER_NAMES[method]}, last epoch, voted (10 passes)", *map(text_of, cells),
                             str(count)])
        return rows

    published = PUBLISHED["scan_objectnn"]
    rows = [[f"{name} (published)", *map(text_of, values), ""] for name, values in published.items()]
    blocks.append(markdown_table("Table 1: ScanObjectNN classification accuracy (%)",
                                 ["Method", "OBJ-BG", "OBJ-ONLY", "PB-T50-RS", "n"],
                                 rows + our_rows("scan_objectnn", VARIANTS, ["accuracy"])))
    columns = [f"{way}way_{shot}shot" for way, shot in FEWSHOT_SETTINGS]
    rows = [[f"{name} (published)", *map(text_of, values), ""] for name, values in PUBLISHED["fewshot"].items()]
    blocks.append(markdown_table("Table 2: few-shot classification on ModelNet40, accuracy (%), mean ± std over folds",
                                 ["Method", "5-way 10-shot", "5-way 20-shot", "10-way 10-shot", "10-way 20-shot", "n"],
                                 rows + our_rows("fewshot", columns, ["accuracy"])))
    rows = [[f"{name} (published)", *map(text_of, values), ""] for name, values in PUBLISHED["partseg"].items()]
    blocks.append(markdown_table("Table 3: part segmentation on ShapeNetPart, mIoU (%)",
                                 ["Method", "mIoU_C", "mIoU_I", "n"],
                                 rows + our_rows("partseg", ["partseg"], ["class_miou", "instance_miou"])))
    rows = [[f"{name} (published)", text_of(value), ""] for name, value in PUBLISHED["modelnet40"].items()]
    blocks.append(markdown_table("Extra: ModelNet40 fine-tuning accuracy (%) (Point-MAE's published 93.8 is voted)",
                                 ["Method", "accuracy", "n"],
                                 rows + our_rows("modelnet40", ["modelnet40"], ["accuracy"],
                                                 ("best", "last", "voted"))))
    return "\n".join(blocks)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pre-training and every downstream of KR-MAE's Tables 1-3.")
    parser.add_argument("--method", default="kr_mae", help=f"one or several of {METHODS}, comma-separated")
    parser.add_argument("--data_root", default="data", help="the folder holding the data sets (layouts: datasets.py)")
    parser.add_argument("--data", default="real", choices=("real", "synthetic"),
                        help="synthetic: the built-in stand-ins of every task (synthetic.py), no files needed")
    parser.add_argument("--preset", default="", help="'tiny': pretrain.py's and finetune.py's CPU preset")
    parser.add_argument("--out_dir", default="runs/reproduce")
    parser.add_argument("--only", default="", help=f"comma-separated tasks of {TASKS} to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated tasks to leave out")
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds of Table 1, Table 3 and ModelNet40")
    parser.add_argument("--folds", default="0,1,2,3,4,5,6,7,8,9", help="few-shot folds (Table 2: all 10)")
    parser.add_argument("--pretrain_epochs", type=int, default=0, help="0: pretrain.py's (the paper's 300)")
    parser.add_argument("--finetune_epochs", type=int, default=0, help="0: finetune.py's (300; few-shot 150)")
    parser.add_argument("--pretrain_flags", default="", help="more flags for every pretrain.py piece")
    parser.add_argument("--finetune_flags", default="", help="more flags for every finetune.py piece")
    parser.add_argument("--gpus", default="", help="'0,1,...': independent pieces side by side, one per GPU")
    parser.add_argument("--bench", default=os.path.join(HERE, "docs", "bench_h100.json"),
                        help="bench.py's measurement the GPU-hour estimate comes from")
    parser.add_argument("--dry_run", action="store_true", help="print the plan, the estimate and the data; run nothing")
    args = parser.parse_args(argv)
    for option in ("only", "skip"):
        unknown = [task for task in getattr(args, option).split(",") if task and task not in TASKS]
        if unknown:
            parser.error(f"--{option} takes tasks of {TASKS}, found {unknown}.")
    if args.preset == "tiny" and not args.pretrain_epochs:
        args.pretrain_epochs = 2  # pretrain.py's tiny preset keeps the paper's 300 epochs
    if args.preset not in ("", "tiny"):
        parser.error(f"--preset must be 'tiny' (pretrain.py's and finetune.py's one preset) or left out, found "
                     f"{args.preset!r}.")
    if args.preset and args.data != "synthetic":
        parser.error("--preset tiny is a CPU smoke run: it pairs with --data synthetic (the real data sets need the "
                     "paper's model sizes).")
    return args


def main(argv=None):
    args = parse_args(argv)
    pieces, plan = build_plan(args)
    states = {id(piece): piece_state(piece) for piece in plan}
    methods = list(dict.fromkeys(piece["method"] for piece in plan))

    # --- before anything runs: settings on disk, data, dependencies -----------------------------------------------
    differences = {id(piece): settings_differences(piece, states[id(piece)]) if states[id(piece)] else
                   checkpoint_differences(piece) if piece["task"] == "pretrain"
                   and os.path.isfile(os.path.join(piece["folder"], "last.pth")) else [] for piece in pieces}
    refused = [f"{piece['folder']}: " + "; ".join(differences[id(piece)]) for piece in pieces if differences[id(piece)]]
    missing = sorted({piece["needs"] for piece in pieces if args.data == "real" and states[id(piece)].get("state")
                      != "done" and find_data(piece["needs"], args.data_root) is None})
    pretrain_ready = {piece["method"] for piece in plan if piece["task"] == "pretrain"
                      and (piece in pieces or states[id(piece)].get("state") == "done")}
    orphans = [piece for piece in pieces if piece["after"] and piece["method"] not in pretrain_ready]
    bench = load_bench(args.bench)
    if args.dry_run or refused or missing or orphans:
        total, unknown = 0.0, 0
        print(f"plan: {len(pieces)} pieces, methods {methods}, data {args.data} ({args.data_root}), out_dir "
              f"{args.out_dir}")
        for piece in pieces:
            state = states[id(piece)].get("state", "new")
            seconds, figure = estimate_seconds(piece, bench, args)
            total, unknown = total + (seconds or 0.0), unknown + (seconds is None)
            hours = f"{seconds / 3600:.2f} GPU h" if seconds is not None else "GPU h not estimated"
            found = ("synthetic" if args.data == "synthetic" else
                     find_data(piece["needs"], args.data_root) or "MISSING")
            print(f"  [{piece['method']}/{piece['name']}] {state}, {hours} ({figure}), data {piece['needs']}: {found}"
                  f"\n      python {piece['script']} {' '.join(command(piece)[2:])}")
        print(f"estimate: {total / 3600:.1f} GPU hours on one GPU" + (f", {unknown} pieces not estimated" if unknown
                                                                        else ""))
        for warning in clip_warnings(pieces, args):
            print(warning)
    problems = refused and ["pieces on disk were started with other settings than this command (pass them, or "
                            "another --out_dir):", *refused]
    problems = (problems or []) + [f"data set {name} not found under {args.data_root!r}; tried "
                                   f"{[os.path.join(args.data_root, folder) for folder in DATA[name][0]]}. Expected "
                                   f"layout: {DATA[name][2]}" for name in missing]
    problems += [f"{piece['method']}/{piece['name']} needs the pre-training of {piece['method']}, which is neither "
                 f"done nor chosen (--only / --skip)" for piece in orphans[:1]]
    if problems and not args.dry_run:
        raise SystemExit("reproduce.py refused to start:\n  " + "\n  ".join(problems))
    if args.dry_run:
        print("before starting, reproduce.py would refuse:\n  " + "\n  ".join(problems) if problems else
              "nothing stands in the way of starting")
        return None
    for warning in clip_warnings(pieces, args):
        print(warning)

    # --- run what is not done, then the tables -------------------------------------------------------------------
    slots = [gpu.strip() for gpu in args.gpus.split(",") if gpu.strip()] or [None]
    failed = run_pieces(pieces, plan, slots, states)
    table = collect(plan, states)
    text = tables(table, methods, args)
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.md"), "w") as handle:
        handle.write(text)
    results = {"data": args.data, "preset": args.preset, "methods": table, "published": PUBLISHED,
               "pretrain": {method: states[id(piece)].get("result") for piece in plan if piece["task"] == "pretrain"
                            for method in [piece["method"]]},
               "pieces": {f"{piece['method']}/{piece['name']}": states[id(piece)].get("state", "not run")
                          for piece in plan}}
    with open(os.path.join(args.out_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    if failed:
        raise SystemExit(f"{len(failed)} pieces failed: {[piece['method'] + '/' + piece['name'] for piece in failed]}"
                         f" (their output.log says why); run the same command again to resume them.")
    return results


if __name__ == "__main__":
    # A SIGTERM (a job scheduler's, `kill`) stops the running pieces as Ctrl-C does, instead of leaving them running.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    try:
        main()
    except KeyboardInterrupt:  # the running pieces were stopped; their piece.json says "started"
        raise SystemExit("interrupted: run the same command again to resume (the interrupted pieces continue from "
                         "their last.pth).")
