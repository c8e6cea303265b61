"""The speed suite: one command that runs every CUDA path of the project once and then measures the pre-training
step, each part in a process of its own under its own time limit, so that the first minutes of a GPU go to
measurement, not to set-up. docs/SPEED_SUITE.md has the command for a GPU machine and how to read its summary.

Run:  python bench.py --suite --out DIR                  (on a GPU: the paper configuration, about 9 minutes)
      python bench.py --suite --preset tiny --out DIR    (on the CPU: tiny sizes and the CPU's substitutes)
      python bench.py --suite --parts pretrain_compile,bench_compile_kr_mae --budget_scale 2 --out DIR
                                                        (a second run of some parts, with longer limits)
(`python speed_suite.py ...` is the same.) It writes DIR/suite.json and DIR/suite.md after every part (so a run
killed midway leaves what it measured) and, from the profile, DIR/profile_trace.json.gz. The runs' own folders
(checkpoints, logs, pictures, the bench JSONs) go to a fresh temporary folder, named in the JSON (--work).

The parts, in this order; each drives a script through its command line, as a reader would type it:
  (1) smoke, every path once, at pretrain.py's and finetune.py's tiny preset, one epoch:
      pretrain_eager     pretrain.py on the device, eager (bf16 autocast, fused AdamW, the bf16 frozen tower)
      pretrain_compile   the same with --compile (the whole model, forward and backward, through torch.compile)
      pretrain_resume    --resume of pretrain_eager's checkpoint for a second epoch
      torchrun_pretrain  pretrain.py under torchrun: NCCL on 2 GPUs (on 1 GPU one process, which runs the single-
                         process path); on the CPU 2 processes with gloo
      torchrun_finetune  finetune.py under torchrun, likewise
      finetune           finetune.py from pretrain_eager's checkpoint
      bf16_tower         the bf16 frozen tower against float32 on the device, by tests/test_tokenizer.py's own
                         function and bounds (bf16_tower_against_float32; on the CPU the CPU test itself)
  (2) bench.py at the paper configuration (batch 128; with --preset tiny the tiny sizes), each step alone (--only):
      bench_eager_kr_mae, bench_eager_point_mae            eager (KR-MAE's also with the stage table)
      bench_compile_kr_mae, bench_compile_point_mae        --compile
      bench_graphs_kr_mae, bench_graphs_point_mae          --compile --compile_mode reduce-overhead (CUDA graphs)
  (3) profile          bench.py --profile: the top kernels of one eager KR-MAE step

A part that fails (its exit status, or its time limit) is recorded with the tail of its stderr and the suite goes
on; a part that cannot run here (no CUDA, a part it needs failed, not in --parts) is recorded as skipped, with the
reason. Ctrl-C or SIGTERM kills the running part's processes, records it as stopped and the rest as skipped, and
writes the summary. Every part is in the JSON, in order.

Each part's time limit (its budget) is computed in suite_parts from the last measurements, printed in the plan and
recorded: start-up + compiling + its steps x the last measured step x 3. On an H100-class GPU at the paper
configuration the budgets add up to 530 s, so the suite ends inside 9 minutes (540 s) with the driver's own
seconds; tests/test_speed_suite.py checks that sum.
"""
import argparse
import datetime
import gzip
import importlib
import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))  # the scripts run from the repository's root

# The last measured step, in seconds: docs/bench_h100.json (H100, paper configuration, batch 128: KR-MAE's 12.8
# TFLOP in 137 ms, 9.4 % of its compute floor) and docs/bench_h100_tiny.json (H100, tiny preset, batch 16), both
# torch 2.11 on the code before the speed changes, so upper bounds. CPU: the tiny preset's steps in the suite's
# own CPU run on 2 cores shared with other work (load average about 10; docs/SPEED_SUITE.md), 2.5 times those of
# the same CPU unloaded (docs/bench_cpu_tiny.json: 0.52 and 0.39 s).
LAST_STEP_SECONDS = {("cuda", "paper"): {"kr_mae": 0.137, "point_mae": 0.074},
                     ("cuda", "tiny"): {"kr_mae": 0.048, "point_mae": 0.029},
                     ("cpu", "tiny"): {"kr_mae": 1.32, "point_mae": 1.22}}
