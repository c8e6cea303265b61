"""Point-MAE's released checkpoints, read into this project's layout (docs/REFERENCE.md sec. 7).

This project's `--no-use_2d --masking random` model computes what Point-MAE's code computes, and its fine-tuning
models are Point-MAE's, so Point-MAE's files load here after a rename of their keys (plus a squeeze of the 1x1
convolutions that are Linear layers here). Three official layouts, recognised by their keys:

    Point-MAE pre-training   pretrain.pth               torch.load(f)["base_model"]        -> kr_mae.KRMAE
    Point-MAE classifier     modelnet_1k.pth, scan_*.pth torch.load(f)["base_model"]        -> downstream.Classifier
    Point-MAE part seg.      part_seg.pth               torch.load(f)["model_state_dict"]  -> downstream.PartSegmenter
Keys may start with `module.` (saved from DataParallel); it is stripped. This project's own checkpoints
(`{"model": state, "config": {...}}`) pass through unchanged.

What maps to what (official -> here; inside every transformer block `mlp.fc1` -> `mlp.0`, `mlp.fc2` -> `mlp.2`):
    MAE_encoder.encoder.* / encoder.*            -> tokenizer_3d.group_encoder.*   mini-PointNet (Eq. 3)
    MAE_encoder.pos_embed.* / pos_embed.*        -> encoder_pos.mlp.*              centre embedding
    MAE_encoder.blocks.blocks.* / blocks.blocks.* -> encoder.blocks.*              encoder blocks
    MAE_encoder.norm.* / norm.*                  -> encoder.norm.*
    mask_token, decoder_pos_embed.*, MAE_decoder.blocks.*, MAE_decoder.norm.*
                                                 -> mask_token, decoder_pos.mlp.*, decoder.blocks.*, decoder.norm.*
    increase_dim.0.weight (3K, D, 1)             -> reconstruction_head.weight (3K, D)   squeezed
    cls_token, cls_pos, cls_head_finetune.*      -> cls_token, cls_pos_embed, head.*     (same indices 0,1,4,5,8)
    label_conv.0.weight (64, 16, 1), label_conv.1.* -> category_embed.0.weight (64, 16) squeezed, category_embed.1.*
    propagation_0.mlp_convs.{0,1}.*, .mlp_bns.{0,1}.* -> propagation.{0,3}.*, propagation.{1,4}.*
    convs1, bns1, convs2, bns2, convs3           -> head.0, head.1, head.4, head.5, head.7

The other way, `export_pretrain_state`: a pre-training checkpoint of this project -> the official pre-training
layout (`base_model` with `MAE_encoder.*`, the decoder and `increase_dim`, the 1x1 convolution restored to
(3K, D, 1)), so that Point-MAE's own code (its builder.load_model, strictly) reads what this project pre-trained.
Only the parts Point-MAE's model has travel: the 2-D branch (renderer, CLIP tower, its projection), the view
selector (RVS) and the masking policy (RM) have no place in it and are left out, by name. A checkpoint without
Point-MAE's decoder (Joint-MAE's and CrossAlignNet's own decoders, a fine-tuned model) is refused.

Pure functions on state dicts: this file imports no other module of ours. Counts the weights cannot tell (the
number of attention heads) come from the caller's flags; shapes are checked by whoever loads the result.
Demo: `python point_mae_checkpoints.py` builds a file in the official pre-training layout (random values) and
prints what it maps to. Export: `python point_mae_checkpoints.py --export runs/pretrain/last.pth pretrain_pointmae.pth`.
"""
import argparse
import os
import pickle
import re

import torch

PRETRAIN, CLASSIFIER, PART_SEG, OURS = ("Point-MAE pre-training", "Point-MAE classifier",
                                        "Point-MAE part segmentation", "this project")

# The backbone of the fine-tuning models (classifier and part segmentation): official prefix -> ours.
_BACKBONE = [("encoder.", "tokenizer_3d.group_encoder."), ("pos_embed.", "encoder_pos.mlp."),
             ("blocks.blocks.", "encoder.blocks."), ("norm.", "encoder.norm.")]
