"""The cross-validated probe's solver: liblinear's one-vs-rest squared-hinge linear SVM, solved in torch for every C
of a grid, every cross-validation fold and every class AT ONCE. Not a section of any paper: it is what makes the
scale-free probe of linear_probe.py (docs/REFERENCE.md sec. 9) affordable at full ModelNet40 size on a CPU.

The problem (the same objective as scikit-learn's LinearSVC(loss="squared_hinge", penalty="l2", dual=False), i.e.
liblinear's L2R_L2LOSS_SVC primal with intercept_scaling = 1: the bias is a constant feature 1 and is regularised):
    for every class k (one-vs-rest, t_ik = +1 if y_i = k else -1) and every training mask s (a fold's training rows):
        min_w  f(w) = 1/2 |w|^2 + C sum_{i in s} max(0, 1 - t_ik <w, z_i>)^2,    z_i = [x_i ; 1]   (F1 = F + 1)
    prediction: argmax_k <w_k, z> (the first k on a tie, as liblinear).
f is strongly convex and piecewise quadratic, with gradient and generalised Hessian (A = the active rows,
t_ik <w, z_i> < 1):
    g = w - 2 C sum_{i in A} t_ik (1 - t_ik <w, z_i>) z_i           H = I + 2 C sum_{i in A} z_i z_i^T
Newton's method with conjugate-gradient steps (as liblinear's own trust-region Newton solver), here:
  - every (mask, class) pair is a column of one weight matrix W (F1, S * K), so every product is one matrix product
    over all the problems (folds, the refit on the whole split, and all classes): no loop over folds or classes;
  - the coordinates are those of the eigenvectors Q of sum_i z_i z_i^T over all rows (w = Q v: |w| = |v| and
    <w, z> = <v, Q^T z>, so the problem and its solution do not change), where the diagonal of each column's H is a
    good preconditioner: features that point almost the same way (linear_probe.feature_geometry) make H very
    anisotropic along a few eigenvectors, which this diagonal captures;
  - C ascends along the grid and every C starts from the previous C's solution (warm start);
  - a Newton step stops its CG once every column's residual is below 0.1 of its start; the step length is the
    largest of 1, 1/2, 1/4, ... with Armijo's sufficient decrease f(w + t d) <= f(w) + 0.01 t <g, d>;
  - a column stops when |g| <= tol * max(min(#pos, #neg), 1) / #rows * |g(w = 0)| (liblinear's primal rule), with
    tol = 1e-5, ten times tighter than LinearSVC's default 1e-4.
NOTE(deviation): the CG products H p run in float32 (3.5x faster on 2 CPU cores); the gradient, objective, line
search and the weights stay float64, so only the Newton direction is inexact, which Newton's method tolerates (its
stopping rule is on the float64 gradient). Checked against LinearSVC in tests/test_linear_svm.py: the same
predictions, weights within 2e-3 relative, and an objective never above liblinear's (liblinear stops earlier:
at C = 1e3 and 1e4 on 2,000 shapes of linear_probe.bench_features its objective is 0.15 % and 4.6 % above
ours; docs/PROBES.md).

Shapes: M rows, F features, F1 = F + 1, S masks, K classes, P = S * K problems, G the C grid.
"""
import warnings

import torch

NEWTON_TOLERANCE = 1e-5  # liblinear's primal stopping rule with this tol (LinearSVC's default: 1e-4)
MAX_NEWTON_STEPS = 100  # per C; a column not converged by then keeps its last iterate, and a warning says so
MAX_CG_STEPS = 200  # per Newton step
CG_FORCING = 0.1  # a Newton step's CG stops when every residual is below this share of its first one
ARMIJO = 0.01  # sufficient-decrease constant of the backtracking line search


def _objective(V, Z, T, masks, c):
    """f per column (P,) and the active rows (M, P) as 0/1, at the rotated weights V (F1, P)."""
    margins = T * (Z @ V)  # (M, P)  t_ik <w, z_i>
    active = ((margins < 1) & masks).double()  # (M, P)
    slack = active * (1 - margins)  # (M, P)
    return 0.5 * (V * V).sum(0) + c * (slack * slack).sum(0), active, slack


