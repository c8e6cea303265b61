"""Benchmark: how fast KR-MAE pre-trains, how far a step is from its compute floor, where the step's time goes, and
the speed of its basic operations.

Measured on the device it runs on (CPU or CUDA), in one process, after warm-up, as the median of several repetitions:
  1. pre-training throughput (shapes/s; one step = forward + backward + AdamW step, as pretrain.py's loop takes it)
     and peak memory, for the full KR-MAE configuration and for the same backbone with no 2-D branch and random
     masking (= Point-MAE);
  2. the compute floor of that step: its FLOPs (forward + backward, counted once, untimed, by FlopCounterMode: matrix
     products, convolutions and attention) divided by the GPU's peak dense bf16 throughput, and the fraction of that
     floor the measured step reaches, floor / step time (1.0 would be a step doing only its FLOPs, at peak). The
     floor leaves memory traffic out, so no real step reaches 1.0;
  3. the time of each stage inside one real KR-MAE step (render, project centres, 2-D tokens, 3-D tokens, RVS, RM,
     KAT encoder, decoder, rest of forward, backward + optimizer), with nothing synchronised between the stages.
     On CUDA every call of a stage is bracketed by two CUDA events recorded on the current stream, the forward and
     the backward + optimizer by three more, and the device is synchronised once, after the step. The time between
     two events is GPU time between those two points of the stream: the stage's kernels, plus any gap in which the
     GPU sat idle because the host had not yet issued the next kernel (so a stage the host is slower at shows its
     host time, one the GPU is slower at its kernels). On the CPU, where ops run synchronously, time.perf_counter()
     at the same points gives the same. A stage called more than once in a step adds up; the rows come from the one
     step whose time is the median, so they add up to it;
  4. throughput of rendering (clouds x views / s), FPS, KNN and the Chamfer loss at the configuration's sizes;
  5. with --profile, one step under torch.profiler: the top 25 ops and kernels by device time (CPU time on the CPU),
     printed and in the JSON ("profile"), and a Chrome trace (open it in chrome://tracing or ui.perfetto.dev).

Run:  python bench.py                       (paper sizes: batch 128, 1024 points, ViT-B/16-sized tower, 10 views)
      python bench.py --profile             (also a profile of one step; trace in runs/bench/bench_trace.json)
      python bench.py --compile --compile_mode reduce-overhead   (the step through torch.compile: no stage table)
      python bench.py --cudnn_benchmark     (cuDNN picks its convolution algorithms by timing them)
      python bench.py --preset tiny --threads 1   (the CPU smoke preset of pretrain.py, on one thread)
      python bench.py --method joint_mae --matched   (also the step of a peer method, here at matched settings)
      python bench.py --batch_size 16 --out runs/bench/bench_cpu.json
      python bench.py --operations_only --batch_size 32 --threads 2   (rendering etc. alone, e.g. on a CPU)
      python bench.py --only point_mae      (one of the two steps; the other row is null)
      python bench.py --suite --out DIR     (speed_suite.py: a smoke of every CUDA path, then this bench in each
                                             mode and a profile, each part under its own time limit)
The CLIP weights are not needed: a randomly initialised tower of the same size costs the same time.
On a CPU shared with other work, use --threads 1 or start with OMP_WAIT_POLICY=PASSIVE: with OpenMP's default
busy-waiting, loops of small ops on 2 cores collapse under load (seconds per call instead of milliseconds). Both
settings, cudnn.benchmark and the compile mode are printed and recorded.
Prints a table and writes strict JSON (a value that does not exist, such as peak GPU memory on the CPU or the floor
of a device whose peak is unknown, is null) to runs/bench/bench.json by default.
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from kr_mae import chamfer_distance
from masking import gather_tokens
import pretrain
from render import MultiViewRenderer
from tokenizer import farthest_point_sample, knn_indices
from util import distributed, optim, weights

# Peak dense (without sparsity) bf16 tensor-core throughput in TFLOP/s, NVIDIA's datasheets (half their figure "with
# sparsity"). Matched in this order against torch.cuda.get_device_name, so the PCIe and NVL parts come first.
PEAK_DENSE_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
                          ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

# The whole floor of one step at the paper configuration (batch 128, paper sizes) on an H100 SXM (989 TFLOP/s dense
# bf16, 3.35 TB/s), as estimated in the README's Speed section (an op-by-op count of FLOPs and bytes at batch 2 and
# 4, extrapolated to 128; not measured on a GPU): per stage max(FLOPs / peak, compulsory bytes /
# bandwidth) of an ideal fused implementation, summed. Unlike the counted compute floor, it includes the memory
# traffic no implementation can avoid. Shown only at that configuration, the one it was derived for.
PAPER_FLOOR_ESTIMATE = {"kr_mae": {"floor_ms": 15.0, "tflop": 12.8, "compulsory_traffic_gb": 8.0},
                        "point_mae": {"floor_ms": 3.5, "tflop": 1.6, "compulsory_traffic_gb": 5.0}}

# FlopCounterMode counts the attention kernels of CUDA but not the CPU's: the same formulas for the CPU's, so that
# a CPU count equals a GPU count of the same step.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
        sdpa_backward_flop_count(grad_out, query, key, value),
}

RATIO_NOTE = ("The KR-MAE / Point-MAE step-time ratio (kr_mae_over_point_mae_step_time in the JSON) is not KR-MAE's "
              "intrinsic cost:\nPoint-MAE's step is mostly launch overhead, and as overhead is removed the ratio rises "
              "toward the frozen ViT's share of the FLOPs (README, Speed).")


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


class StepClock:
    """Points in time inside a step, read after the step. On CUDA a point is a CUDA event recorded on the device's
    current stream: recording does not wait for the GPU, and two points give the GPU time between them (see the
    docstring above). On the CPU, where ops run synchronously, a point is time.perf_counter()."""

    def __init__(self, device):
        self.device = device

    def mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self):
        synchronize(self.device)  # once per step: afterwards every event of the step has completed

    def seconds(self, start, end):
        if self.device.type != "cuda":
            return end - start
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


def build(cfg, device, use_bf16):
    """The model of cfg.method set up as pretrain.py sets it up -> (model, what the step calls, optimizer): the
    frozen CLIP towers stored in bf16 under bf16 autocast, fused AdamW on CUDA, torch.compile with --compile."""
    torch.manual_seed(0)
    model = pretrain.build_model(cfg).to(device)
    if use_bf16:
        weights.cast_frozen_towers(model, torch.bfloat16)
    optimizer = optim.make_optimizer(model, cfg, device)
    return model, pretrain.compile_model(model, cfg), optimizer


def training_step(step_model, optimizer, points, use_bf16, grad_clip, clock=None):
    """One step as pretrain.py's loop takes it: forward under bf16 autocast, backward, the gradient clip only with
    --grad_clip (off by default, as Point-MAE's pre-training; its finiteness check, a host read, is left out), AdamW.
    With a clock it returns three points: the start, the end of the forward, the end of the optimizer step."""
    marks = [clock.mark()] if clock else []
    with torch.autocast(points.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss = step_model(points)["loss"]
    marks += [clock.mark()] if clock else []
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_model.parameters(), grad_clip)
    optimizer.step()
    return marks + ([clock.mark()] if clock else [])


def step_flops(model, points, use_bf16):
    """FLOPs of one training step, forward + backward, counted once by FlopCounterMode on the eager model (2 per
    multiply-add of matrix products, convolutions and attention; elementwise ops, norms and the optimizer count 0).
    The gradients it computes are dropped."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        with torch.autocast(points.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(points)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def compute_floor_seconds(flops, peak_tflops):
    """The time `flops` take at the peak throughput: a lower bound on the step that leaves memory traffic out.
    None when the peak is unknown."""
    return flops / (peak_tflops * 1e12) if peak_tflops else None


def with_floor(row, peak_tflops):
    """A throughput row led by shapes/s, peak memory and the fraction of the compute floor the step reaches."""
    floor = compute_floor_seconds(row["flops_per_step"], peak_tflops)
    return {"shapes_per_second": row["shapes_per_second"], "peak_memory_gib": row["peak_memory_gib"],
            "fraction_of_floor": floor / row["step_seconds"] if floor is not None else None,
            "step_seconds": row["step_seconds"], "flops_per_step": row["flops_per_step"],
            "floor_ms": floor * 1e3 if floor is not None else None}


def throughput(cfg, device, use_bf16, repeats):
    """Shapes per second, peak memory and FLOPs of full training steps for one configuration."""
    model, step_model, optimizer = build(cfg, device, use_bf16)
    points = torch.randn(cfg.batch_size, cfg.num_points, 3, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = lambda: training_step(step_model, optimizer, points, use_bf16, cfg.grad_clip)  # noqa: E731
    seconds = median_seconds(step, device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_seconds": seconds, "shapes_per_second": cfg.batch_size / seconds, "peak_memory_gib": peak,
            "flops_per_step": step_flops(model, points, use_bf16)}  # counted after the timing, untimed


def time_stages(step, stages, clock, repeats, warmup):
    """The time of each stage inside real steps. stages: {name: (module, method name)}; each method is shadowed by
    an instance attribute that brackets its every call with two clock points (stages must not call one another).
    step(clock) runs one step and returns its three points: start, end of forward, end. The device is synchronised
    once per step, after it. -> the time of the median step and its rows {name: seconds}, with the forward's time
    outside every stage as "rest of forward" and "backward + optimizer": together they add up to the step."""
    calls = {name: [] for name in stages}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = clock.mark()
            result = function(*args, **kwargs)
            calls[name].append((started, clock.mark()))
            return result
        return wrapper

    for name, (module, method) in stages.items():
        setattr(module, method, timed(name, getattr(module, method)))  # the instance attribute shadows the method
    steps = []
    try:
        for repeat in range(warmup + repeats):
            for intervals in calls.values():
                intervals.clear()
            started, forward_done, ended = step(clock)
            clock.synchronize()
            if repeat < warmup:
                continue
            rows = {name: sum(clock.seconds(*interval) for interval in intervals) for name, intervals in calls.items()}
            rows["rest of forward"] = clock.seconds(started, forward_done) - sum(rows.values())
            rows["backward + optimizer"] = clock.seconds(forward_done, ended)
            steps.append((clock.seconds(started, ended), rows))
    finally:
        for module, method in stages.values():
            delattr(module, method)  # the class's method again
    return sorted(steps, key=lambda step_rows: step_rows[0])[(len(steps) - 1) // 2]  # the (lower) median step


def stage_shares(cfg, device, use_bf16, repeats):
    """Time and share of each stage of one KR-MAE step (see time_stages), on the eager model."""
    model, _, optimizer = build(cfg, device, use_bf16)  # cfg without --compile: `model` is what the step calls
    points = torch.randn(cfg.batch_size, cfg.num_points, 3, device=device)
    stages = {"3-D tokens (FPS, KNN, PointNet)": (model.tokenizer_3d, "forward")}  # in the order of the forward
    if cfg.use_2d:
        stages.update({"render": (model.renderer, "forward"), "project centres": (model.renderer, "project"),
                       "2-D tokens (frozen ViT + proj)": (model.tokenizer_2d, "forward")})
    if cfg.masking == "reinforced":
        stages["RM"] = (model.masking, "forward")
    if cfg.use_2d and cfg.use_rvs:
        stages["RVS"] = (model.selector, "forward")
    stages.update({"KAT encoder": (model.encoder, "forward"), "decoder": (model.decoder, "forward")})
    step = lambda clock: training_step(model, optimizer, points, use_bf16, cfg.grad_clip, clock)  # noqa: E731
    step_seconds, rows = time_stages(step, stages, StepClock(device), repeats, WARMUP["calls"])
    return step_seconds, {name: {"seconds": value, "share": value / step_seconds} for name, value in rows.items()}


def profile_step(cfg, device, use_bf16, trace_path, row_limit=25):
    """--profile: one KR-MAE step, after the warm-up steps, under torch.profiler (CPU and, on CUDA, CUDA activity).
    Writes a Chrome trace to trace_path and returns the table of the top ops and kernels by self device time on CUDA,
    by self CPU time on the CPU, and the same rows for the JSON: {"sorted_by", "top": [{name, calls, self_ms}]}."""
    _, step_model, optimizer = build(cfg, device, use_bf16)
    points = torch.randn(cfg.batch_size, cfg.num_points, 3, device=device)
    for _ in range(WARMUP["calls"]):
        training_step(step_model, optimizer, points, use_bf16, cfg.grad_clip)
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        training_step(step_model, optimizer, points, use_bf16, cfg.grad_clip)
        synchronize(device)  # the step's kernels inside the profile
    os.makedirs(os.path.dirname(trace_path) or ".", exist_ok=True)
    profiler.export_chrome_trace(trace_path)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = profiler.key_averages()
    rows = [{"name": event.key, "calls": event.count, "self_ms": getattr(event, sort_by) / 1e3}  # microseconds
            for event in sorted(averages, key=lambda event: getattr(event, sort_by), reverse=True)[:row_limit]]
    return averages.table(sort_by=sort_by, row_limit=row_limit), {"sorted_by": sort_by, "top": rows}


def render_with_3d_ops(renderer, points):
    """The renderer's images (B, V, 3, H, W) computed with the 3-D operations PointCLIP V2 writes for Densify and
    Smooth, a (1, k, k) max_pool3d and a (1, 3, 3) Gaussian conv3d over the whole voxel grid at once, instead of
    render.py's 1-D passes: the same images (to 1e-6, tested), timed beside them as the reference."""
    grid = renderer.voxelize(points).flatten(0, 1).unsqueeze(1)  # (B * V, 1, d, g, g)
    k, pad = renderer.densify_kernel, renderer.densify_padding
    dense = F.max_pool3d(grid, kernel_size=(1, k, k), stride=1, padding=(0, pad, pad))  # (B * V, 1, d, g-2, g-2)
    offsets = torch.tensor([-1.0, 0.0, 1.0], device=points.device)  # (3,)
    weights = torch.exp(-offsets**2 / (2 * 3.0**2))  # (3,) PointCLIP V2's Gaussian, sigma 3 (render.py's default)
    kernel = (weights[:, None] * weights[None, :] / weights.sum() ** 2).view(1, 1, 1, 3, 3)  # normalised 3 x 3
    depth_map = F.conv3d(dense, kernel, padding=(0, 1, 1)).amax(dim=2)  # (B * V, 1, g-2, g-2)
    image = 1 - depth_map / depth_map.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)  # (B * V, 1, g-2, g-2)
    size = (renderer.image_size, renderer.image_size)
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False).clamp(0, 1)  # (B * V, 1, H, W)
    return image.expand(-1, 3, -1, -1).view(points.shape[0], -1, 3, *size)  # (B, V, 3, H, W)


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
        ("render, PointCLIP V2's 3-D pool + conv (clouds x views / s)", lambda: render_with_3d_ops(renderer, points),
         cfg.batch_size * cfg.num_views),
        ("FPS (clouds / s)", lambda: farthest_point_sample(points, cfg.num_groups), cfg.batch_size),
        ("KNN (clouds / s)", lambda: knn_indices(points, centers, cfg.group_size), cfg.batch_size),
        ("Chamfer fwd+bwd (groups / s)", lambda: chamfer_distance(predicted.requires_grad_(), target).sum().backward(),
         predicted.shape[0]),
    ]:
        with torch.no_grad() if not name.startswith("Chamfer") else torch.enable_grad():
            seconds = median_seconds(function, device, repeats)
        results[name] = {"seconds": seconds, "per_second": count / seconds}
    return results


