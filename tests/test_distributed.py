"""pretrain.py under several processes (torchrun: DistributedDataParallel), on the CPU with the gloo backend.

How two processes are compared with one. The ranks are started with torch.multiprocessing.spawn and given the
environment torchrun gives (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR 127.0.0.1, a free MASTER_PORT), then each
calls pretrain.main, as `torchrun --nproc_per_node 2 pretrain.py` does. A 2-rank run and a 1-process run of the same
global batch take the same shapes at every step (rank_batches) but draw different random numbers, so the step is
made deterministic given the data: Point-MAE (--method point_mae, no 2-D branch), no augmentation (--no-augment), no
stochastic depth (--drop_path 0), and, test-only, the random masking replaced by one fixed mask for every shape
(`same_mask_for_every_shape`). What is then left to differ is the order of float32 sums (gradients averaged by
all-reduce, BatchNorm statistics summed per rank, one thread per rank against two). Measured here: the losses of
the 4 steps agree to 2e-7 (relative), so they are compared to 1e-5; without SyncBatchNorm they differ by 1.5e-3 from
the second step on, with both ranks taking the same shapes by 1e-2. After 4 AdamW steps the weights agree to 1.3e-5,
so they are compared to 1e-4 (a tenth of one step: lr 1e-3); broken as above they differ by 5e-3. Except the
parameters a BatchNorm makes irrelevant (BATCHNORM_NULL_SPACE): they are not compared.
finetune.py is made deterministic the same way (patch_finetune: no random points, augmentation or dropout). Its
epoch losses agree to 3e-6 (compared to 1e-4; without SyncBatchNorm, whose effect is larger in the head's BatchNorm
over 4 shapes instead of 8, 3e-2); the final classifiers compute logits (of size up to 0.9) that agree to 1.3e-4
(compared to 1e-3; without SyncBatchNorm 0.7), and their BatchNorm running variances agree to 1.5e-6 (compared to
1e-4; without SyncBatchNorm 2e-2).
"""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import datasets
import downstream
import finetune
import kr_mae
from masking import random_masking
import pretrain
from util import distributed
from util.checkpoints import load_checkpoint

torch.set_num_threads(2)

LOSS_RELATIVE, WEIGHT_ABSOLUTE = 1e-5, 1e-4  # see the module docstring
FINE_LOSS_RELATIVE, FINE_LOGIT_ABSOLUTE = 1e-4, 1e-3  # see the module docstring
# A BatchNorm subtracts any constant its input is shifted by, so in exact arithmetic these get no gradient: the
# biases of the convolutions before the mini-PointNet's two BatchNorms (first_conv.3 reaches the second one through
# second_conv.0, a linear map). Their gradient is float noise of ~1e-10, which AdamW, dividing by the gradient's own
# size, turns into steps of ~lr in any direction, in one run as in the other; the running means follow them.
BATCHNORM_NULL_SPACE = tuple(f"tokenizer_3d.group_encoder.{name}" for name in (
    "first_conv.0.bias", "first_conv.3.bias", "second_conv.0.bias", "first_conv.1.running_mean",
    "second_conv.1.running_mean"))


def config(out_dir, *flags):
    """Point-MAE on the tiny preset with 16 shapes of 128 points, a global batch of 8 (2 steps an epoch), 2 epochs,
    nothing random but the (test-fixed) masks; the CPU, whatever the machine has."""
    return pretrain.build_config(["--method", "point_mae", "--preset", "tiny", "--num_points", "128",
                                  "--num_groups", "8", "--synthetic_size", "16", "--batch_size", "8", "--epochs", "2",
                                  "--no-augment", "--drop_path", "0", "--picture_every", "0", "--no-progress",
                                  "--device", "cpu", "--out_dir", str(out_dir), *flags])


# ---------------------------------------------------------------- test-only: fixed masks, the loss of every step

def same_mask_for_every_shape(batch_size, num_groups, mask_ratio, device=None, generator=None):
    """kr_mae.random_masking's stand-in: the mask that a generator seeded with 0 draws for one shape, for every
    shape of every step, so the masks depend neither on the random stream nor on how the batch is split."""
    visible, masked = random_masking(1, num_groups, mask_ratio, device, torch.Generator().manual_seed(0))
    return visible.expand(batch_size, -1), masked.expand(batch_size, -1)  # (B, Gv), (B, Gm)


