"""Which tensors a checkpoint keeps, and loading them into a model: the plumbing between the runs and the models.

  encoder_state_dict(state)     the 3-D path fine-tuning keeps (tokenizer_3d.*, encoder_pos.*, encoder.*)
  initialise_from(model, path)  pretrain.py --init_from: Point-MAE's (or our) pre-trained encoder, decoder and head
  load_pretrained(model, ...)   finetune.py --checkpoint: the 3-D path, and the task head when all of it fits
  trainable_state(model)        what a pre-training checkpoint stores: the model without a pre-trained CLIP tower
  load_trainable_state(...)     its inverse, on resume
  cast_frozen_towers(model, dt) the frozen CLIP towers stored in bf16 once
Point-MAE's own files are read through point_mae_checkpoints.py, which maps their keys to ours.
"""
import point_mae_checkpoints
import tokenizer
from util.checkpoints import load_checkpoint


ENCODER_PREFIXES = ("tokenizer_3d.", "encoder_pos.", "encoder.")


def encoder_state_dict(model_state):
    """The 3-D path that fine-tuning keeps: tokenizer_3d.*, encoder_pos.*, encoder.* (the decoder is dropped).

    The MLP fusion of Table 6 row A (`fusion_mlp`, kat.py) acts only on 2-D tokens, which fine-tuning does not
    have, so its weights are dropped too; the other fusions share all their weights with the 3-D path."""
    return {name: value for name, value in model_state.items()
            if name.startswith(ENCODER_PREFIXES) and ".fusion_mlp." not in name}


# What --init_from copies: the parts Point-MAE's pre-training model has (docs/REFERENCE.md sec. 7).
POINT_MAE_PREFIXES = ENCODER_PREFIXES + ("mask_token", "decoder_pos.", "decoder.", "reconstruction_head.")


def initialise_from(model, path):
    """--init_from: copy a pre-training checkpoint's 3-D encoder, decoder and reconstruction head into `model` (an
    official Point-MAE pretrain.pth, whose keys point_mae_checkpoints.py maps, or a last.pth of this script); the
    parts Point-MAE lacks (2-D branch, view selector, masking policy) keep their fresh initialisation. Every one of
    those parameters must be in the file with this model's shape; what was loaded is printed and returned."""
    layout, state, _ = point_mae_checkpoints.project_state(load_checkpoint(path), path)
    if layout not in (point_mae_checkpoints.PRETRAIN, point_mae_checkpoints.OURS):
        raise ValueError(f"--init_from {path!r} is a {layout} checkpoint; it needs a pre-training one (Point-MAE's "
                         f"pretrain.pth or a last.pth of pretrain.py): a fine-tuned model has no decoder.")
    own = model.state_dict()
    wanted = [name for name in own if name.startswith(POINT_MAE_PREFIXES) and ".fusion_mlp." not in name]
    missing = [name for name in wanted if name not in state]
    misfit = [f"{name} {tuple(state[name].shape)} there, {tuple(own[name].shape)} here" for name in wanted
              if name in state and state[name].shape != own[name].shape]
    extra = [name for name in state if name.startswith(POINT_MAE_PREFIXES) and ".fusion_mlp." not in name
             and name not in own]
    if missing or misfit or extra:
        raise ValueError(f"--init_from {path!r} ({layout} layout) does not fit this model: "
                         + "; ".join(text for text in (
                             f"missing from it: {missing[:4]} (of {len(missing)})" if missing else "",
                             f"other shapes: {misfit[:3]} (of {len(misfit)})" if misfit else "",
                             f"in it but not here: {extra[:4]} (of {len(extra)})" if extra else "") if text)
                         + ". Pass its --dim/--depth/--decoder_depth/--group_size (Point-MAE's: 384, 12, 4, 32).")
    model.load_state_dict({name: state[name] for name in wanted}, strict=False)
    fresh = sorted({name.split(".")[0] for name, parameter in model.named_parameters()
                    if parameter.requires_grad and name not in wanted})
    print(f"--init_from {path} ({layout} layout): loaded {len(wanted)} tensors (3-D encoder, decoder, reconstruction "
          f"head); starting fresh: {fresh or 'nothing'}; attention heads from --num_heads {model.cfg.num_heads}, "
          f"--decoder_heads {model.cfg.decoder_heads}")
    return wanted


# The settings --eval_only compares with those a fine-tuned checkpoint of this project was trained with: the model's
# shape and the test set it was tested on.
EVAL_SETTINGS = ("task", "variant", "data", "synthetic_test_size", "num_points", "num_groups", "group_size", "dim",
                 "depth", "num_heads", "way", "shot", "fold", "queries", "fewshot_head_classes",
                 "fps_skip_near_origin")


