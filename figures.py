"""Figures of a KR-MAE pre-training run: what each stage of the paper does, drawn from a checkpoint and its log.

Composes the modules (no new method here) into four PNGs, drawn with Pillow only:

    views.png           Eq. (1) the v rendered depth views of one synthetic shape; Eq. (5) each view's RVS score
                        s_i from the checkpoint's selector; Eq. (6) the k selected views framed in orange.
    masking.png         Point-MAE random masking vs Eq. (7) Reinforced Masking on the same shape and seed
                        (blue = visible group, light grey = masked group), and the RM probability P_S per group.
    reconstruction.png  Eq. (15) for 3 shapes: input, visible groups, visible + reconstructed masked groups.
    curves.png          Eq. (16) L_R per epoch and the linear-SVM accuracy of the log(s), one colour per run.

Shapes: N points, G groups, K points per group, V views, H x W image, Gv visible, Gm masked.
Paper symbol -> name here:  s_i -> scores[i],  k -> cfg.num_selected_views,  P_S -> probabilities (G,),
L_R -> the log's "loss_rec".

Run:  python figures.py --checkpoint runs/pretrain/last.pth --log runs/pretrain/log.jsonl --out docs/
      python figures.py --log runs/a/log.jsonl runs/b/log.jsonl --labels KR-MAE Point-MAE --out docs/
Without --checkpoint: the views without scores, random masking only, no reconstruction.
"""
import argparse
import json
import math
import os
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import kr_mae
import masking
import pretrain
from render import MultiViewRenderer
import synthetic
from tokenizer import group_points
from util import weights
from util.checkpoints import load_checkpoint

FRAME = (235, 120, 0)  # the frame of a selected view (orange)
VISIBLE, MASKED = (30, 90, 220), (205, 205, 205)  # blue = visible group, light grey = masked group
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def font(size):
    """Pillow's built-in scalable font (Pillow >= 10.1 with FreeType), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def load_model(checkpoint_path, clip_model=""):
    """Rebuild the KRMAE of a pretrain.py checkpoint in eval mode on the CPU; clip_model overrides the CLIP file."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = dict(checkpoint["config"])
    if clip_model:
        config["clip_model"] = clip_model  # the real CLIP weights may live elsewhere on this machine
    model = kr_mae.KRMAE(pretrain.Config(**config))
    weights.load_trainable_state(model, checkpoint["model"])
    return model.eval()


def sample_shape(category="chair", num_points=1024, seed=0):
    """The first shape of `category` in the synthetic test split: points (N, 3). Label = index % 12 (synthetic.py)."""
    if category not in synthetic.SYNTHETIC_CATEGORIES:
        raise ValueError(f"category must be one of {synthetic.SYNTHETIC_CATEGORIES}, found {category!r}.")
    dataset = synthetic.SyntheticShapes("test", num_points=num_points, seed=seed)
    return dataset[synthetic.SYNTHETIC_CATEGORIES.index(category)][0]  # (N, 3)


