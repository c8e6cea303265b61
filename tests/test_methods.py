"""pretrain.py --method: each peer method's settings (method defaults, its paper's settings, --matched, preset and
flags in that order), a tiny pre-training of every method on the CPU whose checkpoint finetune.py then loads and
fine-tunes, every loss term logged, exact resume of a peer method, the frozen teacher kept out of checkpoints."""
import dataclasses
import json

import pytest
import torch

import downstream
import finetune
import pretrain
from util import weights
from util.checkpoints import load_checkpoint
from util.config import parse_config

torch.set_num_threads(2)

PEERS = ("joint_mae", "i2p_mae", "crossalignnet")
# The loss terms (and statistics) each method must log beside loss and loss_rec.
LOGGED = {"kr_mae": ("loss_policy",), "point_mae": ("loss_policy",), "joint_mae": ("loss_2d", "loss_cross"),
          "i2p_mae": ("loss_2d", "masking_entropy"), "crossalignnet": ("loss_gsa",)}


def tiny_method(tmp_path, method, *flags):
    """--method M on the tiny preset, a few small shapes, one epoch, no picture: a few seconds on the CPU."""
    return pretrain.build_config(["--method", method, "--preset", "tiny", "--synthetic_size", "16", "--batch_size",
                                  "8", "--num_points", "256", "--num_groups", "16", "--epochs", "1",
                                  "--picture_every", "0", "--no-progress", "--out_dir", str(tmp_path), *flags])


def test_method_defaults_paper_settings_matched_preset_and_flags_in_order():
    joint = pretrain.build_config(["--method", "joint_mae"])
    assert (joint.num_points, joint.mask_ratio, joint.image_size, joint.decoder_depth) == (2048, 0.75, 224, 2)
    matched = pretrain.build_config(["--method", "joint_mae", "--matched"])
    assert (matched.num_points, matched.mask_ratio, matched.batch_size) == (1024, 0.6, 128)
    assert (matched.image_size, matched.decoder_depth) == (224, 2)  # the architecture stays the method's
    tiny = pretrain.build_config(["--method", "joint_mae", "--preset", "tiny"])
    assert (tiny.num_points, tiny.image_size, tiny.mask_ratio) == (512, 64, 0.75)  # the preset wins over both
    assert pretrain.build_config(["--method", "joint_mae", "--num_points", "1024"]).num_points == 1024
    i2p = pretrain.build_config(["--method", "i2p_mae"])
    assert (i2p.num_points, i2p.mask_ratio, i2p.batch_size, i2p.image_size) == (2048, 0.8, 64, 224)
    cal = pretrain.build_config(["--method", "crossalignnet"])
    assert (cal.num_points, cal.mask_ratio, cal.augment) == (2048, 0.6, False)
    assert pretrain.build_config(["--method", "crossalignnet", "--matched"]).augment
    point_mae = pretrain.build_config(["--method", "point_mae"])
    assert (point_mae.use_2d, point_mae.masking) == (False, "random")
    assert pretrain.build_config([]) == parse_config(pretrain.Config, [])  # kr_mae: the paper, unchanged
    with pytest.raises(SystemExit):
        pretrain.build_config(["--method", "pointbert"])


@pytest.mark.parametrize("cfg_flags, message", [
    ((["--method", "point_mae", "--use_2d"]), "--method point_mae is --no-use_2d --masking random"),
    ((["--method", "joint_mae", "--joint_mask_ratio_2d", "0.001"]), "--joint_mask_ratio_2d 0.001 must mask"),
    ((["--method", "i2p_mae", "--i2p_target_points", "64"]), "--i2p_target_points must be between 1 and"),
    ((["--method", "crossalignnet", "--cal_image_masking", "aligned"]), "--cal_image_masking must be"),
    ((["--method", "joint_mae", "--init_from", "pretrain.pth"]), "--init_from loads Point-MAE's encoder"),
])
def test_method_settings_that_cannot_work_are_refused(cfg_flags, message):
    with pytest.raises(ValueError, match=message):
        pretrain.check_config(pretrain.build_config(cfg_flags))


@pytest.mark.parametrize("method", ["point_mae", *PEERS])
def test_every_method_pretrains_logs_its_terms_and_fine_tunes(tmp_path, method):
    cfg = tiny_method(tmp_path / "pretrain", method)
    model = pretrain.main(cfg)
    record = json.loads(open(tmp_path / "pretrain" / "log.jsonl").read().splitlines()[-1])
    for name in ("loss", "loss_rec", *LOGGED[method]):
        assert name in record and record[name] == record[name], name  # logged and not NaN
    # finetune.py loads the 3-D path of the checkpoint, every tensor of it, and fine-tunes one epoch.
    fine_cfg = finetune.build_config(["--preset", "tiny", "--task", "modelnet40", "--data", "synthetic",
                                      "--num_points", "256", "--num_groups", "16", "--batch_size", "8",
                                      "--synthetic_train_size", "16", "--synthetic_test_size", "8", "--epochs", "1",
                                      "--no-progress", "--checkpoint", str(tmp_path / "pretrain" / "last.pth"),
                                      "--out_dir", str(tmp_path / "finetune")])
    classifier = downstream.Classifier(12, **downstream.backbone_arguments(fine_cfg))
    weights.load_pretrained(classifier, fine_cfg.checkpoint, fine_cfg)
    source = model.state_dict()
    encoder = [name for name in classifier.state_dict() if name.startswith(weights.ENCODER_PREFIXES)]
    assert encoder and all(torch.equal(classifier.state_dict()[name], source[name].cpu()) for name in encoder)
    summary = finetune.main(fine_cfg)
    assert summary["num_runs"] == 1 and "last_accuracy" in summary