def patch_pretrain(patch, trace):
    """Fix the masks and append the reconstruction loss of every step (this process's batch) to `trace`; `patch` is
    a pytest MonkeyPatch."""
    chamfer_distance = kr_mae.chamfer_distance

    def recorded(predicted, target):
        errors = chamfer_distance(predicted, target)  # (M,), M = every masked group of this process's batch
        trace.append(errors.mean().item())  # = loss_rec of the step: the picture is off, so one call a step
        return errors

    patch.setattr(kr_mae, "random_masking", same_mask_for_every_shape)
    patch.setattr(kr_mae, "chamfer_distance", recorded)


def patch_finetune(patch, trace):
    """Make a fine-tuning step deterministic given the data: the first num_points stored points instead of a random
    FPS and subset, no scale-and-translate, no dropout in the head (and --drop_path 0). `trace` stays empty."""
    build_model = finetune.build_model

    def without_dropout(*args, **kwargs):
        model = build_model(*args, **kwargs)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
        return model

    patch.setattr(finetune, "training_points",
                  lambda points, num_points, skip_near_origin=False: points[:, :num_points])  # (B, N, 3)
    patch.setattr(datasets, "scale_and_translate", lambda points, generator=None: points)
    patch.setattr(finetune, "build_model", without_dropout)


SCRIPTS = {"pretrain": (pretrain, patch_pretrain), "finetune": (finetune, patch_finetune)}


class SimulatedKill(Exception):
    pass


def killed_at(epoch_to_kill):
    """epoch_order's stand-in (pretrain.py's, which finetune.py imports) that stops the run as the epoch
    `epoch_to_kill` starts."""
    epoch_order = pretrain.epoch_order

    def order(num_samples, seed, epoch):
        if epoch == epoch_to_kill:
            raise SimulatedKill(f"killed at the start of epoch {epoch}")
        return epoch_order(num_samples, seed, epoch)

    return order


