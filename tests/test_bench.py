"""bench.py: strict JSON under runs/ by default, 10 repeats, the recorded settings; the FLOP count and compute floor
on hand-computed cases; the in-step stage timer on stages of known length; the profile's Chrome trace (the timed
run itself is tested, with its own sizes, in test_bench_ablations.py)."""
import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench
import pretrain


def refuse_constant(name):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def fixed_throughput(measured=None):
    """A stand-in for bench.throughput holding what a CPU run reports: no peak GPU memory (NaN)."""
    def throughput(cfg, device, use_bf16, repeats):
        if measured is not None:
            measured.append((cfg.method, cfg.num_points, cfg.batch_size, repeats))
        return {"step_seconds": 0.5, "shapes_per_second": 2.0, "peak_memory_gib": float("nan"),
                "flops_per_step": 3e12}
    return throughput


def test_default_output_is_strict_json_under_runs_with_10_repeats(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(bench, "throughput", fixed_throughput(measured))
    monkeypatch.setattr(bench, "stage_shares", lambda *args: (0.5, {"render": {"seconds": float("inf"), "share": 1.0}}))
    monkeypatch.setattr(bench, "operations", lambda *args: {"FPS (clouds / s)": {"seconds": 0.1, "per_second": 10.0}})
    monkeypatch.chdir(tmp_path)
    bench.main(["--preset", "tiny", "--device", "cpu"])
    path = tmp_path / "runs" / "bench" / "bench.json"  # runs/ is git-ignored; the folder is created
    result = json.loads(path.read_text(), parse_constant=refuse_constant)  # NaN or Infinity would raise here
    assert result["kr_mae"]["peak_memory_gib"] is None and result["stages"]["render"]["seconds"] is None
    assert result["kr_mae"]["shapes_per_second"] == 2.0 and [row[3] for row in measured] == [10, 10]  # README's 10
    # The CPU's peak throughput is unknown: FLOPs are given, the floor and the fraction of it are null.
    assert result["kr_mae"]["flops_per_step"] == 3e12 and result["kr_mae"]["floor_ms"] is None
    assert result["kr_mae"]["fraction_of_floor"] is None and result["paper_floor_estimate"] is None  # tiny preset
    # The JSON leads with the headline: shapes/s, peak memory, fraction of the floor.
    assert list(result)[:2] == ["kr_mae", "point_mae"]
    assert list(result["kr_mae"])[:3] == ["shapes_per_second", "peak_memory_gib", "fraction_of_floor"]


def test_json_records_the_settings_the_floor_and_the_paper_estimate(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "throughput", fixed_throughput())
    monkeypatch.setattr(bench, "operations", lambda *args: {})

    def no_stages(*args):
        raise AssertionError("the stage timers wrap the eager methods: with --compile there is no stage table")

    monkeypatch.setattr(bench, "stage_shares", no_stages)
    monkeypatch.setattr(bench, "compiled_fps_matches_eager", lambda cfg, device: True)  # tested on its own below
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        # No preset, batch 128: the paper configuration, the one the whole-floor estimate is for.
        result = bench.main(["--device", "cpu", "--threads", "1", "--cudnn_benchmark", "--compile", "--compile_mode",
                             "max-autotune", "--peak_tflops", "100", "--out", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark
    settings = json.loads((tmp_path / "bench.json").read_text())["settings"]
    assert settings["threads"] == 1 and settings["omp_wait_policy"] == "PASSIVE" and settings["cudnn_benchmark"]
    assert settings["compile"] and settings["compile_mode"] == "max-autotune" and settings["peak_tflops"] == 100.0
    assert result["config"]["compile"] and result["config"]["compile_mode"] == "max-autotune"  # passed into cfg
    # 3e12 FLOPs at 100 TFLOP/s: a floor of 30 ms, against a 500 ms step: 6 % of the floor.
    assert result["kr_mae"]["floor_ms"] == pytest.approx(30.0) and result["kr_mae"]["fraction_of_floor"] == 0.06
    assert result["paper_floor_estimate"]["kr_mae"]["floor_ms"] == 15.0 and result["stages"] is None
    printed = capsys.readouterr().out
    assert "not KR-MAE's intrinsic cost" in printed and "KR-MAE step time / Point-MAE step time" not in printed
    assert result["kr_mae_over_point_mae_step_time"] == 1.0  # kept in the JSON
    another = bench.main(["--device", "cpu", "--batch_size", "64", "--compile", "--out", str(tmp_path / "bench.json")])
    assert another["paper_floor_estimate"] is None  # not the paper's batch: the estimate does not apply


def test_method_flag_measures_each_peer_method_at_its_settings(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(bench, "throughput", fixed_throughput(measured))
    monkeypatch.setattr(bench, "stage_shares", lambda *args: (0.5, {}))
    monkeypatch.setattr(bench, "operations", lambda *args: {})
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--method", "joint_mae,i2p_mae", "--matched",
                         "--batch_size", "4", "--out", str(tmp_path / "bench.json")])
    # KR-MAE, Point-MAE, then each method, at the same batch; --matched with the tiny preset keeps its 512 points.
    assert [row[:3] for row in measured] == [("kr_mae", 512, 4), ("kr_mae", 512, 4), ("joint_mae", 512, 4),
                                             ("i2p_mae", 512, 4)]
    assert set(result["methods"]) == {"joint_mae", "i2p_mae"} and result["methods"]["i2p_mae"]["matched"]
    try:
        bench.main(["--preset", "tiny", "--device", "cpu", "--method", "pointbert"])
    except SystemExit as error:
        assert "pointbert" in str(error)
    else:
        raise AssertionError("an unknown method was accepted")


class LossOf(nn.Module):
    """A model as bench.py's step sees one: a dict with the loss."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, inputs):
        return {"loss": self.function(inputs).sum()}


def test_step_flops_of_a_linear_layer_and_of_attention_and_their_floor():
    B, width_in, width_out = 8, 16, 4
    linear = LossOf(nn.Linear(width_in, width_out))
    inputs = torch.randn(B, width_in, requires_grad=True)  # so the backward also computes the input's gradient
    flops = bench.step_flops(linear, inputs, use_bf16=False)
    # forward x W^T: 2 B in out; backward: the weight's gradient and the input's, 2 B in out each.
    assert flops == 2 * B * width_in * width_out + 4 * B * width_in * width_out
    assert all(parameter.grad is None for parameter in linear.parameters())  # the count leaves no gradients
    assert bench.compute_floor_seconds(flops, 100.0) == flops / 100e12
    assert bench.compute_floor_seconds(flops, None) is None  # the peak is unknown: no floor
    row = bench.with_floor({"step_seconds": 0.5, "shapes_per_second": 16.0, "peak_memory_gib": 1.0,
                            "flops_per_step": flops}, 100.0)
    assert row["floor_ms"] == flops / 100e12 * 1e3 and row["fraction_of_floor"] == flops / 100e12 / 0.5
    # Attention on (B, heads, L, d), the CPU's kernel (counted by bench's own mapping): forward QK^T and AV, 2 B h L^2 d
    # each; backward, as flash attention does it, QK^T again, then dV, dP, dQ and dK: 5 products of 2 B h L^2 d.
    heads, length, head_dim = 2, 8, 4
    attention = LossOf(lambda qkv: F.scaled_dot_product_attention(*qkv.unbind(0)))
    qkv = torch.randn(3, B, heads, length, head_dim, requires_grad=True)
    assert bench.step_flops(attention, qkv, use_bf16=False) == (2 + 5) * 2 * B * heads * length ** 2 * head_dim


class Sleeper(nn.Module):
    """A stage of known length: it sleeps, then scales its input."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, inputs):
        time.sleep(self.seconds)
        return inputs * self.weight


class SleepyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Sleeper(0.05), Sleeper(0.025)

    def forward(self, inputs):
        hidden = self.second(self.second(self.first(inputs)))  # the second stage runs twice: 0.05 s in all
        time.sleep(0.03)  # forward time outside every stage
        return {"loss": hidden.sum()}


def test_stage_timer_adds_up_each_stage_inside_one_step():
    model = SleepyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.randn(4, 3)
    step = lambda clock: bench.training_step(model, optimizer, inputs, False, 0.0, clock)  # noqa: E731
    stages = {"first": (model.first, "forward"), "second": (model.second, "forward")}
    step_seconds, rows = bench.time_stages(step, stages, bench.StepClock(torch.device("cpu")), repeats=3, warmup=1)
    slack = 0.02  # sleep only ever overshoots; a loaded machine may add a little
    assert 0.05 <= rows["first"] < 0.05 + slack  # not the whole forward, nor the stage after it
    assert 0.05 <= rows["second"] < 0.05 + slack  # both calls added (one alone would be 0.025)
    assert 0.03 <= rows["rest of forward"] < 0.03 + slack and rows["backward + optimizer"] >= 0.0
    assert rows["first"] + rows["second"] <= step_seconds
    assert sum(rows.values()) == pytest.approx(step_seconds, abs=1e-9)  # one step's rows add up to that step
    assert "forward" not in vars(model.first) and "forward" not in vars(model.second)  # the methods restored


def test_profile_writes_a_chrome_trace(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "throughput", fixed_throughput())
    monkeypatch.setattr(bench, "stage_shares", lambda *args: (0.5, {}))
    monkeypatch.setattr(bench, "operations", lambda *args: {})
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--batch_size", "2", "--repeats", "1", "--warmup",
                         "0", "--profile", "--out", str(tmp_path / "bench.json")])
    assert result["trace"] == str(tmp_path / "bench_trace.json")
    trace = json.loads((tmp_path / "bench_trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names  # the step's own ops, from the profiled step
    assert "Self CPU" in capsys.readouterr().out  # the table of the top ops
    # The same top rows in the JSON: by self CPU time on the CPU, longest first, each op of the trace.
    profile = json.loads((tmp_path / "bench.json").read_text())["profile"]
    top = profile["top"]
    assert profile["sorted_by"] == "self_cpu_time_total" and len(top) == 25
    assert [row["self_ms"] for row in top] == sorted((row["self_ms"] for row in top), reverse=True)
    assert top[0]["self_ms"] > 0 and all(row["calls"] >= 1 and row["name"] in names for row in top)


def test_only_measures_one_of_the_two_steps(tmp_path, monkeypatch):
    steps = []  # the use_2d and masking of each step measured
    monkeypatch.setattr(bench, "throughput", lambda cfg, *args: steps.append((cfg.use_2d, cfg.masking)) or
                        fixed_throughput()(cfg, *args))
    monkeypatch.setattr(bench, "stage_shares", lambda *args: (_ for _ in ()).throw(AssertionError("KR-MAE's stages")))
    monkeypatch.setattr(bench, "operations", lambda *args: {})
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--only", "point_mae", "--out",
                         str(tmp_path / "bench.json")])
    assert steps == [(False, "random")] and result["kr_mae"] is None  # Point-MAE's step alone
    assert result["point_mae"]["shapes_per_second"] == 2.0 and result["kr_mae_over_point_mae_step_time"] is None
    assert result["stages"] is None and "--only point_mae" in result["stages_timing"]["how"]
    monkeypatch.setattr(bench, "stage_shares", lambda *args: (0.5, {}))
    steps.clear()
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--only", "kr_mae", "--out",
                         str(tmp_path / "bench.json")])
    assert steps == [(True, "reinforced")] and result["point_mae"] is None and result["stages"] == {}


