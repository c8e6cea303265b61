"""The paper's ablations (Tables 4, 5, 6) and scratch-vs-pre-trained, re-run at a scale small enough to repeat, and
reported as paired differences over seeds with 95 % intervals.

Every row is one pre-training command (pretrain.py's tiny preset on the built-in synthetic shapes, all 10 views
rendered) followed by two measures of the encoder it produced:
  - the linear probes of linear_probe.py on frozen features (finetune.py --task svm on clean synthetic shapes,
    1024 train / 512 test): the literature's SVC(C = 0.01) on raw max-pooled features, the cross-validated linear
    SVM, 1-nearest-neighbour, and the 10-shot linear probe (class-mean accuracy, mean over 20 draws);
  - a fine-tune that does not saturate: 10 labelled shapes per class (120 in all) of the perturbed, PB-T50-RS-like
    synthetic variant, 30 epochs, tested on 512 shapes after the LAST epoch (no best-epoch picking). With all 1024
    training shapes every row and random init reached 94-96 %, so no difference could show; with 10 per class a
    randomly initialised encoder stays well below 90 % (measured values in the README), leaving room either way.
Table 5 needs only the pre-training loss: the mean reconstruction loss L_R (Eq. 16) of the last pre-training epoch.

    Table 4  A Point-MAE (no 2-D, random masking)   B + KAT (k random views)   C + RVS   D + RM (= KR-MAE)
             E/G/H: KR-MAE with k = 1 / 6 / 9 selected views (F = D, k = 3)
    Table 5  random vs reinforced masking, mask ratio 0.5 ... 0.9 (0.6: rows C and D)
    Table 6  fusion: MLP / joint self-attention / plain cross-attention / aligned (= D)
    scratch  the same measures of a randomly initialised encoder (Point-MAE's from-scratch initialisation)
    peers    Joint-MAE, I2P-MAE, CrossAlignNet (pretrain.py --method, at matched settings: Point-MAE's points, mask
             ratio and schedule, so only the method differs), each against Point-MAE (row A), and each paper's
             key mechanism: Joint-MAE Table 6 (global attention) and Table 8 (no / 1-view cross-reconstruction);
             I2P-MAE's 2D-guided vs random masking; CrossAlignNet Table 7 (image masking) and Table 8 (lambda);
             and KR-MAE with I2P-MAE's saliency masking (--masking saliency) against RM and random masking.

Comparisons are paired by seed: pre-training seed s and fine-tuning seed s of one row against the same seeds of
another (scratch: fine-tuning seed s). For each we give the mean difference and its 95 % Student-t interval over
the seeds; "yes" when the interval excludes 0.

Run:  python ablations.py --jobs 2 --seeds 0,1,2,3,4 --only A,D,scratch --out runs/ablations  (the README's tables)
      python ablations.py --report docs/ablations/results.json    (print the markdown tables again)
A finished pre-training in <out>/<row>_seed<s>/ (log.jsonl up to the last epoch and last.pth) is reused, not re-run.
"""
import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time

from scipy import stats

# Shared by every pre-training run: the tiny model, all 10 PointCLIP V2 views, k = 3 (paper), a fixed budget.
PRETRAIN_EPOCHS = 15
PRETRAIN_COMMON = ["--preset", "tiny", "--num_views", "10", "--num_selected_views", "3", "--synthetic_size", "512",
                   "--epochs", str(PRETRAIN_EPOCHS), "--warmup_epochs", "2", "--picture_every", "0", "--no-progress"]
# The downstream measures, shared by every row.
PROBE_COMMAND = ["--task", "svm", "--data", "synthetic", "--preset", "tiny", "--synthetic_train_size", "1024",
                 "--synthetic_test_size", "512", "--no-progress"]
