"""Point-MAE's official checkpoints (docs/REFERENCE.md sec. 7): files built in the official layouts (its key names and
shapes, random values) load into this project's models tensor for tensor, give the logits of the same weights loaded
through our own layout, evaluate with --eval_only, start a pre-training with --init_from; wrong files are refused
with clear errors. And the FPS variant of Point-MAE's CUDA kernel against a hand-worked case and a slow version."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import downstream
import finetune
import kr_mae
import point_mae_checkpoints as pmc
import pretrain
from tokenizer import PointTokenizer, farthest_point_sample
from util import weights
from util.config import parse_config

torch.set_num_threads(2)

TINY = dict(dim=96, depth=4)  # pretrain.py's and finetune.py's tiny preset (4 heads)
SMALL = ["--num_points", "256", "--num_groups", "16", "--batch_size", "8", "--no-progress",
         "--synthetic_train_size", "16", "--synthetic_test_size", "12"]


def official_name(ours):
    """Our key -> the official key it comes from, written independently of point_mae_checkpoints' rules (a chain
    of plain replacements, in the pre-training layout), so that a wrong rule there cannot pass unnoticed."""
    name = ours.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2.") if "blocks." in ours else ours
    for old, new in [("tokenizer_3d.group_encoder.", "MAE_encoder.encoder."), ("encoder_pos.mlp.", "MAE_encoder.pos_embed."),
                     ("encoder.blocks.", "MAE_encoder.blocks.blocks."), ("encoder.norm.", "MAE_encoder.norm."),
                     ("decoder_pos.mlp.", "decoder_pos_embed."), ("decoder.blocks.", "MAE_decoder.blocks."),
                     ("decoder.norm.", "MAE_decoder.norm."), ("reconstruction_head.", "increase_dim.0.")]:
        if name.startswith(old):
            return new + name[len(old):]
    return name  # mask_token


def finetuned_official_name(ours, part_seg):
    """Our key -> the official classifier / part segmentation key (independent of the module, as above)."""
    if ours.startswith(("tokenizer_3d.", "encoder_pos.", "encoder.")):
        return official_name(ours)[len("MAE_encoder."):]
    table = {"cls_token": "cls_token", "cls_pos_embed": "cls_pos"}
    if ours in table:
        return table[ours]
    if not part_seg:
        return ours.replace("head.", "cls_head_finetune.", 1)
    module, index, rest = ours.split(".", 2)
    return {("category_embed", "0"): "label_conv.0", ("category_embed", "1"): "label_conv.1",
            ("propagation", "0"): "propagation_0.mlp_convs.0", ("propagation", "1"): "propagation_0.mlp_bns.0",
            ("propagation", "3"): "propagation_0.mlp_convs.1", ("propagation", "4"): "propagation_0.mlp_bns.1",
            ("head", "0"): "convs1", ("head", "1"): "bns1", ("head", "4"): "convs2", ("head", "5"): "bns2",
            ("head", "7"): "convs3"}[(module, index)] + "." + rest


def assert_equals_official(model_state, official, name_of):
    """Every tensor of ours equals the official tensor it maps from (1x1-conv weights squeezed)."""
    assert model_state
    for name, value in model_state.items():
        source = official[name_of(name)]
        source = source[:, :, 0] if source.ndim == value.ndim + 1 else source
        assert torch.equal(value, source), name


def save_official(tmp_path, state, container="base_model", name="official.pth"):
    """Saved as Point-MAE saves: the state dict beside optimizer, epoch and metrics (numpy scalars included)."""
    path = str(tmp_path / name)
    torch.save({container: state, "optimizer": {}, "epoch": 299, "metrics": {"acc": np.float64(93.8)}}, path)
    return path


# ---------------------------------------------------------------- the layouts

def test_official_pretraining_file_maps_onto_point_mae_mode_tensor_for_tensor(tmp_path):
    official = pmc.official_pretrain_state(prefix="module.", generator=torch.Generator().manual_seed(0))
    assert len(official) == 209  # docs/REFERENCE.md sec. 7, paper size
    cfg = dataclasses.replace(pretrain.Config(), use_2d=False, masking="random")
    model = kr_mae.KRMAE(cfg)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    weights.initialise_from(model, save_official(tmp_path, official))
    state = model.state_dict()
    assert set(state) == set(before)  # and every one of them was replaced:
    assert not any(torch.equal(state[name], before[name]) for name in state if not name.endswith("batches_tracked"))
    unprefixed = {name[len("module."):]: value for name, value in official.items()}
    assert_equals_official(state, unprefixed, official_name)


@pytest.mark.parametrize("part_seg", [False, True])
def test_official_finetuned_model_loads_and_gives_the_logits_of_our_own_layout(tmp_path, part_seg):
    generator = torch.Generator().manual_seed(1)
    classes = 50 if part_seg else 12
    official = pmc.official_finetuned_state(classes, part_seg=part_seg, generator=generator, **TINY)
    container = "model_state_dict" if part_seg else "base_model"
    cfg = finetune.build_config(["--preset", "tiny", "--task", "partseg" if part_seg else "modelnet40"])
    build = ((lambda: downstream.PartSegmenter(16, 50, **downstream.backbone_arguments(cfg))) if part_seg else
             (lambda: downstream.Classifier(12, **downstream.backbone_arguments(cfg))))
    model = build()
    assert weights.load_pretrained(model, save_official(tmp_path, official, container), cfg, whole_model=True)
    assert_equals_official(model.state_dict(), official, lambda name: finetuned_official_name(name, part_seg))
    # The same weights in our own layout (named by the test's own table), through the same loader.
    reference = build()
    ours = {name: official[finetuned_official_name(name, part_seg)] for name in reference.state_dict()}
    ours = {name: value[:, :, 0] if value.ndim == reference.state_dict()[name].ndim + 1 else value
            for name, value in ours.items()}
    path = str(tmp_path / "ours.pth")
    pretrain.save_checkpoint(path, {"model": ours, "config": dataclasses.asdict(cfg)})
    weights.load_pretrained(reference, path, cfg, whole_model=True)
    model.eval(), reference.eval()
    points = torch.randn(3, 512, 3, generator=generator)
    with torch.no_grad():
        inputs = (points, torch.tensor([0, 5, 15])) if part_seg else (points,)
        logits, expected = model(*inputs), reference(*inputs)
    assert logits.shape == ((3, 512, 50) if part_seg else (3, 12))
    assert torch.equal(logits, expected)


def test_fine_tuning_from_an_official_classifier_of_other_classes_trains_a_new_head(tmp_path, capsys):
    official = pmc.official_finetuned_state(40, generator=torch.Generator().manual_seed(2), **TINY)
    cfg = finetune.build_config(["--preset", "tiny", "--task", "modelnet40"])
    model = downstream.Classifier(12, **downstream.backbone_arguments(cfg))
    head_before = model.head[0].weight.clone()
    assert not weights.load_pretrained(model, save_official(tmp_path, official), cfg)
    assert "Point-MAE classifier layout" in capsys.readouterr().out
    assert torch.equal(model.encoder.blocks[3].mlp[0].weight, official["blocks.blocks.3.mlp.fc1.weight"])
    assert torch.equal(model.head[0].weight, head_before)  # (256, 192) fits, but the head loads whole or not at all
    with pytest.raises(ValueError, match=r"--eval_only needs a model fine-tuned for --task modelnet40.*"
                                         r"head.8.weight \(40, 256\) there, \(12, 256\) here"):
        weights.load_pretrained(model, save_official(tmp_path, official), cfg, whole_model=True)


def test_wrong_layouts_and_shapes_are_clear_errors(tmp_path):
    generator = torch.Generator().manual_seed(3)
    cfg = finetune.build_config(["--preset", "tiny", "--task", "modelnet40"])
    model = downstream.Classifier(12, **downstream.backbone_arguments(cfg))
    paper_size = save_official(tmp_path, pmc.official_pretrain_state(generator=generator), name="paper.pth")
    with pytest.raises(ValueError, match=r"\(Point-MAE pre-training layout\) does not fit this model: parameter "
                                         r"\S+ has shape \(384, 512, 1\) in the checkpoint but \(96, 512, 1\) here"):
        weights.load_pretrained(model, paper_size, cfg)
    tiny_pretrain = save_official(tmp_path, pmc.official_pretrain_state(generator=generator, decoder_depth=2,
                                                                        group_size=16, **TINY), name="tiny.pth")
    with pytest.raises(ValueError, match="no task head .*a pre-training checkpoint"):
        weights.load_pretrained(model, tiny_pretrain, cfg, whole_model=True)
    # A key no rule knows, and a 1x1 convolution that is not one.
    state = pmc.official_finetuned_state(12, generator=generator, **TINY)
    with pytest.raises(ValueError, match=r"match nothing in its layout, e.g. \['cls_head_finetune_extra.weight'\]"):
        weights.load_pretrained(model, save_official(tmp_path, {**state, "cls_head_finetune_extra.weight":
                                                                 torch.zeros(1)}, name="extra.pth"), cfg)
    broken = pmc.official_pretrain_state(generator=generator, decoder_depth=2, group_size=16, **TINY)
    broken["increase_dim.0.weight"] = broken["increase_dim.0.weight"][:, :, 0]
    with pytest.raises(ValueError, match=r"increase_dim.0.weight.*\(out, in, 1\); found shape \(48, 96\)"):
        weights.load_pretrained(model, save_official(tmp_path, broken, name="broken.pth"), cfg)
    with pytest.raises(ValueError, match=r"holds no state dict.*found keys \['epoch', 'weights'\]"):
        path = str(tmp_path / "other.pth")
        torch.save({"weights": [1, 2], "epoch": 3}, path)
        weights.load_pretrained(model, path, cfg)
    # --init_from: a fine-tuned file has no decoder; another group size does not fit the reconstruction head.
    pre_cfg = parse_config(pretrain.Config, ["--preset", "tiny", "--no-use_2d", "--masking", "random"])
    with pytest.raises(ValueError, match="is a Point-MAE classifier checkpoint; it needs a pre-training one"):
        weights.initialise_from(kr_mae.KRMAE(pre_cfg), save_official(tmp_path, state, name="classifier.pth"))
    with pytest.raises(ValueError, match=r"other shapes: \['reconstruction_head.weight \(48, 96\) there, "
                                         r"\(24, 96\) here'"):
        weights.initialise_from(kr_mae.KRMAE(dataclasses.replace(pre_cfg, group_size=8)), tiny_pretrain)


# ---------------------------------------------------------------- --init_from and --eval_only end to end

def test_init_from_starts_kr_mae_from_point_mae_and_leaves_the_new_parts_fresh(tmp_path, capsys):
    official = pmc.official_pretrain_state(generator=torch.Generator().manual_seed(4), decoder_depth=2,
                                           group_size=16, **TINY)
    path = save_official(tmp_path, official)
    cfg = parse_config(pretrain.Config, ["--preset", "tiny"])  # KR-MAE: 2-D branch, RVS, RM
    torch.manual_seed(0)
    model = kr_mae.KRMAE(cfg)
    fresh_before = {name: value.clone() for name, value in model.state_dict().items()
                    if name.startswith(("masking.", "selector.", "tokenizer_2d."))}
    loaded = weights.initialise_from(model, path)
    assert "starting fresh: ['masking', 'selector', 'tokenizer_2d']" in capsys.readouterr().out
    state = model.state_dict()
    assert_equals_official({name: state[name] for name in loaded}, official, official_name)
    assert len(loaded) == len(official)
    assert all(torch.equal(state[name], value) for name, value in fresh_before.items())
    # Through main: a run with a learning rate too small to move the weights still holds the official ones.
    run = parse_config(pretrain.Config, ["--preset", "tiny", "--no-use_2d", "--masking", "random",
                                                  "--epochs", "1", "--synthetic_size", "32", "--lr", "1e-12",
                                                  "--min_lr", "0", "--picture_every", "0", "--no-progress",
                                                  "--init_from", path, "--out_dir", str(tmp_path / "run")])
    trained = dict(pretrain.main(run).named_parameters())
    for name in ("encoder.blocks.3.mlp.0.weight", "decoder.blocks.1.attn.qkv.weight", "reconstruction_head.weight"):
        source = official[official_name(name)]
        assert torch.allclose(trained[name].detach(), source.reshape(trained[name].shape), atol=1e-8), name


def test_eval_only_reproduces_the_last_epoch_of_a_fine_tuning_run(tmp_path):
    flags = ["--preset", "tiny", *SMALL, "--task", "modelnet40", "--data", "synthetic", "--epochs", "2",
             "--vote", "--vote_passes", "2"]
    summary = finetune.main(finetune.build_config([*flags, "--out_dir", str(tmp_path / "runs")]))
    run_dir = tmp_path / "runs" / "modelnet40_synthetic" / "seed0"
    last = [json.loads(line) for line in open(run_dir / "log.jsonl")][-1]
    evaluated = finetune.main(finetune.build_config([*flags, "--out_dir", str(tmp_path / "runs"), "--eval_only",
                                                     "--checkpoint", str(run_dir / "last.pth")]))
    for key in ("accuracy", "class_accuracy"):
        assert evaluated[key]["mean"] == last[key]
        assert evaluated[f"voted_{key}"]["mean"] == summary[f"voted_{key}"]["mean"]
    written = json.load(open(tmp_path / "runs" / "modelnet40_synthetic_eval" / "summary.json"))
    assert written["eval_only"] and written["accuracy"] == evaluated["accuracy"]
    with pytest.raises(ValueError, match="fine-tuned with other settings than this command: --num_groups 16 there, "
                                         "32 here"):
        finetune.main(finetune.build_config([*flags, "--num_groups", "32", "--out_dir", str(tmp_path / "runs"),
                                             "--eval_only", "--checkpoint", str(run_dir / "last.pth")]))


def test_eval_only_of_an_official_classifier(tmp_path):
    generator = torch.Generator().manual_seed(5)
    path = save_official(tmp_path, pmc.official_finetuned_state(12, generator=generator, prefix="module.", **TINY))
    cfg = finetune.build_config(["--preset", "tiny", *SMALL, "--task", "modelnet40", "--data", "synthetic",
                                 "--eval_only", "--checkpoint", path, "--out_dir", str(tmp_path / "runs")])
    summary = finetune.main(cfg)
    # The same number by hand: the loaded model on the FPS test points of every test shape.
    sets = finetune.build_datasets(cfg)
    model = finetune.build_model(cfg, sets, whole_model=True).eval()
    points = torch.stack([sets["test"][i][0] for i in range(len(sets["test"]))])
    labels = torch.tensor([sets["test"][i][1] for i in range(len(sets["test"]))])
    with torch.no_grad():
        predicted = model(downstream.test_points(points, cfg.num_points)).argmax(dim=1)
    assert summary["accuracy"]["mean"] == pytest.approx(100 * (predicted == labels).float().mean().item())
    with pytest.raises(ValueError, match="--eval_only tests a fine-tuned model: pass it with --checkpoint"):
        finetune.main(dataclasses.replace(cfg, checkpoint=""))


# ---------------------------------------------------------------- FPS as Point-MAE's CUDA kernel

def slow_kernel_fps(points, num_samples):
    """Point-MAE's CUDA FPS kernel, one point at a time: start at 0; a point with squared norm <= 1e-3 is never a
    candidate; the candidate with the largest distance to the chosen set wins (lowest index on ties); none: 0."""
    chosen, distance = [0], [float("inf")] * len(points)
    for _ in range(num_samples - 1):
        last = points[chosen[-1]]
        best, best_index = -1.0, 0
        for index, point in enumerate(points):
            if float((point ** 2).sum()) <= 1e-3:
                continue
            distance[index] = min(distance[index], float(((point - last) ** 2).sum()))
            if distance[index] > best:
                best, best_index = distance[index], index
        chosen.append(best_index)
    return chosen


def test_fps_skipping_points_at_the_origin_hand_worked_case():
    # From point 0 = (1, 0, 0): point 1 (squared norm 4e-4) is the farthest (1.0404) but the kernel skips it, so
    # point 2 (0.5) comes next, then point 3 (0.29); then every candidate is chosen (distance 0): point 0 again.
    points = torch.tensor([[[1.0, 0, 0], [-0.02, 0, 0], [0.5, 0.5, 0], [0.3, 0, 0]]])
    assert farthest_point_sample(points, 4).tolist() == [[0, 1, 2, 3]]
    assert farthest_point_sample(points, 4, skip_near_origin=True).tolist() == [[0, 2, 3, 0]]
    assert slow_kernel_fps(points[0], 4) == [0, 2, 3, 0]


def test_fps_skipping_points_at_the_origin_matches_the_slow_kernel_and_reaches_the_tokenizer():
    generator = torch.Generator().manual_seed(6)
    points = torch.nn.functional.normalize(torch.randn(3, 200, 3, generator=generator), dim=2)  # a unit sphere
    points[:, ::7] *= 0.01  # and 29 points per cloud at its centre, squared norm 1e-4: plain FPS picks one early
    points[:, 0] = torch.tensor([0.6, 0.0, 0.8])
    fast = farthest_point_sample(points, 40, skip_near_origin=True)
    assert [fast[b].tolist() for b in range(3)] == [slow_kernel_fps(points[b], 40) for b in range(3)]
    assert not torch.equal(fast, farthest_point_sample(points, 40))  # the default still picks them
    tokenizer = PointTokenizer(num_groups=40, group_size=8, dim=32, skip_near_origin=True).eval()
    centers = tokenizer(points)[1]  # (B, G, 3)
    assert torch.equal(centers, torch.stack([points[b, fast[b]] for b in range(3)]))
    assert bool(((centers[:, 1:] ** 2).sum(-1) > 1e-3).all())
    cfg = parse_config(pretrain.Config, ["--preset", "tiny", "--fps_skip_near_origin"])
    assert kr_mae.KRMAE(cfg).tokenizer_3d.skip_near_origin
    fine_cfg = finetune.build_config(["--preset", "tiny", "--fps_skip_near_origin"])
    assert downstream.PointEncoder(**downstream.backbone_arguments(fine_cfg)).tokenizer_3d.skip_near_origin


# ---------------------------------------------------------------- --export: our pre-training -> the official layout

def save_ours(tmp_path, flags, name="last.pth"):
    """A pre-training checkpoint as pretrain.py writes it (random weights, a BatchNorm's statistics moved)."""
    torch.manual_seed(7)
    cfg = pretrain.build_config(flags)
    model = pretrain.build_model(cfg)
    state = model.state_dict()
    for key in state:
        if key.endswith("running_mean"):
            state[key] += torch.randn(state[key].shape)  # not the fresh zeros: every tensor must travel
    path = str(tmp_path / name)
    pretrain.save_checkpoint(path, {"model": state, "config": dataclasses.asdict(cfg), "epoch": 4})
    return path, state


def test_export_round_trips_and_has_exactly_the_official_pre_training_keys(tmp_path, capsys):
    path, state = save_ours(tmp_path, ["--preset", "tiny"])  # KR-MAE: 2-D branch, RVS and RM as well
    exported = pmc.export_file(path, str(tmp_path / "pretrain_pointmae.pth"))
    assert "left out, no place in Point-MAE's model: ['masking', 'selector', 'tokenizer_2d']" in capsys.readouterr().out
    written = torch.load(tmp_path / "pretrain_pointmae.pth", weights_only=True)
    assert written["epoch"] == 4 and written["metrics"] == {}
    reference = pmc.official_pretrain_state(decoder_depth=2, group_size=16, **TINY)  # docs/REFERENCE.md sec. 7's layout
    assert list(written["base_model"]) == list(reference) == list(exported)
    assert all(written["base_model"][name].shape == value.shape for name, value in reference.items())
    assert written["base_model"]["increase_dim.0.weight"].shape == (48, 96, 1)  # the 1x1 convolution restored
    # Back through the official-layout reader: every tensor equals the one exported, under its own name.
    layout, back, _ = pmc.project_state(written, "exported")
    assert layout == pmc.PRETRAIN
    kept = {name for name in state if name.startswith(weights.POINT_MAE_PREFIXES)}
    assert set(back) == kept
    assert all(torch.equal(back[name], state[name]) for name in kept)
    # The same names, written independently of the module's rules (official_name above).
    assert_equals_official({name: state[name] for name in kept}, written["base_model"], official_name)


def test_export_at_paper_size_gives_the_209_tensors_of_the_official_file():
    state = kr_mae.KRMAE(pretrain.build_config(["--method", "point_mae"])).state_dict()
    written = pmc.export_pretrain_state(state)[0]
    official = pmc.official_pretrain_state(meta=True)  # docs/REFERENCE.md sec. 7 at paper size
    assert len(written) == 209 and list(written) == list(official)
    assert all(written[name].shape == value.shape for name, value in official.items())


def test_export_refuses_models_without_point_mae_s_decoder(tmp_path):
    for method, message in (("joint_mae", r"does not have the shape of Point-MAE's pre-training model .*missing "
                                          r"\['MAE_decoder.norm.bias', 'MAE_decoder.norm.weight', 'mask_token'\]"),
                            ("crossalignnet", r"lacks the 3-D encoder's encoder.norm.weight or the reconstruction "
                                              r"head's reconstruction_head.weight")):
        path, _ = save_ours(tmp_path, ["--method", method, "--preset", "tiny"], f"{method}.pth")
        with pytest.raises(ValueError, match=message):
            pmc.export_file(path, str(tmp_path / "out.pth"))
    classifier = downstream.Classifier(12, **downstream.backbone_arguments(finetune.build_config(["--preset", "tiny"])))
    path = str(tmp_path / "finetuned.pth")
    pretrain.save_checkpoint(path, {"model": classifier.state_dict(), "config": {}})
    with pytest.raises(ValueError, match="lacks the 3-D encoder's encoder.norm.weight or the reconstruction head"):
        pmc.export_file(path, str(tmp_path / "out.pth"))
    official = str(tmp_path / "official.pth")
    torch.save({"base_model": pmc.official_pretrain_state(decoder_depth=2, group_size=16, **TINY)}, official)
    with pytest.raises(ValueError, match="is already in the Point-MAE pre-training layout"):
        pmc.export_file(official, str(tmp_path / "out.pth"))
    with pytest.raises(ValueError, match=r"holds more than tensors.*numpy.*it was not loaded"):
        pmc.export_file(save_official(tmp_path, {"x": torch.zeros(1)}, name="numpy.pth"), str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()


# ---------------------------------------------------------------- what load_pretrained and --eval_only say

def test_svm_encoder_from_a_pre_training_file_is_not_said_to_load_a_task_head(tmp_path, capsys):
    path, _ = save_ours(tmp_path, ["--preset", "tiny"])
    cfg = finetune.build_config(["--preset", "tiny", "--task", "svm"])
    model = downstream.PointEncoder(**downstream.backbone_arguments(cfg))  # what run_svm builds: no head
    assert weights.load_pretrained(model, path, cfg) is False
    out = capsys.readouterr().out
    assert "the 3-D path alone (this model has no task head)" in out and "fine-tuned with" not in out


def test_eval_only_of_an_official_part_segmenter_without_shapenetpart_refuses_the_synthetic_fallback(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here
    path = save_official(tmp_path, pmc.official_finetuned_state(50, part_seg=True, **TINY), "model_state_dict",
                         name="part_seg.pth")
    cfg = finetune.build_config(["--preset", "tiny", "--task", "partseg", "--eval_only", "--checkpoint", path])
    with pytest.raises(FileNotFoundError, match=r"--eval_only tests --checkpoint .*part_seg.pth.* no data set at "
                                                r"'data/shapenetcore_partanno_segmentation_benchmark_v0_normal', and "
                                                r"the fallback to the built-in synthetic shapes is refused"):
        finetune.main(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part_seg.pth"]  # nothing run, nothing written
