"""Tests for rvs.py: Eq. (6) against a slow loop (ties included), gating, gradients, shapes."""
import pytest
import torch

import rvs


def slow_top_k(scores_row, k):
    """Eq. (6) by the letter, then the documented tie-break (higher score first, then lower view index)."""
    values = scores_row.tolist()
    eq6_set = [i for i in range(len(values)) if sum(value > values[i] for value in values) < k]
    chosen = sorted(eq6_set, key=lambda i: (-values[i], i))[:k]
    return eq6_set, chosen


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_views_matches_eq6_loop_on_random_scores(k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.rand(16, 7, generator=generator)
    selected = rvs.top_k_views(scores, k)
    assert selected.shape == (16, k) and selected.dtype == torch.long
    for row in range(16):
        eq6_set, chosen = slow_top_k(scores[row], k)
        # Without ties Eq. (6) already has exactly k members and they are the ones we keep.
        assert sorted(eq6_set) == sorted(chosen)
        assert selected[row].tolist() == chosen


def test_top_k_views_breaks_ties_by_lower_view_index():
    scores = torch.tensor([
        [0.5, 0.9, 0.5, 0.5, 0.1],  # Eq. (6) with k = 2 keeps {0, 1, 2, 3}: three views tie at 0.5
        [0.3, 0.3, 0.3, 0.3, 0.3],  # all tied
        [0.2, 0.7, 0.7, 0.1, 0.7],  # three-way tie at the top
    ])
    selected = rvs.top_k_views(scores, 2)
    assert selected.tolist() == [[1, 0], [0, 1], [1, 2]]
    for row in range(3):
        eq6_set, chosen = slow_top_k(scores[row], 2)
        assert len(eq6_set) > 2  # the tie really makes Eq. (6)'s set larger than k
        assert selected[row].tolist() == chosen
        assert set(chosen) <= set(eq6_set)


def test_top_k_views_rejects_bad_k():
    with pytest.raises(ValueError, match="number of selected views"):
        rvs.top_k_views(torch.rand(2, 4), 5)


def make_inputs(batch_size=3, num_groups=8, num_views=6, num_patches=5, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens_3d = torch.randn(batch_size, num_groups, dim, generator=generator)
    tokens_2d = torch.randn(batch_size, num_views, num_patches, dim, generator=generator)
    return tokens_3d, tokens_2d


def test_forward_shapes_and_score_range():
    torch.manual_seed(0)
    tokens_3d, tokens_2d = make_inputs()
    selector = rvs.ReliableViewSelector(dim=16, num_selected=3)
    selected, scores, gated = selector(tokens_3d, tokens_2d)
    assert selected.shape == (3, 3) and selected.dtype == torch.long
    assert scores.shape == (3, 6)
    assert gated.shape == (3, 3, 5, 16)
    assert ((scores > 0) & (scores < 1)).all()
    # The selection is Eq. (6) applied to the returned scores.
    assert torch.equal(selected, rvs.top_k_views(scores, 3))


def test_scores_match_a_slow_per_view_loop_of_eq4_eq5():
    torch.manual_seed(1)
    tokens_3d, tokens_2d = make_inputs()
    selector = rvs.ReliableViewSelector(dim=16, num_selected=2, hidden_dim=8)
    _, scores, _ = selector(tokens_3d, tokens_2d)
    for b in range(3):
        cls_3d = tokens_3d[b].max(dim=0).values
        for view in range(6):
            cls_2d = tokens_2d[b, view].max(dim=0).values
            expected = torch.sigmoid(selector.score_mlp(torch.cat([cls_3d, cls_2d])))[0]
            assert torch.allclose(scores[b, view], expected, atol=1e-6)


def test_gated_tokens_equal_selected_tokens_times_score():
    torch.manual_seed(2)
    tokens_3d, tokens_2d = make_inputs()
    selector = rvs.ReliableViewSelector(dim=16, num_selected=3)
    selected, scores, gated = selector(tokens_3d, tokens_2d)
    for b in range(3):
        for slot in range(3):
            view = selected[b, slot].item()
            assert torch.allclose(gated[b, slot], tokens_2d[b, view] * scores[b, view], atol=1e-6)


def test_k_equal_to_v_keeps_every_view():
    torch.manual_seed(3)
    tokens_3d, tokens_2d = make_inputs()
    selector = rvs.ReliableViewSelector(dim=16, num_selected=6)
    selected, scores, gated = selector(tokens_3d, tokens_2d)
    assert torch.equal(selected.sort(dim=1).values, torch.arange(6).expand(3, 6))
    # Best-first order: the scores along the selection never increase.
    assert (scores.gather(1, selected).diff(dim=1) <= 0).all()


def test_selector_parameters_receive_gradients_from_the_gated_tokens():
    torch.manual_seed(4)
    tokens_3d, tokens_2d = make_inputs()
    selector = rvs.ReliableViewSelector(dim=16, num_selected=2)
    _, _, gated = selector(tokens_3d, tokens_2d)
    gated.pow(2).sum().backward()
    for name, parameter in selector.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_mismatched_inputs_raise_clear_errors():
    selector = rvs.ReliableViewSelector(dim=16)
    with pytest.raises(ValueError, match="share batch size and width"):
        selector(torch.randn(2, 8, 16), torch.randn(3, 6, 5, 16))
    with pytest.raises(ValueError, match=r"\(B, V, P, D\)"):
        selector(torch.randn(2, 8, 16), torch.randn(2, 6, 16))