def squared_hinge_path(features, labels, masks, c_grid, tol=NEWTON_TOLERANCE):
    """features (M, F) float64 (normalise them before, if wanted), labels (M,) int, masks (M, S) bool (True = a
    training row of that mask), c_grid (G,) positive -> (classes (K,), weights (G, F1, S, K) float64 in the
    original coordinates, the last row of F1 being the bias), the weights of C = sorted(c_grid)[g] at index g."""
    x = torch.as_tensor(features, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    masks = torch.as_tensor(masks, dtype=torch.bool)
    rows = len(x)
    if x.ndim != 2 or labels.shape != (rows,) or masks.ndim != 2 or len(masks) != rows:
        raise ValueError(f"Expected features (M, F), labels (M,) and masks (M, S), but found {tuple(x.shape)}, "
                         f"{tuple(labels.shape)} and {tuple(masks.shape)}.")
    grid = sorted(float(c) for c in c_grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"Expected a non-empty grid of positive C values, but found {list(c_grid)}.")
    z = torch.cat([x, torch.ones(rows, 1, dtype=torch.float64)], dim=1)  # (M, F1)  intercept_scaling = 1
    rotation = torch.linalg.eigh(z.T @ z).eigenvectors  # (F1, F1)  Q
    Z = z @ rotation  # (M, F1)  rotated rows Q^T z_i
    Z32, squares = Z.float(), Z * Z  # (M, F1) each
    classes = torch.unique(labels)  # (K,)
    num_masks, num_classes = masks.shape[1], len(classes)
    signs = torch.where(labels[:, None] == classes[None, :], 1.0, -1.0).double()  # (M, K)
    T = signs.repeat(1, num_masks)  # (M, P)  column p = mask (p // K), class (p % K)
    in_mask = masks.repeat_interleave(num_classes, dim=1)  # (M, P)
    positives = ((T > 0) & in_mask).sum(0).double()  # (P,)
    counts = in_mask.sum(0).double()  # (P,)
    # liblinear's rule: eps_p = tol * max(min(#pos, #neg), 1) / #rows, against |g| at w = 0.
    eps = tol * torch.clamp(torch.minimum(positives, counts - positives), min=1) / counts.clamp(min=1)  # (P,)
    V = torch.zeros(Z.shape[1], T.shape[1], dtype=torch.float64)  # (F1, P) rotated weights
    path = []
    for c in grid:  # ascending, each C warm-started from the previous one
        f, active, slack = _objective(V, Z, T, in_mask, c)
        start_norm = (2 * c * (Z.T @ (in_mask * T))).norm(dim=0)  # (P,) |g(w = 0)|
        for _ in range(MAX_NEWTON_STEPS):
            gradient = V - 2 * c * (Z.T @ (slack * T))  # (F1, P)
            todo = gradient.norm(dim=0) > eps * start_norm  # (P,)
            if not bool(todo.any()):
                break
            columns = todo.nonzero().squeeze(1)  # (Pa,) the problems not yet solved
            g, act = gradient[:, columns], active[:, columns]  # (F1, Pa), (M, Pa)
            act32 = act.float()
            diagonal = 1 + 2 * c * (squares.T @ act)  # (F1, Pa) the diagonal of H, the preconditioner
            # Preconditioned CG on H d = -g, every column at once.
            direction, residual = torch.zeros_like(g), -g  # (F1, Pa) each
            preconditioned = residual / diagonal
            search, rz = preconditioned.clone(), (residual * preconditioned).sum(0)  # (F1, Pa), (Pa,)
            first = residual.norm(dim=0)  # (Pa,)
            for _ in range(MAX_CG_STEPS):
                product = search + 2 * c * (Z32.T @ (act32 * (Z32 @ search.float()))).double()  # (F1, Pa) H p
                curvature = (search * product).sum(0)  # (Pa,)
                step = torch.where(curvature > 0, rz / curvature.clamp(min=1e-300), 0.0)  # (Pa,)
                direction, residual = direction + step * search, residual - step * product
                if bool((residual.norm(dim=0) <= CG_FORCING * first).all()):
                    break
                preconditioned = residual / diagonal
                rz_next = (residual * preconditioned).sum(0)
                search = preconditioned + torch.where(rz > 0, rz_next / rz.clamp(min=1e-300), 0.0) * search
                rz = rz_next
            # Backtracking line search (Armijo), per column.
            V_now, f_now, slope = V[:, columns], f[columns], (g * direction).sum(0)  # (F1, Pa), (Pa,), (Pa,)
            length = torch.ones(len(columns), dtype=torch.float64)  # (Pa,)
            for _ in range(30):
                f_new = _objective(V_now + length * direction, Z, T[:, columns], in_mask[:, columns], c)[0]
                accepted = f_new <= f_now + ARMIJO * length * slope  # (Pa,)
                if bool(accepted.all()):
                    break
                length = torch.where(accepted, length, 0.5 * length)
            V[:, columns] = V_now + length * direction
            f, active, slack = _objective(V, Z, T, in_mask, c)
        else:  # the steps ran out: say so (a silently unconverged fit would mislead, as liblinear's warning says)
            todo = (V - 2 * c * (Z.T @ (slack * T))).norm(dim=0) > eps * start_norm  # (P,) after the last step
            warnings.warn(f"linear_svm: {int(todo.sum())} of {len(todo)} problems at C = {c:g} did not reach the "
                          f"stopping rule in {MAX_NEWTON_STEPS} Newton steps; their last iterate is kept.",
                          RuntimeWarning)
        path.append((rotation @ V).reshape(-1, num_masks, num_classes))  # (F1, S, K) original coordinates
    return classes, torch.stack(path)  # (K,), (G, F1, S, K)


def predict(weights, classes, features):
    """weights (F1, K) of one mask, classes (K,), features (M, F) -> predicted labels (M,), numpy."""
    x = torch.as_tensor(features, dtype=torch.float64)
    scores = x @ weights[:-1] + weights[-1]  # (M, K)
    return classes[scores.argmax(dim=1)].numpy()  # the first maximum on a tie
