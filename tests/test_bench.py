"""bench.py's output: strict JSON under runs/ by default, 10 repeats (the timed run itself is tested, with its own
sizes, in test_bench_ablations.py)."""
import json

import bench


def refuse_constant(name):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def test_default_output_is_strict_json_under_runs_with_10_repeats(tmp_path, monkeypatch):
    # The measurements are replaced by fixed rows holding what a CPU run reports: no peak GPU memory (NaN).
    repeats_seen = []

    def throughput(cfg, device, use_bf16, repeats):
        repeats_seen.append(repeats)
        return {"step_seconds": 0.5, "shapes_per_second": 2.0, "peak_memory_gib": float("nan")}

    monkeypatch.setattr(bench, "throughput", throughput)
    monkeypatch.setattr(bench, "stage_shares", lambda *args: {"render": {"seconds": float("inf"), "share": 1.0}})
    monkeypatch.setattr(bench, "operations", lambda *args: {"FPS (clouds / s)": {"seconds": 0.1, "per_second": 10.0}})
    monkeypatch.chdir(tmp_path)
    bench.main(["--preset", "tiny", "--device", "cpu"])
    path = tmp_path / "runs" / "bench" / "bench.json"  # runs/ is git-ignored; the folder is created
    result = json.loads(path.read_text(), parse_constant=refuse_constant)  # NaN or Infinity would raise here
    assert result["kr_mae"]["peak_memory_gib"] is None and result["stages"]["render"]["seconds"] is None
    assert result["kr_mae"]["shapes_per_second"] == 2.0 and repeats_seen == [10, 10]  # the README's 10 repeats


def test_method_flag_measures_each_peer_method_at_its_settings(tmp_path, monkeypatch):
    measured = []

    def throughput(cfg, device, use_bf16, repeats):
        measured.append((cfg.method, cfg.num_points, cfg.batch_size))
        return {"step_seconds": 0.5, "shapes_per_second": 2.0, "peak_memory_gib": float("nan")}

    monkeypatch.setattr(bench, "throughput", throughput)
    monkeypatch.setattr(bench, "stage_shares", lambda *args: {})
    monkeypatch.setattr(bench, "operations", lambda *args: {})
    result = bench.main(["--preset", "tiny", "--device", "cpu", "--method", "joint_mae,i2p_mae", "--matched",
                         "--batch_size", "4", "--out", str(tmp_path / "bench.json")])
    # KR-MAE, Point-MAE, then each method, at the same batch; --matched with the tiny preset keeps its 512 points.
    assert measured == [("kr_mae", 512, 4), ("kr_mae", 512, 4), ("joint_mae", 512, 4), ("i2p_mae", 512, 4)]
    assert set(result["methods"]) == {"joint_mae", "i2p_mae"} and result["methods"]["i2p_mae"]["matched"]
    try:
        bench.main(["--preset", "tiny", "--device", "cpu", "--method", "pointbert"])
    except SystemExit as error:
        assert "pointbert" in str(error)
    else:
        raise AssertionError("an unknown method was accepted")
