"""Tests of pretrain.py: Eq. (16), the whole pipeline on the tiny preset, exact resume, checkpoints, flags."""
import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch

from kr_mae import KRMAE, chamfer_distance
import kr_mae
import linear_probe
import pretrain
from pretrain import Config
from util import optim, weights
from util.checkpoints import load_checkpoint
from util.config import parse_config

torch.set_num_threads(2)


def tiny(tmp_path, **overrides):
    """The tiny preset with a very small synthetic set, no progress bar, output in tmp_path."""
    cfg = parse_config(Config, ["--preset", "tiny"])
    values = dict(synthetic_size=32, batch_size=8, epochs=2, out_dir=str(tmp_path), progress=False, picture_every=1)
    values.update(overrides)
    return dataclasses.replace(cfg, **values)


def test_chamfer_matches_brute_force_double_loop():
    generator = torch.Generator().manual_seed(0)
    predicted, target = torch.randn(3, 5, 3, generator=generator), torch.randn(3, 7, 3, generator=generator)
    expected = []
    for group in range(3):  # Eq. (16) written out with plain loops
        forward = sum(min(float(((a - b) ** 2).sum()) for b in target[group]) for a in predicted[group]) / 5
        backward = sum(min(float(((a - b) ** 2).sum()) for a in predicted[group]) for b in target[group]) / 7
        expected.append(forward + backward)
    assert torch.allclose(chamfer_distance(predicted, target), torch.tensor(expected), atol=1e-5)
    assert torch.allclose(chamfer_distance(target, target), torch.zeros(3), atol=1e-6)


def test_parse_config_flags_presets_and_booleans():
    cfg = parse_config(Config, [])
    assert (cfg.dim, cfg.depth, cfg.mask_ratio, cfg.num_views, cfg.num_selected_views) == (384, 12, 0.6, 10, 3)
    cfg = parse_config(Config, ["--preset", "tiny", "--lr=5e-4", "--no-use_2d", "--dim", "64"])
    assert cfg.lr == 5e-4 and cfg.use_2d is False and cfg.dim == 64 and cfg.num_groups == 32
    with pytest.raises(SystemExit):
        parse_config(Config, ["--preset", "huge"])


def test_help_shows_each_fields_whole_comment_and_no_section_header(capsys):
    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    # A comment continued on the next line is shown whole; the section header after a field is not appended.
    assert "and schedule (only the method differs); without it each method gets its paper's (PAPER_SETTINGS)" in text
    assert "Point-MAE's CUDA kernel: for exact parity with its checkpoints (tokenizer.py) (default: False)" in text
    assert "Point-MAE: 0.6 (default: 0.6)" in text and "--- " not in text


def test_learning_rate_warmup_then_cosine():
    values = [optim.learning_rate(step, 100, 10, 1e-3, 1e-6) for step in range(100)]
    assert values[0] == pytest.approx(1e-4) and values[9] == pytest.approx(1e-3)
    assert values[10] == pytest.approx(1e-3) and values[-1] == pytest.approx(1e-6, abs=1e-6)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_tiny_run_writes_checkpoint_log_picture_and_loss_goes_down(tmp_path):
    pretrain.main(tiny(tmp_path, epochs=4, synthetic_size=64, svm_every=4))
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [record["epoch"] for record in records] == [0, 1, 2, 3]
    assert records[-1]["loss_rec"] < records[0]["loss_rec"]
    # The probes run only on the epochs --svm_every names; their record carries every probe's accuracy and the C
    # that cross-validation chose from the grid (the probes themselves are tested in test_linear_probe.py).
    assert "svm_accuracy" not in records[2]
    assert {"svm_accuracy", "svm_C", "literature_svm_accuracy", "nearest_neighbour_accuracy"} <= set(records[3])
    assert records[3]["svm_C"] in linear_probe.C_GRID
    assert (tmp_path / "last.pth").is_file() and not (tmp_path / "last.pth.tmp").exists()
    assert (tmp_path / "reconstruction_003.png").is_file()


