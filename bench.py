"""Benchmark: how fast KR-MAE pre-trains, where a step's time goes, and the speed of its basic operations.

Measured on the device it runs on (CPU or CUDA), in one process, after warm-up, as the median of several repetitions:
  1. pre-training throughput (shapes/s; one step = forward + backward + AdamW step) and peak memory, for the full
     KR-MAE configuration and for the same backbone with no 2-D branch and random masking (= Point-MAE);
  2. the share of each stage in one KR-MAE step (render, 2-D tokens, 3-D tokens, RVS, RM, KAT encoder,
     decoder + loss, backward + optimizer);
  3. throughput of rendering (clouds x views / s), FPS, KNN and the Chamfer loss at the paper's sizes.

Run:  python bench.py                       (paper sizes: batch 128, 1024 points, ViT-B/16-sized tower, 10 views)
      python bench.py --preset tiny         (the CPU smoke preset of pretrain.py)
      python bench.py --method joint_mae --matched   (also the step of a peer method, here at matched settings)
      python bench.py --batch_size 16 --out runs/bench/bench_cpu.json
The CLIP weights are not needed: a randomly initialised tower of the same size costs the same time.
Prints a table and writes strict JSON (a value that does not exist, such as peak GPU memory on the CPU, is null)
to runs/bench/bench.json by default.
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import time

import torch

import distributed
import pretrain
from masking import gather_tokens
from pretrain import chamfer_distance
from render import MultiViewRenderer
from tokenizer import farthest_point_sample, knn_indices


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WARMUP = {"calls": 2}  # set from --warmup


def median_seconds(function, device, repeats):
    """Median wall time of function() after warm-up calls, with the device synchronised around each call."""
    for _ in range(WARMUP["calls"]):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build(cfg, device):
    model = pretrain.build_model(cfg).to(device)  # the model of cfg.method
    optimizer = torch.optim.AdamW(pretrain.parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    return model, optimizer


def training_step(model, optimizer, points, use_bf16):
    with torch.autocast(points.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss = model(points)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optimizer.step()


def throughput(cfg, device, use_bf16, repeats):
    """Shapes per second and peak memory of full training steps for one configuration."""
    torch.manual_seed(0)
    model, optimizer = build(cfg, device)
    points = torch.randn(cfg.batch_size, cfg.num_points, 3, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(lambda: training_step(model, optimizer, points, use_bf16), device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_seconds": seconds, "shapes_per_second": cfg.batch_size / seconds, "peak_memory_gib": peak}


def stage_shares(cfg, device, use_bf16, repeats):
    """Time of each stage of one KR-MAE step: every stage's callable is wrapped by a synchronising timer."""
    torch.manual_seed(0)
    model, optimizer = build(cfg, device)
    points = torch.randn(cfg.batch_size, cfg.num_points, 3, device=device)
    stages = {"render": [model.renderer, "forward"], "render (project centres)": [model.renderer, "project"],
              "2-D tokens (frozen ViT + proj)": [model.tokenizer_2d, "forward"],
              "3-D tokens (FPS, KNN, PointNet)": [model.tokenizer_3d, "forward"],
              "RVS": [model.selector, "forward"], "KAT encoder": [model.encoder, "forward"],
              "decoder": [model.decoder, "forward"]}
    if cfg.masking == "reinforced":
        stages["RM"] = [model.masking, "forward"]
    totals = {name: 0.0 for name in stages}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            synchronize(device)
            started = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(device)
            totals[name] += time.perf_counter() - started
            return result
        return wrapper

    for name, (module, method) in stages.items():
        setattr(module, method, timed(name, getattr(module, method)))  # instance attribute shadows the method
    forward_times, backward_times, stage_runs = [], [], []
    for repeat in range(repeats + WARMUP["calls"]):
        for name in totals:
            totals[name] = 0.0
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(points)["loss"]
        synchronize(device)
        middle = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if repeat >= WARMUP["calls"]:  # warm-up calls are not timed
            forward_times.append(middle - started)
            backward_times.append(time.perf_counter() - middle)
            stage_runs.append(dict(totals))
    rows = {name: statistics.median(run[name] for run in stage_runs) for name in stages}
    forward = statistics.median(forward_times)
    rows["rest of forward (gathers, PMA, head, Chamfer, L_S)"] = max(0.0, forward - sum(rows.values()))
    rows["backward + optimizer"] = statistics.median(backward_times)
    total = forward + rows["backward + optimizer"]
    return {name: {"seconds": value, "share": value / total} for name, value in rows.items()}


