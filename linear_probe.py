"""Linear probes of frozen encoder features: the literature's linear SVM and three scale-free probes (REFERENCE
sec. 9). Not a section of the KR-MAE paper: it measures how good the pre-trained 3-D encoder's features are without
any fine-tuning, as I2P-MAE, Point-M2AE and Joint-MAE report it.

Features: every group visible, no 2-D tokens, encoder output tokens (B, G, D), pooled over the G tokens:
    "max"       f = max_G tokens                       (B, D)     the literature's pooling
    "max_mean"  f = [max_G tokens ; mean_G tokens]     (B, 2D)    the pooling of Point-MAE's classification head

Protocols (what probe_all reports):
    literature       SVC(C = 0.01, kernel = "linear") on RAW "max" features, one-vs-one hinge loss (libsvm):
                     min_w 1/2 |w|^2 + C sum_i max(0, 1 - y_i (w . x_i + b)) per class pair.
                     I2P-MAE / Point-M2AE's protocol; ModelNet40 accuracy reported 93.4 (I2P-MAE), 92.4 (Joint-MAE),
                     about 91 for Point-MAE-style backbones. Comparable with those papers, nothing more.
    cross-validated  LinearSVC's problem on L2-normalised "max_mean" features, one-vs-rest squared hinge, solved
                     for every C, fold and class at once by linear_svm.py (liblinear's objective, checked against
                     it); C chosen from a log grid by stratified k-fold cross-validation on the TRAINING split only,
                     then refitted on the whole training split. The chosen C is reported.
    nearest-neighbour  1-NN with cosine similarity on "max_mean": y_hat(i) = y_train[argmax_j <z_i, z_j>],
                     z = f / |f|. No parameter at all.
    few-shot         `shots` training shapes per class (seeded draws), LinearSVC(C = 1) on L2-normalised
                     "max_mean", CLASS-MEAN accuracy on the whole test split = 1/K sum_k (correct_k / count_k);
                     mean and std over the draws. Still informative when full-data accuracies saturate.

Beside the numbers, every report describes the features the probes saw (feature_geometry, on the "max_mean"
features of the training split), so that a reader sees whether a fixed C can bind:
    effective rank       exp(H(p)), p_j = s_j / sum_j s_j, s = singular values of the CENTRED features (X - mean_M X),
                         H the Shannon entropy in nats (Roy and Vetterli, 2007). Between 1 (one direction) and F.
    participation ratio  (sum_j s_j^2)^2 / sum_j s_j^4 of the same s: the number of directions that carry the
                         variance (1 when one direction carries it all, F when the variance is isotropic).
    mean pairwise cosine 1 / (M (M - 1)) sum_{i != j} <z_i, z_j>, z = f / |f|, on the RAW (uncentred) features.
Features that point almost the same way (mean cosine near 1) have tiny margins once L2-normalised, so accuracy then
climbs steeply with C: a fixed-C protocol measures the C as much as the features. Hence the literature protocol is
also reported at C = 0.01, 0.1 and 1 (LITERATURE_C_SWEEP): when those accuracies differ, C binds.
Every probe reports accuracy and class-mean accuracy 1/K sum_k (correct_k / count_k) (a small class that is never
recognised shows in the second). Printed output and the JSON lead with the scale-free probes (cross-validated SVM,
1-NN, few-shot with its fixed, documented C); the literature protocol follows, labelled as the published one.

Why C needs a scale. Multiply every feature by s: w' = w / s gives the same margins with |w'|^2 = |w|^2 / s^2, so
the problem with C on s*x is the problem with C * s^2 on x. C = 0.01 was tuned on raw pooled features (norm about
15); on L2-normalised features (norm 1) the same C acts like 0.01 / 225 on the raw ones: about 200 times more
regularisation. Such a probe under-fits (about 50 % TRAIN accuracy on the synthetic shapes,
tests/test_finetune_recipe.py) and on slightly imbalanced classes predicts the majority class only. Hence the literature
protocol keeps the raw scale, and our own protocols normalise and choose C by cross-validation (scale-free).

Shapes: M samples, F feature width, B batch, N points, G tokens (groups), D width, K classes.
Run the demo: `python linear_probe.py` (synthetic Gaussian clusters, a few seconds, prints every probe's result).
Time the probes at full ModelNet40 size: `python linear_probe.py --bench` (synthetic features of 9,843 / 2,468
shapes, 40 classes, [max ; mean] of width 384, built to look like real ones; see bench_features; docs/PROBES.md).
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import SVC, LinearSVC

import linear_svm
from downstream import PointEncoder, backbone_arguments, init_head, test_points
from util.weights import load_pretrained

LITERATURE_C = 0.01  # I2P-MAE / Point-M2AE: SVC(C=0.01, kernel="linear") on raw max-pooled features
# NOTE(unspecified): the literature protocol is also fitted at 10x and 100x its C, so that a reader sees whether C
# binds (the published protocol itself stays the C = 0.01 column).
LITERATURE_C_SWEEP = (0.01, 0.1, 1.0)
# NOTE(unspecified): 1e-3 .. 1e4 brackets every C that is useful on unit-norm features: 1e-3 predicts almost one
# class, 1e4 is close to a hard margin (a randomly initialised tiny encoder already picks 1e3 on synthetic shapes,
# so the grid reaches one step beyond).
C_GRID = tuple(10.0 ** power for power in range(-3, 5))
# NOTE(unspecified): the few-shot probe has too few shapes per class to cross-validate C; C = 1 (scikit-learn's
# default) on unit-norm features is fixed in advance so that every checkpoint is probed identically.
FEW_SHOT_C = 1.0
# liblinear's default of 1000 iterations is short for the dual solver at large C; 10000 converges on the tests' and
# the demo's data without a ConvergenceWarning (which we leave visible: a silent non-converged fit would mislead).
LINEAR_SVC_MAX_ITER = 10_000


# -------------------------------------------------------------------------------------------------------------------
# 1. Frozen features
# -------------------------------------------------------------------------------------------------------------------
def encoder_tokens(model, points):
    """Encoder output tokens with every group visible and no 2-D tokens (the 3-D path only). `model` is any module
    with `tokenizer_3d`, `encoder_pos` and `encoder` (downstream.PointEncoder, kr_mae.KRMAE)."""
    tokens, centers, _ = model.tokenizer_3d(points)  # (B, G, D), (B, G, 3)
    return model.encoder(tokens, model.encoder_pos(centers))  # (B, G, D)


def pool(tokens, pooling):
    """(B, G, D) -> (B, F): "max" (F = D) or "max_mean" (F = 2D). Raw: no normalisation here, the probes decide."""
    if pooling == "max":
        return tokens.max(dim=1).values  # (B, D)
    if pooling == "max_mean":
        return torch.cat([tokens.max(dim=1).values, tokens.mean(dim=1)], dim=1)  # (B, 2D)
    raise ValueError(f"Expected pooling 'max' or 'max_mean', but found {pooling!r}.")


@torch.no_grad()
def _extract(model, dataset, batch_size, device, use_bf16, num_workers, prepare, poolings):
    """One pass of the encoder over a dataset -> ({pooling: features (M, F)}, labels (M,)), float32 / long on the CPU.
    Eval mode during the pass (no dropout, no drop-path); the model's previous mode is restored even on an error."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    pooled, labels = {pooling: [] for pooling in poolings}, []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:  # (points, label, ...) tuples
            points = batch[0].to(device)  # (B, N, 3)
            if prepare is not None:
                points = prepare(points)  # (B, N', 3), e.g. the 1024 test points of 8192 stored ones
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                tokens = encoder_tokens(model, points)  # (B, G, D)
            tokens = tokens.float()  # pool in float32: the mean of bf16 values loses digits
            for pooling in poolings:
                pooled[pooling].append(pool(tokens, pooling).cpu())  # (B, F)
            labels.append(torch.as_tensor(batch[1]).long().reshape(-1))  # (B,)
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("Expected a dataset with at least one sample, but the data loader yielded no batch.")
    return {pooling: torch.cat(parts) for pooling, parts in pooled.items()}, torch.cat(labels)  # (M, F), (M,)


