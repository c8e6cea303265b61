"""Tests of finetune.py: metrics and the SVM against hand-worked cases, checkpoint loading, every task end to end on
the synthetic shapes and on tiny data sets written in the real formats, learning above chance, exact resume."""
import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

import datasets
import downstream
import finetune
import kr_mae
import pretrain
import synthetic
from util import weights
from util.checkpoints import load_checkpoint
from util.config import parse_config

torch.set_num_threads(2)

# Smaller than the tiny preset (256 points, 16 groups): the same code paths, a few seconds per run.
SMALL = ["--num_points", "256", "--num_groups", "16", "--batch_size", "8", "--epochs", "1", "--no-progress",
         "--synthetic_train_size", "16", "--synthetic_test_size", "12"]


def config(tmp_path, *flags):
    """The tiny preset, then SMALL, then `flags`; output in tmp_path."""
    return finetune.build_config(["--preset", "tiny", *SMALL, "--out_dir", str(tmp_path), *flags])


def read_log(path):
    return [json.loads(line) for line in open(path)]


# ---------------------------------------------------------------- metrics, interpolation, SVM

def test_part_miou_hand_made_case_with_absent_part_and_category_restriction():
    # Two categories: 0 owns parts 0, 1, 2; 1 owns parts 3, 4.
    ranges = [(0, 3), (3, 2)]
    target = torch.tensor([[0, 0, 1, 1], [3, 3, 3, 4]])
    prediction = torch.tensor([[0, 1, 1, 1], [3, 3, 4, 4]])
    category = torch.tensor([0, 1])
    instance, klass, per_shape = downstream.part_miou(prediction, target, category, ranges)
    # Shape 0: part 0 IoU 1/2, part 1 IoU 2/3, part 2 absent from both -> 1.  Shape 1: 2/3 and 1/2.
    expected = torch.tensor([(1 / 2 + 2 / 3 + 1) / 3, (2 / 3 + 1 / 2) / 2])
    assert torch.allclose(per_shape, expected)
    assert instance == pytest.approx(expected.mean().item()) and klass == pytest.approx(expected.mean().item())
    # Logits: the largest logit of the first point is part 4 (another category's), restriction picks part 0.
    logits = torch.full((2, 4, 5), -5.0).scatter(2, prediction[..., None], 1.0)
    logits[0, 0, 4] = 9.0
    assert downstream.restrict_to_category(logits, category, ranges)[0, 0] == 0
    assert torch.allclose(downstream.part_miou(logits, target, category, ranges)[2], expected)
    # Class mIoU averages categories, not shapes: a third shape of category 0 with IoU 1 moves them apart.
    instance, klass, _ = downstream.part_miou(torch.cat([prediction, target[:1]]), torch.cat([target, target[:1]]),
                                           torch.tensor([0, 1, 0]), ranges)
    assert instance == pytest.approx((expected.sum().item() + 1) / 3)
    assert klass == pytest.approx(((expected[0].item() + 1) / 2 + expected[1].item()) / 2)


def test_interpolation_matches_a_slow_loop():
    generator = torch.Generator().manual_seed(0)
    points, centers = torch.randn(2, 7, 3, generator=generator), torch.randn(2, 4, 3, generator=generator)
    features = torch.randn(2, 4, 5, generator=generator)
    fast = downstream.interpolate_from_centers(points, centers, features)
    for b in range(2):
        for n in range(7):
            squared = ((centers[b] - points[b, n]) ** 2).sum(dim=1)
            nearest = squared.argsort()[:3]
            weights = 1 / (squared[nearest] + 1e-8)
            expected = (weights[:, None] * features[b, nearest]).sum(dim=0) / weights.sum()
            assert torch.allclose(fast[b, n], expected, atol=1e-5)


# ---------------------------------------------------------------- few-shot episodes, configuration