# Seconds before a part's first step: Python, torch, the device, clip, the model (at the paper configuration a
# ViT-B/16-sized tower built on the CPU); torchrun's launch adds TORCHRUN_SECONDS. Not measured on a GPU here yet.
START_SECONDS = {("cuda", "paper"): 20, ("cuda", "tiny"): 15, ("cpu", "tiny"): 30}
TORCHRUN_SECONDS = 5
# Seconds of compiling, (--compile, then reduce-overhead): not measured on a GPU here yet, so allowances. The
# reduce-overhead part compiles the same step again after the --compile part, with Inductor's kernel cache warm.
# CPU (the run above): pretrain.py --compile 559 s in all with a cold cache, bench.py --compile 142 s (KR-MAE,
# after it) and 168 s (Point-MAE); CUDA graphs do not exist there.
COMPILE_SECONDS = {("cuda", "paper"): {"kr_mae": (65, 40), "point_mae": (30, 15)},
                   ("cuda", "tiny"): {"kr_mae": (40, 25), "point_mae": (30, 15)},
                   ("cpu", "tiny"): {"kr_mae": (450, None), "point_mae": (300, None)}}
STEP_MARGIN = 3  # a step may take 3 times the last measurement (the first steps: cuBLAS, cuDNN, allocator)
# Steps a part runs, at the tiny preset: one pretrain.py epoch of 512 shapes in batches of 16; one finetune.py
# epoch of 256 training and 128 test shapes. bench.py: 2 warm-up + 10 timed steps, 1 counted (FLOPs), and for the
# eager KR-MAE step the stage table's 12 more; its operations table about 2 steps' worth. The profile part runs
# with --repeats 1 --warmup 1.
STEPS = {"pretrain": 32, "finetune": 24, "bench": 15, "bench_with_stages": 27, "profile": 8}
SUITE_LIMIT_SECONDS = 540  # on an H100-class GPU at the paper configuration: the whole suite inside 9 minutes
TAIL_CHARACTERS = 3000  # of a failing part's stderr; 2000 of every part's stdout

# The packages the parts import besides torch and numpy, by import name -> distribution (for its version).
IMPORTS = {"clip": "clip-anytorch", "ftfy": "ftfy", "regex": "regex", "tqdm": "tqdm", "PIL": "pillow",
           "torchvision": "torchvision", "pkg_resources": "setuptools", "h5py": "h5py", "sklearn": "scikit-learn",
           "scipy": "scipy", "numpy": "numpy"}
# The targets of the paper configuration, batch 128, bf16, one GPU: (name, step, modes, shapes/s at least).
TARGETS = [("KR-MAE eager", "kr_mae", ("eager",), 1400),
           ("KR-MAE compiled", "kr_mae", ("compile", "graphs"), 3000),
           ("Point-MAE, best mode", "point_mae", ("eager", "compile", "graphs"), 10000)]
MODE_FLAGS = {"eager": [], "compile": ["--compile"], "graphs": ["--compile", "--compile_mode", "reduce-overhead"]}

# The bf16 tower part: tests/test_tokenizer.py's function, so the GPU is held to the CPU test's bounds.
BF16_TOWER_CODE = ("import json, sys; sys.path.insert(0, 'tests'); import torch, test_tokenizer; "
                   "print(json.dumps(test_tokenizer.bf16_tower_against_float32(torch.device(sys.argv[1]))))")


def budget_seconds(start, compiling, steps, step_seconds):
    """A part's time limit: start-up + compiling + steps x the last measured step x STEP_MARGIN, rounded up to 5 s.
    -> (seconds, how it was reckoned)."""
    seconds = 5 * math.ceil((start + compiling + steps * step_seconds * STEP_MARGIN) / 5 - 1e-9)
    basis = f"start {start} s" + (f" + compile {compiling} s" if compiling else "")
    basis += f" + {steps} steps x {1e3 * step_seconds:.0f} ms x {STEP_MARGIN}" if steps else ""
    return seconds, basis