def interrupted_at_second_epoch(module, run):
    """Run `run()` (a call of module.main) killed as its second epoch starts, after the first epoch's checkpoint:
    module.epoch_order raises a simulated kill at epoch 1. The interrupted run that a resume test continues."""
    original_order = module.epoch_order

    def crash_at_second_epoch(num_samples, seed, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        return original_order(num_samples, seed, epoch)

    module.epoch_order = crash_at_second_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        module.epoch_order = original_order


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = pretrain.main(tiny(tmp_path / "straight"))
    interrupted_at_second_epoch(pretrain, lambda: pretrain.main(tiny(tmp_path / "resumed")))
    # `--resume path` alone restores the run's own settings (the tiny preset, the test's sizes and folder).
    resumed_cfg = parse_config(Config, ["--resume", str(tmp_path / "resumed" / "last.pth")])
    assert resumed_cfg == tiny(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "last.pth"))
    assert parse_config(Config, ["--resume", resumed_cfg.resume, "--epochs", "5"]).epochs == 5  # flags still win
    resumed = pretrain.main(resumed_cfg)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    lines = open(tmp_path / "resumed" / "log.jsonl").read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    pretrain.main(tiny(tmp_path, epochs=1))
    before = (tmp_path / "last.pth").read_bytes()
    monkeypatch.setattr(kr_mae, "chamfer_distance", lambda a, b: torch.full(a.shape[:1], float("nan")))
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        pretrain.main(tiny(tmp_path, epochs=2, resume=str(tmp_path / "last.pth")))
    assert (tmp_path / "last.pth").read_bytes() == before


