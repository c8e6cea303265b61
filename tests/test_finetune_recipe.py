"""Tests of Point-MAE's fine-tuning recipe in finetune.py (docs/REFERENCE.md sec. 8): per-step FPS resampling, voting,
the part-segmentation augmentation and head layout, the initialisation rules, the 40-way few-shot head, and the
linear probes of `--task svm` on a randomly initialised encoder."""
import dataclasses
import json
import os

import pytest
import torch

import datasets
import downstream
import finetune
import kr_mae
from tokenizer import farthest_point_sample, gather_points
from util import optim
from util.checkpoints import load_checkpoint
from util.config import parse_config

torch.set_num_threads(2)


def tiny(tmp_path, task, **overrides):
    cfg = finetune.build_config(["--task", task, "--preset", "tiny", "--data", "synthetic"])
    values = dict(out_dir=str(tmp_path), progress=False, epochs=1, synthetic_train_size=32, synthetic_test_size=16,
                  batch_size=8)
    values.update(overrides)
    return dataclasses.replace(cfg, **values)


def test_pool_size_follows_point_mae():
    assert downstream.pool_size(1024, 8192) == 1200  # Point-MAE: point_all = 1200 for 1024 points
    assert downstream.pool_size(4096, 8192) == 4800  # Point-MAE: 4800 for 4096
    assert downstream.pool_size(2048, 2048) == 2048  # ScanObjectNN: all 2048 stored points
    assert downstream.pool_size(1024, 1100) == 1100  # never more than stored


def test_training_points_are_a_fresh_subset_of_an_fps_pool_from_a_random_start():
    torch.manual_seed(0)
    points = torch.randn(3, 400, 3)  # stored clouds (B, M, 3)
    pool = downstream.pool_size(128, 400)  # 150
    first, second = downstream.training_points(points, 128), downstream.training_points(points, 128)
    assert first.shape == (3, 128, 3)
    assert not torch.equal(first, second)  # a new subset every step
    starts = []
    for b in range(3):
        # Every chosen point is one of the stored points, and all of them come from ONE farthest point sampling of
        # pool points: some start of the FPS must give a pool that contains every chosen point.
        match = torch.cdist(first[b], points[b]).argmin(dim=1)  # (N,) stored index of each chosen point
        assert torch.equal(points[b, match], first[b]) and match.unique().numel() == 128
        every_start = farthest_point_sample(points[b].expand(400, -1, -1), pool, torch.arange(400))  # (400, pool)
        contains = torch.zeros(400, 400, dtype=torch.bool).scatter_(1, every_start, True)[:, match].all(dim=1)
        assert contains.any(), "the subset is not drawn from an FPS pool"
        starts.append(int(contains.nonzero()[0]))
    # The FPS starts at a random point, not always at index 0 (three shapes, three draws).
    assert any(start != 0 for start in starts)


def test_test_points_are_the_fps_prefix_and_never_random():
    torch.manual_seed(0)
    points = torch.randn(2, 300, 3)
    ordered = gather_points(points, farthest_point_sample(points, 300))  # an FPS-ordered cloud, like Point-MAE's cache
    assert torch.equal(downstream.test_points(ordered, 64), ordered[:, :64])
    assert torch.equal(downstream.test_points(points, 64), downstream.test_points(points, 64))
    assert torch.equal(downstream.test_points(points[:, :64], 64), points[:, :64])  # N stored: taken as they are


def test_vote_points_redraw_the_subset_and_the_augmentation_on_every_pass():
    points = torch.randn(2, 300, 3)
    generator = torch.Generator().manual_seed(0)
    passes = downstream.vote_points(points, 64, 3, generator)
    assert len(passes) == 3 and all(inputs.shape == (2, 64, 3) for inputs in passes)
    assert not torch.equal(passes[0], passes[1])
    again = downstream.vote_points(points, 64, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(passes, again))  # seeded: reproducible


def test_two_epochs_see_different_points_of_the_same_modelnet40_shape(tmp_path, monkeypatch):
    seen = {}  # shape (identified by its stored cloud) -> the points the model read, per call
    original = downstream.training_points

    def recording(points, num_points, skip_near_origin):
        chosen = original(points, num_points, skip_near_origin)
        for stored, picked in zip(points, chosen):
            seen.setdefault(tuple(stored[:2].flatten().tolist()), []).append(picked.clone())
        return chosen

    monkeypatch.setattr(finetune, "training_points", recording)
    cfg = tiny(tmp_path, "modelnet40", epochs=2, synthetic_train_size=16, batch_size=8)
    finetune.main(cfg)
    assert len(seen) == 16 and all(len(picks) == 2 for picks in seen.values())  # each shape once per epoch
    stored = 2 * cfg.num_points  # the synthetic ModelNet40 stand-in stores 2N points per shape
    assert all(picks[0].shape == (cfg.num_points, 3) for picks in seen.values()) and stored > cfg.num_points
    assert all(not torch.equal(picks[0], picks[1]) for picks in seen.values())


