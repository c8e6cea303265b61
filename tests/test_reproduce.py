"""reproduce.py end to end on the built-in synthetic stand-ins (--preset tiny --data synthetic, shortened for the
test: 1 epoch, seed 0, fold 0, 32 shapes): the whole chain of pieces as subprocesses of pretrain.py and
finetune.py, the printed tables against results.json, a second run that does no work, an interrupted piece that
runs again with --resume, changed settings refused before anything runs; and the plan of --dry_run: its commands,
the GPU-hour estimate from bench.py's measured step, a missing data set named with its layout."""
import json
import os
import re
import subprocess

import pytest

import reproduce

SHORT = ["--preset", "tiny", "--data", "synthetic", "--seeds", "0", "--folds", "0", "--pretrain_epochs", "1",
         "--finetune_epochs", "1", "--pretrain_flags", "--picture_every 0 --synthetic_size 32",
         "--finetune_flags", "--synthetic_train_size 32 --synthetic_test_size 32"]


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"reproduce.py started a piece: {args[0]}")


def table_rows(text):
    """The printed markdown tables -> {(table title, row name): [cells]}."""
    rows, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
        elif line.startswith("| ") and not line.startswith("| Method"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[(title, cells[0])] = cells[1:]
    return rows


def test_the_whole_chain_resumes_does_no_work_twice_and_refuses_changed_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "runs")
    # Two slots side by side (CUDA_VISIBLE_DEVICES 0 and 1; on a CPU both run there): the 9 downstream pieces share
    # them once the pre-training is done.
    results = reproduce.main([*SHORT, "--out_dir", out, "--gpus", "0,1"])
    printed = capsys.readouterr().out
    states = {name: json.load(open(os.path.join(out, "kr_mae", name, "piece.json")))
              for name in sorted(os.listdir(os.path.join(out, "kr_mae")))}
    assert len(states) == 10 and all(state["state"] == "done" for state in states.values())
    pretrain_end = states["pretrain"]["finished_at"]
    assert all(state["started_at"] >= pretrain_end for name, state in states.items() if name != "pretrain")
    assert {state["slot"] for state in states.values()} == {"0", "1"}
    # Each piece in its own folder with its own last.pth: the few-shot fold and the seeds in theirs.
    assert os.path.isfile(os.path.join(out, "kr_mae", "pretrain", "last.pth"))
    assert os.path.isfile(os.path.join(out, "kr_mae", "fewshot_10way_20shot", "fewshot_10way_20shot_synthetic",
                                       "seed0_fold0", "last.pth"))

    # The printed tables are results.json's numbers (and results.md the same text), in the paper's layout.
    written = json.load(open(os.path.join(out, "results.json")))
    assert written == json.loads(json.dumps(results))
    assert open(os.path.join(out, "results.md")).read() in printed
    rows = table_rows(printed)
    scan = written["methods"]["kr_mae"]["scan_objectnn"]
    table_1 = "Table 1: ScanObjectNN classification accuracy (%)"
    for kind in ("best", "last"):
        cells = rows[(table_1, f"ours: KR-MAE, {kind} epoch")]
        assert cells == [f"{scan[variant][f'{kind}_accuracy']['mean']:.2f} ± 0.00"
                         for variant in reproduce.VARIANTS] + ["1"]
    assert rows[(table_1, "KR-MAE (published)")] == ["94.45", "91.91", "89.28", ""]  # KR-MAE Table 1
    few_shot = written["methods"]["kr_mae"]["fewshot"]
    table_2 = [title for title, _ in rows if title.startswith("Table 2")][0]
    assert rows[(table_2, "ours: KR-MAE, best epoch")][:4] == [
        f"{few_shot[f'{way}way_{shot}shot']['best_accuracy']['mean']:.2f} ± 0.00"
        for way, shot in reproduce.FEWSHOT_SETTINGS]
    assert rows[(table_2, "KR-MAE (published)")][:4] == ["96.6 ± 1.7", "98.3 ± 1.6", "93.0 ± 4.3", "95.2 ± 2.8"]
    part = written["methods"]["kr_mae"]["partseg"]["partseg"]
    table_3 = "Table 3: part segmentation on ShapeNetPart, mIoU (%)"
    assert rows[(table_3, "ours: KR-MAE, last epoch")] == [f"{part['last_class_miou']['mean']:.2f} ± 0.00",
                                                           f"{part['last_instance_miou']['mean']:.2f} ± 0.00", "1"]
    voted = [cells for (title, name), cells in rows.items() if name.endswith("voted (10 passes)")]
    assert voted == [[f"{written['methods']['kr_mae']['modelnet40']['modelnet40']['voted_accuracy']['mean']:.2f} "
                      f"± 0.00", "1"]]
    # The numbers are finetune.py's own: its summary.json of the piece.
    summary = json.load(open(os.path.join(out, "kr_mae", "scan_objectnn_obj_bg_seed0",
                                          "scan_objectnn_obj_bg_synthetic", "summary.json")))
    assert scan["obj_bg"]["best_accuracy"]["mean"] == summary["best_accuracy"]["mean"]

    # The same command again: nothing runs, the same results.
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    assert reproduce.main([*SHORT, "--out_dir", out, "--gpus", "0,1"]) == results

    # Changed settings: refused before anything runs, naming the setting and the folder.
    with pytest.raises(SystemExit, match=r"(?s)started with other settings.*modelnet40_seed0: --epochs 1 there, "
                                         r"2 here"):
        reproduce.main([*SHORT[:-6], "--finetune_epochs", "2", *SHORT[-4:], "--out_dir", out])
    # A pre-training folder without its piece.json (removed, or run by hand): compared with its last.pth's settings.
    marker = os.path.join(out, "kr_mae", "pretrain", "piece.json")
    kept = open(marker).read()
    os.remove(marker)
    with pytest.raises(SystemExit, match=r"kr_mae/pretrain: --epochs 1 there, 2 here"):
        reproduce.main([*SHORT[:-8], "--pretrain_epochs", "2", *SHORT[-6:], "--out_dir", out])
    with open(marker, "w") as handle:
        handle.write(kept)
    monkeypatch.undo()

    # A piece killed mid-run leaves piece.json "started": the next run starts it again with --resume, and finetune.py
    # reads back its finished run (its last.pth) instead of training it again.
    marker = os.path.join(out, "kr_mae", "modelnet40_seed0", "piece.json")
    state = json.load(open(marker))
    with open(marker, "w") as handle:
        json.dump({**state, "state": "started"}, handle)
    capsys.readouterr()
    again = reproduce.main([*SHORT, "--out_dir", out])
    printed = capsys.readouterr().out
    assert re.findall(r"\[kr_mae/(\S+)\] start", printed) == ["modelnet40_seed0"]
    assert "it was interrupted: --resume" in printed
    assert "--resume" in json.load(open(marker))["command"]
    log = open(os.path.join(out, "kr_mae", "modelnet40_seed0", "output.log")).read()
    assert "resumed from" in log and "at epoch 1" in log
    assert again["methods"] == results["methods"]