def test_interrupted_checkpoint_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pth")
    pretrain.save_checkpoint(path, {"value": 1})

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        pretrain.save_checkpoint(path, {"value": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["value"] == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("overrides", [dict(use_2d=False, masking="random"), dict(use_rvs=False),
                                       dict(fusion="cross"), dict(fusion="joint"), dict(fusion="mlp")])
def test_ablation_variants_run_a_step(tmp_path, overrides):
    cfg = tiny(tmp_path, **overrides)
    model = KRMAE(cfg)
    out = model(torch.randn(2, cfg.num_points, 3))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["predicted"].shape[1:] == (19, cfg.group_size, 3)
    assert all(p.grad is not None for p in model.tokenizer_3d.parameters())
    assert all(p.grad is not None for p in model.encoder_pos.parameters())


@pytest.mark.parametrize("fusion", ["aligned", "mlp"])
def test_encoder_state_dict_loads_into_a_3d_only_encoder(tmp_path, fusion):
    from kat import KATransformer
    from tokenizer import CenterEmbedding, PointTokenizer

    cfg = tiny(tmp_path, fusion=fusion)
    state = weights.encoder_state_dict(KRMAE(cfg).state_dict())
    assert state and not any(name.startswith(("decoder", "tokenizer_2d", "selector", "masking")) for name in state)
    encoder_only = torch.nn.Module()
    encoder_only.tokenizer_3d = PointTokenizer(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=cfg.dim)
    encoder_only.encoder_pos = CenterEmbedding(dim=cfg.dim)
    encoder_only.encoder = KATransformer(dim=cfg.dim, depth=cfg.depth, num_heads=cfg.num_heads)
    encoder_only.load_state_dict(state, strict=True)


def test_paper_configuration_builds_and_runs_one_step_on_the_cpu(tmp_path):
    # The real CLIP weights cannot be downloaded here: a randomly initialised tower of ViT-B/16's size stands in.
    cfg = dataclasses.replace(parse_config(Config, []), clip_random_tower="768,12,12", batch_size=2)
    model = KRMAE(cfg)
    assert sum(p.numel() for p in model.encoder.parameters()) > 20e6  # 12 blocks of width 384
    optimizer = torch.optim.AdamW(optim.parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    before = [p.detach().clone() for p in model.encoder.blocks[0].parameters()]
    out = model(torch.randn(2, cfg.num_points, 3))
    out["loss"].backward()
    optimizer.step()
    assert out["predicted"].shape == (2, 38, 32, 3) and out["selected_views"].shape == (2, 3)
    assert torch.isfinite(out["loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, model.encoder.blocks[0].parameters()) if a.ndim == 2)


def test_reconstruction_loss_trains_the_view_selector(tmp_path):
    # rvs.py gates the selected views' tokens by their scores so that L_R trains the selector (NOTE(unspecified));
    # nothing downstream may normalise that gate away (a LayerNorm on the 2-D tokens gave gradients ~1e-8 here).
    torch.manual_seed(0)
    cfg = tiny(tmp_path, num_views=10, num_selected_views=3)
    model = KRMAE(cfg)
    model(torch.randn(8, cfg.num_points, 3))["loss_rec"].backward()
    selector_gradient = sum(p.grad.norm() ** 2 for p in model.selector.parameters()) ** 0.5
    assert selector_gradient > 1e-6


def test_point_mae_initialisation_and_no_clipping_by_default(tmp_path):
    # Point-MAE: truncated normal std 0.02 and zero biases for every Linear / Conv1d of the encoder side, the
    # mini-PointNet and the encoder's centre MLP included; the decoder's centre MLP keeps PyTorch's default.
    torch.manual_seed(0)
    model = KRMAE(tiny(tmp_path))
    encoder_side = [layer for part in (model.tokenizer_3d, model.encoder_pos, model.encoder)
                    for layer in part.modules() if isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d))]
    weights = torch.cat([layer.weight.flatten() for layer in encoder_side])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)  # PyTorch's default: std 0.33 for Conv1d 3->128
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in encoder_side if layer.bias is not None)
    first_conv = model.tokenizer_3d.group_encoder.first_conv[0]
    assert first_conv.weight.abs().max().item() < 0.1  # PyTorch's default draws up to 1/sqrt(3) here
    decoder_linear = model.decoder_pos.mlp[0]
    assert torch.count_nonzero(decoder_linear.bias) == decoder_linear.bias.numel()  # default init: uniform biases
    # Point-MAE's pre-training does not clip gradients (it clips at 10 only when fine-tuning).
    assert Config().grad_clip == 0.0


# ---------------------------------------------------------------- reliability: checkpoints, run folders, settings

def small(tmp_path, **overrides):
    """Smaller than tiny(): 128 points in 8 groups, 16 shapes, one epoch, no picture, no 2-D branch (its renderer
    and tower take seconds on the CPU): half a second a run."""
    values = dict(synthetic_size=16, batch_size=8, epochs=1, picture_every=0, num_points=128, num_groups=8,
                  use_2d=False)
    values.update(overrides)
    return tiny(tmp_path, **values)


def read_epochs(path):
    return [json.loads(line)["epoch"] for line in open(path)]


class CodeInPickle:
    """Unpickling this object creates a marker file: what a crafted .pth could do with os.system instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_checkpoint(tmp_path):
    """A .pth that looks like a checkpoint and runs code when unpickled; returns its path and the marker file."""
    path, marker = tmp_path / "crafted.pth", tmp_path / "code_ran"
    torch.save({"model": {}, "config": {}, "epoch": 0, "payload": CodeInPickle(marker)}, path)
    return str(path), marker


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    for load in (lambda: load_checkpoint(path), lambda: parse_config(Config, ["--resume", path])):
        with pytest.raises(RuntimeError) as error:
            load()
        assert path in str(error.value) and "not a checkpoint this project wrote" in str(error.value)
        assert "may contain code" in str(error.value)
    assert not marker.exists()


def test_rng_state_needs_only_the_plain_safe_loader_and_restores_every_generator(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state: it must survive the round trip too

    def draws():
        return torch.rand(3), np.random.rand(3), np.random.randn(), random.random()

    path = str(tmp_path / "state.pth")
    pretrain.save_checkpoint(path, {"rng": pretrain.rng_state()})
    expected = draws()
    pretrain.set_rng_state(torch.load(path, weights_only=True)["rng"])  # no allow-list needed
    again = draws()
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2:] == again[2:]
    # A checkpoint of an earlier version holds numpy's own array: load_checkpoint still reads and restores it.
    torch.save({"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}},
               path)
    expected = draws()
    pretrain.set_rng_state(load_checkpoint(path)["rng"])
    again = draws()
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2:] == again[2:]


def test_resume_of_a_copied_run_folder_writes_into_the_copy_only(tmp_path):
    pretrain.main(small(tmp_path / "original"))
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    before = {path.name: path.read_bytes() for path in (tmp_path / "original").iterdir()}
    cfg = parse_config(Config, ["--resume", str(tmp_path / "copy" / "last.pth"), "--epochs", "2"])
    assert cfg.out_dir == str(tmp_path / "copy")  # the checkpoint's folder, not the one its config recorded
    pretrain.main(cfg)
    assert read_epochs(tmp_path / "copy" / "log.jsonl") == [0, 1]
    assert load_checkpoint(str(tmp_path / "copy" / "last.pth"))["epoch"] == 1
    assert {path.name: path.read_bytes() for path in (tmp_path / "original").iterdir()} == before


def test_fresh_run_in_a_used_folder_is_refused_and_overwrite_keeps_the_old_run_until_its_first_epoch(tmp_path,
                                                                                                    monkeypatch):
    pretrain.main(small(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in ("log.jsonl", "last.pth")}
    with pytest.raises(FileExistsError, match="--overwrite"):
        pretrain.main(small(tmp_path, seed=1))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    # --overwrite, killed during its first epoch: the earlier run's log and checkpoint are whole; the stale temporary
    # file of a kill during a checkpoint write is gone.
    (tmp_path / "last.pth.tmp").write_bytes(b"half a checkpoint")

    def killed(num_samples, seed, epoch):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(pretrain, "epoch_order", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(small(tmp_path, seed=1, overwrite=True))
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not (tmp_path / "last.pth.tmp").exists()
    pretrain.main(small(tmp_path, seed=1, overwrite=True))
    assert read_epochs(tmp_path / "log.jsonl") == [0] and (tmp_path / "log.jsonl").read_bytes() != before["log.jsonl"]


def test_a_data_root_that_does_not_exist_is_an_error_not_synthetic_data(tmp_path):
    missing = str(tmp_path / "ShapeNet55-typo")
    with pytest.raises(FileNotFoundError) as error:
        pretrain.main(small(tmp_path / "run", data_root=missing))
    assert missing in str(error.value) and "shapenet_pc" in str(error.value)  # the path and the expected layout
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(kr_mae, "chamfer_distance", lambda a, b: torch.full(a.shape[:1], float("nan")))
    with pytest.raises(FloatingPointError) as error:
        pretrain.main(small(tmp_path))
    assert "No checkpoint of this run was written yet" in str(error.value) and "resume" not in str(error.value)
    assert not (tmp_path / "last.pth").exists()


@pytest.mark.parametrize("overrides", [
    dict(use_2d=True, use_rvs=False, num_selected_views=0),  # fused no view
    dict(use_2d=True, use_rvs=False, num_selected_views=7),  # the tiny preset renders 6 views: quietly used 6
    dict(use_2d=True, num_selected_views=7),
    dict(epochs=0),  # wrote nothing, said nothing
    dict(warmup_epochs=2),  # more than the one epoch
    dict(warmup_epochs=-1),
    dict(batch_size=0),
    dict(mask_ratio=1.0),
    dict(mask_ratio=0.1),  # masks int(0.1 * 8) = 0 of the 8 groups
    dict(num_groups=200),  # more than the 128 points
    dict(group_size=200),
    dict(masking="greedy"),
    dict(fusion="sum"),
    dict(data="modelnet"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, overrides):
    flag, value = list(overrides.items())[-1]
    with pytest.raises(ValueError, match=f"^--{flag} ") as error:
        pretrain.main(small(tmp_path / "run", **overrides))
    assert str(value) in str(error.value)
    assert not (tmp_path / "run").exists()


def test_cast_frozen_towers_casts_only_the_frozen_towers_and_make_optimizer_fuses_on_cuda():
    for method in ("kr_mae", "i2p_mae"):
        model = pretrain.build_model(pretrain.build_config(["--preset", "tiny", "--method", method]))
        weights.cast_frozen_towers(model, torch.bfloat16)
        tower = model.tokenizer_2d.visual if method == "kr_mae" else model.teacher.visual
        assert tower.conv1.weight.dtype == tower.proj.dtype == torch.bfloat16
        assert tower.ln_pre.weight.dtype == torch.float32  # CLIP's recipe keeps the LayerNorms
        # Everything that trains stays float32 (AdamW's master weights).
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    cfg = pretrain.build_config(["--preset", "tiny", "--no-use_2d"])
    model = pretrain.build_model(cfg)
    weights.cast_frozen_towers(model, torch.bfloat16)  # no tower: nothing to do
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert optim.make_optimizer(model, cfg, torch.device("cuda")).defaults["fused"] is True
    assert not optim.make_optimizer(model, cfg, torch.device("cpu")).defaults["fused"]
