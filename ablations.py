"""The paper's ablations (Tables 4, 5, 6) and scratch-vs-pre-trained, re-run at a scale small enough to repeat.

Every row is one pre-training command (pretrain.py's tiny preset on the built-in synthetic shapes, all 10 views
rendered) followed by two measures of the encoder it produced:
  - the linear-SVM accuracy on frozen features (finetune.py --task svm, synthetic shapes);
  - a short fine-tune on the hard scan-like variant (finetune.py --task scan_objectnn --variant pb_t50_rs on the
    synthetic "perturbed" shapes), reported as the LAST epoch's test accuracy (no best-epoch picking).
Each row runs for several seeds; tables give mean +- sample std. Table 5 needs only the pre-training loss: the
mean reconstruction loss L_R (Eq. 16) of the last pre-training epoch.

    Table 4  A Point-MAE (no 2-D, random masking)   B + KAT (k random views)   C + RVS   D + RM (= KR-MAE)
             E/G/H: KR-MAE with k = 1 / 6 / 9 selected views (F = D, k = 3)
    Table 5  random vs reinforced masking, mask ratio 0.5 ... 0.9
    Table 6  fusion: MLP / joint self-attention / plain cross-attention / aligned (= D)
    scratch  the same fine-tune from a randomly initialised encoder

Run:  python ablations.py --jobs 8 --out runs/ablations          (all rows, 3 seeds; on one GPU: ~10 minutes)
      python ablations.py --report runs/ablations/results.json    (print the markdown tables again)
The commands are the same on a CPU, only slower (see the README for the measured wall time).
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

# Shared by every pre-training run: the tiny model, all 10 PointCLIP V2 views, k = 3 (paper), a fixed budget.
PRETRAIN_COMMON = ["--preset", "tiny", "--num_views", "10", "--num_selected_views", "3", "--synthetic_size", "512",
                   "--epochs", "15", "--warmup_epochs", "2", "--picture_every", "0", "--no-progress"]
# The downstream measures, shared by every row.
SVM_COMMAND = ["--task", "svm", "--data", "synthetic", "--preset", "tiny", "--synthetic_train_size", "1024",
               "--synthetic_test_size", "512", "--no-progress"]
FINETUNE_COMMAND = ["--task", "scan_objectnn", "--variant", "pb_t50_rs", "--data", "synthetic", "--preset", "tiny",
                    "--synthetic_train_size", "1024", "--synthetic_test_size", "512", "--epochs", "10",
                    "--warmup_epochs", "2", "--no-progress"]

# name -> (extra pre-training flags, whether to evaluate downstream). The random/reinforced pairs of Table 5 at
# mask ratio 0.6 are rows C and D of Table 4, so they are run once.
CONFIGS = {
    "A": (["--no-use_2d", "--masking", "random"], True),
    "B": (["--no-use_rvs", "--masking", "random"], True),
    "C": (["--masking", "random"], True),
    "D": (["--masking", "reinforced"], True),
    "k1": (["--num_selected_views", "1"], True),
    "k6": (["--num_selected_views", "6"], True),
    "k9": (["--num_selected_views", "9"], True),
    "mlp": (["--fusion", "mlp"], True),
    "joint": (["--fusion", "joint"], True),
    "cross": (["--fusion", "cross"], True),
    **{f"random_{r}": (["--masking", "random", "--mask_ratio", r], False) for r in ("0.5", "0.7", "0.8", "0.9")},
    **{f"reinforced_{r}": (["--mask_ratio", r], False) for r in ("0.5", "0.7", "0.8", "0.9")},
}
TABLES = {
    "Table 4": [("A: Point-MAE (no 2-D, random masking)", "A"), ("B: + KAT, 3 random views", "B"),
                ("C: + RVS (k = 3)", "C"), ("D: + RM = KR-MAE (k = 3)", "D"), ("E: KR-MAE, k = 1", "k1"),
                ("G: KR-MAE, k = 6", "k6"), ("H: KR-MAE, k = 9", "k9")],
    "Table 6": [("A: MLP", "mlp"), ("B: Self-Attention (joint)", "joint"), ("C: Cross-Attention", "cross"),
                ("D: Aligned-Attention (KAT)", "D")],
    "Table 5": [(f"{masking} {ratio}", {"0.6": {"random": "C", "reinforced": "D"}[masking]}.get(ratio,
                                                                                               f"{masking}_{ratio}"))
                for masking in ("random", "reinforced") for ratio in ("0.5", "0.6", "0.7", "0.8", "0.9")],
}


THREADS = {"OMP_NUM_THREADS": "1"}  # set by main(): the machine's cores shared among the runs at once


def run(command, log_path):
    """Run one command, its output to a log file; return its wall time, or raise with the log's tail."""
    started = time.time()
    with open(log_path, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **THREADS})
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log_path}:\n" + open(log_path).read()[-2000:])
    return time.time() - started


