"""The downstream models and measures: the pre-trained 3-D path with Point-MAE's task heads, its test and voting
inputs, class-mean accuracy, part mIoU, and the test pass. Paper "Fine-tuning Setup" and Tables 1-3; finetune.py
sets up the tasks and runs the loop. This file imports torch, datasets.py and the stage modules only: copy it with them.

After pre-training only the 3-D path is kept (`tokenizer_3d`, `encoder_pos`, `encoder`: Eq. 3 and the KAT encoder of
Eq. 9-14 without 2-D tokens, every group visible), under the pre-training models' names, so its weights load as they
are (util/weights.py).

Classification head (Point-MAE):  f = [cls output ; max over the group tokens]          (B, 2D)
                                   logits = MLP(2D -> 256 -> 256 -> classes), BN, ReLU, Dropout 0.5
Segmentation head (Point-MAE):     f_i = [hidden blocks 4, 8, 12 of token i]             (B, G, 3D)
                                   global = [max_G f ; mean_G f ; Embed(category one-hot)] (B, 6D + 64)
                                   per point: [xyz ; inverse-distance mix of the 3 nearest centres' f]
                                   -> propagation MLP 3D + 3 -> 4D -> 1024                 (B, N, 1024)
                                   [propagated ; global] -> Conv1d 512 -> 256 -> part logits (B, N, parts)

Point-MAE's recipe (docs/REFERENCE.md sec. 8): a classification set returns ALL stored points, normalised over all of
them; training takes an FPS of 1200 (for 1024) from a random start and a fresh random 1024 of those EVERY step, then
scale-and-translate; testing takes an FPS of 1024; voting re-draws the 1024 and the augmentation on every pass.

Shapes: B batch, N points, G groups/tokens, K points per group, D width, M generic count.
Paper symbol -> name: n -> num_groups, p -> group_size, d^E -> dim.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets
from kat import KATransformer
from tokenizer import CenterEmbedding, PointTokenizer, farthest_point_sample, gather_points


# ---------------------------------------------------------------------------------------------------------------
# Models: the pre-trained 3-D path plus a task head
# ---------------------------------------------------------------------------------------------------------------
class PointEncoder(nn.Module):
    """The 3-D path kept after pre-training, under kr_mae.KRMAE's attribute names (its weights load as they are)."""

    def __init__(self, num_groups=64, group_size=32, dim=384, depth=12, num_heads=6, drop_path=0.1,
                 skip_near_origin=False):
        super().__init__()
        self.tokenizer_3d = PointTokenizer(num_groups=num_groups, group_size=group_size, dim=dim,
                                           skip_near_origin=skip_near_origin)  # Eq. (3)
        self.encoder_pos = CenterEmbedding(dim=dim)
        self.encoder = KATransformer(dim=dim, depth=depth, num_heads=num_heads, drop_path_rate=drop_path)


def backbone_arguments(cfg):
    return dict(num_groups=cfg.num_groups, group_size=cfg.group_size, dim=cfg.dim, depth=cfg.depth,
                num_heads=cfg.num_heads, drop_path=cfg.drop_path, skip_near_origin=cfg.fps_skip_near_origin)


def init_head(module):
    """Point-MAE's initialisation when training from scratch: truncated normal std 0.02, zero biases, for every Linear
    and Conv1d of `module`. A head fine-tuned from a checkpoint keeps PyTorch's default initialisation instead, as
    in Point-MAE, whose truncated-normal init runs only when no checkpoint is given (see run_finetune)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d)):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def init_new_parts(model):
    """init_head for every part of `model` outside the pre-trained 3-D path (tokenizer_3d, encoder_pos, encoder):
    finetune.py --trunc_normal_head gives a new head on a checkpoint's 3-D path the from-scratch initialisation."""
    for name, child in model.named_children():
        if name not in ("tokenizer_3d", "encoder_pos", "encoder"):
            init_head(child)


class Classifier(PointEncoder):
    """Point-MAE's classification model: [cls ; group tokens] -> encoder -> [cls output ; max] -> MLP."""

    def __init__(self, num_classes, **backbone):
        super().__init__(**backbone)
        dim = self.encoder.norm.normalized_shape[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # NOTE(unspecified): named *pos_embed so util/optim.parameter_groups exempts it from weight decay, as cls_token.
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # Point-MAE: std 0.02
        nn.init.trunc_normal_(self.cls_pos_embed, std=0.02)
        # Point-MAE: 2D -> 256 -> 256 -> classes, BN + ReLU + Dropout 0.5 after each hidden layer.
        self.head = nn.Sequential(nn.Linear(2 * dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                  nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                  nn.Linear(256, num_classes))  # (B, 2D) -> (B, classes), PyTorch's default init

    def forward(self, points):
        tokens, centers, _ = self.tokenizer_3d(points)  # (B, G, D), (B, G, 3)  Eq. (3)
        batch_size = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch_size, -1, -1), tokens], dim=1)  # (B, 1 + G, D)
        pos = torch.cat([self.cls_pos_embed.expand(batch_size, -1, -1), self.encoder_pos(centers)],
                        dim=1)  # (B, 1 + G, D)
        encoded = self.encoder(x, pos)  # (B, 1 + G, D)
        feature = torch.cat([encoded[:, 0], encoded[:, 1:].max(dim=1).values], dim=1)  # (B, 2D)
        return self.head(feature)  # (B, classes)


