"""Tests for masking.py: Eq. (7) probabilities and visible/masked split, the Gumbel-top-k sampler against exact
sequential sampling without replacement, Eq. (8) gradients, random masking and Part and Masking Alignment."""
import itertools
import math

import pytest
import torch

import masking
from masking import ReinforcedMasking, reinforce_loss


def test_num_visible_follows_point_mae_rounding():
    assert masking.num_visible(64, 0.6) == 26  # Point-MAE: 38 masked, 26 visible
    assert masking.num_visible(128, 0.6) == 52
    assert masking.num_visible(10, 0.0) == 10
    with pytest.raises(ValueError, match="mask ratio"):
        masking.num_visible(64, 1.0)


def test_gather_tokens_matches_a_loop():
    x = torch.randn(3, 7, 2, 4)
    index = torch.tensor([[6, 0], [3, 3], [1, 5]])
    gathered = masking.gather_tokens(x, index)
    assert gathered.shape == (3, 2, 2, 4)
    for b in range(3):
        for m in range(2):
            assert torch.equal(gathered[b, m], x[b, index[b, m]])


@pytest.mark.parametrize("mask_ratio", [0.0, 0.3, 0.6, 0.9])
def test_reinforced_masking_split_and_probabilities(mask_ratio):
    torch.manual_seed(0)
    num_groups = 20
    policy = masking.ReinforcedMasking(dim=12, num_heads=3, mask_ratio=mask_ratio)
    torch.nn.init.normal_(policy.score.weight)  # a non-uniform policy
    tokens = torch.randn(4, num_groups, 12)
    visible_index, masked_index, log_probs = policy(tokens, torch.Generator().manual_seed(1))
    visible_count = num_groups - int(mask_ratio * num_groups)
    assert visible_index.shape == (4, visible_count) and masked_index.shape == (4, num_groups - visible_count)
    assert log_probs.shape == (4, num_groups)
    assert torch.allclose(log_probs.exp().sum(dim=1), torch.ones(4), atol=1e-5)  # Eq. (7): sum_i p_i = 1
    assert log_probs.exp().std() > 0  # the policy is not uniform here
    for b in range(4):
        visible, masked = set(visible_index[b].tolist()), set(masked_index[b].tolist())
        assert len(visible) == visible_count and not visible & masked
        assert visible | masked == set(range(num_groups))
    # Both index lists are ascending.
    assert (visible_index.diff(dim=1) > 0).all() and (masked_index.diff(dim=1) > 0).all()


def exact_ordered_pair_probabilities(probabilities):
    """Sequential draws without replacement, by enumeration: P(first i, then j) = p_i p_j / (1 - p_i)."""
    return {(i, j): probabilities[i] * probabilities[j] / (1 - probabilities[i])
            for i, j in itertools.permutations(range(len(probabilities)), 2)}


def ordered_pair_frequencies(draws, num_items):
    codes = draws[:, 0] * num_items + draws[:, 1]
    counts = torch.bincount(codes, minlength=num_items * num_items).double() / draws.shape[0]
    return {(i, j): counts[i * num_items + j].item() for i in range(num_items) for j in range(num_items)}


def max_pair_error(frequencies, exact):
    return max(abs(frequencies[pair] - exact.get(pair, 0.0)) for pair in frequencies)


def test_gumbel_top_k_matches_sequential_sampling_without_replacement():
    probabilities = [0.4, 0.25, 0.15, 0.12, 0.08]
    num_samples, tolerance = 200_000, 0.006  # sampling std of each frequency <= 0.0011, so about 5 sigma
    log_probs = torch.tensor(probabilities).log().expand(num_samples, -1)
    exact = exact_ordered_pair_probabilities(probabilities)
    draws = masking.sample_without_replacement(log_probs, 2, torch.Generator().manual_seed(0))
    assert draws.shape == (num_samples, 2)
    assert max_pair_error(ordered_pair_frequencies(draws, 5), exact) < tolerance
    # Inclusion probabilities (the unordered visible set) follow from the ordered ones.
    inclusion = torch.bincount(draws.flatten(), minlength=5).double() / num_samples
    for item in range(5):
        expected = sum(value for pair, value in exact.items() if item in pair)
        assert abs(inclusion[item].item() - expected) < tolerance

    # The test has power: wrong samplers miss by far more than the tolerance.
    top_k = log_probs.topk(2, dim=1).indices  # deterministic Top-K
    with_replacement = torch.multinomial(log_probs.exp(), 2, replacement=True,
                                         generator=torch.Generator().manual_seed(0))
    independent = torch.multinomial(torch.tensor(probabilities), 2 * num_samples, replacement=True,
                                     generator=torch.Generator().manual_seed(0)).view(num_samples, 2)
    uniform = torch.rand(num_samples, 5, generator=torch.Generator().manual_seed(0))
    gumbel_on_probabilities = (log_probs.exp() - torch.log(-torch.log(uniform))).topk(2, dim=1).indices  # p, not log p
    for wrong in (top_k, with_replacement, independent, gumbel_on_probabilities):
        assert max_pair_error(ordered_pair_frequencies(wrong, 5), exact) > 3 * tolerance