# ---------------------------------------------------------------------------------------------------------------
# 1. views.png: Eq. (1) rendering, Eq. (5) scores, Eq. (6) Top-k
# ---------------------------------------------------------------------------------------------------------------
def views_figure(model, points, path, title="", tile=160, columns=None):
    """Grid of the rendered views of points (N, 3), scored and framed when the model has a trained selector.

    Returns dict(scores=list or None, selected=list, tiles=[(left, top, right, bottom) per view]).
    """
    cfg = model.cfg if model is not None else None
    has_scores = cfg is not None and cfg.use_2d and cfg.use_rvs  # without RVS the selector is never trained
    renderer = model.renderer if cfg is not None and cfg.use_2d else MultiViewRenderer(num_views=10)
    cloud = points.unsqueeze(0)  # (1, N, 3)
    with torch.no_grad():
        images = renderer(cloud)[0, :, 0]  # (V, H, W), the 3 channels are identical
        scores, selected = None, []
        if has_scores:
            tokens, centers, _ = model.tokenizer_3d(cloud)  # (1, G, D), (1, G, 3)  Eq. (3)
            tokens_2d = model.image_tokens(cloud, centers)[0]  # (1, V, P, D)  Eq. (1)-(2)
            chosen, view_scores, _ = model.selector(tokens, tokens_2d)  # (1, S), (1, V)  Eq. (5)-(6)
            scores, selected = view_scores[0].tolist(), chosen[0].tolist()
    num_views = images.shape[0]
    columns = columns or (num_views if num_views <= 5 else math.ceil(num_views / 2))  # 10 views: 2 rows of 5
    rows = math.ceil(num_views / columns)
    # Each cell: a margin for the frame, the tile, then two caption lines under it.
    cell_width, cell_height, header = tile + 20, tile + 58, 56
    image = Image.new("RGB", (columns * cell_width + 10, header + rows * cell_height), "white")
    pen = ImageDraw.Draw(image)
    big, small = font(17), font(14)
    pen.text((12, 8), title or "Rendered views (Eq. 1)", fill="black", font=big)
    legend = (f"s_i = RVS score (Eq. 5); orange frame = the k = {len(selected)} selected views (Eq. 6)"
              if has_scores else "no trained selector in this checkpoint: views only, no RVS scores")
    pen.text((12, 32), legend, fill=(70, 70, 70), font=small)
    tiles = []
    for view in range(num_views):
        left = 15 + (view % columns) * cell_width
        top = header + 6 + (view // columns) * cell_height
        grey = (images[view].clamp(0, 1).numpy() * 255).round().astype(np.uint8)  # (H, W)
        image.paste(Image.fromarray(grey).resize((tile, tile), Image.BILINEAR).convert("RGB"), (left, top))
        tiles.append((left, top, left + tile, top + tile))
        pen.rectangle([left, top, left + tile - 1, top + tile - 1], outline=(190, 190, 190))
        caption = f"view {view}" + (f"   s = {scores[view]:.4f}" if has_scores else "")
        pen.text((left, top + tile + 6), caption, fill="black", font=small)
        if view in selected:
            # A 5-pixel frame just outside the tile, and the rank of the view among the selected ones.
            pen.rectangle([left - 5, top - 5, left + tile + 4, top + tile + 4], outline=FRAME, width=5)
            rank = selected.index(view) + 1
            pen.text((left, top + tile + 24), f"selected (#{rank})", fill=FRAME, font=small)
    image.save(path)
    return dict(scores=scores, selected=selected, tiles=tiles)


# ---------------------------------------------------------------------------------------------------------------
# 2. masking.png: random masking vs Reinforced Masking (Eq. 7)
# ---------------------------------------------------------------------------------------------------------------
def oblique(points):
    """The fixed oblique view of pretrain.draw_clouds (35 deg about y, -25 deg about x): (M, 3) -> (M, 3)."""
    angle_y, angle_x = math.radians(35), math.radians(-25)
    rotate_y = np.array([[math.cos(angle_y), 0, math.sin(angle_y)], [0, 1, 0],
                         [-math.sin(angle_y), 0, math.cos(angle_y)]])
    rotate_x = np.array([[1, 0, 0], [0, math.cos(angle_x), -math.sin(angle_x)],
                         [0, math.sin(angle_x), math.cos(angle_x)]])
    return points @ (rotate_x @ rotate_y).T  # (M, 3): screen x, screen y, depth (larger = nearer)


def draw_cloud(pen, points, colours, left, top, size):
    """Points (M, 3) with one RGB colour each (M, 3) into a size x size square, far points first."""
    seen = oblique(points)  # (M, 3)
    for index in np.argsort(seen[:, 2]):  # painter's order: nearer points drawn last, on top
        u, v = left + size / 2 + seen[index, 0] * size * 0.42, top + size / 2 - seen[index, 1] * size * 0.42
        pen.rectangle([u - 2, v - 2, u + 2, v + 2], fill=tuple(int(c) for c in colours[index]))


def heat(values):
    """Heat colours: 0 -> pale yellow, 0.5 -> orange, 1 -> dark red, for values (M,) in [0, 1] -> (M, 3)."""
    stops = np.array([[255, 245, 170], [250, 140, 30], [150, 0, 0]], dtype=float)  # (3, 3)
    position = np.clip(values, 0, 1) * 2  # (M,) in [0, 2]
    lower = np.minimum(position.astype(int), 1)  # (M,) the stop below
    fraction = (position - lower)[:, None]  # (M, 1)
    return stops[lower] * (1 - fraction) + stops[lower + 1] * fraction  # (M, 3)


def masking_figure(model, points, path, seed=0, size=320, num_groups=64, group_size=32, mask_ratio=0.6):
    """Group points of points (N, 3) coloured by random and reinforced masks (same seed), and RM's P_S per group.
    Without a model (or a model trained with random masking) only the random panel is drawn.
    Returns dict(random_visible, reinforced_visible, probabilities) as lists (None where not drawn)."""
    cloud = points.unsqueeze(0)  # (1, N, 3)
    with torch.no_grad():
        if model is not None:
            tokens, centers, neighborhoods = model.tokenizer_3d(cloud)  # (1, G, D), (1, G, 3), (1, G, K, 3)
            num_groups, mask_ratio = model.cfg.num_groups, model.cfg.mask_ratio
        else:
            centers, neighborhoods = group_points(cloud, num_groups, group_size)  # (1, G, 3), (1, G, K, 3)
        random_visible, _ = masking.random_masking(1, num_groups, mask_ratio,
                                                   generator=torch.Generator().manual_seed(seed))  # (1, Gv)
        panels = [(f"random masking (Point-MAE), seed {seed}", random_visible[0].tolist())]
        reinforced_visible, probabilities = None, None
        if model is not None and hasattr(model, "masking"):
            reinforced_visible, _, log_probs = model.masking(tokens, generator=torch.Generator().manual_seed(seed))
            probabilities = log_probs.exp()[0]  # (G,)  P_S, Eq. (7)
            panels.append((f"reinforced masking (Eq. 7), seed {seed}", reinforced_visible[0].tolist()))
    group_clouds = (neighborhoods[0] + centers[0, :, None]).numpy()  # (G, K, 3) absolute coordinates
    group_of_point = np.repeat(np.arange(num_groups), group_clouds.shape[1])  # (G * K,)
    flat = group_clouds.reshape(-1, 3)  # (G * K, 3)
    with_heat = probabilities is not None
    image = Image.new("RGB", (size * (len(panels) + with_heat), size + 90), "white")
    pen = ImageDraw.Draw(image)
    big, small = font(15), font(13)
    for column, (title, visible) in enumerate(panels):
        is_visible = np.isin(group_of_point, visible)  # (G * K,)
        colours = np.where(is_visible[:, None], VISIBLE, MASKED)  # (G * K, 3)
        pen.text((column * size + 10, 8), title, fill="black", font=big)
        pen.text((column * size + 10, 28), f"blue: {len(visible)} visible, grey: {num_groups - len(visible)} masked",
                 fill=(70, 70, 70), font=small)
        draw_cloud(pen, flat, colours, column * size, 50, size)
    if with_heat:
        left = len(panels) * size
        values = probabilities.numpy()  # (G,)
        low, high = float(values.min()), float(values.max())
        ramp = (values - low) / max(high - low, 1e-12)  # (G,) in [0, 1]
        pen.text((left + 10, 8), "RM probability P_S per group (Eq. 7)", fill="black", font=big)
        pen.text((left + 10, 28), f"uniform would be 1/G = {1 / num_groups:.5f}", fill=(70, 70, 70), font=small)
        draw_cloud(pen, flat, heat(ramp)[group_of_point], left, 50, size)
        # A colour bar with its two end values, so a nearly uniform policy reads as nearly uniform.
        bar = heat(np.linspace(0, 1, size - 60))  # (size - 60, 3)
        for offset, colour in enumerate(bar):
            pen.line([left + 30 + offset, size + 50, left + 30 + offset, size + 64], fill=tuple(int(c) for c in colour))
        pen.text((left + 30, size + 68), f"{low:.5f}", fill="black", font=small)
        pen.text((left + size - 30, size + 68), f"{high:.5f}", fill="black", font=small, anchor="ra")
    image.save(path)
    return dict(random_visible=random_visible[0].tolist(), probabilities=None if probabilities is None else
                probabilities.tolist(), reinforced_visible=None if reinforced_visible is None else
                reinforced_visible[0].tolist())


# ---------------------------------------------------------------------------------------------------------------
# 3. reconstruction.png: Eq. (15), one row per shape
# ---------------------------------------------------------------------------------------------------------------
def reconstruction_figure(model, shapes, path, names=None, seed=0):
    """pretrain.reconstruction_picture for every shape of shapes (M, N, 3), rows stacked under a named header.
    The masks are drawn from torch's global generator inside a forked, seeded state (the caller's stays put)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.random.fork_rng():
        torch.manual_seed(seed)
        for index in range(shapes.shape[0]):
            row_path = os.path.join(folder, f"row{index}.png")
            pretrain.reconstruction_picture(model, shapes[index : index + 1], row_path)
            rows.append(Image.open(row_path).convert("RGB"))
    header = 26
    image = Image.new("RGB", (rows[0].width, len(rows) * (rows[0].height + header)), "white")
    pen = ImageDraw.Draw(image)
    for index, row in enumerate(rows):
        top = index * (row.height + header)
        name = names[index] if names else f"shape {index}"
        pen.text((8, top + 5), f"{name}: black input, blue visible groups, red reconstructed masked groups (Eq. 15)",
                 fill="black", font=font(14))
        image.paste(row, (0, top + header))
        pen.line([0, top, image.width, top], fill=(180, 180, 180))
    image.save(path)


# ---------------------------------------------------------------------------------------------------------------
# 4. curves.png: L_R (Eq. 16) and the linear-SVM accuracy per epoch
# ---------------------------------------------------------------------------------------------------------------
def read_log(path):
    """pretrain.py's log.jsonl: one JSON object per epoch -> list of dicts."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def nice_ticks(low, high, count=5, integer=False):
    """About `count` round tick values (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    span = high - low if high > low else max(abs(high), 1.0)
    raw_step = span / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step * 0.999)
    step = max(step, 1) if integer else step
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    last = max(last, first + 1)  # at least one interval, also for a single value
    return [k * step for k in range(first, last + 1)], step


def draw_plot(pen, box, series, title, y_label):
    """One line plot into box = (left, top, right, bottom): series = [(label, colour, xs, ys)], epochs on x."""
    left, top, right, bottom = box
    small, big = font(13), font(15)
    pen.text(((left + right) / 2, top), title, fill="black", font=big, anchor="ma")
    # The legend sits in one row under the title, so it never covers a line.
    x = left + 70
    for label, colour, _, _ in series:
        pen.rectangle([x, top + 29, x + 18, top + 37], fill=colour)
        pen.text((x + 24, top + 26), label, fill="black", font=small)
        x += 40 + pen.textlength(label, font=small)
    plot = (left + 70, top + 76, right - 10, bottom - 45)  # the axes' inner box
    xs = [x for _, _, values, _ in series for x in values]
    ys = [y for _, _, _, values in series for y in values]
    x_ticks, _ = nice_ticks(min(xs), max(xs), 6, integer=True)
    y_ticks, y_step = nice_ticks(min(ys), max(ys), 5)
    decimals = len(f"{y_step:.10f}".rstrip("0").partition(".")[2])  # as many as the step needs: 0.025 -> 3

    def to_screen(x_value, y_value):
        u = plot[0] + (x_value - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (plot[2] - plot[0])
        v = plot[3] - (y_value - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (plot[3] - plot[1])
        return u, v

    for value in x_ticks:  # vertical grid lines and epoch numbers
        u, _ = to_screen(value, y_ticks[0])
        pen.line([u, plot[1], u, plot[3]], fill=(232, 232, 232))
        pen.line([u, plot[3], u, plot[3] + 5], fill="black")
        pen.text((u, plot[3] + 8), f"{value:g}", fill="black", font=small, anchor="ma")
    for value in y_ticks:  # horizontal grid lines and values
        _, v = to_screen(x_ticks[0], value)
        pen.line([plot[0], v, plot[2], v], fill=(232, 232, 232))
        pen.line([plot[0] - 5, v, plot[0], v], fill="black")
        pen.text((plot[0] - 8, v), f"{value:.{decimals}f}", fill="black", font=small, anchor="rm")
    pen.line([plot[0], plot[1], plot[0], plot[3], plot[2], plot[3]], fill="black", width=1)
    pen.text(((plot[0] + plot[2]) / 2, plot[3] + 26), "epoch", fill="black", font=small, anchor="ma")
    pen.text((left, plot[1] - 24), y_label, fill=(70, 70, 70), font=small)
    for _, colour, x_values, y_values in series:
        points = [to_screen(x_value, y_value) for x_value, y_value in zip(x_values, y_values)]
        if len(points) > 1:
            pen.line(points, fill=colour, width=2)
        for u, v in points if len(points) <= 40 else []:  # markers on short runs: one epoch still shows
            pen.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)


def curves_figure(log_paths, path, labels=None):
    """loss_rec per epoch (and svm_accuracy where logged) of one or more runs; returns the panel names drawn."""
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in log_paths]
    if len(labels) != len(log_paths):
        raise ValueError(f"Expected one label per log, found {len(labels)} labels for {len(log_paths)} logs.")
    runs = [(label, PALETTE[index % len(PALETTE)], read_log(log_path))
            for index, (label, log_path) in enumerate(zip(labels, log_paths))]
    loss = [(label, colour, [r["epoch"] for r in records], [r["loss_rec"] for r in records])
            for label, colour, records in runs if records]
    if not loss:
        raise ValueError(f"The logs {log_paths} hold no epoch lines; run pretrain.py for at least one epoch first.")
    accuracy = [(label, colour, [r["epoch"] for r in records if "svm_accuracy" in r],
                 [r["svm_accuracy"] for r in records if "svm_accuracy" in r]) for label, colour, records in runs]
    accuracy = [entry for entry in accuracy if entry[2]]  # runs that logged the SVM (pretrain.py --svm_every)
    panels = [("reconstruction loss L_R (Eq. 16)", "squared-L2 Chamfer", loss)]
    panels += [("linear-SVM accuracy, synthetic shapes", "accuracy (%)", accuracy)] if accuracy else []
    panel_width = 520
    image = Image.new("RGB", (panel_width * len(panels), 400), "white")
    pen = ImageDraw.Draw(image)
    for index, (title, y_label, series) in enumerate(panels):
        draw_plot(pen, (index * panel_width + 10, 10, (index + 1) * panel_width - 10, 390), series, title, y_label)
    image.save(path)
    return [title for title, _, _ in panels]


# ---------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()  # drawing only
def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw the KR-MAE figures of a pre-training run.")
    parser.add_argument("--checkpoint", default="", help="a pretrain.py last.pth (omit: views and random mask only)")
    parser.add_argument("--log", nargs="*", default=None, help="log.jsonl file(s); default: beside --checkpoint")
    parser.add_argument("--labels", nargs="*", default=None, help="one legend label per --log")
    parser.add_argument("--out", default="docs", help="folder for the PNGs")
    parser.add_argument("--clip_model", default="", help="override the checkpoint's CLIP name or local file")
    parser.add_argument("--category", default="chair", help="synthetic category of the views and masking figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks and the synthetic shapes")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    model = load_model(args.checkpoint, args.clip_model) if args.checkpoint else None
    num_points = model.cfg.num_points if model is not None else 1024
    points = sample_shape(args.category, num_points, args.seed)  # (N, 3)
    print(f"model {'from ' + args.checkpoint if model is not None else 'none'}; {args.category}: points "
          f"{tuple(points.shape)}")
    written = [os.path.join(args.out, name) for name in ("views.png", "masking.png")]
    info = views_figure(model, points, written[0], title=f"Rendered views of a synthetic {args.category} (Eq. 1)")
    print("views: scores", info["scores"] and [round(s, 4) for s in info["scores"]], "selected", info["selected"])
    masking_figure(model, points, written[1], seed=args.seed)
    if model is not None:
        names = ["chair", "airplane", "table"]
        shapes = torch.stack([sample_shape(name, num_points, args.seed) for name in names])  # (3, N, 3)
        written.append(os.path.join(args.out, "reconstruction.png"))
        reconstruction_figure(model, shapes, written[-1], names=names, seed=args.seed)
    log_paths = args.log
    if log_paths is None and args.checkpoint:
        default_log = os.path.join(os.path.dirname(args.checkpoint), "log.jsonl")
        log_paths = [default_log] if os.path.isfile(default_log) else []
    if log_paths:
        written.append(os.path.join(args.out, "curves.png"))
        curves_figure(log_paths, written[-1], args.labels)
    print("wrote", " ".join(written))


if __name__ == "__main__":
    main()