def rank_main(rank, world_size, port, runs):
    """One spawned rank: torchrun's environment, then for each (script, cfg, kill_epoch, trace_prefix) of `runs` in
    turn that script's main, made deterministic (the process group joined by the first run stays for the others);
    this rank's losses of a pretrain.py run go to <trace_prefix>.rank<r>.json."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    for script, cfg, kill_epoch, trace_prefix in runs:
        module, patch_script = SCRIPTS[script]
        trace = []
        with pytest.MonkeyPatch.context() as patch:
            patch_script(patch, trace)
            if kill_epoch is not None:
                patch.setattr(module, "epoch_order", killed_at(kill_epoch))
            try:
                module.main(cfg)
            except SimulatedKill:
                pass  # both ranks stop at the same point, before any collective of that epoch
        with open(f"{trace_prefix}.rank{rank}.json", "w") as handle:
            json.dump(trace, handle)
    # Leave the process group before the interpreter exits: a gloo group still alive at exit can abort the process
    # ("terminate called without an active exception", SIGABRT) after its work is done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_two_ranks(runs):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(rank_main, args=(2, port, runs), nprocs=2, join=True)


def read_trace(trace_prefix, world_size=2):
    """The global batch's loss of every step: the mean of the ranks' losses (each rank's is the mean over its
    equal share of the batch)."""
    traces = [json.load(open(f"{trace_prefix}.rank{rank}.json")) for rank in range(world_size)]
    return [sum(step) / world_size for step in zip(*traces)]


def read_log(path):
    return [json.loads(line) for line in open(path)]


def assert_same_weights(state, expected_state):
    assert state.keys() == expected_state.keys()  # the un-wrapped names: no "module." of DDP
    compared = [name for name in expected_state if name not in BATCHNORM_NULL_SPACE]
    assert len(compared) == len(expected_state) - len(BATCHNORM_NULL_SPACE)  # those names exist
    for name in compared:
        assert torch.allclose(state[name].float(), expected_state[name].float(), rtol=0, atol=WEIGHT_ABSOLUTE), name


def checkpoint_weights(path):
    return load_checkpoint(str(path))["model"]


# ---------------------------------------------------------------- the tests

def test_rank_batches_split_every_global_batch_in_rank_order():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1)).tolist()
    assert distributed.rank_batches(order, 8, 0, 1) == order[:16]  # one process: the whole batches, the rest dropped
    for world_size in (2, 4):
        shares = [distributed.rank_batches(order, 8, rank, world_size) for rank in range(world_size)]
        local = 8 // world_size
        for step in range(2):  # the ranks' step batches, in rank order, are the global batch of that step
            joined = [index for share in shares for index in share[step * local:(step + 1) * local]]
            assert joined == order[step * 8:(step + 1) * 8]
        assert all(len(share) == 2 * local for share in shares)


def test_a_batch_size_the_processes_cannot_share_evenly_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"^--batch_size 8 is the global batch, split evenly over the 3 processes"):
        pretrain.main(config(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_two_processes_train_as_one_process_on_the_same_global_batch(tmp_path, monkeypatch, capfd):
    one_trace = []
    with monkeypatch.context() as patch:
        patch_pretrain(patch, one_trace)
        one = pretrain.main(config(tmp_path / "one"))
    one_log = read_log(tmp_path / "one" / "log.jsonl")
    capfd.readouterr()
    run_two_ranks([("pretrain", config(tmp_path / "two"), None, str(tmp_path / "two_trace"))])
    printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith('{"epoch"')]

    two_trace = read_trace(str(tmp_path / "two_trace"))
    assert len(one_trace) == len(two_trace) == 4  # 2 epochs of 2 steps
    assert two_trace == pytest.approx(one_trace, rel=LOSS_RELATIVE)
    assert one_trace[-1] < one_trace[0]  # it trains: the comparison is not of two constant traces
    # Rank 0 alone logs and prints: one line an epoch, with the means over both ranks (all-reduced sums).
    two_log = read_log(tmp_path / "two" / "log.jsonl")
    assert [record["epoch"] for record in two_log] == [0, 1] and len(printed) == 2
    for one_record, two_record in zip(one_log, two_log):
        assert two_record["loss_rec"] == pytest.approx(one_record["loss_rec"], rel=LOSS_RELATIVE)
        assert two_record["step"] == one_record["step"] and two_record["lr"] == one_record["lr"]
    # The checkpoint holds the un-wrapped model, its weights (and BatchNorm running statistics) those of one process.
    assert_same_weights(checkpoint_weights(tmp_path / "two" / "last.pth"), one.state_dict())


def test_resume_across_a_change_of_world_size(tmp_path, monkeypatch):
    # The reference: one process, two epochs without a stop.
    with monkeypatch.context() as patch:
        patch_pretrain(patch, [])
        straight = pretrain.main(config(tmp_path / "straight")).state_dict()
        # One process killed at the start of epoch 1; two ranks resume it (below).
        patch.setattr(pretrain, "epoch_order", killed_at(1))
        with pytest.raises(SimulatedKill):
            pretrain.main(config(tmp_path / "one_then_two"))
    resume_one = str(tmp_path / "one_then_two" / "last.pth")
    # Two ranks: resume that run; and start another, killed at the start of epoch 1, that one process resumes.
    run_two_ranks([("pretrain", pretrain.build_config(["--resume", resume_one]), None, str(tmp_path / "resumed")),
                   ("pretrain", config(tmp_path / "two_then_one"), 1, str(tmp_path / "killed"))])
    assert_same_weights(checkpoint_weights(resume_one), straight)
    assert [record["epoch"] for record in read_log(tmp_path / "one_then_two" / "log.jsonl")] == [0, 1]
    assert load_checkpoint(str(tmp_path / "two_then_one" / "last.pth"))["epoch"] == 0
    with monkeypatch.context() as patch:
        patch_pretrain(patch, [])
        resumed = pretrain.main(pretrain.build_config(["--resume", str(tmp_path / "two_then_one" / "last.pth")]))
    assert_same_weights(resumed.state_dict(), straight)


def test_a_returned_term_the_loss_does_not_use_leaves_ddp_working(tmp_path):
    # At --cal_gsa_weight 0 CrossAlignNet still returns loss_gsa, with its graph, but the loss leaves it out: DDP's
    # first step would count the GSA decoder as used, and the third would stop waiting for its gradients, unless only
    # the loss keeps its graph.
    cfg = pretrain.build_config(["--method", "crossalignnet", "--preset", "tiny", "--num_points", "128",
                                 "--num_groups", "8", "--synthetic_size", "24", "--batch_size", "8", "--epochs", "1",
                                 "--cal_gsa_weight", "0", "--picture_every", "0", "--no-progress", "--device", "cpu",
                                 "--out_dir", str(tmp_path)])
    run_two_ranks([("pretrain", cfg, None, str(tmp_path / "trace"))])
    assert [record["epoch"] for record in read_log(tmp_path / "log.jsonl")] == [0]  # its 3 steps taken
    assert load_checkpoint(str(tmp_path / "last.pth"))["step"] == 3


# ---------------------------------------------------------------- finetune.py

def fine_config(out_dir, *flags):
    """A from-scratch ModelNet40 classifier of the tiny preset on 16 synthetic training shapes of 128 points (2 steps of
    8 an epoch), 8 test shapes, 2 epochs, nothing random (with patch_finetune)."""
    return finetune.build_config(["--preset", "tiny", "--task", "modelnet40", "--data", "synthetic", "--num_points",
                                  "128", "--num_groups", "8", "--batch_size", "8", "--synthetic_train_size", "16",
                                  "--synthetic_test_size", "8", "--epochs", "2", "--drop_path", "0", "--no-progress",
                                  "--device", "cpu", "--out_dir", str(out_dir), *flags])


FINE_RUN = "modelnet40_synthetic/seed0"  # the run folder under --out_dir


def classifier_function(run_dir, cfg):
    """A fine-tuned checkpoint's logits on the 8 test shapes in training mode (BatchNorm on the batch's statistics,
    no dropout): what its weights compute, whatever the parameters BatchNorm makes irrelevant hold (the biases before
    a BatchNorm, and here also the encoder's last LayerNorm bias, which only shifts the head's first BatchNorm input).
    With the BatchNorm running variances, which training-mode outputs do not read."""
    sets = finetune.build_datasets(cfg)
    model = downstream.Classifier(sets["num_classes"], **downstream.backbone_arguments(cfg))
    state = load_checkpoint(str(run_dir / "last.pth"))["model"]
    model.load_state_dict(state)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    points = torch.stack([sets["test"][index][0] for index in range(8)])  # (8, M, 3)
    with torch.no_grad():
        logits = model.train()(downstream.test_points(points, cfg.num_points))  # (8, classes)
    return logits, [value for name, value in state.items() if name.endswith("running_var")]


def assert_same_function(run_dir, expected_run_dir, cfg):
    (logits, variances), (expected_logits, expected_variances) = (classifier_function(path, cfg)
                                                                  for path in (run_dir, expected_run_dir))
    assert torch.allclose(logits, expected_logits, rtol=0, atol=FINE_LOGIT_ABSOLUTE)
    assert len(variances) == 4 and all(torch.allclose(value, expected, rtol=0, atol=WEIGHT_ABSOLUTE)
                                       for value, expected in zip(variances, expected_variances))


def test_fine_tuning_on_two_processes_equals_one_process_and_resumes_on_one(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch_finetune(patch, [])
        finetune.main(fine_config(tmp_path / "one"))
    # Two ranks: a whole run, and one killed at the start of epoch 1 that one process resumes (below).
    run_two_ranks([("finetune", fine_config(tmp_path / "two"), None, str(tmp_path / "two_trace")),
                   ("finetune", fine_config(tmp_path / "two_then_one"), 1, str(tmp_path / "killed_trace"))])
    one_log, two_log = (read_log(tmp_path / folder / FINE_RUN / "log.jsonl") for folder in ("one", "two"))
    assert [record["epoch"] for record in two_log] == [0, 1]  # rank 0 alone logs
    for one_record, two_record in zip(one_log, two_log):
        assert two_record["loss"] == pytest.approx(one_record["loss"], rel=FINE_LOSS_RELATIVE)  # over both ranks
        assert two_record["train_accuracy"] == one_record["train_accuracy"]  # counted over both ranks
    assert_same_function(tmp_path / "two" / FINE_RUN, tmp_path / "one" / FINE_RUN, fine_config(tmp_path))
    with monkeypatch.context() as patch:
        patch_finetune(patch, [])
        finetune.main(fine_config(tmp_path / "two_then_one", "--resume"))
    assert [record["epoch"] for record in read_log(tmp_path / "two_then_one" / FINE_RUN / "log.jsonl")] == [0, 1]
    assert_same_function(tmp_path / "two_then_one" / FINE_RUN, tmp_path / "one" / FINE_RUN, fine_config(tmp_path))


def test_fine_tuning_refuses_a_batch_the_processes_cannot_share_and_the_tasks_that_train_nothing(tmp_path,
                                                                                                 monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"^--batch_size 8 is the global batch, split evenly over the 3 processes"):
        finetune.main(fine_config(tmp_path / "run"))
    with pytest.raises(ValueError, match="^--eval_only and --task svm train nothing"):
        finetune.main(fine_config(tmp_path / "run", "--task", "svm"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- --log_every: the losses are read every N steps

def test_the_losses_are_read_every_log_every_steps_and_at_the_end_of_each_epoch(tmp_path, monkeypatch):
    reads = []
    summed_over_ranks = distributed.summed_over_ranks

    def counted(sums, world_size):
        reads.append(len(reads))
        return summed_over_ranks(sums, world_size)

    monkeypatch.setattr(pretrain, "summed_over_ranks", counted)
    # 32 shapes, batch 8: 4 steps an epoch. Every 3 steps: after steps 3 and 4 (the epoch's end).
    pretrain.main(config(tmp_path / "three", "--synthetic_size", "32", "--epochs", "1", "--log_every", "3"))
    assert len(reads) == 2
    reads.clear()
    pretrain.main(config(tmp_path / "one", "--synthetic_size", "32", "--epochs", "1", "--log_every", "1"))
    assert len(reads) == 4
    reads.clear()
    pretrain.main(config(tmp_path / "fifty", "--synthetic_size", "32", "--epochs", "1"))  # the default, 50
    assert pretrain.Config.log_every == 50 and len(reads) == 1  # at the epoch's end only


def test_one_non_finite_step_between_two_reads_still_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    pretrain.main(config(tmp_path, "--synthetic_size", "32", "--epochs", "1"))  # 4 steps: the checkpoint of epoch 0
    before = (tmp_path / "last.pth").read_bytes()
    calls = []
    chamfer_distance = kr_mae.chamfer_distance

    def one_nan_step(predicted, target):  # the second step of epoch 1 alone is NaN; the steps after it are finite
        calls.append(1)
        errors = chamfer_distance(predicted, target)
        return errors * float("nan") if len(calls) == 2 else errors

    monkeypatch.setattr(kr_mae, "chamfer_distance", one_nan_step)
    with pytest.raises(FloatingPointError) as error:
        pretrain.main(config(tmp_path, "--synthetic_size", "32", "--epochs", "2", "--resume",
                             str(tmp_path / "last.pth")))
    message = str(error.value)
    assert len(calls) == 4  # read at the epoch's end (--log_every 50), two steps after the bad one
    assert "at a step from 4 to 7" in message and "up to 4 steps" in message and "last good checkpoint" in message
    assert (tmp_path / "last.pth").read_bytes() == before
    assert [record["epoch"] for record in read_log(tmp_path / "log.jsonl")] == [0]


@pytest.mark.parametrize("log_every", [0, -1])
def test_a_log_every_below_one_is_refused(tmp_path, log_every):
    with pytest.raises(ValueError, match=f"^--log_every must be at least 1 .*got {log_every}"):
        pretrain.main(config(tmp_path / "run", "--log_every", str(log_every)))
    assert not (tmp_path / "run").exists()