def operations(cfg, device, repeats):
    """Throughput of the basic operations at the configuration's sizes."""
    torch.manual_seed(0)
    points = torch.randn(cfg.batch_size, cfg.num_points, 3, device=device)
    renderer = MultiViewRenderer(num_views=cfg.num_views, image_size=cfg.image_size, grid_size=cfg.image_size).to(device)
    centers = gather_tokens(points, farthest_point_sample(points, cfg.num_groups))  # (B, G, 3)
    predicted = torch.randn(cfg.batch_size * cfg.num_groups, cfg.group_size, 3, device=device)
    target = torch.randn_like(predicted)
    results = {}
    for name, function, count in [
        ("render (clouds x views / s)", lambda: renderer(points), cfg.batch_size * cfg.num_views),
        ("FPS (clouds / s)", lambda: farthest_point_sample(points, cfg.num_groups), cfg.batch_size),
        ("KNN (clouds / s)", lambda: knn_indices(points, centers, cfg.group_size), cfg.batch_size),
        ("Chamfer fwd+bwd (groups / s)", lambda: chamfer_distance(predicted.requires_grad_(), target).sum().backward(),
         predicted.shape[0]),
    ]:
        with torch.no_grad() if not name.startswith("Chamfer") else torch.enable_grad():
            seconds = median_seconds(function, device, repeats)
        results[name] = {"seconds": seconds, "per_second": count / seconds}
    return results


def write_json(result, path):
    """Write `result` as strict JSON (RFC 8259 has no NaN: NaN and inf become null), creating the folder."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(item) for item in value]
        return value

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(strict(result), handle, indent=2, allow_nan=False)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="KR-MAE speed benchmark")
    parser.add_argument("--preset", default="", help="a pretrain.py preset, e.g. tiny; default: the paper's sizes")
    parser.add_argument("--batch_size", type=int, default=0, help="override the batch size (default: the config's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder")
    parser.add_argument("--method", default="", help="comma-separated pretrain.py methods whose step is also "
                                                     "measured, e.g. joint_mae (each at its paper settings)")
    parser.add_argument("--matched", action="store_true", help="the --method steps at matched settings")
    parser.add_argument("--out", default="runs/bench/bench.json", help="the JSON result (runs/ is not versioned)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    preset = ["--preset", args.preset] if args.preset else []

    def configuration(flags):
        cfg = pretrain.build_config(preset + flags)
        return dataclasses.replace(cfg, clip_random_tower=cfg.clip_random_tower or "768,12,12",  # ViT-B/16's size
                                   batch_size=args.batch_size or cfg.batch_size, compile=args.compile)

    cfg = configuration([])
    methods = [method for method in args.method.split(",") if method]
    unknown = sorted(set(methods) - set(pretrain.METHODS))
    if unknown:
        raise SystemExit(f"--method names unknown methods {unknown}; expected some of {pretrain.METHODS}.")
    device = distributed.select_device(args.device)
    WARMUP["calls"] = args.warmup
    use_bf16 = args.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    point_mae = dataclasses.replace(cfg, use_2d=False, masking="random")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; bf16 autocast: {use_bf16}; batch {cfg.batch_size}, "
          f"{cfg.num_points} points, {cfg.num_groups} groups, {cfg.num_views} views -> {cfg.num_selected_views}, "
          f"image {cfg.image_size}, width {cfg.dim}, depth {cfg.depth}, ViT tower {cfg.clip_random_tower}")

    result = {"device": name, "torch": torch.__version__, "bf16": use_bf16, "config": dataclasses.asdict(cfg)}
    result["kr_mae"] = throughput(cfg, device, use_bf16, args.repeats)
    result["point_mae"] = throughput(point_mae, device, use_bf16, args.repeats)
    result["kr_mae_over_point_mae_step_time"] = result["kr_mae"]["step_seconds"] / result["point_mae"]["step_seconds"]
    result["methods"] = {}
    for method in methods:  # each with its own settings (paper or --matched), the same batch and device
        method_cfg = configuration(["--method", method] + (["--matched"] if args.matched else []))
        result["methods"][method] = {**throughput(method_cfg, device, use_bf16, args.repeats),
                                     "num_points": method_cfg.num_points, "matched": method_cfg.matched}
    result["stages"] = stage_shares(cfg, device, use_bf16, args.repeats)
    result["operations"] = operations(cfg, device, args.repeats)

    print(f"\n{'pre-training step':34s} {'s/step':>9s} {'shapes/s':>10s} {'peak GiB':>9s}")
    for key, label in [("kr_mae", "KR-MAE (full)"), ("point_mae", "Point-MAE (no 2-D, random mask)")]:
        row = result[key]
        print(f"{label:34s} {row['step_seconds']:9.4f} {row['shapes_per_second']:10.1f} {row['peak_memory_gib']:9.2f}")
    for method, row in result["methods"].items():
        label = f"--method {method} ({row['num_points']} points{', matched' if row['matched'] else ''})"
        print(f"{label:34s} {row['step_seconds']:9.4f} {row['shapes_per_second']:10.1f} {row['peak_memory_gib']:9.2f}")
    print(f"KR-MAE step time / Point-MAE step time: {result['kr_mae_over_point_mae_step_time']:.2f}")
    print(f"\n{'stage of one KR-MAE step':52s} {'seconds':>9s} {'share':>7s}")
    for stage, row in result["stages"].items():
        print(f"{stage:52s} {row['seconds']:9.4f} {100 * row['share']:6.1f}%")
    print(f"\n{'operation':34s} {'seconds':>9s} {'per second':>12s}")
    for operation, row in result["operations"].items():
        print(f"{operation:34s} {row['seconds']:9.4f} {row['per_second']:12.1f}")
    write_json(result, args.out)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