def suite_parts(device_type, preset, work, gpus=1, python=sys.executable):
    """The suite's parts in their order: a list of dicts (name, group, what, command, budget_s, basis, needs, note,
    skip). device_type "cuda" or "cpu"; preset "" (the paper configuration) or "tiny" for bench.py's parts (the
    smoke parts always use the tiny preset); work: the folder of the runs' outputs; gpus: how many torchrun uses."""
    sizes = "paper" if preset == "" else preset
    smoke_key, bench_key = (device_type, "tiny"), (device_type, sizes)
    no_bench = None  # why bench.py's parts cannot run here, or None
    if bench_key not in LAST_STEP_SECONDS:
        no_bench = (f"no CUDA device: the {sizes} configuration's step is for a GPU; on the CPU run "
                    f"`--suite --preset tiny` (bench.py's tiny sizes)")
    device = ["--device", device_type]
    nproc = 2 if device_type == "cpu" else max(1, min(2, gpus))
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if device_type == "cpu":
        torchrun_note = "2 processes with gloo (the CPU's substitute for NCCL) and CPUSyncBatchNorm"
    elif nproc == 1:
        torchrun_note = ("1 GPU, so 1 process: distributed.start_processes joins no process group for one process, "
                         "so this runs the single-process path under torchrun; NCCL, DDP and nn.SyncBatchNorm need "
                         "2 GPUs")
    else:
        torchrun_note = "2 processes on 2 GPUs: NCCL, DDP, nn.SyncBatchNorm"
    tiny_start, tiny_step = START_SECONDS[smoke_key], LAST_STEP_SECONDS[smoke_key]["kr_mae"]
    tiny_compile = COMPILE_SECONDS[smoke_key]["kr_mae"][0]
    pretrain = [python, "pretrain.py", "--preset", "tiny", "--epochs", "1", "--no-progress", *device]
    finetune = [python, "finetune.py", "--preset", "tiny", "--epochs", "1", "--no-progress", *device]
    checkpoint = os.path.join(work, "pretrain_eager", "last.pth")

    def part(name, group, what, command, budget, needs=None, note=None, skip=None):
        return {"name": name, "group": group, "what": what, "command": command, "budget_s": budget[0],
                "basis": budget[1], "needs": needs, "note": note, "skip": skip}

    parts = [
        part("pretrain_eager", "smoke", "pretrain.py --preset tiny --epochs 1, eager",
             [*pretrain, "--out_dir", os.path.join(work, "pretrain_eager")],
             budget_seconds(tiny_start, 0, STEPS["pretrain"], tiny_step)),
        part("pretrain_compile", "smoke", "pretrain.py --preset tiny --epochs 1 --compile",
             [*pretrain, "--compile", "--out_dir", os.path.join(work, "pretrain_compile")],
             budget_seconds(tiny_start, tiny_compile, STEPS["pretrain"], tiny_step)),
        part("pretrain_resume", "smoke", "pretrain.py --resume pretrain_eager's last.pth --epochs 2",
             [python, "pretrain.py", "--resume", checkpoint, "--epochs", "2", "--no-progress", *device],
             budget_seconds(tiny_start, 0, STEPS["pretrain"], tiny_step), needs="pretrain_eager"),
        part("torchrun_pretrain", "smoke", f"torchrun --nproc_per_node {nproc} pretrain.py --preset tiny --epochs 1",
             [*torchrun, *pretrain[1:], "--out_dir", os.path.join(work, "torchrun_pretrain")],
             budget_seconds(tiny_start + TORCHRUN_SECONDS, 0, STEPS["pretrain"], tiny_step), note=torchrun_note),
        part("torchrun_finetune", "smoke", f"torchrun --nproc_per_node {nproc} finetune.py --preset tiny --epochs 1",
             [*torchrun, *finetune[1:], "--out_dir", os.path.join(work, "torchrun_finetune")],
             budget_seconds(tiny_start + TORCHRUN_SECONDS, 0, STEPS["finetune"], tiny_step), note=torchrun_note),
        part("finetune", "smoke", "finetune.py --preset tiny --epochs 1 --checkpoint pretrain_eager's last.pth",
             [*finetune, "--checkpoint", checkpoint, "--out_dir", os.path.join(work, "finetune")],
             budget_seconds(tiny_start, 0, STEPS["finetune"], tiny_step), needs="pretrain_eager"),
        part("bf16_tower", "smoke", f"the bf16 frozen tower against float32 on the "
                                    f"{'GPU' if device_type == 'cuda' else 'CPU'} (tests/test_tokenizer.py's bounds)",
             [python, "-c", BF16_TOWER_CODE, device_type], budget_seconds(tiny_start, 0, 0, 0),
             note=None if device_type == "cuda" else "on the CPU: the CPU test's own check"),
    ]
    preset_flags = ["--preset", preset] if preset else []
    start = START_SECONDS.get(bench_key, 0)
    for mode in ("eager", "compile", "graphs"):
        for step in ("kr_mae", "point_mae"):
            name = f"bench_{mode}_{step}"
            skip = no_bench or ("CUDA graphs (reduce-overhead) exist only on CUDA" if mode == "graphs" and
                                device_type != "cuda" else None)
            compiling = 0 if mode == "eager" or skip else COMPILE_SECONDS[bench_key][step][mode == "graphs"]
            steps = STEPS["bench_with_stages" if (mode, step) == ("eager", "kr_mae") else "bench"]
            budget = (None, "") if skip else budget_seconds(start, compiling, steps, LAST_STEP_SECONDS[bench_key][step])
            parts.append(part(name, "bench", " ".join(["bench.py", *preset_flags, *MODE_FLAGS[mode], "--only", step]),
                              [python, "bench.py", *preset_flags, *device, "--only", step, *MODE_FLAGS[mode],
                               "--out", os.path.join(work, f"{name}.json")], budget, skip=skip))
            parts[-1].update(step=step, mode=mode)
    budget = (None, "") if no_bench else budget_seconds(start, 0, STEPS["profile"],
                                                         LAST_STEP_SECONDS[bench_key]["kr_mae"])
    what = " ".join(["bench.py", *preset_flags, "--profile --only kr_mae: top kernels"])
    parts.append(part("profile", "profile", what,
                      [python, "bench.py", *preset_flags, *device, "--only", "kr_mae", "--profile", "--repeats", "1",
                       "--warmup", "1", "--out", os.path.join(work, "profile.json")], budget, skip=no_bench))
    return parts