def test_a_peer_method_resumes_exactly(tmp_path):
    from test_pretrain import interrupted_at_second_epoch

    straight = pretrain.main(tiny_method(tmp_path / "straight", "joint_mae", "--epochs", "2"))
    interrupted_at_second_epoch(pretrain, lambda: pretrain.main(tiny_method(tmp_path / "resumed", "joint_mae",
                                                                           "--epochs", "2")))
    resumed_cfg = pretrain.build_config(["--resume", str(tmp_path / "resumed" / "last.pth")])
    assert resumed_cfg.method == "joint_mae" and resumed_cfg.image_size == 64  # the run's own settings
    resumed = pretrain.main(resumed_cfg)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_checkpoint_without_a_method_resumes_as_kr_mae(tmp_path):
    cfg = dataclasses.replace(tiny_method(tmp_path, "point_mae"), method="kr_mae")
    pretrain.main(cfg)
    checkpoint = load_checkpoint(str(tmp_path / "last.pth"))
    del checkpoint["config"]["method"], checkpoint["config"]["matched"]  # as written before --method existed
    pretrain.save_checkpoint(str(tmp_path / "last.pth"), checkpoint)
    resumed = pretrain.build_config(["--resume", str(tmp_path / "last.pth")])
    assert resumed.method == "kr_mae" and not resumed.use_2d


def test_a_pretrained_teacher_is_left_out_of_checkpoints():
    cfg = pretrain.build_config(["--method", "i2p_mae", "--preset", "tiny", "--num_points", "256",
                                 "--num_groups", "16"])
    model = pretrain.build_model(cfg)
    assert not model.teacher.visual_is_pretrained  # a random tower is saved: nothing else could restore it
    assert any(name.startswith("teacher.visual.") for name in weights.trainable_state(model))
    model.teacher.visual_is_pretrained = True  # as when loaded from CLIP's file
    state = weights.trainable_state(model)
    assert state and not any(name.startswith("teacher.visual.") for name in state)
    assert any(name.startswith("encoder.") for name in state)
    weights.load_trainable_state(model, state)  # the tower is not reported missing


# ---------------------------------------------------------------- KR-MAE with I2P-MAE's saliency masking

def test_saliency_masking_keeps_the_centres_under_the_attended_patch_visible():
    cfg = pretrain.build_config(["--preset", "tiny", "--masking", "saliency", "--num_groups", "16",
                                 "--num_points", "256", "--i2p_saliency_temperature", "1e-3"])
    model = pretrain.build_model(cfg)  # 16 groups, ratio 0.6: 7 visible
    batch, views, patches = 3, cfg.num_views, model.tokenizer_2d.num_patches
    attention = torch.zeros(batch, views, patches)
    attention[:, :, 5] = 1.0  # all the class attention on patch 5, in every view
    patch_index = torch.randint(6, patches, (batch, views, 16))  # every centre elsewhere...
    favoured = torch.tensor([[1, 3, 4, 8, 9, 12, 15], [0, 2, 5, 6, 7, 10, 11], [9, 10, 11, 12, 13, 14, 15]])
    patch_index.scatter_(2, favoured[:, None].expand(-1, views, -1), 5)  # ...but these 7, under patch 5
    visible, masked, entropy = model.saliency_masking(attention, patch_index)
    assert torch.equal(visible, favoured) and masked.shape == (batch, 9)
    # Entropy of softmax(s / tau) over the 16 centres, by hand: 7 equal masses, the rest about e^-1000 = 0.
    assert entropy.item() == pytest.approx(torch.log(torch.tensor(7.0)).item() / torch.log(torch.tensor(16.0)).item())
    # Uniform attention: every centre equally likely, entropy 1, and the masks vary from draw to draw.
    draws = [model.saliency_masking(torch.full_like(attention, 0.01), patch_index) for _ in range(2)]
    assert draws[0][2].item() == pytest.approx(1.0) and not torch.equal(draws[0][0], draws[1][0])


def test_the_tokens_with_attention_equal_the_plain_tokens():
    cfg = pretrain.build_config(["--preset", "tiny", "--masking", "saliency"])
    tokenizer_2d = pretrain.build_model(cfg).tokenizer_2d
    images = torch.rand(2, 3, 3, cfg.image_size, cfg.image_size)
    tokens, attention = tokenizer_2d(images, return_attention=True)
    assert torch.allclose(tokens, tokenizer_2d(images), atol=1e-5)
    assert attention.shape == (2, 3, tokenizer_2d.num_patches) and bool((attention.sum(-1) <= 1 + 1e-6).all())


def test_kr_mae_with_saliency_masking_pretrains_and_logs_its_entropy(tmp_path):
    cfg = tiny_method(tmp_path, "kr_mae", "--masking", "saliency")
    pretrain.main(cfg)
    record = json.loads(open(tmp_path / "log.jsonl").read().splitlines()[-1])
    assert "masking_entropy" in record and record["loss_policy"] == 0.0  # logged; no policy to train
