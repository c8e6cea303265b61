"""pretrain.py --compile: the whole model (forward and backward) through torch.compile gives the losses of the eager
model in float32 on the CPU, and its checkpoint is the eager model's (no `_orig_mod.` names).

One test, because compiling is slow here (about 90 s for this small model on 2 cores with a cold cache). It also
guards against a known failure: torch 2.13's CPU backend miscompiled the farthest point sampling loop when it wrote
its picks into a tensor in place (wrong centres from the second pick on, for 32 groups or more; torch 2.14.1 compiles
that form correctly too); FPS collects its picks in a list. The model here has 32 groups, so such a failure
would show as different losses: the comparison is tight enough that different masks (compiled code drawing its own
random numbers) fail it.
"""
import json

import pytest
import torch
import torch._inductor.config

import pretrain
from util import weights
from util.checkpoints import load_checkpoint

torch.set_num_threads(2)

# The tiny preset made smaller still (1-block towers and encoder, 256 points) but with 32 groups (see above).
SMALL = ["--preset", "tiny", "--depth", "1", "--decoder_depth", "1", "--clip_random_tower", "32,1,2",
         "--num_points", "256", "--num_groups", "32", "--synthetic_size", "8", "--batch_size", "4", "--epochs", "2",
         "--warmup_epochs", "0", "--picture_every", "0", "--no-progress"]


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_compiled_training_gives_the_eager_losses_and_an_eager_checkpoint(tmp_path, monkeypatch):
    # Compiled code draws its random numbers (masks, Gumbel noise, DropPath) with its own generator unless told to
    # call the eager random functions: then both runs draw the same numbers from the same seeded stream.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    pretrain.main(pretrain.build_config(SMALL + ["--out_dir", str(tmp_path / "eager")]))
    pretrain.main(pretrain.build_config(SMALL + ["--out_dir", str(tmp_path / "compiled"), "--compile"]))
    eager, compiled = read_log(tmp_path / "eager" / "log.jsonl"), read_log(tmp_path / "compiled" / "log.jsonl")
    # 2 epochs of 2 steps: the second epoch's losses come after two AdamW steps on the compiled gradients.
    assert [record["epoch"] for record in compiled] == [0, 1]
    terms = [name for name in eager[0] if name.startswith("loss")]
    assert {"loss", "loss_rec", "loss_policy"} <= set(terms)
    for before, after in zip(eager, compiled):
        for name in terms:  # measured: equal to about 1e-7 relative (fused kernels round differently)
            assert abs(after[name] - before[name]) <= 1e-5 * abs(before[name]) + 1e-7, (name, before, after)
    # The checkpoint holds the eager model's names and loads into an eager model.
    state = load_checkpoint(str(tmp_path / "compiled" / "last.pth"))["model"]
    assert not [name for name in state if "_orig_mod" in name]
    cfg = pretrain.build_config(SMALL)
    model = pretrain.build_model(cfg)
    weights.load_trainable_state(model, state)
    reference = load_checkpoint(str(tmp_path / "eager" / "last.pth"))["model"]
    assert state.keys() == reference.keys()


@pytest.mark.parametrize("method", pretrain.METHODS)
def test_every_method_traces_as_one_graph_for_compile(method):
    # One graph: torch.compile fuses across the whole step and CUDA graphs can capture it. A branch on a tensor's
    # values (the stage modules' finite checks did that) would split it and wait for the GPU at every step.
    torch._dynamo.reset()
    cfg = pretrain.build_config(SMALL + ["--method", method])
    model = pretrain.build_model(cfg)
    explanation = torch._dynamo.explain(model)(torch.randn(2, cfg.num_points, 3))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
