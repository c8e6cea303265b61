"""Write tests/data/checkpoint_layout.json: what the checkpoints of this project hold, for test_checkpoint_layout.py.

For every --method at the tiny preset: the pre-training checkpoint's model state-dict names and shapes (in order),
its config as pretrain.py writes it, and the AdamW parameter groups (parameter names in order, and each group's
settings), whose order the optimizer state of a resumed run relies on; the same for a fine-tuned classifier
(ModelNet40 on the synthetic shapes) and a part segmenter. The file records a layout that checkpoints on disk
already have, so it is written once and changed only by a deliberate change of the layout:

    python tests/make_checkpoint_layout.py
"""
import dataclasses
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune  # noqa: E402
import pretrain  # noqa: E402
from util import optim, weights

METHODS = ("kr_mae", "point_mae", "joint_mae", "i2p_mae", "crossalignnet")
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checkpoint_layout.json")


def optimizer_layout(model, cfg):
    """The parameter names of each AdamW group, in order, and each group's settings without its parameters."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups = optim.make_optimizer(model, cfg, torch.device("cpu")).state_dict()["param_groups"]
    ordered = [name for group in optim.parameter_groups(model, cfg.weight_decay) for name in
               (names[id(parameter)] for parameter in group["params"])]
    sizes = [len(group["params"]) for group in groups]
    return {"groups": [ordered[:sizes[0]], ordered[sizes[0]:]],
            "settings": [{key: value for key, value in group.items() if key != "params"} for group in groups]}


def layout(model, state, cfg):
    return {"config": dataclasses.asdict(cfg),
            "model": [[name, list(value.shape), str(value.dtype)] for name, value in state.items()],
            "optimizer": optimizer_layout(model, cfg)}


def main():
    torch.manual_seed(0)
    manifest = {"pretrain": {}, "finetune": {}}
    for method in METHODS:
        cfg = pretrain.build_config(["--method", method, "--preset", "tiny"])
        model = pretrain.build_model(cfg)
        manifest["pretrain"][method] = layout(model, weights.trainable_state(model), cfg)
    for name, task in (("classifier", "modelnet40"), ("part_segmenter", "partseg")):
        cfg = finetune.build_config(["--task", task, "--preset", "tiny", "--data", "synthetic"])
        sets = finetune.build_datasets(cfg)
        model = finetune.build_model(cfg, sets)
        manifest["finetune"][name] = layout(model, model.state_dict(), cfg)
    text = json.dumps(manifest, indent=1)
    text = re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda match: "[" + " ".join(match.group(1).split()) + "]", text)
    with open(PATH, "w") as handle:  # one line per tensor
        handle.write(text + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