def test_synthetic_fewshot_episodes():
    train, test = synthetic.synthetic_episode(way=5, shot=3, fold=0, num_points=64)
    assert len(train) == 5 * 3 and len(test) == 5 * 20
    assert train.tensors[0].shape == (15, 128, 3)  # 2 x 64 stored points, resampled per step like ModelNet40's
    assert torch.bincount(train.tensors[1]).tolist() == [3] * 5 and torch.bincount(test.tensors[1]).tolist() == [20] * 5
    # Deterministic: the same fold gives the same shapes; another fold gives others.
    again, _ = synthetic.synthetic_episode(way=5, shot=3, fold=0, num_points=64)
    other, _ = synthetic.synthetic_episode(way=5, shot=3, fold=1, num_points=64)
    assert torch.equal(train.tensors[0], again.tensors[0]) and not torch.equal(train.tensors[0], other.tensors[0])


def test_synthetic_fewshot_episode_classes_are_consistent(monkeypatch):
    class IndexShapes:  # stands in for synthetic.SyntheticShapes: every point holds (sample index, split)
        def __init__(self, split, num_points, size, seed=0):
            self.split, self.num_points = split, num_points

        def __getitem__(self, index):
            points = torch.tensor([float(index), float(self.split == "test"), 0.0]).expand(self.num_points, 3)
            return points, torch.tensor(index % 12), torch.zeros(self.num_points, dtype=torch.long)

    monkeypatch.setattr(synthetic, "SyntheticShapes", IndexShapes)
    train, test = synthetic.synthetic_episode(way=10, shot=5, fold=3, num_points=4)
    for dataset, split in ((train, 0.0), (test, 1.0)):
        index, labels = dataset.tensors[0][:, 0, 0].long(), dataset.tensors[1]
        assert (dataset.tensors[0][:, 0, 1] == split).all() and index.unique().numel() == len(index)  # no repeats
        original_class = index % 12
        for k in range(10):  # every shape of episode class k is of one synthetic class, distinct for each k
            assert original_class[labels == k].unique().numel() == 1
        assert original_class.unique().numel() == 10
    train_class = {int(k): int(c) for k, c in zip(train.tensors[1], train.tensors[0][:, 0, 0].long() % 12)}
    test_class = {int(k): int(c) for k, c in zip(test.tensors[1], test.tensors[0][:, 0, 0].long() % 12)}
    assert train_class == test_class


def test_task_defaults_presets_and_flags():
    cfg = finetune.build_config(["--task", "partseg"])
    assert (cfg.num_points, cfg.num_groups, cfg.lr, cfg.batch_size, cfg.epochs) == (2048, 128, 2e-4, 16, 300)
    assert finetune.build_config(["--task", "fewshot"]).epochs == 150
    assert finetune.build_config(["--task", "modelnet40"]).num_groups == 64
    cfg = finetune.build_config(["--task", "scan_objectnn", "--preset", "tiny", "--lr=1e-3"])
    assert (cfg.dim, cfg.depth, cfg.num_groups, cfg.num_points, cfg.lr) == (96, 4, 32, 512, 1e-3)
    tiny_pretrain = parse_config(pretrain.Config, ["--preset", "tiny"])
    assert all(getattr(cfg, name) == getattr(tiny_pretrain, name) for name in ("dim", "depth", "num_heads",
                                                                                  "group_size", "num_points"))
    with pytest.raises(SystemExit):
        finetune.build_config(["--task", "detection"])


# ---------------------------------------------------------------- checkpoints

def pretrain_checkpoint(tmp_path, **overrides):
    """A tiny kr_mae.KRMAE saved exactly as pretrain.main saves it."""
    cfg = dataclasses.replace(parse_config(pretrain.Config, ["--preset", "tiny"]), **overrides)
    model = kr_mae.KRMAE(cfg)
    path = str(tmp_path / "pretrained.pth")
    pretrain.save_checkpoint(path, {"model": weights.trainable_state(model), "config": dataclasses.asdict(cfg),
                                    "epoch": 0})
    return path, model