def test_sampler_is_reproducible_with_a_generator():
    log_probs = torch.randn(3, 10).log_softmax(dim=1)
    first = masking.sample_without_replacement(log_probs, 4, torch.Generator().manual_seed(7))
    second = masking.sample_without_replacement(log_probs, 4, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert all(len(set(row)) == 4 for row in first.tolist())


def test_reinforce_loss_gradient_step_favours_the_high_error_masked_token():
    torch.manual_seed(0)
    logits = torch.zeros(1, 6, requires_grad=True)
    masked_index = torch.tensor([[1, 3, 4]])
    token_errors = torch.tensor([[2.0, 0.1, 1.0]])  # token 1 hard, token 3 easy
    loss = masking.reinforce_loss(torch.log_softmax(logits, dim=1), masked_index, token_errors)
    # Eq. (8) with our mean normalisation, checked by hand: -(1/3) sum log(1/6) * error.
    assert torch.isclose(loss, -torch.log(torch.tensor(1 / 6)) * 3.1 / 3)
    loss.backward()
    with torch.no_grad():
        change = torch.log_softmax(logits - 1.0 * logits.grad, dim=1) - torch.log_softmax(logits, dim=1)
    change = change[0]
    assert change[1] > change[4] > change[3]  # the higher the error, the larger the gain
    assert change[1] > 0 and change[0] < 0  # hard masked tokens gain, visible ones lose


def test_reinforce_loss_trains_only_the_policy_and_detaches_errors():
    policy = masking.ReinforcedMasking(dim=8, num_heads=2, mask_ratio=0.5)
    tokens = torch.randn(2, 10, 8, requires_grad=True)
    errors_source = torch.rand(2, 10, requires_grad=True)
    visible_index, masked_index, log_probs = policy(tokens)
    loss = masking.reinforce_loss(log_probs, masked_index, errors_source.gather(1, masked_index))
    loss.backward()
    assert policy.score.weight.grad.abs().sum() > 0
    assert tokens.grad is None and errors_source.grad is None  # detached tokens, detached reward
    # detach_input=False lets L_S reach the tokens (the Linear must be non-zero for a path to exist).
    policy = masking.ReinforcedMasking(dim=8, num_heads=2, mask_ratio=0.5, detach_input=False)
    torch.nn.init.normal_(policy.score.weight)
    _, masked_index, log_probs = policy(tokens)
    masking.reinforce_loss(log_probs, masked_index, torch.rand(masked_index.shape)).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_reinforce_loss_baseline_subtracts_the_per_shape_mean():
    log_probs = torch.randn(2, 5).log_softmax(dim=1)
    masked_index = torch.tensor([[0, 2], [1, 4]])
    errors = torch.tensor([[3.0, 1.0], [5.0, 5.0]])
    loss = masking.reinforce_loss(log_probs, masked_index, errors, baseline=True)
    expected = -(log_probs[0, 0] * 1.0 + log_probs[0, 2] * -1.0) / 4  # shape 1 has no advantage at all
    assert torch.isclose(loss, expected)


def test_eval_mode_samples_unless_deterministic():
    torch.manual_seed(0)
    policy = masking.ReinforcedMasking(dim=8, num_heads=2, mask_ratio=0.5).eval()
    torch.nn.init.normal_(policy.score.weight)
    tokens = torch.randn(1, 16, 8)
    draws = {tuple(policy(tokens)[0][0].tolist()) for _ in range(20)}
    assert len(draws) > 1  # still stochastic in eval mode by default
    policy.deterministic_eval = True
    visible_index, _, log_probs = policy(tokens)
    assert set(visible_index[0].tolist()) == set(log_probs[0].topk(8).indices.tolist())


def test_random_masking_rows_are_permutations():
    visible_index, masked_index = masking.random_masking(50, 64, 0.6, generator=torch.Generator().manual_seed(0))
    assert visible_index.shape == (50, 26) and masked_index.shape == (50, 38)
    rows = torch.cat([visible_index, masked_index], dim=1).sort(dim=1).values
    assert torch.equal(rows, torch.arange(64).expand(50, 64))
    assert len({tuple(row) for row in visible_index.tolist()}) == 50  # the rows differ


def test_align_patches_returns_the_patch_under_each_centre():
    # A 4 x 4 pixel image with 2 x 2 patches: P = 4, patch = (row // 2) * 2 + col // 2.
    # Centre pixels (row, col) of G = 4 tokens in S = 2 views, worked out by hand below.
    pixels = torch.tensor([[[0, 0], [1, 3], [3, 0], [2, 2]],     # view 0 -> patches 0, 1, 2, 3
                           [[3, 3], [0, 1], [2, 1], [1, 2]]])    # view 1 -> patches 3, 0, 2, 1
    patch_index = ((pixels[..., 0] // 2) * 2 + pixels[..., 1] // 2).unsqueeze(0)  # (1, S, G)
    assert patch_index.tolist() == [[[0, 1, 2, 3], [3, 0, 2, 1]]]
    # Patch token (view s, patch p) holds the values [10 s + p, -p].
    values = torch.tensor([[10.0 * view + patch, -patch] for view in range(2) for patch in range(4)])
    tokens_2d = values.view(1, 2, 4, 2)
    visible_index = torch.tensor([[3, 0]])  # tokens 3 and 0 are visible, in that order
    aligned = masking.align_patches(tokens_2d, patch_index, visible_index)
    assert aligned.shape == (1, 2, 2, 2)
    expected = torch.tensor([[[[3.0, -3.0], [0.0, 0.0]],        # view 0: token 3 -> patch 3, token 0 -> patch 0
                              [[11.0, -1.0], [13.0, -3.0]]]])   # view 1: token 3 -> patch 1, token 0 -> patch 3
    assert torch.equal(aligned, expected)


def test_align_patches_matches_a_loop_on_random_input():
    generator = torch.Generator().manual_seed(3)
    tokens_2d = torch.randn(2, 3, 9, 5, generator=generator)
    patch_index = torch.randint(0, 9, (2, 3, 12), generator=generator)
    visible_index, _ = masking.random_masking(2, 12, 0.5, generator=generator)
    aligned = masking.align_patches(tokens_2d, patch_index, visible_index)
    for b, view, j in itertools.product(range(2), range(3), range(6)):
        token = visible_index[b, j]
        assert torch.equal(aligned[b, view, j], tokens_2d[b, view, patch_index[b, view, token]])


def _train_policy_on_hard_tokens(learning_rate, steps=60):
    """Train ReinforcedMasking by L_S alone on shapes where 4 of 16 tokens (at random positions, marked by a
    feature) are always 10x harder to reconstruct. Returns the probability mass on the hard tokens and the
    policy's entropy, before and after training, on held-out shapes."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    policy = ReinforcedMasking(dim=16, num_heads=2, mask_ratio=0.5)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)

    def batch(size):
        hard = torch.rand(size, 16, generator=generator).argsort(dim=1)[:, :4]  # (B, 4) hard token positions
        is_hard = torch.zeros(size, 16).scatter_(1, hard, 1.0)  # (B, G)
        tokens = torch.randn(size, 16, 16, generator=generator) * 0.1  # (B, G, D)
        tokens[..., 0] += 2.0 * is_hard  # the feature that tells hard tokens apart
        errors = 0.1 + 0.9 * is_hard  # (B, G): per-token reconstruction error L_R^i
        return tokens, is_hard, errors

    def measure():
        tokens, is_hard, _ = batch(64)
        with torch.no_grad():
            _, _, log_probs = policy(tokens)
        probs = log_probs.exp()  # (B, G)
        entropy = -(probs * log_probs).sum(dim=1).mean().item()
        return (probs * is_hard).sum(dim=1).mean().item(), entropy

    before = measure()
    for _ in range(steps):
        tokens, _, errors = batch(32)
        _, masked_index, log_probs = policy(tokens)
        loss = reinforce_loss(log_probs, masked_index, errors.gather(1, masked_index))  # Eq. (8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, measure()


def _policy_learned(before, after):
    """The policy moved towards making the hard tokens visible and became more certain."""
    (hard_before, entropy_before), (hard_after, entropy_after) = before, after
    return hard_after > hard_before + 0.2 and entropy_after < entropy_before - 0.1


def test_training_the_policy_makes_consistently_hard_tokens_visible():
    before, after = _train_policy_on_hard_tokens(learning_rate=1e-2)
    # The initial policy is uniform: the 4 hard tokens of 16 hold a quarter of the mass, entropy log(16).
    assert before[0] == pytest.approx(0.25, abs=1e-6) and before[1] == pytest.approx(math.log(16), abs=1e-5)
    assert _policy_learned(before, after), (before, after)
    # The same check fails for a policy whose parameters do not move (learning rate 0): it can fail.
    frozen_before, frozen_after = _train_policy_on_hard_tokens(learning_rate=0.0)
    assert frozen_after == pytest.approx(frozen_before) and not _policy_learned(frozen_before, frozen_after)