def extract_features(model, dataset, batch_size, device, use_bf16=False, num_workers=0, prepare=None,
                     pooling="max_mean"):
    """Pooled frozen features of every sample of a dataset of (points, label, ...) -> (M, F) float32, (M,) long, CPU.
    `prepare` (optional) maps each batch of points on the device before the encoder."""
    features, labels = _extract(model, dataset, batch_size, device, use_bf16, num_workers, prepare, (pooling,))
    return features[pooling], labels  # (M, F), (M,)


def features_for_probes(model, train_set, test_set, batch_size, device, use_bf16=False, num_workers=0, prepare=None):
    """Both poolings of both splits from ONE encoder pass per split, in probe_all's argument order:
    (train_max (M, D), train_max_mean (M, 2D), train_labels (M,), test_max, test_max_mean, test_labels)."""
    splits = []
    for dataset in (train_set, test_set):
        features, labels = _extract(model, dataset, batch_size, device, use_bf16, num_workers, prepare,
                                    ("max", "max_mean"))
        splits += [features["max"], features["max_mean"], labels]
    return tuple(splits)


# -------------------------------------------------------------------------------------------------------------------
# 2. Helpers shared by the probes
# -------------------------------------------------------------------------------------------------------------------
def _split(features, labels, name):
    """numpy float64 features (M, F) and int64 labels (M,) from tensors or arrays, with a clear error on a mismatch.
    NOTE(unspecified): float64 so that scikit-learn does not copy, and 1-NN ties are exact for equal directions."""
    features = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).astype(np.int64).reshape(-1)
    if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
        raise ValueError(f"Expected {name} features (M, F) and labels (M,) with M > 0, but found features "
                         f"{features.shape} and labels {labels.shape}.")
    return features, labels  # (M, F), (M,)


def _accuracy(predictions, labels):
    """Plain accuracy in %: the share of correct predictions."""
    return 100.0 * float(np.mean(predictions == labels))


def _class_mean_accuracy(predictions, labels):
    """Class-mean accuracy in %: 1/K sum_k (correct_k / count_k) over the K classes present in `labels`."""
    return 100.0 * float(np.mean([np.mean(predictions[labels == k] == k) for k in np.unique(labels)]))


def _accuracies(predictions, labels, prefix):
    """{prefix_accuracy, prefix_class_mean_accuracy} in %, for one split."""
    return {f"{prefix}_accuracy": _accuracy(predictions, labels),
            f"{prefix}_class_mean_accuracy": _class_mean_accuracy(predictions, labels)}


