"""Tests of linear_probe.py: each probe against scikit-learn or a slow obvious version on hand-built or clustered
features, the defect the cross-validated probe fixes (a fixed C on unit-norm features), and feature extraction
through a tiny fake encoder."""
import json
import math

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.svm import SVC, LinearSVC
from torch import nn

import linear_probe

torch.set_num_threads(2)

# Arbitrary non-negative labels, so that no code may assume 0..K-1.
LABELS = np.array([3, 7, 11, 20, 42])


def unit_clusters(train_counts, test_counts, width=32, noise=0.15, seed=0):
    """Well-separated Gaussian clusters on the unit sphere: class k around a random unit direction.
    -> train_x (M, F), train_y (M,), test_x, test_y, all numpy, every row of norm 1."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(train_counts), width))  # (K, F)
    means /= np.linalg.norm(means, axis=1, keepdims=True)

    def sample(counts):
        index = np.repeat(np.arange(len(counts)), counts)  # (M,)
        x = means[index] + noise * rng.normal(size=(len(index), width))  # (M, F)
        return x / np.linalg.norm(x, axis=1, keepdims=True), LABELS[index]

    return (*sample(train_counts), *sample(test_counts))


def accuracy(predictions, labels):
    return 100.0 * float(np.mean(predictions == labels))


# ---------------------------------------------------------------- pooling

def test_pool_max_and_max_mean_match_manual_values():
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]]])  # (B=1, G=3, D=2)
    assert torch.equal(linear_probe.pool(tokens, "max"), torch.tensor([[3.0, 5.0]]))
    assert torch.allclose(linear_probe.pool(tokens, "max_mean"), torch.tensor([[3.0, 5.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="'max' or 'max_mean'"):
        linear_probe.pool(tokens, "mean")


# ---------------------------------------------------------------- cross-validated SVM and the defect it fixes

def test_cross_validated_probe_separates_unit_norm_clusters_and_reports_its_refit():
    train_x, train_y, test_x, test_y = unit_clusters([30] * 5, [20] * 5)
    result = linear_probe.cross_validated_svm(train_x, train_y, test_x, test_y)
    assert result["test_accuracy"] >= 99.0
    assert result["C"] in linear_probe.C_GRID and result["folds"] == 5
    # The reported train accuracy is that of LinearSVC refitted with the chosen C on the normalised features.
    unit = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    refit = LinearSVC(C=result["C"], dual="auto", max_iter=10_000, random_state=0).fit(unit, train_y)
    assert result["train_accuracy"] == accuracy(refit.predict(unit), train_y)
    # The CV score is that of the out-of-fold predictions with the same stratified folds, on the training split.
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    out_of_fold = cross_val_predict(linear_probe.normalised_linear_svc(result["C"]), train_x, train_y, cv=folds)
    assert result["cv_accuracy"] == pytest.approx(accuracy(out_of_fold, train_y))
    # Ties go to the smaller C: the chosen C is the first C of the grid that reaches the best CV score.
    best = max(result["cv_accuracies"])
    assert result["C"] == min(c for c, score in zip(result["c_grid"], result["cv_accuracies"]) if score == best)
    # On a balanced separable set every class is predicted.
    classifier, _ = linear_probe.fit_cross_validated_svm(train_x, train_y)
    assert len(np.unique(classifier.predict(test_x))) == len(LABELS)


def test_fixed_literature_C_on_unit_norm_features_predicts_one_class_but_cv_probe_does_not():
    # Slightly imbalanced training classes (30 vs 24), a balanced test split: where a fixed C on unit-norm features fails.
    train_x, train_y, test_x, test_y = unit_clusters([30, 24, 24, 24, 24], [20] * 5)
    unit_predictions = SVC(C=0.01, kernel="linear").fit(train_x, train_y).predict(test_x)
    assert np.unique(unit_predictions).tolist() == [LABELS[0]]  # the majority class only
    assert accuracy(unit_predictions, test_y) == 20.0  # majority level of a balanced 5-class split
    # The same C on the same features at the raw scale (norm 15) is fine: C only means something at a scale.
    raw_predictions = SVC(C=0.01, kernel="linear").fit(15 * train_x, train_y).predict(15 * test_x)
    assert accuracy(raw_predictions, test_y) >= 99.0
    # The scale-free probe on the unit-norm features.
    result = linear_probe.cross_validated_svm(train_x, train_y, test_x, test_y)
    assert result["test_accuracy"] >= 99.0
    classifier, _ = linear_probe.fit_cross_validated_svm(train_x, train_y)
    assert len(np.unique(classifier.predict(test_x))) == len(LABELS)


def test_literature_protocol_is_sklearn_svc_on_the_raw_features():
    train_x, train_y, test_x, test_y = unit_clusters([30, 24, 24, 24, 24], [20] * 5)
    train_x, test_x = 15 * train_x, 15 * test_x  # raw pooled features: norm about 15
    reference = SVC(C=0.01, kernel="linear").fit(train_x, train_y)
    ours = linear_probe.fit_literature_svm(torch.from_numpy(train_x).float(), torch.from_numpy(train_y))
    assert np.array_equal(ours.predict(test_x), reference.predict(test_x))
    result = linear_probe.literature_svm(train_x, train_y, test_x, test_y)
    assert result["test_accuracy"] == accuracy(reference.predict(test_x), test_y)
    assert result["train_accuracy"] == accuracy(reference.predict(train_x), train_y)
    assert (result["protocol"], result["pooling"], result["C"]) == ("literature", "max", 0.01)
    # Normalising (what the literature does NOT do) would change the answer on these features.
    unit = SVC(C=0.01, kernel="linear").fit(train_x / 15, train_y)
    assert result["test_accuracy"] != accuracy(unit.predict(test_x / 15), test_y)


def test_folds_are_lowered_for_a_small_class_and_a_single_sample_class_is_rejected():
    train_x, train_y, test_x, test_y = unit_clusters([12, 12, 3], [5, 5, 5])
    result = linear_probe.cross_validated_svm(train_x, train_y, test_x, test_y, folds=5)
    assert (result["folds"], result["folds_requested"]) == (3, 5)
    assert result["test_accuracy"] >= 99.0
    train_x, train_y, test_x, test_y = unit_clusters([12, 12, 1], [5, 5, 5])
    with pytest.raises(ValueError, match=f"class {LABELS[2]} has 1 sample"):
        linear_probe.cross_validated_svm(train_x, train_y, test_x, test_y)


# ---------------------------------------------------------------- nearest neighbour

def test_nearest_neighbour_uses_cosine_similarity_and_breaks_ties_by_lowest_index():
    # Euclidean nearest of the test point (1, 0.05) is (0.9, 0.5) (label 1); by angle it is (10, 0) (label 0).
    train_x = np.array([[10.0, 0.0], [0.9, 0.5]])
    test_x = np.array([[1.0, 0.05]])
    euclidean = np.argmin(np.linalg.norm(train_x - test_x, axis=1))
    assert euclidean == 1  # the case really separates the two metrics
    assert linear_probe.nearest_neighbour_accuracy(train_x, [0, 1], test_x, [0]) == 100.0
    # Rows 0 and 1 have the same direction: an exact tie, resolved to the lower index whatever the norms.
    tied = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert linear_probe.nearest_neighbours(tied, np.array([[3.0, 0.0], [0.0, 5.0]])).tolist() == [0, 2]
    assert linear_probe.nearest_neighbour_accuracy(tied, [5, 3, 8], [[3.0, 0.0]], [5]) == 100.0
    assert linear_probe.nearest_neighbour_accuracy(tied[[1, 0, 2]], [3, 5, 8], [[3.0, 0.0]], [5]) == 0.0


def test_chunked_nearest_neighbours_match_a_slow_loop():
    rng = np.random.default_rng(1)
    train_x, test_x = rng.normal(size=(40, 6)), rng.normal(size=(17, 6))
    slow = []
    for row in test_x:
        cosine = [row @ other / (np.linalg.norm(row) * np.linalg.norm(other)) for other in train_x]
        slow.append(int(np.argmax(cosine)))
    assert linear_probe.nearest_neighbours(train_x, test_x, chunk_size=3).tolist() == slow
    assert linear_probe.nearest_neighbours(train_x, test_x, chunk_size=1000).tolist() == slow


# ---------------------------------------------------------------- few-shot probe

def test_few_shot_draw_takes_exactly_shots_distinct_samples_of_every_class():
    labels = np.array([9, 2, 2, 9, 5, 2, 9, 5, 5, 9, 2, 5, 9])
    index = linear_probe._draw_few_shot(labels, 3, np.random.default_rng([0, 0]))
    assert len(np.unique(index)) == len(index) == 9
    assert labels[index].tolist() == [2, 2, 2, 5, 5, 5, 9, 9, 9]  # 3 of each class, class by class
    again = linear_probe._draw_few_shot(labels, 3, np.random.default_rng([0, 0]))
    assert np.array_equal(index, again)
    draws = {tuple(linear_probe._draw_few_shot(labels, 3, np.random.default_rng([0, d]))) for d in range(10)}
    assert len(draws) > 1


def test_few_shot_probe_is_deterministic_for_a_seed_and_differs_across_seeds():
    # Overlapping clusters, so that which 2 shapes are drawn matters.
    train_x, train_y, test_x, test_y = unit_clusters([20] * 5, [20] * 5, noise=1.0)
    first = linear_probe.few_shot_probe(train_x, train_y, test_x, test_y, shots=2, draws=5, seed=0)
    again = linear_probe.few_shot_probe(train_x, train_y, test_x, test_y, shots=2, draws=5, seed=0)
    other = linear_probe.few_shot_probe(train_x, train_y, test_x, test_y, shots=2, draws=5, seed=1)
    assert first == again
    assert first["accuracies"] != other["accuracies"]
    assert len(first["accuracies"]) == 5 and (first["shots"], first["draws"]) == (2, 5)
    assert first["mean"] == pytest.approx(np.mean(first["accuracies"]))
    assert first["std"] == pytest.approx(np.std(first["accuracies"], ddof=1))


def test_few_shot_probe_scores_class_mean_accuracy():
    # Class 4 around (1, 0), class 6 around (0, 1); every draw separates them perfectly.
    train_x = np.array([[1, 0.1], [1, -0.1], [1, 0], [0.1, 1], [-0.1, 1], [0, 1]])
    train_y = np.array([4, 4, 4, 6, 6, 6])
    # Imbalanced test split: 8 of class 4 (all right), 2 of class 6 (one lies in class 4's region).
    test_x = np.array([[1, 0]] * 8 + [[0, 1], [1, 0]], dtype=float)
    test_y = np.array([4] * 8 + [6, 6])
    result = linear_probe.few_shot_probe(train_x, train_y, test_x, test_y, shots=2, draws=3)
    # Plain accuracy would be 9 / 10 = 90 %; the class mean is (100 + 50) / 2 = 75 %.
    assert result["accuracies"] == [75.0, 75.0, 75.0]
    assert (result["mean"], result["std"]) == (75.0, 0.0)


def test_few_shot_probe_rejects_a_class_with_fewer_than_shots_samples():
    train_x, train_y, test_x, test_y = unit_clusters([12, 12, 3], [5, 5, 5])
    with pytest.raises(ValueError, match=f"class {LABELS[2]} has only 3"):
        linear_probe.few_shot_probe(train_x, train_y, test_x, test_y, shots=4)


# ---------------------------------------------------------------- feature extraction through a fake encoder

class FakeTokenizer(nn.Module):
    def forward(self, points):  # (B, N, 3): one token per point, G = N, D = 6
        return torch.cat([points, points ** 2], dim=-1), points, None


class FakePosition(nn.Module):
    def forward(self, centers):  # (B, G, 3) -> (B, G, 1)
        return centers.sum(dim=-1, keepdim=True)


class FakeEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.modes = []  # self.training at every call

    def forward(self, tokens, pos):
        self.modes.append(self.training)
        return 2 * tokens + pos  # (B, G, D)


class FakeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokenizer_3d, self.encoder_pos, self.encoder = FakeTokenizer(), FakePosition(), FakeEncoder()


def fake_dataset(size, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, generator=generator), int(label), "extra") for label in [4, 0, 9, 4, 2, 7][:size]]


def manual_features(dataset, num_points):
    """What the fake model's features must be, computed sample by sample."""
    rows_max, rows_max_mean = [], []
    for points, _, _ in dataset:
        points = points[:num_points]  # (N', 3)
        tokens = 2 * torch.cat([points, points ** 2], dim=-1) + points.sum(dim=-1, keepdim=True)  # (G, D)
        rows_max.append(tokens.max(dim=0).values)
        rows_max_mean.append(torch.cat([tokens.max(dim=0).values, tokens.mean(dim=0)]))
    return torch.stack(rows_max), torch.stack(rows_max_mean)  # (M, D), (M, 2D)