def test_part_segmentation_trains_with_the_isotropic_augmentation(tmp_path, monkeypatch):
    calls = []
    original = datasets.scale_and_shift_isotropic

    def recording(points, generator=None):
        calls.append(points.shape)
        return original(points, generator)

    def refuse(points, generator=None):
        raise AssertionError("part segmentation must not use the classification's anisotropic scale-and-translate")

    monkeypatch.setattr(datasets, "scale_and_shift_isotropic", recording)
    monkeypatch.setattr(datasets, "scale_and_translate", refuse)
    finetune.main(tiny(tmp_path, "partseg"))
    assert len(calls) == 32 // 8  # once per training step


def test_part_segmentation_head_has_point_mae_layout_at_paper_size():
    model = downstream.PartSegmenter(16, 50, num_groups=128, group_size=32, dim=384, depth=12, num_heads=6)
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    # Point-MAE: propagation_0.mlp_convs 1155 -> 1536 -> 1024 (BN each), convs1 3392 -> 512, convs2 512 -> 256,
    # convs3 256 -> 50, label_conv 16 -> 64 (docs/REFERENCE.md sec. 7).
    assert shapes["propagation.0.weight"] == (1536, 1155, 1) and shapes["propagation.1.weight"] == (1536,)
    assert shapes["propagation.3.weight"] == (1024, 1536, 1) and shapes["propagation.4.weight"] == (1024,)
    assert shapes["head.0.weight"] == (512, 3392, 1) and shapes["head.4.weight"] == (256, 512, 1)
    assert shapes["head.7.weight"] == (50, 256, 1) and shapes["category_embed.0.weight"] == (64, 16)
    model.eval()
    out = model(torch.randn(2, 2048, 3), torch.tensor([0, 5]))
    assert out.shape == (2, 2048, 50)


def test_a_new_head_keeps_default_init_from_a_checkpoint_and_truncated_normal_from_scratch(tmp_path):
    import pretrain
    cfg = tiny(tmp_path, "scan_objectnn")
    pretrain_cfg = parse_config(pretrain.Config, ["--preset", "tiny", "--no-use_2d", "--masking", "random"])
    torch.save({"model": kr_mae.KRMAE(pretrain_cfg).state_dict(), "config": dataclasses.asdict(pretrain_cfg)},
               tmp_path / "pretrained.pth")
    sets = {"num_classes": 15}
    torch.manual_seed(0)
    scratch = finetune.build_model(cfg, sets)
    torch.manual_seed(0)
    loaded = finetune.build_model(dataclasses.replace(cfg, checkpoint=str(tmp_path / "pretrained.pth")), sets)
    # From scratch: truncated normal std 0.02 and zero biases; from a checkpoint: PyTorch's default (uniform
    # weights up to 1/sqrt(fan_in) and non-zero biases), as Point-MAE.
    assert torch.count_nonzero(scratch.head[0].bias) == 0 and scratch.head[0].weight.std() < 0.03
    assert torch.count_nonzero(loaded.head[0].bias) == 256
    bound = 1 / (2 * cfg.dim) ** 0.5
    assert loaded.head[0].weight.abs().max() <= bound and loaded.head[0].weight.std() > 0.5 * bound / 3 ** 0.5
    # The backbone came from the checkpoint.
    state = load_checkpoint(str(tmp_path / "pretrained.pth"))["model"]
    assert torch.equal(loaded.tokenizer_3d.group_encoder.first_conv[0].weight,
                       state["tokenizer_3d.group_encoder.first_conv.0.weight"])


def test_few_shot_keeps_a_40_way_head_like_point_mae(tmp_path):
    cfg = tiny(tmp_path, "fewshot", way=5, shot=2, queries=2)
    sets = finetune.build_datasets(cfg)
    model = finetune.build_model(cfg, sets)
    assert sets["num_classes"] == 40 and model.head[-1].out_features == 40
    assert {int(label) for _, label in sets["train"]} == set(range(5))  # labels stay 0..way-1
    narrow = finetune.build_datasets(dataclasses.replace(cfg, fewshot_head_classes=0))
    assert narrow["num_classes"] == 5