FINETUNE_COMMAND = ["--task", "scan_objectnn", "--variant", "pb_t50_rs", "--data", "synthetic", "--preset", "tiny",
                    "--synthetic_train_size", "120", "--synthetic_test_size", "512", "--epochs", "30",
                    "--warmup_epochs", "3", "--eval_every", "30", "--no-progress"]
# Bump when a change of the code or of the commands above makes earlier results incomparable: the report shows
# only results of the current protocol.
PROTOCOL = 2

# name -> (extra pre-training flags, whether to measure downstream). Table 5's pairs at 0.6 are rows C and D.
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
    # Peer methods at matched settings, and their papers' key mechanisms.
    "joint_mae": (["--method", "joint_mae", "--matched"], True),
    "joint_global": (["--method", "joint_mae", "--matched", "--no-joint_local_3d_to_2d", "--no-joint_local_2d_to_3d"],
                     True),
    "joint_no_cross": (["--method", "joint_mae", "--matched", "--joint_cross_views", "0"], True),
    "joint_1view": (["--method", "joint_mae", "--matched", "--joint_cross_views", "1"], True),
    # Joint-MAE without its two 2-D losses (L_2D weight 0, no L_3D-2D): the depth-map tokens still enter its joint
    # encoder, but nothing asks them to be reconstructed.
    "joint_no_2d": (["--method", "joint_mae", "--matched", "--joint_weight_2d", "0", "--joint_cross_views", "0"],
                    True),
    "i2p_mae": (["--method", "i2p_mae", "--matched"], True),
    "i2p_random": (["--method", "i2p_mae", "--matched", "--no-i2p_guided"], True),
    "crossalignnet": (["--method", "crossalignnet", "--matched"], True),
    "cal_correspondence": (["--method", "crossalignnet", "--matched", "--cal_image_masking", "correspondence"], True),
    "cal_random": (["--method", "crossalignnet", "--matched", "--cal_image_masking", "random"], True),
    "cal_lambda_1e-3": (["--method", "crossalignnet", "--matched", "--cal_gsa_weight", "1e-3"], True),
    "saliency": (["--masking", "saliency"], True),
}
ROW_LABELS = {"A": "A: Point-MAE (no 2-D, random masking)", "B": "B: + KAT, 3 random views", "C": "C: + RVS (k = 3)",
              "D": "D: + RM = KR-MAE (k = 3)", "k1": "E: KR-MAE, k = 1", "k6": "G: KR-MAE, k = 6",
              "k9": "H: KR-MAE, k = 9", "mlp": "Table 6 A: MLP fusion", "joint": "Table 6 B: self-attention",
              "cross": "Table 6 C: cross-attention", "scratch": "random init (no pre-training)",
              "joint_mae": "Joint-MAE (matched)", "joint_global": "Joint-MAE, global attention (its Table 6)",
              "joint_no_cross": "Joint-MAE, no L_3D-2D (its Table 8)",
              "joint_1view": "Joint-MAE, 1-view L_3D-2D (its Table 8)",
              "joint_no_2d": "Joint-MAE without its 2-D losses (L_2D, L_3D-2D)", "i2p_mae": "I2P-MAE (matched)",
              "i2p_random": "I2P-MAE, random masking", "crossalignnet": "CrossAlignNet (matched)",
              "cal_correspondence": "CrossAlignNet, correspondence masking (its Table 7)",
              "cal_random": "CrossAlignNet, random image masking (its Table 7)",
              "cal_lambda_1e-3": "CrossAlignNet, lambda 1e-3 (its Table 8)",
              "saliency": "KR-MAE with saliency masking (I2P-MAE's)"}