def test_extract_features_pools_applies_prepare_and_restores_the_mode():
    model, dataset = FakeModel().train(), fake_dataset(5, seed=0)
    first_four = lambda points: points[:, :4]  # noqa: E731  a caller's sub-sampling of the stored points
    features, labels = linear_probe.extract_features(model, dataset, 2, "cpu", prepare=first_four)
    expected_max, expected_max_mean = manual_features(dataset, 4)
    assert features.dtype == torch.float32 and labels.dtype == torch.long
    assert torch.allclose(features, expected_max_mean) and labels.tolist() == [4, 0, 9, 4, 2]
    assert not torch.allclose(features, manual_features(dataset, 8)[1])  # prepare really changed the input
    max_only, _ = linear_probe.extract_features(model, dataset, 2, "cpu", prepare=first_four, pooling="max")
    assert torch.allclose(max_only, expected_max)
    # Eval mode inside, the previous mode afterwards (train here, eval below), even when a batch fails.
    assert model.encoder.modes and not any(model.encoder.modes)
    assert model.training and model.encoder.training
    model.eval()
    linear_probe.extract_features(model, dataset, 2, "cpu")
    assert not model.training
    model.train()

    def failing(points):
        raise RuntimeError("a broken batch")

    with pytest.raises(RuntimeError, match="a broken batch"):
        linear_probe.extract_features(model, dataset, 2, "cpu", prepare=failing)
    assert model.training and model.encoder.training