def tail(path, characters):
    """The last `characters` of a text file ('' if it does not exist)."""
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as handle:
        return handle.read()[-characters:]


def last_json_object(text):
    """The last line of `text` that is a JSON object (a run's last log record), or None."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def run_part(part, work):
    """Run one part's command in its own process group, under its budget -> what to record: status ("passed",
    "failed", "timed out"), seconds, returncode, error (the tail of stderr), stdout_tail, last_record. On a timeout
    the whole group is killed (torchrun's workers, the compiler's), and it is killed after a normal exit too, so
    nothing a part started outlives it."""
    stdout_path = os.path.join(work, f"{part['name']}.stdout")
    stderr_path = os.path.join(work, f"{part['name']}.stderr")
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.time()
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen(part["command"], cwd=HERE, stdout=stdout, stderr=stderr, env=environment,
                                   start_new_session=True)  # its own process group, id = its pid
        try:
            returncode = process.wait(timeout=part["budget_s"])
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group is gone: every process of it has exited
            process.wait()
    seconds = time.time() - started
    stdout_text = tail(stdout_path, 100_000)
    record = {"seconds": round(seconds, 2), "returncode": returncode, "stdout_tail": stdout_text[-2000:],
              "last_record": last_json_object(stdout_text)}
    if returncode == 0:
        return {"status": "passed", "error": None, **record}
    stderr_text = tail(stderr_path, TAIL_CHARACTERS)
    if returncode is None:
        return {"status": "timed out", "error": f"ran past its budget of {part['budget_s']} s; stderr "
                                                f"ends:\n{stderr_text}", **record}
    return {"status": "failed", "error": f"exit status {returncode}; stderr ends:\n{stderr_text}", **record}


def read_bench(part):
    """A passed bench.py part's JSON (the file after its --out), or None (a smoke part; no such file)."""
    if part["group"] == "smoke":
        return None
    path = part["command"][part["command"].index("--out") + 1]
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def throughput_rows(parts):
    """One row per measured bench.py step: the figures of its JSON that the summary shows."""
    rows = []
    for part in parts:
        bench = part.get("bench")
        if part["group"] != "bench" or part["status"] != "passed" or not bench or not bench.get(part["step"]):
            continue
        row = bench[part["step"]]
        rows.append({"part": part["name"], "step": part["step"], "mode": part["mode"],
                     "shapes_per_second": row["shapes_per_second"], "step_ms": 1e3 * row["step_seconds"],
                     "percent_of_floor": None if row["fraction_of_floor"] is None else 100 * row["fraction_of_floor"],
                     "peak_memory_gib": row["peak_memory_gib"], "tflop_per_step": row["flops_per_step"] / 1e12,
                     "batch_size": bench["config"]["batch_size"], "bf16": bench["settings"]["bf16"],
                     "device": bench["settings"]["device"],
                     "paper_configuration": bench["paper_floor_estimate"] is not None,
                     "compiled_fps_equals_eager": bench["compiled_fps_equals_eager"]})
    return rows


