"""bench.py runs and writes its JSON (no timed assertions); ablations.py builds its tables from run results."""
import json

import pytest

import ablations
import bench


def test_bench_runs_on_the_tiny_preset_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--repeats", "1", "--warmup", "1", "--batch_size", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["kr_mae"]["shapes_per_second"] > 0 and result["point_mae"]["shapes_per_second"] > 0
    assert sum(row["share"] for row in result["stages"].values()) == pytest.approx(1.0, abs=1e-6)
    assert {"render", "KAT encoder", "RVS", "RM", "backward + optimizer"} <= set(result["stages"])
    assert all(row["per_second"] > 0 for row in result["operations"].values())


def test_paired_interval_matches_a_hand_computed_case():
    # differences 1, 2, 3: mean 2, sample std 1, t_{0.975, 2} = 4.302653: half width 4.302653 / sqrt(3) = 2.484138
    mean, low, high = ablations.paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)
    seeds, differences = ablations.paired_differences(
        [{"name": "D", "seed": 0, "x": 5.0}, {"name": "D", "seed": 1, "x": 7.0}, {"name": "D", "seed": 2, "x": 1.0},
         {"name": "A", "seed": 1, "x": 4.0}, {"name": "A", "seed": 0, "x": 3.0}], "D", "A", "x")
    assert seeds == [0, 1] and differences == [2.0, 3.0]  # paired by seed; seed 2 has no partner


def test_ablation_report_gives_rows_paired_differences_and_skips_older_protocols():
    measures = {key: 50.0 for key in ablations.MEASURES}
    results = [{"name": "A", "seed": seed, "protocol": ablations.PROTOCOL, "pretrain_loss_rec": 0.1 + 0.01 * seed,
                **measures, "cv_svm_accuracy": 50.0 + seed} for seed in range(3)]
    results += [{"name": "D", "seed": seed, "protocol": ablations.PROTOCOL, "pretrain_loss_rec": 0.1,
                 **measures, "cv_svm_accuracy": 60.0 + seed} for seed in range(3)]
    results += [{"name": "C", "seed": 0, "protocol": ablations.PROTOCOL - 1, "pretrain_loss_rec": 0.3, **measures}]
    text = ablations.report(results)
    assert "| A: Point-MAE (no 2-D, random masking) | 51 ± 1 | 50 ± 0 |" in text  # the CV SVM leads
    # D - A on the CV SVM: +10 in every seed, std 0, so the interval is the point +10 and it separates from 0.
    assert "| D - A (KR-MAE vs Point-MAE) | CV SVM | +10.00 | [+10.00, +10.00] | 3 | yes |" in text
    assert "| D - A (KR-MAE vs Point-MAE) | 1-NN | +0.00 | [+0.00, +0.00] | 3 | no |" in text
    assert "C: + RVS" not in text  # a result of an older protocol is never shown