def chain(name, seed, out):
    """Pre-train one configuration for one seed, then (for Table 4/6 rows) measure it with the SVM and a fine-tune."""
    flags, downstream = CONFIGS.get(name, ([], True))
    run_dir = os.path.join(out, f"{name}_seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    result = {"name": name, "seed": seed}
    checkpoint = ""
    if name != "scratch":
        command = [sys.executable, "pretrain.py", *PRETRAIN_COMMON, *flags, "--seed", str(seed), "--out_dir", run_dir]
        if name == "D" and seed == 0:
            command += ["--svm_every", "1"]  # one run logs the SVM accuracy over epochs, for the README's curve
        result["pretrain_command"] = " ".join(command[1:])
        result["pretrain_seconds"] = run(command, os.path.join(run_dir, "pretrain.out"))
        last = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))][-1]
        result["pretrain_loss_rec"] = last["loss_rec"]
        checkpoint = os.path.join(run_dir, "last.pth")
    if downstream:
        for measure, base in (("svm", SVM_COMMAND), ("finetune", FINETUNE_COMMAND)):
            command = [sys.executable, "finetune.py", *base, "--seed", str(seed), "--out_dir",
                       os.path.join(run_dir, measure)] + (["--checkpoint", checkpoint] if checkpoint else [])
            result[f"{measure}_seconds"] = run(command, os.path.join(run_dir, f"{measure}.out"))
            label = "svm_synthetic" if measure == "svm" else "scan_objectnn_pb_t50_rs_synthetic"
            summary = json.load(open(os.path.join(run_dir, measure, label, "summary.json")))
            key = "svm_accuracy" if measure == "svm" else "last_accuracy"
            result[f"{measure}_accuracy"] = summary[key]["mean"]
    print(json.dumps(result), flush=True)
    return result


def mean_std(values):
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f}" if len(values) == 1 else \
        f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def report(results):
    """Markdown tables of mean +- std over seeds for every table of the paper, from the list of run results."""
    by_name = {}
    for result in results:
        by_name.setdefault(result["name"], []).append(result)
    lines = []
    for table, rows in TABLES.items():
        lines.append(f"\n**{table}**\n")
        if table == "Table 5":
            lines += ["| masking, mask ratio | pre-training L_R (last epoch) | seeds |", "|---|---|---|"]
        else:
            lines += ["| row | linear SVM acc. (%) | fine-tune acc., perturbed (%) | pre-training L_R | seeds |",
                      "|---|---|---|---|---|"]
        for label, name in rows:
            runs = by_name.get(name, [])
            seeds = ",".join(str(run["seed"]) for run in runs)
            if any("stale" in run for run in runs):  # measured with an earlier version of the code (see its note)
                label += " †"
            loss = mean_std([run["pretrain_loss_rec"] for run in runs])
            if table == "Table 5":
                lines.append(f"| {label} | {loss} | {seeds} |")
            else:
                lines.append(f"| {label} | {mean_std([run['svm_accuracy'] for run in runs])} | "
                             f"{mean_std([run['finetune_accuracy'] for run in runs])} | {loss} | {seeds} |")
    scratch, pretrained = by_name.get("scratch", []), by_name.get("D", [])
    lines += ["\n**From scratch vs KR-MAE pre-training** (same fine-tune)\n", "| encoder | fine-tune acc., perturbed (%) |",
              "|---|---|", f"| random init | {mean_std([run['finetune_accuracy'] for run in scratch])} |",
              f"| KR-MAE (row D) | {mean_std([run['finetune_accuracy'] for run in pretrained])} |"]
    stale = sorted({run["stale"] for run in results if "stale" in run})
    lines += [f"\n† {note}" for note in stale]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--only", default="", help="comma-separated config names (default: all, and scratch)")
    parser.add_argument("--report", default="", help="print the tables of an existing results.json and stop")
    args = parser.parse_args()
    if args.report:
        print(report(json.load(open(args.report))))
        return
    os.makedirs(args.out, exist_ok=True)
    THREADS["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    names = args.only.split(",") if args.only else [*CONFIGS, "scratch"]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results_path, results, started = os.path.join(args.out, "results.json"), [], time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        # The long chains (pre-training + SVM + fine-tune) first, so the pool ends with the short ones.
        order = sorted(names, key=lambda name: not CONFIGS.get(name, ([], True))[1])
        futures = [pool.submit(chain, name, seed, args.out) for name in order for seed in seeds]
        for future in concurrent.futures.as_completed(futures):
            try:
                results.append(future.result())
            except RuntimeError as error:  # one failed run is reported, the others go on
                print(error, file=sys.stderr, flush=True)
            with open(results_path, "w") as handle:  # written after every run, so partial results survive
                json.dump(results, handle, indent=1)
    print(report(results))
    print(f"\n{len(results)} runs in {time.time() - started:.0f} s with {args.jobs} at once; wrote {results_path}")


if __name__ == "__main__":
    main()
