"""linear_svm.squared_hinge_path against liblinear (scikit-learn's LinearSVC, the same objective) and against the
optimality condition of the objective written out in numpy."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

import linear_svm


def overlapping_classes(rows=240, width=12, classes=4, seed=0):
    """Unit-norm features of `classes` overlapping Gaussian clusters that share one large direction (as encoder
    features do): not separable, so every C gives a different solution. -> x (M, F), y (M,)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    centres = rng.normal(size=(classes, width))
    x = 3.0 + centres[y] + 1.5 * rng.normal(size=(rows, width))  # a shared offset: features point the same way
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def objective(weights, x, y, c):
    """1/2 |w|^2 + C sum_i max(0, 1 - t_i <w, [x_i ; 1]>)^2 summed over the one-vs-rest problems, numpy."""
    z = np.hstack([x, np.ones((len(x), 1))])
    t = np.where(y[:, None] == np.unique(y)[None, :], 1.0, -1.0)
    slack = np.maximum(0.0, 1.0 - t * (z @ weights))
    return float(0.5 * (weights ** 2).sum() + c * (slack ** 2).sum())


def liblinear_weights(x, y, c):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a reference that did not converge is no reference
        reference = LinearSVC(C=c, dual=False, tol=1e-8, max_iter=100_000).fit(x, y)
    return reference, np.vstack([reference.coef_.T, reference.intercept_[None, :]])  # (F1, K)


@pytest.mark.parametrize("classes", [4, 2])
def test_path_matches_liblinear_at_every_c_and_on_every_mask(classes):
    x, y = overlapping_classes(classes=classes)
    grid = (0.01, 1.0, 100.0)
    half = np.arange(len(x)) % 2 == 0
    masks = np.stack([half, ~half, np.ones(len(x), bool)], axis=1)  # (M, 3): two folds and the whole set
    found_classes, path = linear_svm.squared_hinge_path(x, y, masks, grid)
    assert path.shape == (3, x.shape[1] + 1, 3, classes)
    assert found_classes.tolist() == list(range(classes))
    for index, c in enumerate(grid):
        for mask in range(3):
            rows = masks[:, mask]
            reference, expected = liblinear_weights(x[rows], y[rows], c)
            ours = path[index, :, mask].numpy()
            if classes == 2:  # liblinear fits ONE problem for two classes; ours fits both, w_0 = -w_1
                np.testing.assert_allclose(ours[:, 0], -ours[:, 1], rtol=1e-4, atol=1e-6)
                ours = ours[:, 1:]
            np.testing.assert_allclose(ours, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
            predictions = linear_svm.predict(path[index, :, mask], found_classes, x)
            assert np.array_equal(predictions, reference.predict(x))


def test_path_reaches_the_optimum_the_objective_defines():
    # The gradient of the objective, written out in numpy, vanishes at the solution, and no perturbation lowers it.
    x, y = overlapping_classes(rows=300, width=8, classes=3, seed=1)
    c = 10.0
    classes, path = linear_svm.squared_hinge_path(x, y, np.ones((len(x), 1), bool), [c])
    weights = path[0, :, 0].numpy()  # (F1, K)
    z = np.hstack([x, np.ones((len(x), 1))])
    t = np.where(y[:, None] == classes.numpy()[None, :], 1.0, -1.0)
    slack = np.maximum(0.0, 1.0 - t * (z @ weights))
    gradient = weights - 2 * c * z.T @ (slack * t)  # (F1, K)
    start = 2 * c * np.linalg.norm(z.T @ t, axis=0)  # |g(w = 0)| per class
    assert np.all(np.linalg.norm(gradient, axis=0) <= 1e-5 * start)
    best = objective(weights, x, y, c)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert objective(weights + 1e-3 * rng.normal(size=weights.shape), x, y, c) > best
    _, reference = liblinear_weights(x, y, c)
    assert best <= objective(reference, x, y, c) + 1e-9 * best


def test_warm_started_path_equals_each_c_solved_alone():
    x, y = overlapping_classes(seed=2)
    masks = np.ones((len(x), 1), bool)
    _, path = linear_svm.squared_hinge_path(x, y, masks, (0.1, 10.0, 1000.0))
    for index, c in enumerate((0.1, 10.0, 1000.0)):
        _, alone = linear_svm.squared_hinge_path(x, y, masks, [c])
        np.testing.assert_allclose(path[index].numpy(), alone[0].numpy(), rtol=1e-3,
                                   atol=1e-3 * alone[0].abs().max().item())


def test_bad_inputs_are_named():
    x, y = overlapping_classes()
    with pytest.raises(ValueError, match=r"masks \(M, S\), but found .*\(240, 12\), \(240,\) and \(239, 1\)"):
        linear_svm.squared_hinge_path(x, y, np.ones((239, 1), bool), [1.0])
    with pytest.raises(ValueError, match=r"positive C values, but found \[0.0\]"):
        linear_svm.squared_hinge_path(x, y, np.ones((240, 1), bool), [0.0])


def test_predict_takes_the_first_class_on_a_tie():
    weights = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)  # (F1 = 2, K = 3): k 0, 1 tie
    assert linear_svm.predict(weights, torch.tensor([3, 5, 7]), np.array([[2.0], [-2.0]])).tolist() == [3, 7]


def test_compare_with_liblinear_reports_agreement_and_both_objectives():
    import linear_probe
    x, y = overlapping_classes(rows=300, seed=3)
    rows = linear_probe.compare_with_liblinear(x[:200], y[:200], x[200:], y[200:], [1.0, 10.0])
    assert [row["C"] for row in rows] == [1.0, 10.0]
    for row in rows:
        assert row["predictions_differing"] == 0 and row["test_accuracy"] == row["liblinear_test_accuracy"]
        assert row["objective"] <= row["liblinear_objective"] * (1 + 1e-9)  # ours is at least as optimal


def test_a_path_that_runs_out_of_newton_steps_says_so(monkeypatch):
    x, y = overlapping_classes(seed=4)
    monkeypatch.setattr(linear_svm, "MAX_NEWTON_STEPS", 1)
    with pytest.warns(RuntimeWarning, match=r"problems at C = 1000 did not reach the stopping rule in 1 Newton"):
        linear_svm.squared_hinge_path(x, y, np.ones((len(x), 1), bool), [1000.0])