def interpolate_from_centers(points, centers, features, k=3):
    """Inverse-distance weighting of the k nearest centres (PointNet++ feature propagation), as one batched matmul:
    points (B, N, 3), centers (B, G, 3), features (B, G, C) -> (B, N, C)."""
    squared = torch.cdist(points.float(), centers.float()).pow(2)  # (B, N, G)
    nearest_squared, nearest = squared.topk(k, dim=2, largest=False)  # (B, N, k), (B, N, k)
    weights = 1.0 / (nearest_squared + 1e-8)  # PointNet++: 1 / squared distance
    weights = weights / weights.sum(dim=2, keepdim=True)  # (B, N, k), rows sum to 1
    # A sparse (B, N, G) mixing matrix with k weights per row; multiplying it gathers and mixes in one step.
    mixing = torch.zeros_like(squared).scatter_(2, nearest, weights)  # (B, N, G)
    return torch.bmm(mixing.to(features.dtype), features)  # (B, N, C)


def hidden_blocks(depth):
    """The encoder blocks the segmentation head reads: Point-MAE's 4, 8, 12 of 12 (0-based 3, 7, 11).
    NOTE(unspecified): for another depth we take the blocks at 1/3, 2/3 and 3/3 of it (depth 4: 1, 2, 4)."""
    return tuple(max(0, depth * part // 3 - 1) for part in (1, 2, 3))


class PartSegmenter(PointEncoder):
    """Point-MAE's part segmentation model (docs/REFERENCE.md sec. 7-8) on the pre-trained 3-D path, in its layer order:
    features of 3 encoder blocks -> feature propagation to every point ([xyz ; interpolated], MLP 3D + 3 -> 4D ->
    1024) -> [propagated ; global] -> Conv1d 512 -> 256 -> part logits."""

    def __init__(self, num_categories, num_parts, **backbone):
        super().__init__(**backbone)
        dim = self.encoder.norm.normalized_shape[0]
        self.hidden = hidden_blocks(len(self.encoder.blocks))
        self.num_categories = num_categories
        # Point-MAE: a 64-d embedding of the category one-hot (Conv1d 16 -> 64 without bias, BN, LeakyReLU 0.2).
        self.category_embed = nn.Sequential(nn.Linear(num_categories, 64, bias=False), nn.BatchNorm1d(64),
                                            nn.LeakyReLU(0.2))
        # Point-MAE's feature propagation (PointNet++): [xyz ; interpolated 3D features] (3D + 3 = 1155 channels)
        # -> Conv1d 4D (1536) -> Conv1d 1024, each with BN + ReLU.
        self.propagation = nn.Sequential(nn.Conv1d(3 * dim + 3, 4 * dim, 1), nn.BatchNorm1d(4 * dim),
                                         nn.ReLU(inplace=True), nn.Conv1d(4 * dim, 1024, 1), nn.BatchNorm1d(1024),
                                         nn.ReLU(inplace=True))
        in_channels = 1024 + 2 * 3 * dim + 64  # propagated + global (max, mean, category): 3392 at D = 384
        self.head = nn.Sequential(nn.Conv1d(in_channels, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                  nn.Dropout(0.5),  # Point-MAE: dropout 0.5 after the first layer
                                  nn.Conv1d(512, 256, 1), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                                  nn.Conv1d(256, num_parts, 1))

    def forward(self, points, category):
        num_points = points.shape[1]
        tokens, centers, _ = self.tokenizer_3d(points)  # (B, G, D), (B, G, 3)  Eq. (3)
        _, hidden = self.encoder(tokens, self.encoder_pos(centers), return_hidden=self.hidden)  # 3 x (B, G, D)
        features = torch.cat(hidden, dim=2)  # (B, G, 3D)
        one_hot = F.one_hot(category, self.num_categories).to(features.dtype)  # (B, categories)
        global_feature = torch.cat([features.max(dim=1).values, features.mean(dim=1),
                                    self.category_embed(one_hot).to(features.dtype)], dim=1)  # (B, 6D + 64)
        per_point = interpolate_from_centers(points, centers, features)  # (B, N, 3D)
        propagated = torch.cat([points.to(features.dtype), per_point], dim=2)  # (B, N, 3 + 3D), Point-MAE's order
        propagated = self.propagation(propagated.transpose(1, 2))  # (B, 1024, N)
        x = torch.cat([propagated, global_feature[:, :, None].expand(-1, -1, num_points)], dim=1)  # (B, 1024+6D+64, N)
        return self.head(x).transpose(1, 2)  # (B, N, parts)


# ---------------------------------------------------------------------------------------------------------------
# Measures: class-mean accuracy, part mIoU (pure functions)
# ---------------------------------------------------------------------------------------------------------------
def class_mean_accuracy(predictions, labels, num_classes):
    """Mean over the classes present in `labels` of each class's accuracy (ScanObjectNN's mAcc)."""
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).float()  # (classes,)
    total = torch.bincount(labels, minlength=num_classes).float()  # (classes,)
    return (correct[total > 0] / total[total > 0]).mean().item()


def part_category_table(part_ranges, device=None):
    """part_ranges[c] = (first part label, number of parts) of category c (the readers' convention, contiguous
    ranges) -> the owner category of every part label, (parts,)."""
    owner = torch.full((max(first + count for first, count in part_ranges),), -1, dtype=torch.long, device=device)
    for category, (first, count) in enumerate(part_ranges):  # 16 categories: a loop over a table, not over data
        owner[first:first + count] = category
    return owner  # (parts,)


def restrict_to_category(logits, category, part_ranges):
    """Predicted part of every point among the parts of its shape's known category (Point-MAE's evaluation):
    logits (B, N, parts), category (B,) -> (B, N) long."""
    owner = part_category_table(part_ranges, logits.device)  # (parts,)
    allowed = owner[None, :] == category[:, None]  # (B, parts)
    return logits.float().masked_fill(~allowed[:, None, :], float("-inf")).argmax(dim=2)  # (B, N)


def part_miou(logits_or_pred, target, category, part_ranges):
    """Part segmentation metrics (docs/REFERENCE.md sec. 1): logits (B, N, parts) or predictions (B, N), target (B, N),
    category (B,). Logits are first restricted to the category's parts. For each shape, the IoU of each part of
    its category (1 when the part is absent from both prediction and truth), averaged over those parts.
    Returns (instance mIoU = mean over shapes, class mIoU = mean over categories of their shapes' mean,
    per-shape mIoU (B,))."""
    predictions = (restrict_to_category(logits_or_pred, category, part_ranges) if logits_or_pred.is_floating_point()
                   else logits_or_pred)  # (B, N)
    owner = part_category_table(part_ranges, target.device)  # (parts,)
    num_shapes, num_parts, num_categories = target.shape[0], owner.numel(), len(part_ranges)
    # Counts per (shape, part) by one bincount over shape * parts + label: no loop over shapes or parts.
    shape_offset = torch.arange(num_shapes, device=target.device)[:, None] * num_parts  # (B, 1)
    target_index = (target + shape_offset).flatten()  # (B*N,)
    size = num_shapes * num_parts
    intersection = torch.bincount(target_index, weights=(predictions == target).flatten().float(), minlength=size)
    target_count = torch.bincount(target_index, minlength=size).float()  # (B*parts,)
    predicted_count = torch.bincount((predictions + shape_offset).flatten(), minlength=size).float()  # (B*parts,)
    union = predicted_count + target_count - intersection  # (B*parts,)
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))  # absent in both: 1
    iou = iou.reshape(num_shapes, num_parts)  # (B, parts)
    belongs = (owner[None, :] == category[:, None]).float()  # (B, parts): the parts of each shape's category
    shape_miou = (iou * belongs).sum(dim=1) / belongs.sum(dim=1)  # (B,)
    category_sum = torch.zeros(num_categories, device=target.device).index_add_(0, category, shape_miou)
    category_count = torch.bincount(category, minlength=num_categories).float()  # (categories,)
    present = category_count > 0
    class_miou = (category_sum[present] / category_count[present]).mean()
    return shape_miou.mean().item(), class_miou.item(), shape_miou