def test_pretrain_checkpoint_loads_every_encoder_tensor(tmp_path, capsys):
    path, pretrained = pretrain_checkpoint(tmp_path)
    cfg = config(tmp_path, "--task", "scan_objectnn")
    model = downstream.Classifier(15, **downstream.backbone_arguments(cfg))
    weights.load_pretrained(model, path, cfg)
    printed = capsys.readouterr().out
    assert "(this project layout)" in printed and "the 3-D path only; new, trained from scratch: ['cls_pos_embed', " \
                                                   "'cls_token', 'head']" in printed
    source = pretrained.state_dict()
    loaded = [name for name in model.state_dict() if name.startswith(weights.ENCODER_PREFIXES)]
    assert loaded and all(torch.equal(model.state_dict()[name], source[name]) for name in loaded)
    segmenter = downstream.PartSegmenter(16, 50, **downstream.backbone_arguments(cfg))
    weights.load_pretrained(segmenter, path, cfg)
    assert torch.equal(segmenter.encoder.blocks[0].attn.qkv.weight, source["encoder.blocks.0.attn.qkv.weight"])


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    path, _ = pretrain_checkpoint(tmp_path, dim=64, num_heads=4)
    cfg = config(tmp_path)  # dim 96
    model = downstream.Classifier(15, **downstream.backbone_arguments(cfg))
    message = r"parameter \S+ has shape \(64, \d+, 1\) in the checkpoint but \(96, \d+, 1\) here"
    with pytest.raises(ValueError, match=message):
        weights.load_pretrained(model, path, cfg)
    path, _ = pretrain_checkpoint(tmp_path, depth=2)
    with pytest.raises(ValueError, match=r"missing from it \['encoder.blocks.2"):
        weights.load_pretrained(model, path, cfg)
    path, _ = pretrain_checkpoint(tmp_path, num_heads=2)
    with pytest.raises(ValueError, match="trained with 2 heads but this model has 4; pass --num_heads 2"):
        weights.load_pretrained(model, path, cfg)


# ---------------------------------------------------------------- every task end to end on the synthetic shapes

@pytest.mark.parametrize("flags", [["--task", "scan_objectnn", "--variant", "obj_bg"],
                                   ["--task", "scan_objectnn", "--variant", "obj_only"],
                                   ["--task", "scan_objectnn", "--variant", "pb_t50_rs", "--vote",
                                    "--vote_passes", "2"],
                                   ["--task", "modelnet40"],
                                   ["--task", "fewshot", "--way", "3", "--shot", "4", "--queries", "2",
                                    "--folds", "0,1"],
                                   ["--task", "partseg"]])
def test_task_runs_end_to_end_on_synthetic_shapes(tmp_path, flags):
    summary = finetune.main(config(tmp_path, "--data", "synthetic", *flags))
    metric = "instance_miou" if "partseg" in flags else "accuracy"
    assert summary["num_runs"] == (2 if "--folds" in flags else 1)
    run = summary["runs"][0]
    log = read_log(tmp_path / summary["task"] / ("seed0_fold0" if "--folds" in flags else "seed0") / "log.jsonl")
    assert [record["epoch"] for record in log] == [0] and np.isfinite(log[0]["loss"])
    # The summary reports what the run logged: best = the maximum over the logged epochs, last = the last epoch.
    assert run[f"best_{metric}"] == max(record[metric] for record in log) == run[f"last_{metric}"]
    assert summary[f"best_{metric}"]["mean"] == pytest.approx(sum(r[f"best_{metric}"] for r in summary["runs"])
                                                             / summary["num_runs"])
    if "--vote" in flags:
        assert "voted_accuracy" in run  # a voted number always carries the word
    if "partseg" in flags:
        assert run["last_class_miou"] == log[-1]["class_miou"]


def test_svm_task_with_seeds_reports_mean_and_std(tmp_path):
    path, _ = pretrain_checkpoint(tmp_path)
    summary = finetune.main(config(tmp_path, "--task", "svm", "--data", "synthetic", "--checkpoint", path,
                                   "--seeds", "0,1", "--synthetic_train_size", "96", "--synthetic_test_size", "24",
                                   "--probe_shots", "2", "--probe_draws", "3"))
    values = [run["cv_svm_accuracy"] for run in summary["runs"]]
    # A frozen pre-trained encoder and a deterministic probe: the seed changes only the CV folds' shuffle.
    assert len(values) == 2 and summary["cv_svm_accuracy"]["mean"] == pytest.approx(sum(values) / 2)
    literature = [run["literature_svm_accuracy"] for run in summary["runs"]]
    assert literature[0] == literature[1] and summary["literature_svm_accuracy"]["std"] == 0.0