def test_dry_run_prints_commands_the_estimate_and_the_missing_data_with_its_layout(tmp_path, capsys):
    (tmp_path / "data" / "ModelNetFewshot" / "5way_10shot").mkdir(parents=True)
    (tmp_path / "data" / "ModelNetFewshot" / "5way_10shot" / "0.pkl").write_bytes(b"")
    assert reproduce.main(["--data_root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "runs"),
                           "--dry_run"]) is None
    printed = capsys.readouterr().out
    # 20 pieces: pre-training, 3 variants x 3 seeds, 4 few-shot settings, 3 + 3 seeds of part segmentation and
    # ModelNet40; nothing written.
    assert "plan: 20 pieces" in printed and not (tmp_path / "runs").exists()
    # Pre-training: 300 epochs x (41952 // 128 = 327 steps) x bench_h100.json's measured 0.13727 s = 3.74 h.
    assert re.search(r"\[kr_mae/pretrain\] new, 3\.74 GPU h \(\S+bench_h100.json kr_mae.step_seconds 0.1373 s, "
                     r"measured\)", printed)
    assert "python pretrain.py --method kr_mae --data shapenet55" in printed
    assert (f"python finetune.py --task fewshot --way 5 --shot 10 --folds 0,1,2,3,4,5,6,7,8,9 --seed 0 --data real "
            f"--data_root {tmp_path / 'data' / 'ModelNetFewshot'} --checkpoint") in printed
    assert "data ModelNet40 few-shot: " + str(tmp_path / "data" / "ModelNetFewshot") in printed
    assert f"data set ScanObjectNN not found under {str(tmp_path / 'data')!r}" in printed
    assert "Expected layout: " + reproduce.datasets.SCANOBJECTNN_LAYOUT in printed
    assert "data set ModelNet40 few-shot not found" not in printed
    # Without --dry_run the same plan is refused before anything starts.
    with pytest.raises(SystemExit, match="refused to start:\n  data set ModelNet40 not found"):
        reproduce.main(["--data_root", str(tmp_path / "data"), "--out_dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_flag_strings_round_trip():
    flags = reproduce.argv_to_flags("--picture_every 0 --no-amp --vote --lr=5e-4", "pretrain_flags")
    assert flags == {"picture_every": "0", "amp": False, "vote": True, "lr": "5e-4"}
    assert reproduce.flags_to_argv(flags) == ["--picture_every", "0", "--no-amp", "--vote", "--lr", "5e-4"]
    with pytest.raises(ValueError, match="--pretrain_flags expects flags .* found 'x'"):
        reproduce.argv_to_flags("x --y", "pretrain_flags")
