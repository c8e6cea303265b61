"""Checkpoints already on disk keep loading: tests/data/checkpoint_layout.json records what a checkpoint of every
--method (tiny preset) and of a fine-tuned classifier and part segmenter holds (the model's tensor names, shapes and
dtypes, the config as the scripts write it, the AdamW parameter groups); tests/make_checkpoint_layout.py wrote it.
The models built by the code must have that layout, and a checkpoint in that layout must resume (pretrain.py
--resume, finetune.py --resume), load as a pre-trained encoder (finetune.py --checkpoint) and as a fine-tuned
model (--eval_only)."""
import dataclasses
import json
import os

import pytest
import torch

import downstream
import finetune
import pretrain
from util import optim, weights
from util.checkpoints import load_checkpoint, rng_state, save_checkpoint

torch.set_num_threads(2)

with open(os.path.join(os.path.dirname(__file__), "data", "checkpoint_layout.json")) as handle:
    LAYOUT = json.load(handle)
METHODS = ("kr_mae", "point_mae", "joint_mae", "i2p_mae", "crossalignnet")
FINETUNED = {"classifier": "modelnet40", "part_segmenter": "partseg"}


def built_layout(model, state, cfg):
    """What make_checkpoint_layout.py records, for a model built by the code as it is."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    optimizer = optim.make_optimizer(model, cfg, torch.device("cpu"))
    return {"model": [[name, list(value.shape), str(value.dtype)] for name, value in state.items()],
            "groups": [[names[id(parameter)] for parameter in group["params"]] for group in optimizer.param_groups]}


def config_of_record(cfg, recorded):
    """cfg's values of the recorded config's fields. Every recorded field must still be one (a saved config is read
    back as flags); a field added since is not in the record, and a checkpoint without it keeps its default."""
    values = dataclasses.asdict(cfg)
    return {name: values.get(name, "(no such field)") for name in recorded["config"]}


def pretrain_model(method):
    cfg = pretrain.build_config(["--method", method, "--preset", "tiny"])
    model = pretrain.build_model(cfg)
    return cfg, model, weights.trainable_state(model)


def finetuned_model(name):
    cfg = finetune.build_config(["--task", FINETUNED[name], "--preset", "tiny", "--data", "synthetic"])
    sets = finetune.build_datasets(dataclasses.replace(cfg, synthetic_train_size=16, synthetic_test_size=8))
    model = finetune.build_model(cfg, sets)
    return cfg, model, model.state_dict()


def checkpoint_in_recorded_layout(recorded, values, epoch, **config):
    """A checkpoint dict as the scripts write it, every name, shape and dtype from the record: the model's tensors
    (values of a freshly built model where it has the name, zeros otherwise), AdamW's state after one step in the
    recorded group order, the recorded config (with `config`'s changes) and the RNG state."""
    model = {name: (values[name].clone() if name in values else torch.zeros(shape, dtype=getattr(torch, dtype[6:])))
             for name, shape, dtype in recorded["model"]}
    shapes = {name: shape for name, shape, _ in recorded["model"]}
    ordered = [name for group in recorded["optimizer"]["groups"] for name in group]
    state = {index: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(shapes[name]),
                     "exp_avg_sq": torch.zeros(shapes[name])} for index, name in enumerate(ordered)}
    sizes = [len(group) for group in recorded["optimizer"]["groups"]]
    groups = [{**settings, "params": list(range(start, start + size))} for settings, start, size in
              zip(recorded["optimizer"]["settings"], (0, sizes[0]), sizes)]
    return {"model": model, "optimizer": {"state": state, "param_groups": groups},
            "config": {**recorded["config"], **config}, "epoch": epoch, "step": epoch + 1, "rng": rng_state()}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_the_recorded_checkpoint_layout(method):
    recorded = LAYOUT["pretrain"][method]
    cfg, model, state = pretrain_model(method)
    built = built_layout(model, state, cfg)
    assert built["model"] == recorded["model"]
    assert built["groups"] == recorded["optimizer"]["groups"]  # the optimizer state's order on resume
    assert config_of_record(cfg, recorded) == recorded["config"]  # the same flags, with the same tiny-preset values