def test_classification_learns_well_above_chance(tmp_path):
    # 12 synthetic classes (chance 8.3 %), tiny model from scratch (Point-MAE init), 8 epochs of 192 shapes.
    summary = finetune.main(config(tmp_path, "--task", "modelnet40", "--data", "synthetic", "--epochs", "8",
                                   "--synthetic_train_size", "192", "--synthetic_test_size", "96"))
    print("synthetic classification accuracy", summary["last_accuracy"]["mean"])
    assert summary["last_accuracy"]["mean"] > 25.0  # > 3x chance


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    from test_pretrain import interrupted_at_second_epoch

    flags = ["--task", "scan_objectnn", "--data", "synthetic", "--epochs", "2"]
    finetune.main(config(tmp_path / "straight", *flags))
    interrupted_at_second_epoch(finetune, lambda: finetune.main(config(tmp_path / "resumed", *flags)))
    finetune.main(config(tmp_path / "resumed", *flags, "--resume"))
    run = "scan_objectnn_obj_bg_synthetic/seed0"
    straight = load_checkpoint(str(tmp_path / "straight" / run / "last.pth"))
    resumed = load_checkpoint(str(tmp_path / "resumed" / run / "last.pth"))
    assert straight["model"].keys() == resumed["model"].keys()
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert straight["best"] == resumed["best"]
    assert [record["epoch"] for record in read_log(tmp_path / "resumed" / run / "log.jsonl")] == [0, 1]


# ---------------------------------------------------------------- the real formats, through finetune

def write_scanobjectnn(root, samples=16, points=300):
    import h5py
    rng = np.random.default_rng(0)
    (root / "main_split").mkdir(parents=True)
    for name in ("training_objectdataset.h5", "test_objectdataset.h5"):
        with h5py.File(root / "main_split" / name, "w") as handle:
            handle["data"] = rng.normal(size=(samples, points, 3)).astype(np.float32)  # (S, N, 3)
            handle["label"] = np.arange(samples) % 15


def write_modelnet40(root, points=300):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("airplane\nbathtub\n")
    ids = {split: [f"{name}_{split}{index:03d}" for name in ("airplane", "bathtub") for index in range(count)]
           for split, count in (("train", 4), ("test", 2))}
    for split, names in ids.items():
        (root / f"modelnet40_{split}.txt").write_text("\n".join(names) + "\n")
        for shape_id in names:
            (root / shape_id.rsplit("_", 1)[0]).mkdir(exist_ok=True)
            np.savetxt(root / shape_id.rsplit("_", 1)[0] / f"{shape_id}.txt", rng.normal(size=(points, 6)),
                       fmt="%.5f", delimiter=",")


def write_fewshot(root, way=2, shot=4, points=300):
    rng = np.random.default_rng(0)
    (root / f"{way}way_{shot}shot").mkdir(parents=True)
    episode = {split: [(rng.normal(size=(points, 6)).astype(np.float32), label, 7 * label)  # (points, label, original)
                       for label in range(way) for _ in range(count)]
               for split, count in (("train", shot), ("test", 3))}
    with open(root / f"{way}way_{shot}shot" / "0.pkl", "wb") as handle:
        pickle.dump(episode, handle)