# ---------------------------------------------------------------------------------------------------------------
# Point-MAE's inputs: the training, test and voting points of a batch
# ---------------------------------------------------------------------------------------------------------------
def pool_size(num_points, stored):
    """Point-MAE's FPS pool before the random pick: 1200 points for 1024 (4800 for 4096), never more than stored
    (so ScanObjectNN's 2048 of 2048 keeps every point): ceil(N * 1200 / 1024), capped at the stored count."""
    return min(stored, math.ceil(num_points * 1200 / 1024))


def training_points(points, num_points, skip_near_origin=False):
    """Point-MAE's per-step resampling of a training batch: all stored points (B, M, 3) -> FPS of pool_size points
    from a random start -> a fresh random num_points of them -> (B, N, 3). Point-MAE shuffles the stored points
    and starts its FPS at index 0, which is a random start; it draws ONE random subset for the whole batch
    (np.random.choice(pool, N, replace=False)), as here. A new subset every step: no two epochs see the same points."""
    batch_size, stored, _ = points.shape
    pool = pool_size(num_points, stored)
    if pool < stored:  # FPS of all stored points would only reorder them
        start = torch.randint(stored, (batch_size,), device=points.device)  # (B,) random FPS start
        points = gather_points(points, farthest_point_sample(points, pool, start, skip_near_origin))  # (B, pool, 3)
    chosen = torch.randperm(pool, device=points.device)[:num_points]  # (N,) one subset for the batch
    return points[:, chosen]  # (B, N, 3)