def feature_geometry(features):
    """How spread the features are: {effective_rank, participation_ratio, mean_cosine} of features (M, F).
    effective_rank = exp(-sum_j p_j log p_j), p_j = s_j / sum_j s_j, s the singular values of the centred features;
    participation_ratio = (sum_j s_j^2)^2 / sum_j s_j^4; mean_cosine = mean of <z_i, z_j> over all pairs i != j of the
    raw rows made unit-norm (a zero row counts as the zero vector). See the module docstring."""
    features = torch.as_tensor(_split(features, np.zeros(len(features)), "geometry")[0])  # (M, F) float64
    if len(features) < 2:
        raise ValueError(f"Expected at least 2 feature rows to measure their geometry, but found {len(features)}.")
    singular = torch.linalg.svdvals(features - features.mean(dim=0))  # (min(M, F),)
    if float(singular.sum()) == 0.0:  # every row equal: no direction carries any variance
        effective_rank, participation = 0.0, 0.0
    else:
        share = singular / singular.sum()  # (min(M, F),) p_j, sums to 1
        entropy = -(share[share > 0] * share[share > 0].log()).sum()  # nats; 0 log 0 = 0
        effective_rank = float(entropy.exp())
        variance = singular ** 2  # (min(M, F),)
        participation = float(variance.sum() ** 2 / (variance ** 2).sum())
    unit = F.normalize(features, dim=1)  # (M, F)
    # sum_{i != j} <z_i, z_j> = |sum_i z_i|^2 - sum_i |z_i|^2: O(M F) rather than the (M, M) matrix.
    total = unit.sum(dim=0)  # (F,)
    pairs = len(unit) * (len(unit) - 1)
    mean_cosine = float((total @ total - (unit * unit).sum()) / pairs)
    return {"effective_rank": effective_rank, "participation_ratio": participation, "mean_cosine": mean_cosine}


def normalised_linear_svc(c):
    """L2-normalise each sample, then a one-vs-rest squared-hinge linear SVM (liblinear): the few-shot probe's
    classifier, and the reference the cross-validated probe's own solver (linear_svm.py) is tested against.
    NOTE(unspecified): LinearSVC (liblinear) rather than SVC(kernel="linear") (libsvm): libsvm slows down sharply
    as C grows. dual="auto" picks the dual solver for the few-shot draws (M < F) and the primal one otherwise.
    random_state fixes the dual solver's coordinate order, so a fit is a pure function of its inputs."""
    return make_pipeline(Normalizer(norm="l2"),
                         LinearSVC(C=c, dual="auto", max_iter=LINEAR_SVC_MAX_ITER, random_state=0))


# -------------------------------------------------------------------------------------------------------------------
# 3. The probes
# -------------------------------------------------------------------------------------------------------------------
def fit_literature_svm(train_x, train_y, c=LITERATURE_C):
    """SVC(C=c, kernel="linear") fitted on the raw features as given (libsvm, one-vs-one): the fitted classifier."""
    train_x, train_y = _split(train_x, train_y, "training")
    return SVC(C=c, kernel="linear").fit(train_x, train_y)


def literature_svm(train_x, train_y, test_x, test_y, c=LITERATURE_C, sweep=LITERATURE_C_SWEEP):
    """The I2P-MAE / Point-M2AE protocol: SVC(C=0.01, kernel="linear") on RAW max-pooled features (pass the "max"
    features; they are NOT normalised here, because C = 0.01 only has its meaning at their raw scale).
    Also fitted at every C of `sweep` (c_sweep, ascending): when its accuracies differ, C binds on these features."""
    train_x, train_y = _split(train_x, train_y, "training")
    test_x, test_y = _split(test_x, test_y, "test")
    c_sweep = []
    for value in sorted({float(c), *(float(other) for other in sweep)}):
        classifier = fit_literature_svm(train_x, train_y, value)
        c_sweep.append({"C": value, **_accuracies(classifier.predict(train_x), train_y, "train"),
                        **_accuracies(classifier.predict(test_x), test_y, "test")})
    published = next(entry for entry in c_sweep if entry["C"] == float(c))
    return {"protocol": "literature", "pooling": "max", **published, "c_sweep": c_sweep}