def test_features_for_probes_runs_the_encoder_once_per_split_and_returns_both_poolings():
    model, train_set, test_set = FakeModel(), fake_dataset(5, seed=0), fake_dataset(3, seed=1)
    outputs = linear_probe.features_for_probes(model, train_set, test_set, 2, "cpu")
    assert len(model.encoder.modes) == math.ceil(5 / 2) + math.ceil(3 / 2)  # one call per batch, not per pooling
    train_max, train_max_mean, train_y, test_max, test_max_mean, test_y = outputs
    for (got_max, got_max_mean), dataset in (((train_max, train_max_mean), train_set),
                                             ((test_max, test_max_mean), test_set)):
        expected_max, expected_max_mean = manual_features(dataset, 8)
        assert torch.allclose(got_max, expected_max) and torch.allclose(got_max_mean, expected_max_mean)
    assert train_y.tolist() == [4, 0, 9, 4, 2] and test_y.tolist() == [4, 0, 9]


# ---------------------------------------------------------------- everything together

def test_probe_all_reports_every_protocol_and_format_probes_names_them():
    train_x, train_y, test_x, test_y = unit_clusters([30] * 5, [20, 10, 10, 5, 5])
    raw_max, raw_max_mean = 15 * train_x[:, :16], 15 * train_x  # stand-ins for the two poolings
    result = linear_probe.probe_all(raw_max, raw_max_mean, train_y, 15 * test_x[:, :16], 15 * test_x, test_y,
                                    shots=3, draws=4, seed=0)
    assert result["majority_share"] == 40.0  # 20 of the 50 test shapes
    assert (result["train_shapes"], result["test_shapes"]) == (150, 50)
    assert result["cross_validated"] == linear_probe.cross_validated_svm(raw_max_mean, train_y, 15 * test_x, test_y)
    assert result["literature"] == linear_probe.literature_svm(raw_max, train_y, 15 * test_x[:, :16], test_y)
    assert result["nearest_neighbour"] == linear_probe.nearest_neighbour_accuracy(train_x, train_y, test_x, test_y)
    neighbour = linear_probe.nearest_neighbour_probe(train_x, train_y, test_x, test_y)
    assert result["nearest_neighbour_class_mean"] == neighbour["test_class_mean_accuracy"]
    assert (result["few_shot"]["shots"], result["few_shot"]["draws"]) == (3, 4)
    assert result["feature_geometry"] == {"max_mean": linear_probe.feature_geometry(raw_max_mean),
                                          "max": linear_probe.feature_geometry(raw_max)}
    # The scale-free probes lead the JSON; the published protocol follows them; every stage is timed.
    keys = list(result)
    assert keys.index("cross_validated") < keys.index("nearest_neighbour") < keys.index("few_shot") \
        < keys.index("literature") < keys.index("feature_geometry")
    assert set(result["seconds"]) == {"cross_validated", "nearest_neighbour", "few_shot", "literature",
                                      "feature_geometry"}
    assert json.loads(json.dumps(result)) == result  # plain Python values, ready for a log line
    text = linear_probe.format_probes(result)
    validated = result["cross_validated"]
    literature = result["literature"]
    for expected in ("literature", "cross-validated", "1-NN", "few-shot", f"C = {validated['C']:g} chosen",
                     f"train {validated['train_accuracy']:.1f} %", f"train {literature['train_accuracy']:.1f} %",
                     f"{validated['test_class_mean_accuracy']:.1f} %", "published protocol", "C sweep",
                     f"mean pairwise cosine {result['feature_geometry']['max_mean']['mean_cosine']:.3f}",
                     "40.0 %"):
        assert expected in text, expected
    # The scale-free lines come before the published protocol's.
    assert text.index("cross-validated") < text.index("1-NN") < text.index("few-shot") < text.index("literature ")