def write_shapenetpart(root, points=300):
    rng = np.random.default_rng(0)
    (root / "train_test_split").mkdir(parents=True)
    synsets = {name: f"0{index:07d}" for index, name in enumerate(datasets.SHAPENETPART_CATEGORIES)}
    (root / "synsetoffset2category.txt").write_text("".join(f"{name}\t{synset}\n" for name, synset in synsets.items()))
    lists = {"train": [], "val": [], "test": []}
    for index, (split, name) in enumerate([("train", "Airplane"), ("train", "Mug")] * 4 + [("val", "Mug"),
                                          ("test", "Airplane"), ("test", "Mug")]):
        first, count = datasets.SHAPENETPART_PART_RANGES[datasets.SHAPENETPART_CATEGORIES.index(name)]
        (root / synsets[name]).mkdir(exist_ok=True)
        table = np.concatenate([rng.normal(size=(points, 6)), (first + np.arange(points) % count)[:, None]], axis=1)
        np.savetxt(root / synsets[name] / f"shape{index}.txt", table, fmt="%.5f")
        lists[split].append(f"shape_data/{synsets[name]}/shape{index}")
    for split, entries in lists.items():
        (root / "train_test_split" / f"shuffled_{split}_file_list.json").write_text(json.dumps(entries))


@pytest.mark.parametrize("task, writer, folder, expected_test_shapes", [
    ("scan_objectnn", write_scanobjectnn, "ScanObjectNN", 16),
    ("modelnet40", write_modelnet40, "modelnet40_normal_resampled", 4),
    ("fewshot", write_fewshot, "ModelNetFewshot", 6),
    ("partseg", write_shapenetpart, "shapenetcore_partanno_segmentation_benchmark_v0_normal", 2),
])
def test_real_format_through_finetune(tmp_path, task, writer, folder, expected_test_shapes, capsys):
    writer(tmp_path / folder)
    flags = ["--task", task, "--data_root", str(tmp_path / folder), "--way", "2", "--shot", "4"]
    summary = finetune.main(config(tmp_path / "runs", *flags))
    printed = capsys.readouterr().out
    assert "SYNTHETIC" not in printed and not summary["task"].endswith("synthetic")
    assert f"/ {expected_test_shapes} test shapes" in printed
    metric = "instance_miou" if task == "partseg" else "accuracy"
    log = read_log(tmp_path / "runs" / summary["task"] / ("seed0_fold0" if task == "fewshot" else "seed0") / "log.jsonl")
    assert summary[f"last_{metric}"]["mean"] == log[-1][metric]


def test_missing_real_data_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        finetune.main(config(tmp_path, "--task", "partseg", "--data", "real", "--data_root", str(tmp_path / "none")))


# ---------------------------------------------------------------- reliability: checkpoints, run folders, settings

# One training step and 4 test shapes: half a second a run.
FLAGS = ["--task", "modelnet40", "--data", "synthetic", "--synthetic_train_size", "8", "--synthetic_test_size", "4"]


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from test_pretrain import crafted_checkpoint

    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(RuntimeError) as error:
        finetune.main(config(tmp_path / "runs", *FLAGS, "--checkpoint", path))
    assert path in str(error.value) and "not a checkpoint this project wrote" in str(error.value)
    assert not marker.exists()


def test_resume_refuses_a_run_started_with_other_settings(tmp_path):
    path, _ = pretrain_checkpoint(tmp_path, use_2d=False)  # the encoder is all fine-tuning reads
    first = finetune.main(config(tmp_path, *FLAGS, "--checkpoint", path))
    # The same command with --resume reads the finished run back.
    assert finetune.main(config(tmp_path, *FLAGS, "--checkpoint", path, "--resume")) == first
    # Another --lr and no --checkpoint: that run would be reported under a "from scratch" header.
    with pytest.raises(ValueError) as error:
        finetune.main(config(tmp_path, *FLAGS, "--resume", "--lr", "0.001"))
    message = str(error.value)
    assert f"--checkpoint {path!r} there, '' here" in message and "--lr 0.0005 there, 0.001 here" in message