@pytest.mark.parametrize("name", FINETUNED)
def test_the_fine_tuned_models_have_the_recorded_checkpoint_layout(name):
    recorded = LAYOUT["finetune"][name]
    cfg, model, state = finetuned_model(name)
    built = built_layout(model, state, cfg)
    assert built["model"] == recorded["model"] and built["groups"] == recorded["optimizer"]["groups"]
    assert config_of_record(cfg, recorded) == recorded["config"]


@pytest.mark.parametrize("method", METHODS)
def test_a_pretraining_checkpoint_in_the_recorded_layout_resumes_and_fine_tunes(tmp_path, method):
    _, _, values = pretrain_model(method)
    checkpoint = checkpoint_in_recorded_layout(LAYOUT["pretrain"][method], values, epoch=0,
                                               out_dir=str(tmp_path / "elsewhere"))
    path = str(tmp_path / "run" / "last.pth")
    os.makedirs(os.path.dirname(path))
    save_checkpoint(path, checkpoint)
    # --resume: the recorded config becomes the run's settings; the model, the optimizer and the RNG load; one epoch.
    cfg = pretrain.build_config(["--resume", path, "--epochs", "2", "--synthetic_size", "8", "--batch_size", "4",
                                 "--num_points", "256", "--num_groups", "16", "--picture_every", "0", "--no-progress"])
    assert cfg.method == method and cfg.out_dir == os.path.dirname(path)
    pretrain.main(cfg)
    resumed = load_checkpoint(path)
    assert resumed["epoch"] == 1 and list(resumed["model"]) == list(checkpoint["model"])
    # finetune.py --checkpoint (the resumed run's checkpoint): every tensor of the 3-D path loads, unchanged.
    fine_cfg = finetune.build_config(["--task", "modelnet40", "--preset", "tiny", "--data", "synthetic",
                                      "--checkpoint", path])
    classifier = downstream.Classifier(12, **downstream.backbone_arguments(fine_cfg))
    weights.load_pretrained(classifier, path, fine_cfg)
    encoder = [name for name in classifier.state_dict() if name.startswith(weights.ENCODER_PREFIXES)]
    assert len(encoder) > 20
    assert all(torch.equal(classifier.state_dict()[name], resumed["model"][name]) for name in encoder)


@pytest.mark.parametrize("name", FINETUNED)
def test_a_fine_tuned_checkpoint_in_the_recorded_layout_resumes_and_is_evaluated(tmp_path, name):
    cfg, _, values = finetuned_model(name)
    small = dict(synthetic_train_size=16, synthetic_test_size=8, num_points=256, num_groups=16, batch_size=8,
                 out_dir=str(tmp_path))
    metric = "instance_miou" if name == "part_segmenter" else "accuracy"
    checkpoint = checkpoint_in_recorded_layout(LAYOUT["finetune"][name], values, epoch=cfg.epochs - 2, **small)
    checkpoint.update(best={"epoch": 0, metric: 0.0}, last={metric: 0.0})
    flags = ["--task", FINETUNED[name], "--preset", "tiny", "--data", "synthetic", "--synthetic_train_size", "16",
             "--synthetic_test_size", "8", "--num_points", "256", "--num_groups", "16", "--batch_size", "8",
             "--vote_passes", "2", "--out_dir", str(tmp_path), "--no-progress"]
    label = finetune.task_label(finetune.build_config(flags))
    path = str(tmp_path / label / "seed0" / "last.pth")
    os.makedirs(os.path.dirname(path))
    save_checkpoint(path, checkpoint)
    # finetune.py --resume: the recorded config is the same run, the model and optimizer load, the last epoch runs.
    summary = finetune.main(finetune.build_config(flags + ["--resume"]))
    assert summary["num_runs"] == 1 and load_checkpoint(path)["epoch"] == cfg.epochs - 1
    # --eval_only --checkpoint: the recorded layout is a whole fine-tuned model, its task head included.
    eval_cfg = finetune.build_config(flags + ["--checkpoint", path])
    model = finetune.build_model(eval_cfg, finetune.build_datasets(eval_cfg), load_weights=False)
    assert weights.load_pretrained(model, path, eval_cfg, whole_model=True)  # True: the task head loaded too
    evaluated = finetune.main(finetune.build_config(flags + ["--eval_only", "--checkpoint", path]))
    assert f"last_{metric}" not in evaluated and f"{metric}" in evaluated