def test_probe_all_verbose_prints_each_stage_with_its_time(capsys):
    train_x, train_y, test_x, test_y = unit_clusters([12] * 3, [5] * 3)
    linear_probe.probe_all(train_x[:, :8], train_x, train_y, test_x[:, :8], test_x, test_y, c_grid=(1.0,),
                           shots=2, draws=2, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    for title in ("cross-validated SVM", "1-NN cosine", "few-shot", "literature SVC", "feature geometry"):
        assert f"probe: {title}" in lines[[title in line for line in lines].index(True)], title
        took = [line for line in lines if line.startswith(f"probe: {title}") and " took " in line]
        assert len(took) == 1 and took[0].endswith(" s"), title


# ---------------------------------------------------------------- feature geometry, class-mean accuracy, C sweep

def test_feature_geometry_on_cases_with_known_answers():
    # k orthogonal directions with equal spread: centred singular values are k equal values -> effective rank k,
    # participation ratio k. Rows +-e_j (j < k) in R^8, each twice: the mean is 0.
    for k in (1, 3, 5):
        rows = np.concatenate([np.eye(8)[:k], -np.eye(8)[:k]])  # (2k, 8)
        geometry = linear_probe.feature_geometry(np.concatenate([rows, rows]))
        assert geometry["effective_rank"] == pytest.approx(k, abs=1e-9)
        assert geometry["participation_ratio"] == pytest.approx(k, abs=1e-9)
    # Singular values (3, 1): p = (3/4, 1/4), effective rank exp(H) = 4 / 3^(3/4) = 1.7548; participation ratio
    # (9 + 1)^2 / (81 + 1) = 1.2195.
    rows = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) / np.sqrt(2)  # centred, s = (3, 1)
    geometry = linear_probe.feature_geometry(rows)
    assert geometry["effective_rank"] == pytest.approx(4 / 3 ** 0.75, rel=1e-9)
    assert geometry["participation_ratio"] == pytest.approx(100 / 82, rel=1e-9)
    # The centring is part of the definition: a shared offset changes neither measure.
    shifted = linear_probe.feature_geometry(rows + np.array([50.0, -20.0]))
    assert shifted["effective_rank"] == pytest.approx(geometry["effective_rank"], rel=1e-9)
    # Mean pairwise cosine: orthogonal rows 0, equal directions 1, a row and its opposite -1, and a slow loop.
    assert linear_probe.feature_geometry(np.eye(4))["mean_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert linear_probe.feature_geometry(np.array([[1.0, 2.0], [3.0, 6.0], [0.5, 1.0]]))["mean_cosine"] \
        == pytest.approx(1.0)
    assert linear_probe.feature_geometry(np.array([[1.0, 2.0], [-2.0, -4.0]]))["mean_cosine"] == pytest.approx(-1.0)
    x = np.random.default_rng(3).normal(size=(9, 4)) + 1.0
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    slow = np.mean([unit[i] @ unit[j] for i in range(9) for j in range(9) if i != j])
    assert linear_probe.feature_geometry(x)["mean_cosine"] == pytest.approx(slow, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 feature rows"):
        linear_probe.feature_geometry(np.ones((1, 3)))


def test_every_probe_reports_class_mean_accuracy_beside_accuracy():
    # Class 4 around (1, 0), class 6 around (0, 1); of the 2 test shapes of class 6 one lies in class 4's region,
    # so plain accuracy is 9 / 10 = 90 % and the class mean (100 + 50) / 2 = 75 % for every probe.
    train_x = np.array([[1, 0.1], [1, -0.1], [1, 0], [0.1, 1], [-0.1, 1], [0, 1]] * 2)
    train_y = np.array([4, 4, 4, 6, 6, 6] * 2)
    test_x = np.array([[1, 0]] * 8 + [[0, 1], [1, 0]], dtype=float)
    test_y = np.array([4] * 8 + [6, 6])
    validated = linear_probe.cross_validated_svm(train_x, train_y, test_x, test_y, folds=2)
    literature = linear_probe.literature_svm(15 * train_x, train_y, 15 * test_x, test_y)
    neighbour = linear_probe.nearest_neighbour_probe(train_x, train_y, test_x, test_y)
    few_shot = linear_probe.few_shot_probe(train_x, train_y, test_x, test_y, shots=2, draws=2)
    for result in (validated, literature, neighbour):
        assert (result["test_accuracy"], result["test_class_mean_accuracy"]) == (90.0, 75.0)
    assert (few_shot["accuracy_mean"], few_shot["mean"]) == (90.0, 75.0)
    assert validated["train_class_mean_accuracy"] == 100.0


def test_literature_c_sweep_is_sklearn_svc_at_each_c_and_shows_when_c_binds():
    # Unit-norm clusters: at that scale C = 0.01 predicts the majority class only, C = 0.1 and 1 do not.
    train_x, train_y, test_x, test_y = unit_clusters([30, 24, 24, 24, 24], [20] * 5)
    result = linear_probe.literature_svm(train_x, train_y, test_x, test_y)
    assert [entry["C"] for entry in result["c_sweep"]] == [0.01, 0.1, 1.0]
    for entry in result["c_sweep"]:
        reference = SVC(C=entry["C"], kernel="linear").fit(train_x, train_y)
        assert entry["test_accuracy"] == accuracy(reference.predict(test_x), test_y)
        assert entry["train_accuracy"] == accuracy(reference.predict(train_x), train_y)
    # The published column is the C = 0.01 entry of the sweep.
    assert {key: result[key] for key in result["c_sweep"][0]} == result["c_sweep"][0]
    accuracies = [entry["test_accuracy"] for entry in result["c_sweep"]]
    assert accuracies[0] == 20.0 and accuracies[-1] == 100.0  # here C binds: the sweep makes it visible


# ---------------------------------------------------------------- the benchmark's features

def test_bench_features_have_the_geometry_of_real_encoder_features():
    train_max, train_max_mean, train_y, test_max, test_max_mean, test_y = linear_probe.bench_features(
        train_size=2000, test_size=500)
    assert train_max_mean.shape == (2000, 768) and test_max_mean.shape == (500, 768)
    assert np.array_equal(train_max, train_max_mean[:, :384]) and np.array_equal(test_max, test_max_mean[:, :384])
    assert len(np.unique(train_y)) == 40
    geometry = linear_probe.feature_geometry(train_max_mean)
    # The tiny-preset encoders' real features (docs/PROBES.md): mean pairwise cosine 0.84-0.90, 1.4-1.9 effective dimensions.
    assert 0.84 <= geometry["mean_cosine"] <= 0.90
    assert 1.4 <= geometry["participation_ratio"] <= 1.9