# Per layout, (official prefix, our prefix), the first match wins; a key no rule matches is an error.
RENAMES = {
    PRETRAIN: [("MAE_encoder." + old, new) for old, new in _BACKBONE] + [
        ("mask_token", "mask_token"), ("decoder_pos_embed.", "decoder_pos.mlp."),
        ("MAE_decoder.blocks.", "decoder.blocks."), ("MAE_decoder.norm.", "decoder.norm."),
        ("increase_dim.0.", "reconstruction_head.")],
    CLASSIFIER: _BACKBONE + [("cls_token", "cls_token"), ("cls_pos", "cls_pos_embed"),
                             ("cls_head_finetune.", "head.")],
    PART_SEG: _BACKBONE + [
        ("label_conv.0.", "category_embed.0."), ("label_conv.1.", "category_embed.1."),
        ("propagation_0.mlp_convs.0.", "propagation.0."), ("propagation_0.mlp_bns.0.", "propagation.1."),
        ("propagation_0.mlp_convs.1.", "propagation.3."), ("propagation_0.mlp_bns.1.", "propagation.4."),
        ("convs1.", "head.0."), ("bns1.", "head.1."), ("convs2.", "head.4."), ("bns2.", "head.5."),
        ("convs3.", "head.7.")],
}
# Official 1x1 Conv1d weights (out, in, 1) that are Linear weights (out, in) here.
SQUEEZED = ("reconstruction_head.weight", "category_embed.0.weight")
# Where each layout keeps its state dict in the file (Point-MAE's builder.load_model also accepts "model").
CONTAINER_KEYS = ("base_model", "model_state_dict", "model")


def strip_module_prefix(state):
    """DataParallel's `module.` prefix off every key that has it."""
    return {(name[len("module."):] if name.startswith("module.") else name): value for name, value in state.items()}


def detect_layout(state):
    """Which official layout a state dict (keys without `module.`) is in, by its marker keys; OURS if none."""
    if any(name.startswith("MAE_encoder.") for name in state):
        return PRETRAIN
    if any(name.startswith("cls_head_finetune.") for name in state):
        return CLASSIFIER
    if any(name.startswith(("label_conv.", "propagation_0.")) for name in state):
        return PART_SEG
    return OURS


def rename_key(name, layout):
    """One official key -> ours, or None when no rule of the layout matches it."""
    for old, new in RENAMES[layout]:
        if name == old or name.startswith(old) and old.endswith("."):
            ours = new + name[len(old):]
            return re.sub(r"(blocks\.\d+\.mlp\.)fc([12])\.", lambda m: f"{m[1]}{2 * int(m[2]) - 2}.", ours)
    return None


def convert_state(state, layout):
    """An official state dict (without `module.`) -> this project's names, the 1x1 convolutions squeezed."""
    converted, unknown = {}, []
    for name, value in state.items():
        ours = rename_key(name, layout)
        if ours is None:
            unknown.append(name)
            continue
        if ours in SQUEEZED:
            if value.ndim != 3 or value.shape[2] != 1:
                raise ValueError(f"{layout} key {name!r} should be a 1x1 Conv1d weight of shape (out, in, 1); found "
                                 f"shape {tuple(value.shape)}.")
            value = value[:, :, 0]  # (out, in)
        converted[ours] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys of this {layout} file match nothing in its layout, e.g. {unknown[:5]}; "
                         f"expected the keys of docs/REFERENCE.md sec. 7 (is it a checkpoint of another model?).")
    return converted