def target_rows(rows):
    """Each target against the best measured step of its modes. Assessed only on rows at the paper configuration
    (batch 128) with bf16 on a GPU, and never on a compiled step whose compiled FPS picked other centres than eager
    (not the same computation); elsewhere `met` is None and the note says why."""
    assessed = [row for row in rows if row["paper_configuration"] and row["bf16"] and row["device"] != "CPU"
                and row["compiled_fps_equals_eager"] is not False]
    targets = []
    for name, step, modes, minimum in TARGETS:
        candidates = [row for row in assessed if row["step"] == step and row["mode"] in modes]
        best = max(candidates, key=lambda row: row["shapes_per_second"], default=None)
        note = None if best else ("not measured at the paper configuration with bf16 on a GPU" if rows else
                                  "not measured")
        targets.append({"target": name, "step": step, "modes": list(modes), "minimum": minimum,
                        "measured": best["shapes_per_second"] if best else None, "part": best["part"] if best else None,
                        "met": best["shapes_per_second"] >= minimum if best else None, "note": note})
    return targets


def environment():
    """What this machine runs the parts with: Python, torch, the GPU, and each imported package's version (or
    why it cannot be imported), checked here first so that a missing wheel shows before any part runs."""
    packages = {}
    for module, distribution in IMPORTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # clip's pkg_resources deprecation warning
                importlib.import_module(module)
            packages[distribution] = importlib.metadata.version(distribution)
        except Exception as error:  # noqa: BLE001 (recorded, not raised: the parts that need it will fail)
            packages[distribution] = f"cannot import {module}: {error}"
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "gpus": torch.cuda.device_count() if cuda else 0,
            "packages": packages}