def test_svm_task_reports_every_probe_and_the_cv_probe_is_far_above_the_majority(tmp_path, capsys):
    cfg = tiny(tmp_path, "svm", synthetic_train_size=240, synthetic_test_size=120, probe_shots=5, probe_draws=4)
    summary = finetune.main(cfg)
    text = capsys.readouterr().out
    for name in ("literature", "cross-validated", "1-NN", "few-shot", "majority"):
        assert name in text, name
    # Every stage of --task svm says when it starts and how long it took, in plain lines.
    for stage in ("feature extraction", "cross-validated SVM", "1-NN cosine", "few-shot", "literature SVC"):
        assert f"probe: {stage}" in text and any(line.startswith(f"probe: {stage}") and " took " in line
                                                 for line in text.splitlines()), stage
    assert "ms per shape" in text
    run = summary["runs"][0]
    assert run["majority_share"] == pytest.approx(100 / 12)
    # A randomly initialised encoder's features already separate the synthetic classes well; a probe that
    # under-fits (C = 0.01 on unit-norm features: about 50 % here) or predicts one class (8.3 %) fails this.
    assert run["cv_svm_accuracy"] > 80.0 and run["cv_svm_train_accuracy"] > 90.0
    assert run["cv_svm_C"] in [float(c) for c in __import__("linear_probe").C_GRID]
    log = json.loads(open(tmp_path / "svm_synthetic" / "seed0" / "log.jsonl").read())
    assert log["probes"]["cross_validated"]["C"] == run["cv_svm_C"]


def test_layer_decay_factors_follow_the_depth_of_the_pre_trained_path():
    decay, depth = 0.5, 4
    assert optim.layer_scale("tokenizer_3d.group_encoder.first_conv.0.weight", depth, decay) == 0.5 ** 5
    assert optim.layer_scale("encoder_pos.mlp.0.weight", depth, decay) == 0.5 ** 5
    assert optim.layer_scale("encoder.blocks.0.attn.qkv.weight", depth, decay) == 0.5 ** 4
    assert optim.layer_scale("encoder.blocks.3.mlp.fc1.bias", depth, decay) == 0.5
    for new_or_last in ("encoder.norm.weight", "cls_token", "cls_pos_embed", "head.0.weight"):
        assert optim.layer_scale(new_or_last, depth, decay) == 1.0


def test_scaled_optimizer_at_factor_one_steps_exactly_as_point_mae_s_and_freezing_holds_the_encoder(tmp_path):
    cfg = tiny(tmp_path, "scan_objectnn")
    torch.manual_seed(0)
    model = finetune.build_model(cfg, {"num_classes": 15})
    twin = finetune.build_model(cfg, {"num_classes": 15})
    twin.load_state_dict(model.state_dict())
    plain = optim.make_optimizer(model, cfg, torch.device("cpu"))
    scaled = optim.scaled_optimizer(twin, optim.make_optimizer(twin, cfg, torch.device("cpu")), cfg)
    assert {group["encoder"] for group in scaled.param_groups} == {True, False}
    assert sum(len(group["params"]) for group in scaled.param_groups) == len(list(model.parameters()))
    points = torch.rand(4, cfg.num_points, 3)
    for network, optimizer in ((model, plain), (twin, scaled)):
        torch.manual_seed(1)  # the same drop-path and dropout draws
        network(points).sum().backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    # --freeze_epochs 1: after one epoch the 3-D path's parameters are the initial ones, the head's are not
    frozen_cfg = dataclasses.replace(tiny(tmp_path, "scan_objectnn"), freeze_epochs=1, seed=3)
    finetune.main(frozen_cfg)
    torch.manual_seed(3)
    initial = finetune.build_model(frozen_cfg, {"num_classes": 12}).state_dict()
    run = [os.path.join(root, "last.pth") for root, _, files in os.walk(tmp_path) if "last.pth" in files]
    trained = torch.load(run[0], weights_only=False)["model"]
    names = [name for name, _ in finetune.build_model(frozen_cfg, {"num_classes": 12}).named_parameters()]
    encoder = [name for name in names if name.startswith(("tokenizer_3d.", "encoder_pos.", "encoder."))]
    assert encoder and all(torch.equal(trained[name], initial[name]) for name in encoder)
    assert not torch.equal(trained["head.0.weight"], initial["head.0.weight"])


def test_trunc_normal_head_replaces_the_default_init_of_a_new_head(tmp_path):
    import pretrain
    cfg = tiny(tmp_path, "scan_objectnn")
    pretrain_cfg = parse_config(pretrain.Config, ["--preset", "tiny", "--no-use_2d", "--masking", "random"])
    torch.save({"model": kr_mae.KRMAE(pretrain_cfg).state_dict(), "config": dataclasses.asdict(pretrain_cfg)},
               tmp_path / "pretrained.pth")
    loaded = finetune.build_model(dataclasses.replace(cfg, checkpoint=str(tmp_path / "pretrained.pth"),
                                                      trunc_normal_head=True), {"num_classes": 15})
    assert torch.count_nonzero(loaded.head[0].bias) == 0 and loaded.head[0].weight.std() < 0.03
    state = load_checkpoint(str(tmp_path / "pretrained.pth"))["model"]
    assert torch.equal(loaded.encoder.blocks[0].attn.qkv.weight, state["encoder.blocks.0.attn.qkv.weight"])