def test_the_compiled_fps_check_compares_centres_and_reports_a_difference(monkeypatch):
    cfg = pretrain.build_config(["--preset", "tiny", "--num_points", "64", "--num_groups", "32", "--batch_size", "2"])
    assert bench.compiled_fps_matches_eager(cfg, torch.device("cpu")) is True  # compiles FPS (about 10 s here)
    # A compiler that changed one pick is reported: stand in for torch.compile with a function off by one centre.
    monkeypatch.setattr(bench.torch, "compile", lambda function, mode=None: lambda points, count: torch.roll(
        function(points, count), 1, dims=1))
    assert bench.compiled_fps_matches_eager(cfg, torch.device("cpu")) is False


def test_the_3d_reference_render_timed_beside_the_renderer_gives_its_images():
    # The operations table times render.py beside PointCLIP V2's 3-D max-pool + conv3d: both must make the same images.
    renderer = bench.MultiViewRenderer(num_views=4, image_size=64, grid_size=64)
    points = torch.rand(2, 512, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, N, 3)
    images, reference = renderer(points), bench.render_with_3d_ops(renderer, points)
    assert reference.shape == images.shape == (2, 4, 3, 64, 64)
    assert (reference - images).abs().max() <= 1e-6 and (images < 1).float().mean() > 0.05


def test_operations_only_measures_the_operations_and_no_step(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "throughput", lambda *args: (_ for _ in ()).throw(AssertionError("no step")))
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--operations_only", "--batch_size", "2",
                         "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "ops.json")])
    written = json.loads((tmp_path / "ops.json").read_text())
    assert set(written) == {"settings", "config", "operations"} and written["config"]["batch_size"] == 2
    assert "render, PointCLIP V2's 3-D pool + conv (clouds x views / s)" in result["operations"]
    assert written["operations"]["render (clouds x views / s)"]["per_second"] > 0