def load_pretrained(model, path, cfg, whole_model=False):
    """Load a checkpoint into `model`: this project's (pre-training or fine-tuned) or an official Point-MAE file
    (pre-training, classifier or part segmentation; point_mae_checkpoints.py maps its keys). Its 3-D path must fit.
    A fine-tuned checkpoint's task head (class token, head, ...) loads too when ALL of it fits this task; otherwise
    the head starts fresh, and that is said. whole_model=True (--eval_only) requires every tensor of the model.
    Counts the weights do not show (the number of heads) come from the flags. Returns True when the head loaded."""
    layout, state, saved = point_mae_checkpoints.project_state(load_checkpoint(path), path)
    if whole_model and "task" in saved:  # --eval_only of a run of ours: the model and test set it was tested on
        differing = [f"--{name} {saved[name]!r} there, {getattr(cfg, name)!r} here" for name in EVAL_SETTINGS
                     if name in saved and saved[name] != getattr(cfg, name)]
        if differing:
            raise ValueError(f"{path!r} was fine-tuned with other settings than this command: "
                             f"{'; '.join(differing)}. Pass its settings to evaluate it.")
    encoder = encoder_state_dict(state)
    if not encoder:
        raise ValueError(f"Checkpoint {path!r} ({layout} layout) holds no parameter starting with {ENCODER_PREFIXES}; "
                         f"expected pretrain.py's or finetune.py's last.pth or an official Point-MAE checkpoint.")
    own = model.state_dict()
    for name, value in encoder.items():
        if name in own and own[name].shape != value.shape:
            raise ValueError(f"Checkpoint {path!r} ({layout} layout) does not fit this model: parameter {name} has "
                             f"shape {tuple(value.shape)} in the checkpoint but {tuple(own[name].shape)} here. Pass "
                             f"the checkpoint's --dim/--depth/--num_heads (or its --preset).")
    if saved.get("num_heads", cfg.num_heads) != cfg.num_heads:  # same shapes, different meaning
        raise ValueError(f"Checkpoint {path!r} was trained with {saved['num_heads']} heads but this model has "
                         f"{cfg.num_heads}; pass --num_heads {saved['num_heads']}.")
    # The task head: every tensor of the model outside the 3-D path (cls_token, cls_pos_embed, head.*; part
    # segmentation: category_embed.*, propagation.*, head.*).
    head_names = [name for name in own if not name.startswith(ENCODER_PREFIXES)]
    head_missing = [name for name in head_names if name not in state]
    head_misfit = [f"{name} {tuple(state[name].shape)} there, {tuple(own[name].shape)} here" for name in head_names
                   if name in state and state[name].shape != own[name].shape]
    head_fits = not head_missing and not head_misfit
    if whole_model and not head_fits:
        found = (f"tensors of a different shape ({'; '.join(head_misfit[:3])}: fine-tuned for another task or "
                 f"number of classes?)" if head_misfit else
                 f"no task head ({len(head_missing)} tensors missing, e.g. {head_missing[:3]}: a pre-training "
                 f"checkpoint?)")
        raise ValueError(f"--eval_only needs a model fine-tuned for --task {cfg.task}; checkpoint {path!r} ({layout} "
                         f"layout) has {found}.")
    loaded = {**encoder, **({name: state[name] for name in head_names} if head_fits else {})}
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing_encoder = [name for name in missing if name.startswith(ENCODER_PREFIXES)]
    if missing_encoder or unexpected:
        raise ValueError(f"Checkpoint {path!r} ({layout} layout) does not fit this model: encoder parameters missing "
                         f"from it {missing_encoder[:6]} (of {len(missing_encoder)}), unexpected in it "
                         f"{unexpected[:6]} (of {len(unexpected)}). Was it trained with another --depth?")
    if not head_names:  # --task svm: the encoder alone has no head, so a pre-training file fits it trivially
        head_text = "alone (this model has no task head)"
    elif head_fits:
        head_text = "and the task head it was fine-tuned with"
    elif len(head_missing) < len(head_names):
        mismatch = "; ".join((head_misfit or head_missing)[:2])
        head_text = f"only: its task head does not fit this task ({mismatch}), a new one is trained"
    else:
        head_text = f"only; new, trained from scratch: {sorted({name.split('.')[0] for name in missing})}"
    print(f"loaded {path} ({layout} layout): {len(loaded)} tensors, the 3-D path {head_text}; --num_heads "
          f"{cfg.num_heads} from the flags")
    return head_fits and bool(head_names)


def frozen_towers(model):
    """The state-dict prefixes of the model's frozen CLIP towers that hold PRE-TRAINED weights: KR-MAE's
    `tokenizer_2d.visual.`, I2P-MAE's teacher `teacher.visual.` (both flag `visual_is_pretrained`)."""
    return tuple(f"{name}.visual." for name in ("tokenizer_2d", "teacher")
                 if getattr(getattr(model, name, None), "visual_is_pretrained", False))


def trainable_state(model):
    """The model's state dict without a pre-trained frozen CLIP tower (reloaded from CLIP's file on resume; it
    would add about 350 MB to every checkpoint).

    NOTE(unspecified): a random tower (tests, the tiny preset) is saved, since nothing else could restore it."""
    frozen = frozen_towers(model)
    return {name: value for name, value in model.state_dict().items() if not (frozen and name.startswith(frozen))}


def load_trainable_state(model, state):
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = frozen_towers(model)
    missing = [name for name in missing if not (frozen and name.startswith(frozen))]
    if missing or unexpected:
        raise RuntimeError(f"The checkpoint does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}"
                           f" (of {len(missing)} and {len(unexpected)}). Was it written with another configuration?")


def cast_frozen_towers(model, dtype):
    """Store the frozen CLIP towers' matrices in `dtype` once (CLIP's own recipe, tokenizer.cast_frozen_tower), so
    that under bf16 autocast they are not re-cast at every call: KR-MAE's `tokenizer_2d.visual`, I2P-MAE's
    `teacher.visual`. Their outputs change only by the rounding that autocast already applied to them."""
    for name in ("tokenizer_2d", "teacher"):
        visual = getattr(getattr(model, name, None), "visual", None)
        if visual is not None:
            tokenizer.cast_frozen_tower(visual, dtype)
