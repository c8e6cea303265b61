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


def test_ablation_tables_report_mean_and_std_over_seeds():
    results = [{"name": "A", "seed": seed, "pretrain_loss_rec": 0.1 + 0.01 * seed, "svm_accuracy": 50.0 + seed,
                "finetune_accuracy": 60.0} for seed in range(3)]
    results += [{"name": "random_0.5", "seed": 0, "pretrain_loss_rec": 0.2, "stale": "an older version"}]
    text = ablations.report(results)
    assert "| A: Point-MAE (no 2-D, random masking) | 51 ± 1 | 60 ± 0 | 0.11 ± 0.01 | 0,1,2 |" in text
    assert "| random 0.5 † | 0.200 | 0 |" in text and "† an older version" in text  # marked as older
    assert "| D: + RM = KR-MAE (k = 3) | - | - | - |  |" in text  # a row with no runs says so
    # Table 5's 0.6 rows are Table 4's C and D, run once.
    assert ("random 0.6", "C") in ablations.TABLES["Table 5"] and ("reinforced 0.6", "D") in ablations.TABLES["Table 5"]