def test_fresh_run_in_a_used_folder_is_refused_unless_overwrite(tmp_path, monkeypatch):
    finetune.main(config(tmp_path, *FLAGS))
    run = tmp_path / "modelnet40_synthetic" / "seed0"
    before = {name: (run / name).read_bytes() for name in ("log.jsonl", "last.pth")}
    with pytest.raises(FileExistsError, match="--overwrite"):
        finetune.main(config(tmp_path, *FLAGS, "--lr", "0.001"))
    # --overwrite, killed during its first epoch: the earlier run is whole; the stale temporary file is gone.
    (run / "last.pth.tmp").write_bytes(b"half a checkpoint")

    def killed(num_samples, seed, epoch):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(finetune, "epoch_order", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(config(tmp_path, *FLAGS, "--lr", "0.001", "--overwrite"))
    monkeypatch.undo()
    assert {name: (run / name).read_bytes() for name in before} == before and not (run / "last.pth.tmp").exists()
    finetune.main(config(tmp_path, *FLAGS, "--lr", "0.001", "--overwrite"))
    assert [record["epoch"] for record in read_log(run / "log.jsonl")] == [0]
    assert load_checkpoint(str(run / "last.pth"))["config"]["lr"] == 0.001


def test_a_data_root_that_does_not_exist_is_an_error_not_synthetic_data(tmp_path):
    missing = str(tmp_path / "modelnet40_typo")
    with pytest.raises(FileNotFoundError) as error:
        finetune.main(config(tmp_path / "runs", "--task", "modelnet40", "--data_root", missing))
    assert missing in str(error.value) and "modelnet40_shape_names.txt" in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    cross_entropy = finetune.F.cross_entropy
    monkeypatch.setattr(finetune.F, "cross_entropy", lambda *args, **kwargs: cross_entropy(*args, **kwargs) * torch.nan)
    with pytest.raises(FloatingPointError) as error:
        finetune.main(config(tmp_path, *FLAGS))
    assert "No checkpoint of this run was written yet" in str(error.value) and "resume" not in str(error.value)


def test_the_loss_is_read_every_log_every_steps_and_the_log_holds_the_same_mean_as_per_step_reads(tmp_path,
                                                                                                 monkeypatch):
    losses, reads = [], []
    cross_entropy, summed_over_ranks = finetune.F.cross_entropy, finetune.summed_over_ranks

    def recorded(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        losses.append(loss.item())  # float32 -> a Python float, the per-step sum the device sum must equal
        return loss

    def counted(sums, world_size):
        reads.append(1)
        return summed_over_ranks(sums, world_size)

    monkeypatch.setattr(finetune.F, "cross_entropy", recorded)
    monkeypatch.setattr(finetune, "summed_over_ranks", counted)
    finetune.main(config(tmp_path, *FLAGS, "--synthetic_train_size", "40", "--log_every", "2"))
    record, = read_log(tmp_path / "modelnet40_synthetic" / "seed0" / "log.jsonl")
    steps = record["step"]
    assert steps == len(losses) == 5  # 40 shapes, batches of 8
    assert len(reads) == 3  # after steps 2 and 4, and at the epoch's end (step 5)
    total = 0.0
    for value in losses:  # the per-step Python sum the loop made before its loss stayed on the device
        total += value
    assert record["loss"] == total / steps


def test_one_non_finite_fine_tuning_step_between_two_reads_still_stops_the_run(tmp_path, monkeypatch):
    calls = []
    cross_entropy = finetune.F.cross_entropy

    def one_nan_step(*args, **kwargs):  # the second step alone is NaN; the steps after it are finite
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(finetune.F, "cross_entropy", one_nan_step)
    with pytest.raises(FloatingPointError) as error:
        finetune.main(config(tmp_path, *FLAGS, "--synthetic_train_size", "32", "--log_every", "4"))
    message = str(error.value)
    assert len(calls) == 4  # read after step 4, two steps after the bad one
    assert "at a step from 0 to 3" in message and "up to 4 steps" in message
    assert "No checkpoint of this run was written yet" in message
    assert not (tmp_path / "modelnet40_synthetic" / "seed0" / "last.pth").exists()


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--warmup_epochs", "2"], ["--batch_size", "0"],
                                   ["--num_groups", "300"], ["--group_size", "300"], ["--variant", "hardest"]])
def test_bad_settings_are_refused_before_any_work(tmp_path, flags):
    flag, value = flags
    with pytest.raises(ValueError, match=f"^{flag} ") as error:
        finetune.main(config(tmp_path / "runs", "--task", "scan_objectnn", "--data", "synthetic", *flags))
    assert value in str(error.value)
    assert not (tmp_path / "runs").exists()