def cell(value, spec):
    """A markdown cell: the value formatted, or '-' for one that does not exist."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def first_line(text):
    return (text or "").strip().splitlines()[0].replace("|", "/") if (text or "").strip() else ""


def markdown(result):
    """The summary, made from the JSON alone: the parts, the step's throughput, the targets, the stage table of the
    eager KR-MAE step, the top kernels and every failure's error."""
    suite = result["suite"]
    lines = [f"# Speed suite: {suite['device']}, {suite['sizes']}", "",
             f"Started {suite['started_utc']}; {cell(suite['seconds'], '.1f')} s of a {suite['budget_total_s']} s "
             f"budget; torch {result['environment']['torch']}, Python {result['environment']['python']}; run "
             f"folders in `{suite['work']}`.", "",
             f"Command: `{' '.join(suite['command'])}`", "", "## Parts", "",
             "| # | part | status | seconds | budget s | what | note |", "|---|---|---|---|---|---|---|"]
    for index, part in enumerate(result["parts"], 1):
        note = part.get("skip_reason") or first_line(part.get("error")) or part.get("note") or ""
        lines.append(f"| {index} | {part['name']} | {part['status']} | {cell(part.get('seconds'), '.1f')} | "
                     f"{cell(part['budget_s'], 'd')} | {part['what']} | {note} |")
    lines += ["", "## The step (bench.py)", "",
              "| part | step | mode | shapes/s | ms/step | % of compute floor | peak GiB | TFLOP/step | batch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in result["throughput"]:
        lines.append(f"| {row['part']} | {row['step']} | {row['mode']} | {cell(row['shapes_per_second'], '.1f')} | "
                     f"{cell(row['step_ms'], '.2f')} | {cell(row['percent_of_floor'], '.2f')} | "
                     f"{cell(row['peak_memory_gib'], '.2f')} | {cell(row['tflop_per_step'], '.3f')} | "
                     f"{row['batch_size']} |")
    lines += ["", "## Targets (paper configuration, batch 128, bf16, one GPU)", "",
              "| target | at least shapes/s | measured | part | met |", "|---|---|---|---|---|"]
    for row in result["targets"]:
        met = {True: "yes", False: "no", None: row["note"]}[row["met"]]
        lines.append(f"| {row['target']} | {row['minimum']} | {cell(row['measured'], '.1f')} | {row['part'] or '-'} "
                     f"| {met} |")
    eager = [part for part in result["parts"] if part["name"] == "bench_eager_kr_mae" and part.get("bench")]
    if eager and eager[0]["bench"]["stages"]:
        timing = eager[0]["bench"]["stages_timing"]
        lines += ["", f"## Stages of the eager KR-MAE step (bench_eager_kr_mae; {timing['how']})", "",
                  "| stage | ms | share |", "|---|---|---|"]
        lines += [f"| {name} | {1e3 * row['seconds']:.2f} | {100 * row['share']:.1f} % |"
                  for name, row in eager[0]["bench"]["stages"].items()]
        lines.append(f"| the step (median) | {1e3 * timing['step_seconds']:.2f} | |")
    if result["profile"]:
        lines += ["", f"## Top kernels of one eager KR-MAE step (profile, by {result['profile']['sorted_by']})", "",
                  "| op or kernel | calls | self ms |", "|---|---|---|"]
        lines += [f"| {row['name'][:90].replace('|', '/')} | {row['calls']} | {row['self_ms']:.3f} |"
                  for row in result["profile"]["top"]]
    failures = [part for part in result["parts"] if part["status"] in ("failed", "timed out", "stopped")]
    if failures:
        lines += ["", "## Failures"]
        for part in failures:
            lines += ["", f"### {part['name']} ({part['status']})", "", "```", part["error"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def strict(value):
    """`value` with NaN and inf as None: strict JSON (RFC 8259 has no NaN), e.g. for a run's log line that printed a
    NaN loss. Twin of bench.strict (this file imports no module of ours)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    return value


def write_summary(result, out):
    """suite.json and suite.md, each written to a temporary name and renamed: a kill never leaves half a file."""
    for name, text in (("suite.json", json.dumps(strict(result), indent=2, allow_nan=False)),
                       ("suite.md", markdown(result))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)


def run_suite(parts, out, work, header):
    """Run the parts in order, recording each (a failure is recorded, never raised) and rewriting the summary after
    each one -> the result (the JSON's content). header: the suite's settings and environment."""
    started = time.time()
    result = {"suite": {**header["suite"], "started_utc": utc_now(), "finished_utc": None, "seconds": None,
                        "budget_total_s": sum(part["budget_s"] or 0 for part in parts if not part["skip"])},
              "environment": header["environment"], "parts": [], "throughput": [], "targets": [], "profile": None}
    status, stopped = {}, False
    for index, part in enumerate(parts, 1):
        record = {**part, "status": "skipped", "skip_reason": part["skip"], "seconds": None, "error": None}
        del record["skip"]
        needed = part["needs"]
        if not part["skip"] and needed and status.get(needed) != "passed":
            record["skip_reason"] = f"needs {needed}'s checkpoint, and {needed} {status.get(needed, 'did not run')}"
        if stopped:
            record["skip_reason"] = "the suite was stopped before this part"
        elif record["skip_reason"] is None:
            print(f"[{index}/{len(parts)}] {part['name']} (budget {part['budget_s']} s): {' '.join(part['command'])}",
                  flush=True)
            try:
                record.update(run_part(part, work))
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see main): run_part killed the part's processes
                stopped = True
                record.update(status="stopped", error="the suite was stopped (Ctrl-C or SIGTERM) during this part")
            record["bench"] = read_bench(record) if record["status"] == "passed" else None
            print(f"    {record['status']} in {cell(record['seconds'], '.1f')} s" +
                  (f": {first_line(record['error'])}" if record["error"] else ""), flush=True)
        else:
            print(f"[{index}/{len(parts)}] {part['name']}: skipped ({record['skip_reason']})", flush=True)
        status[part["name"]] = record["status"]
        result["parts"].append(record)
        if part["name"] == "profile" and record.get("bench"):
            result["profile"] = record["bench"]["profile"]
            copy_trace(record["bench"]["trace"], out)
        result["throughput"] = throughput_rows(result["parts"])
        result["targets"] = target_rows(result["throughput"])
        result["suite"].update(finished_utc=utc_now(), seconds=round(time.time() - started, 1))
        write_summary(result, out)
    return result


def copy_trace(path, out, limit_bytes=16 * 2**20):
    """The profile's Chrome trace, gzipped, beside the summary, when it is under limit_bytes compressed."""
    if not path or not os.path.exists(path):
        return
    target = os.path.join(out, "profile_trace.json.gz")
    with open(path, "rb") as source, gzip.open(target + ".tmp", "wb") as compressed:
        shutil.copyfileobj(source, compressed)
    if os.path.getsize(target + ".tmp") <= limit_bytes:
        os.replace(target + ".tmp", target)
    else:
        os.remove(target + ".tmp")


def interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="the speed suite: every CUDA path, then the step measured")
    parser.add_argument("--out", default="", help="the folder of suite.json and suite.md (default: "
                                                  "runs/suite/<UTC time>); refused if it holds a suite.json")
    parser.add_argument("--preset", default="", choices=["", "tiny"], help="bench.py's sizes; default: the paper's")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--parts", default="", help="comma-separated names of the parts to run (the others are "
                                                    "recorded as skipped); default: all")
    parser.add_argument("--budget_scale", type=float, default=1.0, help="multiply every part's time limit")
    parser.add_argument("--work", default="", help="the folder of the runs' outputs (default: a fresh temporary "
                                                   "folder)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    out = args.out or os.path.join("runs", "suite", datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%d_%H%M%S"))
    if os.path.exists(os.path.join(out, "suite.json")):
        raise SystemExit(f"{out!r} holds the summary of an earlier suite run (suite.json); give another --out.")
    env = environment()
    if args.device == "cuda" and not env["gpu"]:
        raise SystemExit("--device cuda, but torch sees no CUDA device here; --device cpu (or auto) runs the CPU's "
                         "version of the suite.")
    device_type = "cuda" if env["gpu"] and args.device != "cpu" else "cpu"
    names = [part["name"] for part in suite_parts(device_type, args.preset, "", gpus=env["gpus"])]
    chosen = [name for name in args.parts.split(",") if name] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise SystemExit(f"--parts names unknown parts {unknown}; expected some of {names}.")
    os.makedirs(out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="speed_suite_")
    os.makedirs(work, exist_ok=True)
    parts = suite_parts(device_type, args.preset, os.path.abspath(work), gpus=env["gpus"])
    # A package that does not import would fail every part after minutes of start-up: then no part runs.
    missing = [version for version in env["packages"].values() if version.startswith("cannot import")]
    for part in parts:
        if part["name"] not in chosen and not part["skip"]:
            part["skip"] = "not in --parts"
        if missing:
            part["skip"] = f"{'; '.join(missing)} (carry its wheel: docs/SPEED_SUITE.md)"
        if part["budget_s"] is not None:
            part["budget_s"] = max(1, round(part["budget_s"] * args.budget_scale))
    sizes = "paper configuration" if args.preset == "" else f"--preset {args.preset}"
    header = {"suite": {"device": env["gpu"] or "CPU", "device_type": device_type, "sizes": sizes,
                        "preset": args.preset, "budget_scale": args.budget_scale, "work": os.path.abspath(work),
                        "out": os.path.abspath(out), "command": ["bench.py", "--suite", *argv]},
              "environment": env}

    # --- the plan: each part's time limit and how it was reckoned ---------------------------------------------------
    print(f"speed suite on {header['suite']['device']} ({device_type}), {sizes}; Python {env['python']}, torch "
          f"{env['torch']}; packages: " + ", ".join(f"{name} {version}" for name, version in env["packages"].items()))
    print(f"{'#':>2s} {'part':24s} {'budget s':>8s}  basis (or why it is skipped)")
    for index, part in enumerate(parts, 1):
        print(f"{index:2d} {part['name']:24s} {cell(part['budget_s'], 'd'):>8s}  {part['skip'] or part['basis']}")
    total = sum(part["budget_s"] for part in parts if not part["skip"])
    print(f"   {'total':24s} {total:8d}  (an H100-class GPU at the paper configuration: at most "
          f"{SUITE_LIMIT_SECONDS} s)\nsummary: {out}/suite.json, suite.md; run folders: {work}", flush=True)

    # SIGTERM (e.g. `timeout` around the suite) as Ctrl-C: the part running is killed with its process group, which
    # runs in a session of its own and would otherwise outlive the suite, and the summary is written.
    signal.signal(signal.SIGTERM, interrupt)
    result = run_suite(parts, out, work, header)
    print("\n" + markdown(result))
    return result


if __name__ == "__main__":
    main()