# The peer table: the five methods at matched settings (A = Point-MAE, D = KR-MAE), and Joint-MAE without its
# 2-D losses beside it.
PEER_ROWS = ("A", "D", "joint_mae", "joint_no_2d", "i2p_mae", "crossalignnet")
# The measures of a row: result key -> column title.
# The measures that fix no hyperparameter (the cross-validated SVM, 1-NN, the fine-tune) come first; the 10-shot probe
# fixes C = 1 and the literature SVM C = 0.01 (the published protocol, for numbers beside published ones: on features
# that point almost the same way, its accuracy follows C, so it is not the measure of a difference).
MEASURES = {"cv_svm_accuracy": "CV SVM", "nearest_neighbour_accuracy": "1-NN",
            "finetune_accuracy": "fine-tune, 10/class", "few_shot_10_class_accuracy": "10-shot probe (C = 1)",
            "literature_svm_accuracy": "literature SVM (C = 0.01)"}
# Paired comparisons (better, baseline, what it isolates); a pair appears when both rows have results.
COMPARISONS = [("B", "A", "KAT with random views vs none"), ("C", "A", "RVS + KAT vs Point-MAE"),
               ("C", "B", "RVS vs random views"), ("D", "C", "reinforced vs random masking"),
               ("D", "A", "KR-MAE vs Point-MAE"), ("k1", "D", "k = 1 vs 3"), ("k6", "D", "k = 6 vs 3"),
               ("k9", "D", "k = 9 vs 3"), ("D", "mlp", "aligned vs MLP fusion"), ("D", "joint", "aligned vs joint"),
               ("D", "cross", "aligned vs cross"), ("A", "scratch", "Point-MAE vs random init"),
               ("D", "scratch", "KR-MAE vs random init"),
               ("joint_mae", "A", "Joint-MAE vs Point-MAE"), ("i2p_mae", "A", "I2P-MAE vs Point-MAE"),
               ("crossalignnet", "A", "CrossAlignNet vs Point-MAE"), ("D", "joint_mae", "KR-MAE vs Joint-MAE"),
               ("D", "i2p_mae", "KR-MAE vs I2P-MAE"), ("D", "crossalignnet", "KR-MAE vs CrossAlignNet"),
               ("joint_mae", "joint_global", "local vs global attention"),
               ("joint_mae", "joint_no_cross", "4-view L_3D-2D vs none"),
               ("joint_mae", "joint_1view", "4 vs 1 view of L_3D-2D"),
               ("joint_mae", "joint_no_2d", "its 2-D losses vs none"),
               ("joint_no_2d", "A", "Joint-MAE without 2-D losses vs Point-MAE"),
               ("i2p_mae", "i2p_random", "2D-guided vs random masking"),
               ("crossalignnet", "cal_correspondence", "complementary vs correspondence"),
               ("crossalignnet", "cal_random", "complementary vs random image masking"),
               ("crossalignnet", "cal_lambda_1e-3", "lambda 1e-4 vs 1e-3"),
               ("D", "saliency", "reinforced vs saliency masking"), ("saliency", "C", "saliency vs random masking")]

THREADS = {"OMP_NUM_THREADS": "1"}  # set by main(): the machine's cores shared among the runs at once


def run(command, log_path):
    """Run one command, its output to a log file; return its wall time, or raise with the log's tail."""
    started = time.time()
    with open(log_path, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **THREADS})
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log_path}:\n" + open(log_path).read()[-2000:])
    return time.time() - started


def finished_pretraining(run_dir):
    """The records of a pre-training that reached its last epoch (log.jsonl and last.pth present), else None."""
    log_path, checkpoint = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "last.pth")
    if not (os.path.isfile(log_path) and os.path.isfile(checkpoint)):
        return None
    records = [json.loads(line) for line in open(log_path) if line.strip()]
    return records if records and records[-1]["epoch"] == PRETRAIN_EPOCHS - 1 else None


