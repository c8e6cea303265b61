"""Tests of figures.py: every figure from a tiny pre-training run, its size, its content, and the CLI."""
import dataclasses
import json
import os

import pytest
import torch
from PIL import Image

import figures
from kr_mae import KRMAE
from masking import num_visible
import pretrain
from pretrain import Config
from util import weights
from util.checkpoints import load_checkpoint
from util.config import parse_config

torch.set_num_threads(2)


def tiny_config(out_dir, **overrides):
    """The tiny preset with a very small synthetic set (as tests/test_pretrain.py)."""
    values = dict(synthetic_size=32, batch_size=8, epochs=2, out_dir=str(out_dir), progress=False, picture_every=0)
    values.update(overrides)
    return dataclasses.replace(parse_config(Config, ["--preset", "tiny"]), **values)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny pre-training run shared by the tests: its folder holds last.pth and log.jsonl."""
    folder = tmp_path_factory.mktemp("pretrain")
    pretrain.main(tiny_config(folder))
    return folder


@pytest.fixture(scope="module")
def model(run):
    return figures.load_model(str(run / "last.pth"))


def distinct_colours(image):
    return len(image.getcolors(maxcolors=1 << 20))


def count_frames(image, tiles):
    """How many tiles carry the orange frame: the pixel 3 left of the tile's middle row is the frame colour."""
    return sum(image.getpixel((left - 3, (top + bottom) // 2)) == figures.FRAME for left, top, _, bottom in tiles)


def test_views_figure_scores_the_views_and_frames_the_k_selected(model, tmp_path):
    points = figures.sample_shape("chair", model.cfg.num_points)  # (N, 3)
    info = figures.views_figure(model, points, tmp_path / "views.png")
    image = Image.open(tmp_path / "views.png").convert("RGB")
    # 6 views of the tiny preset: 2 rows of 3 cells of (160 + 20) x (160 + 58), a 56-pixel header, 10 of margin.
    assert image.size == (3 * 180 + 10, 56 + 2 * 218)
    assert distinct_colours(image) > 50
    k = model.cfg.num_selected_views
    assert len(info["tiles"]) == model.cfg.num_views and count_frames(image, info["tiles"]) == k
    # The framed views are the Top-k of the printed scores (Eq. 6), best first.
    best = sorted(range(len(info["scores"])), key=lambda view: -info["scores"][view])[:k]
    assert info["selected"] == best and all(0 < score < 1 for score in info["scores"])


def test_loaded_model_scores_like_the_model_that_was_trained(run, model):
    # pretrain.main seeds torch before building the model, so this rebuilds exactly the trained model, frozen
    # random CLIP tower and its position table included; figures.load_model must agree without the seed.
    checkpoint = load_checkpoint(str(run / "last.pth"))
    torch.manual_seed(checkpoint["config"]["seed"])
    trained = KRMAE(Config(**checkpoint["config"]))
    weights.load_trainable_state(trained, checkpoint["model"])
    points = figures.sample_shape("airplane", model.cfg.num_points).unsqueeze(0)  # (1, N, 3)
    with torch.no_grad():
        scores = []
        for network in (trained.eval(), model):
            tokens, centers, _ = network.tokenizer_3d(points)  # (1, G, D), (1, G, 3)
            scores.append(network.selector(tokens, network.image_tokens(points, centers)[0])[1])  # (1, V)
    assert torch.allclose(scores[0], scores[1], atol=1e-6)


def test_views_without_checkpoint_show_ten_views_and_no_frames(tmp_path):
    info = figures.views_figure(None, figures.sample_shape("airplane", 512), tmp_path / "views.png")
    image = Image.open(tmp_path / "views.png").convert("RGB")
    assert image.size == (5 * 180 + 10, 56 + 2 * 218) and distinct_colours(image) > 50
    assert info["scores"] is None and info["selected"] == [] and count_frames(image, info["tiles"]) == 0


def test_masking_figure_random_vs_reinforced_is_seeded(model, tmp_path):
    points = figures.sample_shape("chair", model.cfg.num_points)  # (N, 3)
    first = figures.masking_figure(model, points, tmp_path / "a.png", seed=3)
    second = figures.masking_figure(model, points, tmp_path / "b.png", seed=3)
    image = Image.open(tmp_path / "a.png").convert("RGB")
    assert image.size == (3 * 320, 320 + 90)  # random, reinforced, probability panels
    assert first == second and image.tobytes() == Image.open(tmp_path / "b.png").convert("RGB").tobytes()
    visible_count = num_visible(model.cfg.num_groups, model.cfg.mask_ratio)
    assert len(first["random_visible"]) == len(first["reinforced_visible"]) == visible_count
    assert sum(first["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert figures.VISIBLE in colours and figures.MASKED in colours and len(colours) > 50  # heat colours too


def test_a_3d_only_random_masking_checkpoint_draws_views_and_one_mask(tmp_path):
    cfg = tiny_config(tmp_path, use_2d=False, masking="random")
    torch.manual_seed(0)
    pretrain.save_checkpoint(str(tmp_path / "plain.pth"), {"model": weights.trainable_state(KRMAE(cfg)),
                                                           "config": dataclasses.asdict(cfg)})
    plain = figures.load_model(str(tmp_path / "plain.pth"))
    points = figures.sample_shape("chair", cfg.num_points)  # (N, 3)
    info = figures.views_figure(plain, points, tmp_path / "views.png")
    framed = count_frames(Image.open(tmp_path / "views.png").convert("RGB"), info["tiles"])
    assert info["scores"] is None and framed == 0
    result = figures.masking_figure(plain, points, tmp_path / "masking.png")
    assert Image.open(tmp_path / "masking.png").size == (320, 320 + 90) and result["reinforced_visible"] is None


def test_reconstruction_figure_stacks_one_row_per_shape(model, tmp_path):
    shapes = torch.stack([figures.sample_shape(name, model.cfg.num_points) for name in ("chair", "table")])
    state = torch.get_rng_state()
    figures.reconstruction_figure(model, shapes, tmp_path / "reconstruction.png", names=["chair", "table"])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left untouched
    image = Image.open(tmp_path / "reconstruction.png").convert("RGB")
    assert image.size == (3 * 256, 2 * (256 + 20 + 26))  # pretrain.draw_clouds rows of 3 panels, 26-pixel headers
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert (30, 90, 200) in colours and (220, 60, 30) in colours  # visible groups and reconstructed groups


def test_curves_figure_one_panel_per_logged_quantity_and_one_colour_per_run(run, tmp_path):
    assert figures.curves_figure([str(run / "log.jsonl")], tmp_path / "one.png") == ["reconstruction loss L_R (Eq. 16)"]
    assert Image.open(tmp_path / "one.png").size == (520, 400)
    other = tmp_path / "other.jsonl"
    records = [{"epoch": epoch, "loss_rec": 0.1 / (epoch + 1), "svm_accuracy": 50.0 + 10 * epoch} for epoch in range(4)]
    other.write_text("".join(json.dumps(record) + "\n" for record in records))
    panels = figures.curves_figure([str(run / "log.jsonl"), str(other)], tmp_path / "two.png", labels=["tiny", "other"])
    image = Image.open(tmp_path / "two.png").convert("RGB")
    assert len(panels) == 2 and image.size == (2 * 520, 400)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert figures.PALETTE[0] in colours and figures.PALETTE[1] in colours and len(colours) > 20
    with pytest.raises(ValueError, match="one label per log"):
        figures.curves_figure([str(other)], tmp_path / "bad.png", labels=["a", "b"])


def test_nice_ticks_hand_worked():
    # span 0.119 / 5 = 0.0238 -> the next round step is 0.025; the ticks cover [0.013, 0.132].
    ticks, step = figures.nice_ticks(0.013, 0.132, 5)
    assert step == 0.025 and ticks[0] == 0 and ticks[-1] == pytest.approx(0.15) and len(ticks) == 7
    ticks, step = figures.nice_ticks(0, 2, 6, integer=True)  # epochs: never a fractional step
    assert step == 1 and ticks == [0, 1, 2]


def test_command_line_writes_the_four_pictures(run, tmp_path):
    figures.main(["--checkpoint", str(run / "last.pth"), "--out", str(tmp_path / "docs")])  # log found beside it
    names = sorted(os.listdir(tmp_path / "docs"))
    assert names == ["curves.png", "masking.png", "reconstruction.png", "views.png"]
    assert all(distinct_colours(Image.open(tmp_path / "docs" / name).convert("RGB")) > 10 for name in names)