def compiled_fps_matches_eager(cfg, device):
    """With --compile: farthest point sampling compiled (cfg.compile_mode) and eager on this device, at the
    configuration's sizes, give the same centres. torch 2.13's CPU backend miscompiled an earlier in-place form of
    it (wrong centres for 32 groups or more); the compiled whole model is trusted only where this holds."""
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(cfg.batch_size, cfg.num_points, 3, generator=generator).to(device)  # (B, N, 3)
    compiled = torch.compile(farthest_point_sample, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    return bool(torch.equal(compiled(points, cfg.num_groups), farthest_point_sample(points, cfg.num_groups)))


def peak_throughput(device, override):
    """-> (peak dense bf16 TFLOP/s or None, where it comes from): --peak_tflops, else the table by GPU name."""
    if override > 0:
        return override, "--peak_tflops"
    if device.type != "cuda":
        return None, "unknown on the CPU; give --peak_tflops"
    name = torch.cuda.get_device_name(device)
    for part, tflops in PEAK_DENSE_BF16_TFLOPS:
        if part in name:
            return tflops, f"table: {part}"
    return None, f"unknown for {name}; give --peak_tflops"


def at_paper_configuration(cfg):
    """True when cfg has the paper's sizes and batch (128): the configuration PAPER_FLOOR_ESTIMATE is for."""
    paper = dataclasses.replace(pretrain.build_config([]), clip_random_tower="768,12,12")  # ViT-B/16's size
    return dataclasses.replace(cfg, compile=paper.compile, compile_mode=paper.compile_mode) == paper


def strict(value):
    """`value` with NaN and inf as None: strict JSON (RFC 8259 has no NaN). Twin of speed_suite.strict, which
    imports no module of ours so that the suite starts even when one of them fails to import."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    return value


def write_json(result, path):
    """Write `result` as strict JSON (NaN and inf become null), creating the folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(strict(result), handle, indent=2, allow_nan=False)


def cell(value, spec, width):
    """A table cell: the formatted value, or '-' for one that does not exist (None, NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}s}"
    return f"{value:{width}{spec}}"


def print_operations(rows):
    print(f"\n{'operation':60s} {'seconds':>9s} {'per second':>12s}")
    for operation, row in rows.items():
        print(f"{operation:60s} {row['seconds']:9.4f} {row['per_second']:12.1f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="KR-MAE speed benchmark")
    parser.add_argument("--preset", default="", help="a pretrain.py preset, e.g. tiny; default: the paper's sizes")
    parser.add_argument("--batch_size", type=int, default=0, help="override the batch size (default: the config's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true", help="the step calls torch.compile of the whole model "
                                                               "(pretrain.compile_model); no stage table then")
    parser.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--cudnn_benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="peak dense bf16 TFLOP/s of the device "
                                                                       "(default: a table by GPU name)")
    parser.add_argument("--profile", action="store_true", help="profile one step; Chrome trace beside --out")
    parser.add_argument("--operations_only", action="store_true", help="only the basic operations (render, FPS, "
                                                                       "KNN, Chamfer), no training step")
    parser.add_argument("--method", default="", help="comma-separated pretrain.py methods whose step is also "
                                                     "measured, e.g. joint_mae (each at its paper settings)")
    parser.add_argument("--matched", action="store_true", help="the --method steps at matched settings")
    parser.add_argument("--only", default="", choices=["", "kr_mae", "point_mae"],
                        help="measure only this one of the two steps (the other row is null); default both")
    parser.add_argument("--out", default="runs/bench/bench.json", help="the JSON result (runs/ is not versioned)")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--suite" in argv:  # every CUDA path, then the step timed in each mode: speed_suite.py, its own flags
        import speed_suite
        return speed_suite.main([arg for arg in argv if arg != "--suite"])
    args = parse_args(argv)

    preset = ["--preset", args.preset] if args.preset else []

    def configuration(flags):
        cfg = pretrain.build_config(preset + flags)
        return dataclasses.replace(cfg, clip_random_tower=cfg.clip_random_tower or "768,12,12",  # ViT-B/16's size
                                   batch_size=args.batch_size or cfg.batch_size, compile=args.compile,
                                   compile_mode=args.compile_mode)

    cfg = configuration([])
    methods = [method for method in args.method.split(",") if method]
    unknown = sorted(set(methods) - set(pretrain.METHODS))
    if unknown:
        raise SystemExit(f"--method names unknown methods {unknown}; expected some of {pretrain.METHODS}.")

    # --- every setting that changes the speed, decided here, printed and recorded --------------------------------
    device = distributed.select_device(args.device)
    WARMUP["calls"] = args.warmup
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    use_bf16 = args.amp and device.type == "cuda"  # TF32 is left as pretrain.py leaves it (off)
    peak_tflops, peak_source = peak_throughput(device, args.peak_tflops)
    point_mae = dataclasses.replace(cfg, use_2d=False, masking="random")
    settings = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                "torch": torch.__version__, "bf16": use_bf16, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32
                "compile": cfg.compile, "compile_mode": cfg.compile_mode, "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "peak_tflops": peak_tflops,
                "peak_tflops_source": peak_source, "repeats": args.repeats, "warmup": args.warmup}
    print(f"device: {settings['device']}; torch {torch.__version__}; bf16 autocast: {use_bf16}; cudnn.benchmark: "
          f"{settings['cudnn_benchmark']}; compile: {cfg.compile} ({cfg.compile_mode}); CPU threads: "
          f"{settings['threads']}; OMP_WAIT_POLICY: {settings['omp_wait_policy'] or 'unset'}; peak: "
          + (f"{peak_tflops:g} TFLOP/s dense bf16 ({peak_source})" if peak_tflops else peak_source))
    print(f"batch {cfg.batch_size}, {cfg.num_points} points, {cfg.num_groups} groups, {cfg.num_views} views -> "
          f"{cfg.num_selected_views}, image {cfg.image_size}, width {cfg.dim}, depth {cfg.depth}, ViT tower "
          f"{cfg.clip_random_tower}")

    # --- measurements --------------------------------------------------------------------------------------------
    if args.operations_only:  # the basic operations alone, e.g. rendering on a CPU at the paper's image sizes
        result = {"settings": settings, "config": dataclasses.asdict(cfg),
                  "operations": operations(cfg, device, args.repeats)}
        print_operations(result["operations"])
        write_json(result, args.out)
        print(f"\nwrote {args.out}")
        return result
    # --only: one of the two steps (a part of speed_suite.py, each under its own time limit); the other row is null
    kr_mae = (with_floor(throughput(cfg, device, use_bf16, args.repeats), peak_tflops)
              if args.only != "point_mae" else None)
    point_mae_row = (with_floor(throughput(point_mae, device, use_bf16, args.repeats), peak_tflops)
                     if args.only != "kr_mae" else None)
    method_rows = {}
    for method in methods:  # each with its own settings (paper or --matched), the same batch and device
        method_cfg = configuration(["--method", method] + (["--matched"] if args.matched else []))
        method_rows[method] = {**with_floor(throughput(method_cfg, device, use_bf16, args.repeats), peak_tflops),
                               "num_points": method_cfg.num_points, "matched": method_cfg.matched}
    fps_check = compiled_fps_matches_eager(cfg, device) if cfg.compile else None
    if fps_check is not None:
        print("compiled farthest point sampling picks the eager centres on this device" if fps_check else
              "WARNING: compiled farthest point sampling picks other centres than eager on this device: the compiled "
              "model's figures are not those of the same computation")
    if cfg.compile:  # the stage timers wrap the eager module's methods, which the compiled graph never calls
        stage_step_seconds, stages = None, None
        stages_note = "skipped: with --compile the step runs the compiled graph, not the methods the timers wrap"
    elif kr_mae is None:
        stage_step_seconds, stages = None, None
        stages_note = "skipped: --only point_mae (the stage table is of the KR-MAE step)"
    else:
        stage_step_seconds, stages = stage_shares(cfg, device, use_bf16, args.repeats)
        stages_note = ("CUDA events on the stream, one synchronisation per step" if device.type == "cuda"
                       else "time.perf_counter, the CPU running ops synchronously")
    trace_path, profile_table, profile_rows = None, None, None
    if args.profile:
        trace_path = os.path.splitext(args.out)[0] + "_trace.json"
        profile_table, profile_rows = profile_step(cfg, device, use_bf16, trace_path)

    result = {"kr_mae": kr_mae, "point_mae": point_mae_row, "methods": method_rows,
              # the estimate of the whole floor (compute and compulsory memory traffic), paper configuration only
              "paper_floor_estimate": PAPER_FLOOR_ESTIMATE if at_paper_configuration(cfg) else None,
              "kr_mae_over_point_mae_step_time": (kr_mae["step_seconds"] / point_mae_row["step_seconds"]
                                                  if kr_mae and point_mae_row else None),
              "compiled_fps_equals_eager": fps_check, "settings": settings, "config": dataclasses.asdict(cfg),
              "stages_timing": {"step_seconds": stage_step_seconds, "how": stages_note}, "stages": stages,
              "operations": operations(cfg, device, args.repeats), "trace": trace_path, "profile": profile_rows}

    # --- the table: shapes/s, peak memory and the fraction of the floor first ------------------------------------
    print(f"\n{'pre-training step':38s} {'shapes/s':>9s} {'peak GiB':>9s} {'% floor':>9s} {'ms/step':>9s} "
          f"{'TFLOP/step':>11s} {'floor ms':>9s}")
    rows = [("KR-MAE (full)", kr_mae), ("Point-MAE (no 2-D, random mask)", point_mae_row)]
    rows = [(label, row) for label, row in rows if row is not None]  # --only: one of the two
    rows += [(f"--method {method} ({row['num_points']} points{', matched' if row['matched'] else ''})", row)
             for method, row in method_rows.items()]
    for label, row in rows:
        percent_of_floor = None if row["fraction_of_floor"] is None else 100 * row["fraction_of_floor"]
        print(f"{label:38s} {cell(row['shapes_per_second'], '.1f', 9)} {cell(row['peak_memory_gib'], '.2f', 9)} "
              f"{cell(percent_of_floor, '.2f', 9)} {cell(1e3 * row['step_seconds'], '.2f', 9)} "
              f"{cell(row['flops_per_step'] / 1e12, '.4f', 11)} {cell(row['floor_ms'], '.2f', 9)}")
    print("(floor: the counted FLOPs of forward + backward at the peak; it leaves memory traffic out)")
    if result["paper_floor_estimate"]:
        kr, pm = PAPER_FLOOR_ESTIMATE["kr_mae"], PAPER_FLOOR_ESTIMATE["point_mae"]
        print(f"The estimated whole floor at this, the paper configuration, on an H100 SXM (compute and "
              f"compulsory memory traffic): KR-MAE about {kr['floor_ms']:g} ms ({kr['tflop']:g} TFLOP + about "
              f"{kr['compulsory_traffic_gb']:g} GB),\nPoint-MAE about {pm['floor_ms']:g} ms ({pm['tflop']:g} TFLOP + "
              f"about {pm['compulsory_traffic_gb']:g} GB)")
    print(RATIO_NOTE)
    if stages is None:
        print(f"\nstage table {stages_note}")
    else:
        print(f"\nstages of one KR-MAE step, timed inside it ({stages_note}):")
        print(f"{'stage':38s} {'ms':>9s} {'share':>7s}")
        for stage, row in stages.items():
            print(f"{stage:38s} {1e3 * row['seconds']:9.2f} {100 * row['share']:6.1f}%")
        print(f"{'the step (median of ' + str(args.repeats) + ')':38s} {1e3 * stage_step_seconds:9.2f}")
    print_operations(result["operations"])
    if profile_table is not None:
        print(f"\none KR-MAE step under torch.profiler (Chrome trace: {trace_path}):\n{profile_table}")
    write_json(result, args.out)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