def chain(name, seed, out):
    """Pre-train one configuration for one seed (or reuse a finished one), then measure it downstream."""
    flags, downstream = CONFIGS.get(name, ([], True))
    run_dir = os.path.join(out, f"{name}_seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    result = {"name": name, "seed": seed, "protocol": PROTOCOL}
    checkpoint = ""
    if name != "scratch":
        command = [sys.executable, "pretrain.py", *PRETRAIN_COMMON, *flags, "--seed", str(seed), "--out_dir", run_dir]
        result["pretrain_command"] = " ".join(command[1:])
        records = finished_pretraining(run_dir)
        if records is None:  # a fresh start replaces an unfinished run's files (--overwrite)
            run(command + ["--overwrite"], os.path.join(run_dir, "pretrain.out"))
            records = finished_pretraining(run_dir)
        result["pretrain_seconds"] = round(sum(record["seconds"] for record in records), 1)
        result["pretrain_loss_rec"] = records[-1]["loss_rec"]
        checkpoint = os.path.join(run_dir, "last.pth")
    if downstream:
        for measure, base in (("probes", PROBE_COMMAND), ("finetune", FINETUNE_COMMAND)):
            command = [sys.executable, "finetune.py", *base, "--seed", str(seed), "--overwrite", "--out_dir",
                       os.path.join(run_dir, measure)] + (["--checkpoint", checkpoint] if checkpoint else [])
            result[f"{measure}_seconds"] = run(command, os.path.join(run_dir, f"{measure}.out"))
            label = "svm_synthetic" if measure == "probes" else "scan_objectnn_pb_t50_rs_synthetic"
            summary = json.load(open(os.path.join(run_dir, measure, label, "summary.json")))
            if measure == "probes":
                result.update({key: summary[key]["mean"] for key in MEASURES if key in summary})
                result["cv_svm_C"] = summary["cv_svm_C"]["mean"]
                result["cv_svm_train_accuracy"] = summary["cv_svm_train_accuracy"]["mean"]
            else:
                result["finetune_accuracy"] = summary["last_accuracy"]["mean"]
    print(json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Statistics and the report
# ---------------------------------------------------------------------------------------------------------------
def mean_std(values):
    """'mean ± sample std' of a list, '-' when empty."""
    if not values:
        return "-"
    return f"{statistics.mean(values):.4g}" if len(values) == 1 else \
        f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def paired_interval(differences, confidence=0.95):
    """Mean of paired differences and its Student-t interval: mean ± t_{n-1} * s / sqrt(n). Needs n >= 2."""
    n = len(differences)
    mean = statistics.mean(differences)
    half_width = stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half_width, mean + half_width


def paired_differences(results, better, baseline, key):
    """Per-seed differences better - baseline of one measure, over the seeds both rows have."""
    first = {run["seed"]: run[key] for run in results if run["name"] == better and key in run}
    second = {run["seed"]: run[key] for run in results if run["name"] == baseline and key in run}
    seeds = sorted(set(first) & set(second))
    return seeds, [first[seed] - second[seed] for seed in seeds]


def report(results):
    """Markdown tables from the list of run results: rows (mean ± std over seeds) and paired comparisons."""
    results = [run for run in results if run.get("protocol") == PROTOCOL]
    names = [name for name in [*CONFIGS, "scratch"] if any(run["name"] == name for run in results)]
    by_name = {name: [run for run in results if run["name"] == name] for name in names}

    def rows_table(row_names):
        table = ["| row | " + " | ".join(MEASURES.values()) + " | pre-training L_R | seeds |",
                 "|---|" + "---|" * (len(MEASURES) + 2)]
        for name in row_names:
            runs = sorted(by_name[name], key=lambda run: run["seed"])
            cells = [mean_std([run[key] for run in runs if key in run]) for key in MEASURES]
            loss = mean_std([run["pretrain_loss_rec"] for run in runs if "pretrain_loss_rec" in run])
            table.append(f"| {ROW_LABELS.get(name, name)} | " + " | ".join(cells) +
                         f" | {loss} | {','.join(str(run['seed']) for run in runs)} |")
        return table

    # Table 5 only rows (no downstream measures) are in the loss table at the end.
    lines = rows_table([name for name in names if CONFIGS.get(name, ([], True))[1]])
    peers = [name for name in PEER_ROWS if name in by_name]
    if len(peers) > 2:  # Point-MAE, KR-MAE and at least one peer
        lines += ["", "Peer methods, re-implemented on the Point-MAE backbone, at matched settings:", "",
                  *rows_table(peers)]
    lines += ["", "Paired differences (first row minus second, same seeds), mean and 95 % interval (accuracies in "
                  "points):", "",
              "| comparison | measure | mean difference | 95 % interval | seeds | separates from 0 |",
              "|---|---|---|---|---|---|"]
    for better, baseline, meaning in COMPARISONS:
        # The pre-training loss too (rows that both pre-train); see the README on what an L_R gap can mean.
        for key, title in [*MEASURES.items(), ("pretrain_loss_rec", "pre-training L_R")]:
            seeds, differences = paired_differences(results, better, baseline, key)
            if len(seeds) < 2:
                continue
            mean, low, high = paired_interval(differences)
            separates = "yes" if low > 0 or high < 0 else "no"
            number = "{:+.2e}" if key == "pretrain_loss_rec" else "{:+.2f}"  # losses are ~0.01, accuracies in points
            lines.append(f"| {better} - {baseline} ({meaning}) | {title} | {number.format(mean)} | "
                         f"[{number.format(low)}, {number.format(high)}] | {len(seeds)} | {separates} |")
    # Table 5: pre-training L_R of random vs reinforced masking, per mask ratio, paired by seed.
    pairs = [("0.6", "C", "D")] + [(ratio, f"random_{ratio}", f"reinforced_{ratio}")
                                   for ratio in ("0.5", "0.7", "0.8", "0.9")]
    lines += ["", "| mask ratio | L_R random | L_R reinforced | reinforced - random | 95 % interval | seeds | "
                  "separates from 0 |", "|---|---|---|---|---|---|---|"]
    for ratio, random_name, reinforced_name in pairs:
        seeds, differences = paired_differences(results, reinforced_name, random_name, "pretrain_loss_rec")
        if len(seeds) < 2:
            continue
        mean, low, high = paired_interval(differences)
        random_loss = mean_std([run["pretrain_loss_rec"] for run in by_name[random_name]])
        reinforced_loss = mean_std([run["pretrain_loss_rec"] for run in by_name[reinforced_name]])
        lines.append(f"| {ratio} | {random_loss} | {reinforced_loss} | {mean:+.2e} | [{low:+.2e}, {high:+.2e}] | "
                     f"{len(seeds)} | {'yes' if low > 0 or high < 0 else 'no'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=0, help="threads per run (0: the machine's cores / --jobs)")
    parser.add_argument("--only", default="", help="comma-separated config names (default: all, and scratch)")
    parser.add_argument("--report", default="", help="print the tables of an existing results.json and stop")
    args = parser.parse_args()
    if args.report:
        print(report(json.load(open(args.report))))
        return
    os.makedirs(args.out, exist_ok=True)
    THREADS["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
    names = args.only.split(",") if args.only else [*CONFIGS, "scratch"]
    unknown = sorted(set(names) - set(CONFIGS) - {"scratch"})
    if unknown:
        raise SystemExit(f"--only names unknown rows {unknown}; expected some of {[*CONFIGS, 'scratch']}.")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results_path, started = os.path.join(args.out, "results.json"), time.time()
    # Results of earlier invocations in the same folder are kept, except those this one re-runs.
    results = json.load(open(results_path)) if os.path.isfile(results_path) else []
    results = [run for run in results if not (run["name"] in names and run["seed"] in seeds)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        # The long chains (pre-training + probes + fine-tune) first, so the pool ends with the short ones.
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
    print(f"\n{len(names) * len(seeds)} runs in {time.time() - started:.0f} s with {args.jobs} at once; "
          f"{len(results)} results in {results_path}")


if __name__ == "__main__":
    main()