def _unit(features):
    """Each row divided by its L2 norm (M, F); a zero row stays zero, as scikit-learn's Normalizer leaves it."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)  # (M, 1)
    return features / np.where(norms == 0, 1.0, norms)


class NormalisedLinearSVM:
    """A fitted scale-free SVM: L2-normalise each sample, then argmax_k <w_k, [x ; 1]> (linear_svm.predict)."""

    def __init__(self, weights, classes):
        self.weights, self.classes = weights, classes  # (F1, K) float64, (K,)

    def predict(self, features):
        return linear_svm.predict(self.weights, self.classes, _unit(np.asarray(features, dtype=np.float64)))


def fit_cross_validated_svm(train_x, train_y, c_grid=C_GRID, folds=5, seed=0):
    """C of the scale-free SVM by stratified k-fold cross-validation on the training split alone, and the SVM
    refitted with that C on the whole training split -> (classifier, selection). The classifier normalises by
    itself: give it raw features.
    The same folds serve every C. Score = accuracy of the out-of-fold predictions (each training sample is
    predicted once, by the model that did not see it). Ties go to the smaller C: the more regularised model.
    A class with fewer samples than `folds` lowers the folds to its count; a class of 1 sample is an error.
    Every fold and the refit, at every C, are solved at once by linear_svm.squared_hinge_path (LinearSVC's
    objective, checked against it in tests/test_linear_svm.py): about 90 s at full ModelNet40 size on 2 idle CPU
    cores, where each of the 41 LinearSVC fits took 11-25 s (docs/PROBES.md)."""
    train_x, train_y = _split(train_x, train_y, "training")
    classes, counts = np.unique(train_y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"Expected at least 2 classes in the training split, but found only {classes.tolist()}.")
    if folds < 2:
        raise ValueError(f"Expected at least 2 cross-validation folds, but found {folds}.")
    if counts.min() < 2:
        small = int(classes[counts.argmin()])
        raise ValueError(f"Cross-validation needs at least 2 training samples per class, but class {small} has "
                         f"{int(counts.min())} sample.")
    # NOTE(unspecified): lower the folds rather than fail, so small subsets (a few shapes per class) still work.
    used_folds = int(min(folds, counts.min()))
    splits = list(StratifiedKFold(used_folds, shuffle=True, random_state=seed).split(train_x, train_y))
    grid = sorted(float(c) for c in c_grid)  # ascending, so the strict ">" below keeps the smaller C on a tie
    if not grid or grid[0] <= 0:
        raise ValueError(f"Expected a non-empty grid of positive C values, but found {list(c_grid)}.")
    unit = _unit(train_x)  # (M, F)
    masks = np.ones((len(unit), used_folds + 1), dtype=bool)  # (M, folds + 1): each fold's training rows, then all
    for fold, (_, held_out_index) in enumerate(splits):
        masks[held_out_index, fold] = False
    svm_classes, path = linear_svm.squared_hinge_path(unit, train_y, masks, grid)  # (K,), (G, F1, folds + 1, K)
    cv_accuracies, best, best_correct = [], None, -1
    for index in range(len(grid)):
        correct = 0  # an integer count, so that ties are exact
        for fold, (_, held_out_index) in enumerate(splits):
            predicted = linear_svm.predict(path[index, :, fold], svm_classes, unit[held_out_index])
            correct += int(np.sum(predicted == train_y[held_out_index]))
        cv_accuracies.append(100.0 * correct / len(train_y))
        if correct > best_correct:
            best, best_correct = index, correct
    selection = {"C": grid[best], "cv_accuracy": 100.0 * best_correct / len(train_y), "folds": used_folds,
                 "folds_requested": int(folds), "c_grid": grid, "cv_accuracies": cv_accuracies}
    return NormalisedLinearSVM(path[best, :, used_folds], svm_classes), selection


def cross_validated_svm(train_x, train_y, test_x, test_y, c_grid=C_GRID, folds=5, seed=0):
    """The scale-free protocol: pass the raw "max_mean" features; each sample is L2-normalised here, C is chosen by
    cross-validation on the training split (fit_cross_validated_svm) and the model refitted on all of it."""
    classifier, selection = fit_cross_validated_svm(train_x, train_y, c_grid, folds, seed)
    train_x, train_y = _split(train_x, train_y, "training")
    test_x, test_y = _split(test_x, test_y, "test")
    return {"protocol": "cross-validated", "pooling": "max_mean", "normalisation": "l2", **selection,
            **_accuracies(classifier.predict(train_x), train_y, "train"),
            **_accuracies(classifier.predict(test_x), test_y, "test")}


def nearest_neighbours(train_x, test_x, chunk_size=1024):
    """Index (Mt,) of each test row's nearest training row by cosine similarity; ties -> the lowest training index.
    Chunked over test rows, so memory stays at chunk_size x M similarities."""
    train = F.normalize(torch.as_tensor(train_x, dtype=torch.float64), dim=1)  # (M, F)
    test = F.normalize(torch.as_tensor(test_x, dtype=torch.float64), dim=1)  # (Mt, F)
    positions = torch.arange(len(train))  # (M,)
    nearest = []
    for start in range(0, len(test), chunk_size):
        similarity = test[start:start + chunk_size] @ train.T  # (chunk, M)
        best = similarity.max(dim=1, keepdim=True).values  # (chunk, 1)
        # Explicit tie rule: the smallest index among the maxima (argmax's choice among ties is not our contract).
        candidates = torch.where(similarity == best, positions, len(train))  # (chunk, M)
        nearest.append(candidates.min(dim=1).values)  # (chunk,)
    return torch.cat(nearest).numpy()  # (Mt,)


def nearest_neighbour_accuracy(train_x, train_y, test_x, test_y, chunk_size=1024):
    """Parameter-free 1-NN accuracy in % with cosine similarity (L2-normalised features, largest dot product)."""
    train_x, train_y = _split(train_x, train_y, "training")
    test_x, test_y = _split(test_x, test_y, "test")
    return _accuracy(train_y[nearest_neighbours(train_x, test_x, chunk_size)], test_y)


def nearest_neighbour_probe(train_x, train_y, test_x, test_y, chunk_size=1024):
    """1-NN with cosine similarity -> {test_accuracy, test_class_mean_accuracy} in %."""
    train_x, train_y = _split(train_x, train_y, "training")
    test_x, test_y = _split(test_x, test_y, "test")
    return _accuracies(train_y[nearest_neighbours(train_x, test_x, chunk_size)], test_y, "test")


def _draw_few_shot(labels, shots, rng):
    """Indices (K * shots,) of `shots` distinct training samples of every class, class by class (ascending label)."""
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < shots:
        small = int(classes[counts.argmin()])
        raise ValueError(f"The few-shot probe needs {shots} training samples of every class, but class {small} has "
                         f"only {int(counts.min())}.")
    picks = [rng.choice(np.flatnonzero(labels == k), size=shots, replace=False) for k in classes]  # K x (shots,)
    return np.concatenate(picks)  # (K * shots,)


def few_shot_probe(train_x, train_y, test_x, test_y, shots=10, draws=20, seed=0):
    """`draws` times: `shots` shapes per class (numpy Generator seeded with [seed, draw]), the scale-free linear SVM
    with C = FEW_SHOT_C on them, CLASS-MEAN accuracy on the whole test split (mean, std, accuracies) and plain
    accuracy beside it (accuracy_mean, accuracy_std). Mean and sample std over the draws.
    NOTE(unspecified): std is 0 for a single draw (the sample std of one value is undefined)."""
    train_x, train_y = _split(train_x, train_y, "training")
    test_x, test_y = _split(test_x, test_y, "test")
    if shots < 1 or draws < 1:
        raise ValueError(f"Expected at least 1 shot and 1 draw, but found shots={shots} and draws={draws}.")
    if len(np.unique(train_y)) < 2:
        raise ValueError("Expected at least 2 classes in the training split for the few-shot probe, but found 1.")
    accuracies, plain = [], []  # class-mean and plain test accuracy of every draw
    for draw in range(draws):
        chosen = _draw_few_shot(train_y, shots, np.random.default_rng([seed, draw]))  # (K * shots,)
        predictions = normalised_linear_svc(FEW_SHOT_C).fit(train_x[chosen], train_y[chosen]).predict(test_x)
        accuracies.append(_class_mean_accuracy(predictions, test_y))
        plain.append(_accuracy(predictions, test_y))
    spread = float(np.std(accuracies, ddof=1)) if draws > 1 else 0.0
    return {"shots": int(shots), "draws": int(draws), "C": FEW_SHOT_C, "mean": float(np.mean(accuracies)),
            "std": spread, "accuracies": accuracies, "accuracy_mean": float(np.mean(plain)),
            "accuracy_std": float(np.std(plain, ddof=1)) if draws > 1 else 0.0}


def probe_all(train_max, train_max_mean, train_y, test_max, test_max_mean, test_y, c_grid=C_GRID, folds=5,
              shots=10, draws=20, seed=0, literature_sweep=LITERATURE_C_SWEEP, verbose=False):
    """Every probe on one pair of splits (the arguments are features_for_probes' output, in its order) -> one
    JSON-ready dict, accuracies in %, the scale-free probes first, then the literature protocol, the features'
    geometry and the wall time of every stage (seconds). majority_share (the most frequent TEST label's share) is
    the accuracy of always predicting that label: a probe at that level has learnt nothing.
    verbose: print one flushed line as each stage starts and ends, with its time (for long runs on real data)."""
    _, test_labels = _split(test_max, test_y, "test")
    stages = (
        ("cross_validated", "cross-validated SVM (C by CV)",
         lambda: cross_validated_svm(train_max_mean, train_y, test_max_mean, test_y, c_grid, folds, seed)),
        ("nearest_neighbour", "1-NN cosine", lambda: nearest_neighbour_probe(train_max_mean, train_y,
                                                                             test_max_mean, test_y)),
        ("few_shot", "few-shot", lambda: few_shot_probe(train_max_mean, train_y, test_max_mean, test_y, shots,
                                                         draws, seed)),
        ("literature", f"literature SVC at C = {', '.join(f'{c:g}' for c in literature_sweep)}",
         lambda: literature_svm(train_max, train_y, test_max, test_y, sweep=literature_sweep)),
        ("feature_geometry", "feature geometry", lambda: {"max_mean": feature_geometry(train_max_mean),
                                                          "max": feature_geometry(train_max)}))
    result, seconds = {}, {}
    for key, title, run in stages:
        if verbose:
            print(f"probe: {title} ...", flush=True)
        started = time.perf_counter()
        result[key] = run()
        seconds[key] = time.perf_counter() - started
        if verbose:
            print(f"probe: {title} took {seconds[key]:.1f} s", flush=True)
    neighbour = result.pop("nearest_neighbour")
    # The 1-NN accuracy stays a plain number under its old key (pretrain.py and the logs read it), its class mean
    # sits beside it.
    ordered = {"cross_validated": result["cross_validated"], "nearest_neighbour": neighbour["test_accuracy"],
               "nearest_neighbour_class_mean": neighbour["test_class_mean_accuracy"], "few_shot": result["few_shot"],
               "literature": result["literature"], "feature_geometry": result["feature_geometry"]}
    return {**ordered,
            "majority_share": 100.0 * float(np.unique(test_labels, return_counts=True)[1].max()) / len(test_labels),
            "train_shapes": int(len(train_y)), "test_shapes": int(len(test_labels)), "seconds": seconds}


def format_probes(result):
    """probe_all's dict -> a few lines of text: the scale-free probes first, then the published protocol and its C
    sweep, then the features' geometry; accuracy and class-mean accuracy on every line."""
    literature, validated, few_shot = result["literature"], result["cross_validated"], result["few_shot"]
    folds = f"{validated['folds']}-fold CV"
    if validated["folds"] != validated["folds_requested"]:
        folds += f" (lowered from {validated['folds_requested']}: a class is that small)"
    sweep = literature["c_sweep"]
    spread = max(entry["test_accuracy"] for entry in sweep) - min(entry["test_accuracy"] for entry in sweep)
    sweep_text = ", ".join(f"C = {entry['C']:g}: {entry['test_accuracy']:.1f} %" for entry in sweep)
    lines = [
        f"Linear probes: {result['train_shapes']} training / {result['test_shapes']} test shapes; always predicting "
        f"the majority class scores {result['majority_share']:.1f} %. Test accuracy / class-mean accuracy:",
        "  scale-free probes (lead every comparison):",
        f"  cross-validated  LinearSVC, C = {validated['C']:g} chosen by {folds} "
        f"(CV {validated['cv_accuracy']:.1f} %), L2-normalised [max ; mean]:  train {validated['train_accuracy']:.1f} %,"
        f" test {validated['test_accuracy']:.1f} % / {validated['test_class_mean_accuracy']:.1f} %",
        f"  1-NN cosine      no parameter, [max ; mean]:  test {result['nearest_neighbour']:.1f} % / "
        f"{result['nearest_neighbour_class_mean']:.1f} %",
        f"  few-shot         {few_shot['shots']} shapes per class, LinearSVC C = {few_shot['C']:g} fixed, "
        f"{few_shot['draws']} draws:  test {few_shot['accuracy_mean']:.1f} % / {few_shot['mean']:.1f} +- "
        f"{few_shot['std']:.1f} %",
        "  published protocol (docs/REFERENCE.md sec. 9; for numbers beside published ones, not for differences):",
        f"  literature       SVC linear, C = {literature['C']:g} fixed, raw max pooling:  "
        f"train {literature['train_accuracy']:.1f} %, test {literature['test_accuracy']:.1f} % / "
        f"{literature['test_class_mean_accuracy']:.1f} %",
        f"  literature C sweep  test {sweep_text}: {spread:.1f} points apart"
        + (" (C binds: this column measures C as well as the features)" if spread >= 1.0 else "")]
    for pooling, name in (("max_mean", "[max ; mean]"), ("max", "max")):
        geometry = result["feature_geometry"][pooling]
        lines.append(f"  features {name:12s} (training split): effective rank {geometry['effective_rank']:.2f} "
                     f"(exp entropy of the centred singular values), participation ratio "
                     f"{geometry['participation_ratio']:.2f}, mean pairwise cosine {geometry['mean_cosine']:.3f}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------------
# Benchmark: synthetic features of full ModelNet40's size that look like real encoder features
# -------------------------------------------------------------------------------------------------------------------
def bench_features(train_size=9843, test_size=2468, num_classes=40, width=384, seed=0):
    """Raw pooled features shaped and spread like a real encoder's on ModelNet40 -> train_max (M, D),
    train_max_mean (M, 2D), train_y (M,), test_max, test_max_mean, test_y (features_for_probes' order), numpy.
    Every row = a shared direction of norm 15 (raw pooled features: about 15), scaled by exp(0.45 t), t ~ N(0, 1),
    + a class centre and within-class noise in 32 directions of decaying scale (the first one 4, then 0.8^j)
    + isotropic noise 0.05. Class sizes are drawn from log-normal weights (ModelNet40's train classes hold
    64-889 shapes). NOTE(unspecified): the constants are chosen so that the training features have a mean pairwise
    cosine of about 0.87 and a participation ratio of about 1.8 (the 0.84-0.90 and 1.4-1.9 measured on
    this project's tiny-preset encoders, docs/PROBES.md), and so that the classes overlap (CV SVM about 85-90 %),
    as real features do."""
    rng = np.random.default_rng(seed)
    weights = np.exp(rng.normal(0.0, 0.8, num_classes))  # (K,) class frequencies
    train_y = np.sort(rng.choice(num_classes, train_size, p=weights / weights.sum()))  # (M,)
    test_y = np.sort(rng.choice(num_classes, test_size, p=weights / weights.sum()))  # (Mt,)
    shared = np.abs(rng.normal(size=2 * width)) + 0.5  # (2D,) positive, as max- and mean-pooled GELU outputs lean
    shared *= 15.0 / np.linalg.norm(shared)
    basis = np.linalg.qr(rng.normal(size=(2 * width, 32)))[0]  # (2D, 32) orthonormal class directions
    scales = 0.8 ** np.arange(32)  # (32,)
    scales[0] = 4.0  # one dominant direction: few effective dimensions
    centres = rng.normal(size=(num_classes, 32)) * scales  # (K, 32)

    def sample(labels):
        size = np.exp(0.45 * rng.normal(size=(len(labels), 1)))  # (M, 1) per-shape scale of the shared part
        local = centres[labels] + 0.5 * scales * rng.normal(size=(len(labels), 32))  # (M, 32)
        return shared * size + local @ basis.T + 0.05 * rng.normal(size=(len(labels), 2 * width))  # (M, 2D)

    train, test = sample(train_y), sample(test_y)
    return train[:, :width], train, train_y, test[:, :width], test, test_y


def compare_with_liblinear(train_x, train_y, test_x, test_y, c_values):
    """linear_svm.squared_hinge_path (the whole path over c_values, as the CV probe runs it) against one LinearSVC
    fit per C, on L2-normalised features -> one dict per C: both test accuracies, the test predictions that
    differ, the weights' relative difference, both objectives summed over the classes, and LinearSVC's time."""
    train_x, train_y = _split(train_x, train_y, "training")
    test_x, test_y = _split(test_x, test_y, "test")
    unit, test_unit = _unit(train_x), _unit(test_x)
    grid = sorted(float(c) for c in c_values)
    classes, path = linear_svm.squared_hinge_path(unit, train_y, np.ones((len(unit), 1), bool), grid)
    z = np.hstack([unit, np.ones((len(unit), 1))])  # (M, F1)
    signs = np.where(train_y[:, None] == classes.numpy()[None, :], 1.0, -1.0)  # (M, K)

    def objective(weights):  # 1/2 |w|^2 + C sum max(0, 1 - t <w, z>)^2, summed over the K problems
        slack = np.maximum(0.0, 1.0 - signs * (z @ weights))
        return float(0.5 * (weights ** 2).sum() + c * (slack ** 2).sum())

    rows = []
    for index, c in enumerate(grid):
        started = time.perf_counter()
        reference = LinearSVC(C=c, dual=False, max_iter=LINEAR_SVC_MAX_ITER, random_state=0).fit(unit, train_y)
        seconds = time.perf_counter() - started
        theirs = np.vstack([reference.coef_.T, reference.intercept_[None, :]])  # (F1, K); 2 classes: one column
        ours = path[index, :, 0].numpy()[:, -theirs.shape[1]:]
        predicted, expected = linear_svm.predict(path[index, :, 0], classes, test_unit), reference.predict(test_unit)
        rows.append({"C": c, "test_accuracy": _accuracy(predicted, test_y),
                     "liblinear_test_accuracy": _accuracy(expected, test_y),
                     "predictions_differing": int(np.sum(predicted != expected)),
                     "weights_relative_difference": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
                     "objective": objective(path[index, :, 0].numpy()) if theirs.shape[1] > 1 else None,
                     "liblinear_objective": objective(theirs) if theirs.shape[1] > 1 else None,
                     "liblinear_seconds": seconds})
    return rows


def bench(args):
    """The probes named by args.probes on bench_features, one flushed line per stage, then the times and the
    machine's load (a shared machine's load changes every time)."""
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    train_max, train_max_mean, train_y, test_max, test_max_mean, test_y = bench_features(args.train_size,
                                                                                         args.test_size)
    print(f"bench features: train {train_max_mean.shape}, test {test_max_mean.shape}, {len(np.unique(train_y))} "
          f"classes; load average before {load_before[0]:.2f}", flush=True)
    stages = {"geometry": lambda: feature_geometry(train_max_mean),
              "nn": lambda: nearest_neighbour_probe(train_max_mean, train_y, test_max_mean, test_y),
              "fewshot": lambda: few_shot_probe(train_max_mean, train_y, test_max_mean, test_y),
              "cv": lambda: cross_validated_svm(train_max_mean, train_y, test_max_mean, test_y),
              "literature": lambda: literature_svm(train_max, train_y, test_max, test_y),
              "liblinear": lambda: compare_with_liblinear(train_max_mean, train_y, test_max_mean, test_y,
                                                          [float(c) for c in args.compare_c.split(",")])}
    result, seconds, cpu = {}, {}, {}
    for name in args.probes.split(","):
        if name not in stages:
            raise ValueError(f"Expected --probes from {sorted(stages)}, but found {name!r}.")
        print(f"bench: {name} ...", flush=True)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result[name] = stages[name]()
        seconds[name], cpu[name] = time.perf_counter() - wall_start, time.process_time() - cpu_start
        print(f"bench: {name} took {seconds[name]:.1f} s wall, {cpu[name]:.1f} s CPU; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
    result["bench"] = {"wall_s": seconds, "cpu_s": cpu, "threads": args.threads, "load_before": load_before,
                       "load_after": os.getloadavg(), "train_size": args.train_size, "test_size": args.test_size}
    print("As logged:", json.dumps(result))


def demo():
    """Gaussian clusters of token sets, no data files: every probe's result in a few seconds."""
    rng = np.random.default_rng(0)
    num_classes, num_tokens, width = 8, 16, 32  # K, G, D
    prototypes = rng.normal(size=(num_classes, num_tokens, width))  # (K, G, D) one token set per class
    # A large part shared by every shape, as in real encoder features: raw norms near 20 (real ones: about 15).
    shared = 2.0 * rng.normal(size=(1, 1, width))  # (1, 1, D)

    def token_sets(counts):
        """Noisy token sets of each class, counts[k] of class k -> tokens (M, G, D), labels (M,)."""
        labels = np.repeat(np.arange(num_classes), counts)  # (M,)
        tokens = shared + 1.0 * prototypes[labels] + rng.normal(size=(len(labels), num_tokens, width))  # (M, G, D)
        return torch.from_numpy(tokens).float(), torch.from_numpy(labels)

    # Slightly imbalanced training classes (as ModelNet40's are), a balanced test split.
    train_tokens, train_labels = token_sets(np.linspace(60, 30, num_classes).astype(int))
    test_tokens, test_labels = token_sets(np.full(num_classes, 25))
    print("tokens: train", tuple(train_tokens.shape), "test", tuple(test_tokens.shape))  # (M, G, D)
    features = []
    for tokens, labels in ((train_tokens, train_labels), (test_tokens, test_labels)):
        features += [pool(tokens, "max"), pool(tokens, "max_mean"), labels]  # (M, D), (M, 2D), (M,)
    print("pooled: max", tuple(features[0].shape), "max_mean", tuple(features[1].shape),
          f"mean raw norm of the max features {features[0].norm(dim=1).mean():.1f}")

    result = probe_all(*features, seed=0)
    print(format_probes(result))
    # The defect the scale-free protocols avoid: the literature's C on the same features made unit-norm.
    unit = literature_svm(F.normalize(features[0], dim=1), train_labels, F.normalize(features[3], dim=1), test_labels)
    print(f"For contrast, SVC C = {LITERATURE_C:g} on L2-normalised max features: "
          f"train {unit['train_accuracy']:.1f} %, test {unit['test_accuracy']:.1f} % "
          f"(about 200 times more regularised than at the raw scale).")
    print("As logged:", json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# The probe run: finetune.py --task svm
# ---------------------------------------------------------------------------------------------------------------
def run_svm(cfg, device, run_dir, sets):
    """Linear probes of frozen features (no fine-tuning), ModelNet40 train -> test or the synthetic shapes: the
    literature's SVM, the cross-validated SVM, 1-nearest-neighbour and the few-shot linear probe (above).
    Each shape is read as at test time: FPS of num_points of its stored points (Point-MAE's 1024). sets: the task's
    train and test sets (finetune.build_datasets)."""
    use_bf16 = cfg.amp and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = PointEncoder(**backbone_arguments(cfg))
    if cfg.checkpoint:
        load_pretrained(model, cfg.checkpoint, cfg)
    else:
        init_head(model)  # Point-MAE's from-scratch initialisation of the whole encoder
        print("No --checkpoint: the features come from a RANDOMLY INITIALISED encoder (a baseline only).")
    model.to(device)
    # Every stage says when it starts and how long it took, in plain flushed lines (also with --no-progress).
    shapes = len(sets["train"]) + len(sets["test"])
    print(f"probe: feature extraction of {shapes} shapes on {device.type} (batches of {cfg.batch_size}: FPS of "
          f"{cfg.num_points} points and the encoder, both batched on the device) ...", flush=True)
    started = time.perf_counter()
    features = features_for_probes(model, sets["train"], sets["test"], cfg.batch_size, device, use_bf16,
                                   cfg.num_workers, prepare=lambda points: test_points(points, cfg.num_points,
                                                                                       cfg.fps_skip_near_origin))
    extraction_seconds = time.perf_counter() - started
    print(f"probe: feature extraction took {extraction_seconds:.1f} s ({1000 * extraction_seconds / shapes:.1f} ms "
          f"per shape)", flush=True)
    probes = probe_all(*features, shots=cfg.probe_shots, draws=cfg.probe_draws, seed=cfg.seed, verbose=True)
    probes["seconds"] = {"feature_extraction": extraction_seconds, **probes["seconds"]}
    print(format_probes(probes), flush=True)
    result = {"seed": cfg.seed, **flatten_probes(probes)}
    with open(os.path.join(run_dir, "log.jsonl"), "w") as handle:
        handle.write(json.dumps({**result, "probes": probes}) + "\n")
    return result


def flatten_probes(probes):
    """probe_all's nested result -> flat float fields, so main() can average them over seeds."""
    literature, validated, few_shot = probes["literature"], probes["cross_validated"], probes["few_shot"]
    geometry = probes["feature_geometry"]["max_mean"]
    return {"cv_svm_accuracy": float(validated["test_accuracy"]),
            "cv_svm_class_mean_accuracy": float(validated["test_class_mean_accuracy"]),
            "cv_svm_train_accuracy": float(validated["train_accuracy"]), "cv_svm_C": float(validated["C"]),
            "nearest_neighbour_accuracy": float(probes["nearest_neighbour"]),
            "nearest_neighbour_class_mean_accuracy": float(probes["nearest_neighbour_class_mean"]),
            f"few_shot_{few_shot['shots']}_class_accuracy": float(few_shot["mean"]),
            f"few_shot_{few_shot['shots']}_accuracy": float(few_shot["accuracy_mean"]),
            "literature_svm_accuracy": float(literature["test_accuracy"]),
            "literature_svm_class_mean_accuracy": float(literature["test_class_mean_accuracy"]),
            "literature_svm_train_accuracy": float(literature["train_accuracy"]),
            **{f"literature_svm_accuracy_C{entry['C']:g}": float(entry["test_accuracy"])
               for entry in literature["c_sweep"]},
            "effective_rank": float(geometry["effective_rank"]),
            "participation_ratio": float(geometry["participation_ratio"]),
            "mean_cosine": float(geometry["mean_cosine"]), "majority_share": float(probes["majority_share"])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Linear probes: the demo, or with --bench their time at full "
                                                 "ModelNet40 size on synthetic features (docs/PROBES.md).")
    parser.add_argument("--bench", action="store_true", help="time the probes on bench_features")
    parser.add_argument("--train_size", type=int, default=9843, help="bench: training shapes (ModelNet40: 9843)")
    parser.add_argument("--test_size", type=int, default=2468, help="bench: test shapes (ModelNet40: 2468)")
    parser.add_argument("--threads", type=int, default=2, help="bench: torch threads")
    parser.add_argument("--probes", default="geometry,nn,fewshot,cv,literature",
                        help="bench: the stages to time, comma-separated, in order (also: liblinear, "
                             "linear_svm beside LinearSVC at --compare_c)")
    parser.add_argument("--compare_c", default="100",
                        help="bench, stage 'liblinear': the C values at which linear_svm is set beside LinearSVC")
    arguments = parser.parse_args()
    if arguments.bench:
        bench(arguments)
    else:
        demo()
