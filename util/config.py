"""Settings: a dataclass of settings turned into command-line flags, the presets, the checks both scripts share.

  parse_config(Config, argv, presets)  every field a flag (`--lr 5e-4`, `--lr=5e-4`, `--no-use_2d`), its source
                                       comment its --help; defaults from the dataclass, --preset, a --resume checkpoint
  PRETRAIN_PRESETS, FINETUNE_PRESETS   --preset tiny of each script: the same small model, so that a tiny
                                       pre-training checkpoint fine-tunes
  schedule_and_size_checks(cfg)        the flag checks both scripts run before any work; range_checks(cfg, ranges)
                                       every float finite and every number in its range
"""
import argparse
import dataclasses
import inspect
import math
import os
import sys

from util.checkpoints import load_resumable

# --preset: a preset replaces the defaults (after pretrain.py's --method defaults, after finetune.py's task
# defaults); flags given on the command line still win. The two "tiny" presets build the same small model (dim 96,
# depth 4, 4 heads, 32 groups of 16 from 512 points), so that a tiny pre-training checkpoint fine-tunes.
PRETRAIN_PRESETS = {
    "tiny": dict(num_points=512, synthetic_size=512, num_groups=32, group_size=16, num_views=6,
                 num_selected_views=2, image_size=64, clip_random_tower="64,2,2", masking_heads=2, dim=96,
                 depth=4, num_heads=4, decoder_depth=2, decoder_heads=4, batch_size=16, lr=1e-3, warmup_epochs=1,
                 num_workers=0, picture_every=1, cal_image_depth=4),  # CrossAlignNet's image encoder as the 3-D one
}
FINETUNE_PRESETS = {
    "tiny": dict(num_points=512, num_groups=32, group_size=16, dim=96, depth=4, num_heads=4, batch_size=16,
                 epochs=3, warmup_epochs=1, synthetic_train_size=256, synthetic_test_size=128, num_workers=0),
}


def field_comments(config_class):
    """Field name -> the comment after it in the dataclass source (continued on indented comment lines), for
    --help. A dataclass made of others (pretrain.Config) has the comments of all of them."""
    comments = {}
    for part in reversed([cls for cls in config_class.__mro__ if dataclasses.is_dataclass(cls)]):
        field_name = None
        for line in inspect.getsource(part).splitlines():
            code, _, comment = line.partition("#")
            if ":" in code and "=" in code:
                field_name = code.split(":")[0].strip()
                comments[field_name] = comment.strip().replace("%", "%%")
            elif field_name and not code.strip() and len(line) - len(line.lstrip()) > 4:  # an indented continuation
                comments[field_name] += " " + comment.strip().replace("%", "%%")
            else:
                field_name = None  # a section header or anything else ends the field's comment
    return comments


def parse_config(config_class, argv=None, presets=PRETRAIN_PRESETS):
    """Turn a dataclass into argparse flags (`--lr 5e-4`, `--lr=5e-4`, `--no-use_2d`), with each field's source comment
    as its help. Defaults come from the dataclass, then `--preset`, then (pretrain.py) the checkpoint of `--resume`;
    flags given on the command line win over all three. presets: name -> defaults ("" for no preset)."""
    comments = field_comments(config_class)  # field name -> its source comment, shown by --help
    parser = argparse.ArgumentParser(description=(config_class.__doc__ or "").split("\n")[0])
    for field in dataclasses.fields(config_class):
        help_text = f"{comments.get(field.name, '')} (default: %(default)s)"
        if field.type in (bool, "bool"):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=field.default,
                                help=help_text)
        else:
            field_type = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            parser.add_argument(f"--{field.name}", type=field_type, default=field.default, help=help_text)
    known = parser.parse_known_args(argv)[0]
    if known.preset and known.preset not in presets:
        parser.error(f"unknown preset {known.preset!r}; expected one of {sorted(name for name in presets if name)}")
    parser.set_defaults(**presets.get(known.preset, {}))  # the preset replaces defaults; explicit flags still win
    resume = getattr(known, "resume", "")
    if isinstance(resume, str) and resume:
        # Continue with the run's own settings, so `--resume path` alone is enough; explicit flags still win.
        explicit = {arg.split("=")[0][2:].removeprefix("no-") for arg in (sys.argv[1:] if argv is None else argv)
                    if arg.startswith("--")}  # the settings given on the command line
        saved = load_resumable(resume, "pretrain.py", [field.name for field in dataclasses.fields(config_class)],
                               explicit)["config"]  # (a --resume path is pretrain.py's; finetune.py's is a flag)
        parser.set_defaults(**{name: value for name, value in saved.items() if name not in ("resume", "overwrite")})
        # The run continues in the checkpoint's folder, not in the out_dir its config recorded: a copied or moved
        # run folder then never writes into the original. An explicit --out_dir still wins.
        parser.set_defaults(out_dir=os.path.dirname(resume) or ".")
    return config_class(**vars(parser.parse_args(argv)))


def range_checks(cfg, ranges):
    """(passed, message) pairs: every float setting is finite (NaN fails every comparison, inf is no rate or weight),
    and every setting of `ranges` (name, allowed(value, cfg), the allowed values in words: a text formatted with
    cfg, or a function of cfg) lies in its range."""
    checks = [(math.isfinite(getattr(cfg, field.name)), f"--{field.name} must be a finite number, got "
                                                        f"{getattr(cfg, field.name)}.")
              for field in dataclasses.fields(cfg) if field.type in (float, "float")]
    for name, allowed, text in ranges:
        value = getattr(cfg, name)
        passed = bool(allowed(value, cfg))
        words = "" if passed else text(cfg) if callable(text) else text.format(cfg=cfg)
        checks.append((passed, f"--{name} must be {words}, got {value!r}."))
    return checks


def schedule_and_size_checks(cfg):
    """The checks pretrain.py and finetune.py share, as (passed, message) pairs: epochs, warm-up, batch size, the
    group counts against the points, the learning rates."""
    return [
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}."),
        (0 <= cfg.warmup_epochs <= cfg.epochs,
         f"--warmup_epochs must be between 0 and --epochs ({cfg.epochs}), got {cfg.warmup_epochs}."),
        (cfg.batch_size >= 1, f"--batch_size must be at least 1, got {cfg.batch_size}."),
        (1 <= cfg.num_groups <= cfg.num_points,
         f"--num_groups must be between 1 and --num_points ({cfg.num_points}), got {cfg.num_groups}."),
        (1 <= cfg.group_size <= cfg.num_points,
         f"--group_size must be between 1 and --num_points ({cfg.num_points}), got {cfg.group_size}."),
        (cfg.lr > 0 and cfg.min_lr >= 0, f"--lr must be positive and --min_lr not negative, got {cfg.lr} and "
                                         f"{cfg.min_lr}."),
    ]


def parse_list(text, name):
    """--seeds / --folds: '0,1,2' -> [0, 1, 2], or a sentence naming the flag and what it got."""
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"--{name} expects comma-separated integers such as '0,1,2', got {text!r}.") from None