def project_state(checkpoint, path):
    """A loaded checkpoint (ours or official) -> (layout, state dict in this project's names, our saved config or {}).

    Ours: {"model": state, "config": {...}, ...}. Official: the state dict under one of CONTAINER_KEYS, or the bare
    state dict; a `module.` prefix is stripped."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Checkpoint {path!r} holds a {type(checkpoint).__name__}, expected a dict (a state dict or "
                         f"a checkpoint holding one under {CONTAINER_KEYS}).")
    container = next((key for key in CONTAINER_KEYS if isinstance(checkpoint.get(key), dict)), None)
    state = checkpoint[container] if container else checkpoint
    if not state or not all(torch.is_tensor(value) for value in state.values()):
        raise ValueError(f"Checkpoint {path!r} holds no state dict: expected tensors under one of {CONTAINER_KEYS} "
                         f"(found keys {sorted(checkpoint)[:8]}).")
    state = strip_module_prefix(state)
    layout = detect_layout(state)
    if layout == OURS:
        return OURS, state, checkpoint.get("config", {}) if container == "model" else {}
    return layout, convert_state(state, layout), {}


# The parts of a pre-training model of this project that Point-MAE's pre-training model has (pretrain.py's
# POINT_MAE_PREFIXES, the twin of this list): the 3-D encoder, the decoder and the reconstruction head.
EXPORTED_PREFIXES = ("tokenizer_3d.", "encoder_pos.", "encoder.", "mask_token", "decoder_pos.", "decoder.",
                     "reconstruction_head.")


def official_key(ours):
    """One key of ours -> its official pre-training key (the inverse of RENAMES[PRETRAIN]), or None."""
    name = re.sub(r"(blocks\.\d+\.mlp\.)([02])\.", lambda m: f"{m[1]}fc{int(m[2]) // 2 + 1}.", ours)
    for old, new in RENAMES[PRETRAIN]:
        if name == new or name.startswith(new) and new.endswith("."):
            return old + name[len(new):]
    return None


def export_pretrain_state(state, path="<state dict>"):
    """A pre-training state dict of this project (our names) -> (the official pre-training state dict, the names of
    the top-level parts left out). Every tensor of Point-MAE's pre-training model must be there with its official
    shape (docs/REFERENCE.md sec. 7, at the width, depths and group size the weights show); anything else is refused."""
    if "reconstruction_head.weight" not in state or "encoder.norm.weight" not in state:
        found = sorted({name.split(".")[0] for name in state})
        raise ValueError(f"{path!r} is not a pre-training model of Point-MAE's shape: it lacks the 3-D encoder's "
                         f"encoder.norm.weight or the reconstruction head's reconstruction_head.weight (its parts: "
                         f"{found}). Export takes a last.pth of pretrain.py with --method kr_mae, point_mae or "
                         f"i2p_mae.")
    # NOTE(unspecified): the 2-D MLP fusion (kat.py, Table 6 row A) acts on 2-D tokens only; it is left out, as
    # fine-tuning leaves it out.
    kept = {name: value for name, value in state.items()
            if name.startswith(EXPORTED_PREFIXES) and ".fusion_mlp." not in name}
    left_out = sorted({name.split(".")[0] for name in state if name not in kept})
    exported, unknown = {}, []
    for name, value in kept.items():
        official = official_key(name)
        if official is None:
            unknown.append(name)
            continue
        exported[official] = value[:, :, None] if name == "reconstruction_head.weight" else value  # (3K, D, 1)
    dim = state["encoder.norm.weight"].shape[0]
    depth, decoder_depth = (len({name.split(".")[2] for name in state if name.startswith(f"{part}.blocks.")})
                            for part in ("encoder", "decoder"))
    group_size = state["reconstruction_head.weight"].shape[0] // 3
    expected = {name: value.shape for name, value in
                official_pretrain_state(dim, depth, decoder_depth, group_size, meta=True).items()}
    missing = sorted(set(expected) - set(exported))
    extra = sorted(set(exported) - set(expected)) + unknown
    misfit = [f"{name} {tuple(exported[name].shape)} here, {tuple(shape)} in Point-MAE's model"
              for name, shape in expected.items() if name in exported and exported[name].shape != shape]
    if missing or extra or misfit:
        raise ValueError(f"{path!r} does not have the shape of Point-MAE's pre-training model (width {dim}, "
                         f"{depth} encoder and {decoder_depth} decoder blocks, groups of {group_size}): "
                         + "; ".join(text for text in (
                             f"missing {missing[:4]} (of {len(missing)})" if missing else "",
                             f"not in Point-MAE's model {extra[:4]} (of {len(extra)})" if extra else "",
                             f"other shapes {misfit[:3]}" if misfit else "") if text)
                         + ". Joint-MAE's and CrossAlignNet's decoders, and fine-tuned models, are not Point-MAE's.")
    return {name: exported[name] for name in expected}, left_out  # the official order


def export_file(source, target):
    """--export: read `source` (a last.pth of pretrain.py) with torch's safe loader, write `target` in the official
    pre-training layout: {"base_model": state, "epoch": ..., "metrics": {}} (Point-MAE's builder reads all three),
    to a temporary file renamed into place. Returns the official state dict."""
    if os.path.abspath(source) == os.path.abspath(target):
        raise ValueError(f"--export would overwrite its source {source!r}; pass another output path.")
    try:  # the safe loader: tensors, numbers, strings and containers only, so the file cannot run code
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:160]
        raise ValueError(f"{source!r} holds more than tensors, numbers, strings and containers ({reason}); it was "
                         f"not loaded. --export reads the last.pth files pretrain.py writes.") from None
    layout, state, config = project_state(checkpoint, source)
    if layout != OURS:
        raise ValueError(f"{source!r} is already in the {layout} layout; --export converts this project's "
                         f"pre-training checkpoints.")
    exported, left_out = export_pretrain_state(state, source)
    temporary = f"{target}.tmp"
    torch.save({"base_model": exported, "epoch": checkpoint.get("epoch", -1), "metrics": {}}, temporary)
    os.replace(temporary, target)
    print(f"{source} (method {config.get('method', 'unknown')}): {len(exported)} tensors -> {target} (Point-MAE's "
          f"pre-training layout); left out, no place in Point-MAE's model: {left_out or 'nothing'}")
    return exported


def official_pretrain_state(dim=384, depth=12, decoder_depth=4, group_size=32, prefix="", generator=None,
                            meta=False):
    """A state dict in the official pre-training layout (the key names and shapes of docs/REFERENCE.md sec. 7) filled
    with random values: what the tests and the demo load. prefix="module." mimics a DataParallel save.
    meta=True: shapes only, no memory (tensors on the meta device), what export checks against."""
    def random(*shape):
        return torch.empty(*shape, device="meta") if meta else torch.randn(*shape, generator=generator)

    def block(name):
        return {f"{name}.norm1.weight": random(dim), f"{name}.norm1.bias": random(dim),
                f"{name}.attn.qkv.weight": random(3 * dim, dim), f"{name}.attn.proj.weight": random(dim, dim),
                f"{name}.attn.proj.bias": random(dim), f"{name}.norm2.weight": random(dim),
                f"{name}.norm2.bias": random(dim), f"{name}.mlp.fc1.weight": random(4 * dim, dim),
                f"{name}.mlp.fc1.bias": random(4 * dim), f"{name}.mlp.fc2.weight": random(dim, 4 * dim),
                f"{name}.mlp.fc2.bias": random(dim)}

    def batch_norm(name, width):
        return {f"{name}.weight": random(width), f"{name}.bias": random(width),
                f"{name}.running_mean": random(width), f"{name}.running_var": random(width).abs() + 0.5,
                f"{name}.num_batches_tracked": torch.tensor(7)}

    state = {"MAE_encoder.encoder.first_conv.0.weight": random(128, 3, 1),
             "MAE_encoder.encoder.first_conv.0.bias": random(128),
             **batch_norm("MAE_encoder.encoder.first_conv.1", 128),
             "MAE_encoder.encoder.first_conv.3.weight": random(256, 128, 1),
             "MAE_encoder.encoder.first_conv.3.bias": random(256),
             "MAE_encoder.encoder.second_conv.0.weight": random(512, 512, 1),
             "MAE_encoder.encoder.second_conv.0.bias": random(512),
             **batch_norm("MAE_encoder.encoder.second_conv.1", 512),
             "MAE_encoder.encoder.second_conv.3.weight": random(dim, 512, 1),
             "MAE_encoder.encoder.second_conv.3.bias": random(dim),
             "MAE_encoder.pos_embed.0.weight": random(128, 3), "MAE_encoder.pos_embed.0.bias": random(128),
             "MAE_encoder.pos_embed.2.weight": random(dim, 128), "MAE_encoder.pos_embed.2.bias": random(dim)}
    for index in range(depth):
        state.update(block(f"MAE_encoder.blocks.blocks.{index}"))
    state.update({"MAE_encoder.norm.weight": random(dim), "MAE_encoder.norm.bias": random(dim),
                  "mask_token": random(1, 1, dim),
                  "decoder_pos_embed.0.weight": random(128, 3), "decoder_pos_embed.0.bias": random(128),
                  "decoder_pos_embed.2.weight": random(dim, 128), "decoder_pos_embed.2.bias": random(dim)})
    for index in range(decoder_depth):
        state.update(block(f"MAE_decoder.blocks.{index}"))
    state.update({"MAE_decoder.norm.weight": random(dim), "MAE_decoder.norm.bias": random(dim),
                  "increase_dim.0.weight": random(3 * group_size, dim, 1),
                  "increase_dim.0.bias": random(3 * group_size)})
    return {prefix + name: value for name, value in state.items()}


def official_finetuned_state(num_classes=40, part_seg=False, dim=384, depth=12, prefix="", generator=None):
    """A state dict in the official classifier (or, part_seg=True, part segmentation) layout with random values:
    the pre-training file's encoder without `MAE_encoder.`, plus the head of docs/REFERENCE.md sec. 7. num_classes is
    the number of classes, or of parts (50) for part segmentation (its category embedding is 16-way)."""
    def random(*shape):
        return torch.randn(*shape, generator=generator)

    def batch_norm(name, width):
        return {f"{name}.weight": random(width), f"{name}.bias": random(width),
                f"{name}.running_mean": random(width), f"{name}.running_var": random(width).abs() + 0.5,
                f"{name}.num_batches_tracked": torch.tensor(3)}

    encoder = official_pretrain_state(dim=dim, depth=depth, decoder_depth=0, generator=generator)
    state = {name[len("MAE_encoder."):]: value for name, value in encoder.items() if name.startswith("MAE_encoder.")}
    if not part_seg:
        state.update({"cls_token": random(1, 1, dim), "cls_pos": random(1, 1, dim),
                      "cls_head_finetune.0.weight": random(256, 2 * dim), "cls_head_finetune.0.bias": random(256),
                      **batch_norm("cls_head_finetune.1", 256),
                      "cls_head_finetune.4.weight": random(256, 256), "cls_head_finetune.4.bias": random(256),
                      **batch_norm("cls_head_finetune.5", 256),
                      "cls_head_finetune.8.weight": random(num_classes, 256),
                      "cls_head_finetune.8.bias": random(num_classes)})
    else:
        state.update({"label_conv.0.weight": random(64, 16, 1), **batch_norm("label_conv.1", 64),
                      "propagation_0.mlp_convs.0.weight": random(4 * dim, 3 * dim + 3, 1),
                      "propagation_0.mlp_convs.0.bias": random(4 * dim),
                      **batch_norm("propagation_0.mlp_bns.0", 4 * dim),
                      "propagation_0.mlp_convs.1.weight": random(1024, 4 * dim, 1),
                      "propagation_0.mlp_convs.1.bias": random(1024),
                      **batch_norm("propagation_0.mlp_bns.1", 1024),
                      "convs1.weight": random(512, 1024 + 6 * dim + 64, 1), "convs1.bias": random(512),
                      **batch_norm("bns1", 512),
                      "convs2.weight": random(256, 512, 1), "convs2.bias": random(256), **batch_norm("bns2", 256),
                      "convs3.weight": random(num_classes, 256, 1), "convs3.bias": random(num_classes)})
    return {prefix + name: value for name, value in state.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Point-MAE's checkpoint layouts: a demo, or --export.")
    parser.add_argument("--export", nargs=2, metavar=("LAST_PTH", "OUTPUT_PTH"),
                        help="write a pre-training last.pth of this project in Point-MAE's pre-training layout")
    arguments = parser.parse_args()
    if arguments.export:
        export_file(*arguments.export)
        raise SystemExit(0)
    official = official_pretrain_state(prefix="module.", generator=torch.Generator().manual_seed(0))
    layout, ours, _ = project_state({"base_model": official, "epoch": 299}, "<built in memory>")
    print(f"official pre-training file: {len(official)} tensors, recognised as {layout!r}")
    for (old, value), new in list(zip(official.items(), ours))[:4] + list(zip(official.items(), ours))[-6:]:
        print(f"  {old:52s} {str(tuple(value.shape)):16s} -> {new:40s} {tuple(ours[new].shape)}")