def test_points(points, num_points, skip_near_origin=False):
    """Point-MAE's test input: FPS of num_points of all stored points from index 0 (for its FPS-ordered 8192-point
    cache, the first num_points). (B, M, 3) -> (B, N, 3); nothing random, every epoch tests the same points."""
    if points.shape[1] == num_points:
        return points
    return gather_points(points, farthest_point_sample(points, num_points, None, skip_near_origin))  # (B, N, 3)


def vote_points(points, num_points, passes, generator, skip_near_origin=False):
    """Point-MAE's voting inputs: FPS of pool_size points from index 0, then for each pass a fresh random
    num_points of them and a scale-and-translate. (B, M, 3) -> list of `passes` tensors (B, N, 3)."""
    pool = pool_size(num_points, points.shape[1])
    if pool < points.shape[1]:
        points = gather_points(points, farthest_point_sample(points, pool, None, skip_near_origin))  # (B, pool, 3)
    inputs = []
    for _ in range(passes):  # 10 passes, each a whole batch
        chosen = torch.randperm(pool, generator=generator)[:num_points].to(points.device)  # (N,)
        inputs.append(datasets.scale_and_translate(points[:, chosen], generator))  # (B, N, 3)
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# The test pass
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, sets, device, use_bf16, num_points, vote_passes=0, generator=None):
    """Test metrics in %: accuracy and class-mean accuracy, or instance / class mIoU and point accuracy.
    Classification reads test_points (FPS of num_points); vote_passes > 0: logits averaged over that many
    vote_points passes (Point-MAE's "voting": a fresh random subset of its FPS pool and a scale-and-translate)."""
    model.eval()
    segmentation = "part_ranges" in sets
    skip = model.tokenizer_3d.skip_near_origin  # the test points are picked by the model's own FPS variant
    outputs, targets, categories = [], [], []
    for batch in loader:
        points = batch[0].to(device)  # (B, M, 3) all stored points (segmentation: N)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if segmentation:
                category = batch[1].to(device)  # (B,)
                outputs.append(restrict_to_category(model(points, category), category, sets["part_ranges"]).cpu())
                targets.append(batch[2])
                categories.append(batch[1])
            elif vote_passes:
                passes = [model(inputs).float() for inputs in vote_points(points, num_points, vote_passes, generator, skip)]
                outputs.append(torch.stack(passes).mean(dim=0).cpu())  # (B, classes)
                targets.append(batch[1])
            else:
                outputs.append(model(test_points(points, num_points, skip)).float().cpu())  # (B, classes)
                targets.append(batch[1])
    target = torch.cat(targets)
    if segmentation:
        predictions = torch.cat(outputs)  # (M, N)
        instance_miou, class_miou, _ = part_miou(predictions, target, torch.cat(categories), sets["part_ranges"])
        point_accuracy = (predictions == target).float().mean().item()
        return {"instance_miou": 100 * instance_miou, "class_miou": 100 * class_miou,
                "point_accuracy": 100 * point_accuracy}
    predictions = torch.cat(outputs).argmax(dim=1)  # (M,)
    return {"accuracy": 100 * (predictions == target).float().mean().item(),
            "class_accuracy": 100 * class_mean_accuracy(predictions, target, sets["num_classes"])}


def test_pass(model, loader, sets, device, use_bf16, num_points, seed, vote_passes=0):
    """evaluate() as a run tests: with vote_passes 0 the test pass, on its own stream seeded with `seed`; else
    Point-MAE's voting, its augmentations drawn from a generator seeded with `seed`.

    NOTE(unspecified): the test pass draws from its own seeded stream (ShapeNetPart resamples its points on every
    access), so every epoch sees the same test points and testing never shifts the training's stream."""
    if vote_passes:
        generator = torch.Generator().manual_seed(seed)
        return evaluate(model, loader, sets, device, use_bf16, num_points, vote_passes, generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return evaluate(model, loader, sets, device, use_bf16, num_points)
