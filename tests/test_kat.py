"""Tests for kat.py: Eq. (9)-(14) and the Table 6 fusion modes, checked against slow explicit versions."""
import math

import pytest
import torch
import torch.nn as nn

import kat

B, GV, S, D, HEADS = 2, 5, 3, 16, 4


def make_inputs(num_2d=GV, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, GV, D, generator=generator)  # (B, Gv, D)
    tokens_2d = torch.randn(B, S, num_2d, D, generator=generator)  # (B, S, M, D)
    return x, tokens_2d


def make_block(fusion="aligned", mask_mode="exclusion", seed=1):
    torch.manual_seed(seed)
    return kat.KATBlock(D, HEADS, fusion=fusion, mask_mode=mask_mode).eval()


def random_mask(num_2d, seed=2):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, S, GV, num_2d, generator=generator) < 0.4  # (B, S, Gv, M)
    mask[0, 1, 2] = False  # one query row with nothing allowed
    return mask


def slow_cross_sum(attention, x, tokens_2d, mask, mode):
    """sum_s T_cross^s (B, Gv, D) by explicit loops over batch, view, head and query (Eq. 11, 13)."""
    weight_q, weight_k, weight_v = attention.qkv.weight.chunk(3, dim=0)
    head_dim = D // HEADS
    out = torch.zeros(B, GV, D)
    for b in range(B):
        for s in range(S):
            for h in range(HEADS):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                keys = tokens_2d[b, s] @ weight_k[cols].T  # (M, D/h)
                values = tokens_2d[b, s] @ weight_v[cols].T  # (M, D/h)
                for i in range(GV):
                    query = x[b, i] @ weight_q[cols].T  # (D/h,)
                    logits = keys @ query / math.sqrt(head_dim)  # (M,)
                    allowed = mask[b, s, i]
                    if mode == "hadamard":  # Eq. (13) literally: masked logits are 0 and stay in the softmax
                        logits = logits * allowed
                        weights = torch.exp(logits) / torch.exp(logits).sum()
                    else:  # exclusion: softmax over the allowed entries only; none allowed -> no contribution
                        weights = torch.zeros_like(logits)
                        if allowed.any():
                            exp = torch.exp(logits[allowed])
                            weights[allowed] = exp / exp.sum()
                    out[b, i, cols] += weights @ values
    return out


def self_attention_by_hand(attention, x):
    queries, keys, values = (x @ w.T for w in attention.qkv.weight.chunk(3, dim=0))  # 3 x (B, Gv, D)
    head_dim = D // HEADS
    split = lambda t: t.unflatten(-1, (HEADS, head_dim)).transpose(1, 2)  # (B, h, Gv, D/h)
    logits = split(queries) @ split(keys).transpose(-1, -2) / math.sqrt(head_dim)  # (B, h, Gv, Gv)
    return (logits.softmax(-1) @ split(values)).transpose(1, 2).flatten(2)  # (B, Gv, D)


def test_identity_fast_path_equals_explicit_identity_mask():
    block = make_block()
    x, tokens_2d = make_inputs()
    identity = torch.eye(GV, dtype=torch.bool).expand(B, S, GV, GV).clone()  # Eq. (12) after PMA
    fast = block(x, tokens_2d)
    general = block(x, tokens_2d, identity)
    assert torch.allclose(fast, general, atol=1e-5)
    # and the identity cross term is exactly the sum over views of V_2D (softmax over one entry is 1)
    attention = block.attn
    weight_v = attention.qkv.weight[2 * D:]
    expected = (block.norm1(tokens_2d) @ weight_v.T).sum(1)  # (B, Gv, D)
    got = attention._cross_sum(block.norm1(x), None, block.norm1(tokens_2d), None)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["exclusion", "hadamard"])
def test_general_masked_attention_matches_slow_loop(mode):
    block = make_block(mask_mode=mode)
    x, tokens_2d = make_inputs(num_2d=7)
    mask = random_mask(7)
    normed_x, normed_2d = block.norm1(x), block.norm1(tokens_2d)
    fast = block.attn._cross_sum(normed_x, block.attn._split_heads(normed_x @ block.attn.qkv.weight[:D].T),
                                 normed_2d, mask)
    slow = slow_cross_sum(block.attn, normed_x, normed_2d, mask, mode)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.isfinite(block(x, tokens_2d, mask)).all()
    if mode == "exclusion":  # the fully masked query row contributes exactly 0
        head_weights = block.attn.cross_attention_weights(normed_x, normed_2d, mask)  # (B, S, h, Gv, M)
        assert torch.all(head_weights[0, 1, :, 2] == 0)


def test_exclusion_and_hadamard_differ():
    x, tokens_2d = make_inputs(num_2d=7)
    mask = random_mask(7)
    exclusion = make_block(mask_mode="exclusion")
    hadamard = make_block(mask_mode="hadamard")
    hadamard.load_state_dict(exclusion.state_dict())
    assert not torch.allclose(exclusion(x, tokens_2d, mask), hadamard(x, tokens_2d, mask), atol=1e-3)
    # with the identity mask too: hadamard keeps weight exp(0) on every non-aligned token
    assert not torch.allclose(exclusion(x, tokens_2d[..., :GV, :]), hadamard(x, tokens_2d[..., :GV, :]), atol=1e-3)


@pytest.mark.parametrize("fusion", ["aligned", "cross"])
def test_token_depends_on_aligned_2d_token_only(fusion):
    block = make_block(fusion=fusion)
    x, tokens_2d = make_inputs()
    before = block(x, tokens_2d)
    changed = tokens_2d.clone()
    changed[:, 1, 3] += 5.0 * torch.randn(B, D)  # 2-D token 3 of view 1 (aligned with 3-D token 3)
    after = block(x, changed)
    assert not torch.allclose(before[:, 3], after[:, 3], atol=1e-4)
    others = [0, 1, 2, 4]
    if fusion == "aligned":  # a non-aligned 2-D token has no influence
        assert torch.allclose(before[:, others], after[:, others], atol=1e-6)
    else:  # plain cross-attention lets every 3-D token see it
        assert not torch.allclose(before[:, others], after[:, others], atol=1e-4)


def test_block_uses_the_2d_tokens_as_given_so_a_gate_scales_the_cross_term():
    block = make_block()
    x, tokens_2d = make_inputs()
    hidden = x + block.attn(block.norm1(x), tokens_2d)  # documented pre-LN composition, no norm on 2-D tokens
    assert torch.allclose(block(x, tokens_2d), hidden + block.mlp(block.norm2(hidden)), atol=1e-6)
    # With PMA's identity alignment the cross term is linear in the 2-D tokens: a view score of 0.3 (rvs.py's
    # gate) scales its contribution by 0.3, so the selector gets a gradient (a LayerNorm would cancel the gate).
    normed = block.norm1(x)
    self_only = block.attn(normed, None)
    full = block.attn(normed, tokens_2d) - self_only
    gated = block.attn(normed, 0.3 * tokens_2d) - self_only
    assert torch.allclose(gated, 0.3 * full, atol=1e-5) and full.abs().max() > 1e-3


def test_three_d_only_block_equals_hand_built_point_mae_block():
    block = make_block()
    x, _ = make_inputs()
    reference = nn.MultiheadAttention(D, HEADS, bias=True, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(block.attn.qkv.weight)
        reference.in_proj_bias.zero_()  # qkv has no bias
        reference.out_proj.weight.copy_(block.attn.proj.weight)
        reference.out_proj.bias.copy_(block.attn.proj.bias)
    normed = block.norm1(x)
    hidden = x + reference(normed, normed, normed, need_weights=False)[0]
    expected = hidden + block.mlp(block.norm2(hidden))
    assert torch.allclose(block(x), expected, atol=1e-5)
    # the attention itself against an explicit per-head softmax
    by_hand = block.attn.proj(self_attention_by_hand(block.attn, normed))  # (B, Gv, D)
    assert torch.allclose(block.attn(normed), by_hand, atol=1e-5)


def test_no_2d_tokens_equals_switched_off_2d_branch():
    x, tokens_2d = make_inputs()
    pos = torch.randn(B, GV, D)
    torch.manual_seed(3)
    encoder = kat.KATransformer(D, depth=3, num_heads=HEADS).eval()
    plain = encoder(x, pos)
    nothing_aligned = torch.zeros(B, S, GV, GV, dtype=torch.bool)  # every cross row fully masked -> 0
    assert torch.allclose(plain, encoder(x, pos, tokens_2d, nothing_aligned), atol=1e-6)
    assert not torch.allclose(plain, encoder(x, pos, tokens_2d), atol=1e-4)
    for fusion in ["cross", "joint", "mlp"]:  # the same weights in another fusion mode, 2-D branch unused
        other = kat.KATransformer(D, depth=3, num_heads=HEADS, fusion=fusion).eval()
        other.load_state_dict(encoder.state_dict(), strict=False)
        assert torch.allclose(plain, other(x, pos), atol=1e-6)


def test_joint_fusion_is_self_attention_over_both_modalities():
    block = make_block(fusion="joint")
    x, tokens_2d = make_inputs(num_2d=4)
    joint = block.attn(x, tokens_2d)
    sequence = torch.cat([x, tokens_2d.flatten(1, 2)], dim=1)  # (B, Gv + S*M, D)
    assert torch.allclose(joint, block.attn(sequence)[:, :GV], atol=1e-5)


def test_mlp_fusion_formula():
    block = make_block(fusion="mlp")
    x, tokens_2d = make_inputs()
    attention = block.attn
    fused = attention.fusion_mlp(torch.cat([x, tokens_2d.mean(1)], dim=-1))  # MLP([E_3D ; mean_s E_2D^s])
    expected = attention.proj(self_attention_by_hand(attention, x)) + fused
    assert torch.allclose(attention(x, tokens_2d), expected, atol=1e-5)
    identity = torch.eye(GV, dtype=torch.bool).expand(B, S, GV, GV)
    assert torch.allclose(attention(x, tokens_2d, identity), expected, atol=1e-5)


@pytest.mark.parametrize("fusion", kat.FUSIONS)
def test_shapes_for_every_fusion(fusion):
    encoder = kat.KATransformer(D, depth=2, num_heads=HEADS, fusion=fusion)
    x, tokens_2d = make_inputs()
    pos = torch.randn(B, GV, D)
    assert encoder(x, pos, tokens_2d).shape == (B, GV, D)
    _, patches = make_inputs(num_2d=9)  # general case: M = P patches with an explicit mask
    assert encoder(x, pos, patches, random_mask(9)).shape == (B, GV, D)
    if fusion in ("aligned", "mlp"):  # no mask needs PMA-aligned tokens
        with pytest.raises(ValueError, match="PMA-aligned"):
            encoder(x, pos, patches)


def test_position_is_added_at_every_block_input():
    encoder = kat.KATransformer(D, depth=3, num_heads=HEADS).eval()
    x, tokens_2d = make_inputs()
    pos = torch.randn(B, GV, D)
    expected = x
    for block in encoder.blocks:
        expected = block(expected + pos, tokens_2d)
    assert torch.allclose(encoder(x, pos, tokens_2d), encoder.norm(expected), atol=1e-6)
    assert [round(block.drop_path.drop_prob, 4) for block in encoder.blocks] == [0.0, 0.05, 0.1]  # Point-MAE


def test_return_hidden_count_and_order():
    encoder = kat.KATransformer(D, depth=4, num_heads=HEADS).eval()
    x, tokens_2d = make_inputs()
    pos = torch.randn(B, GV, D)
    out, hidden = encoder(x, pos, tokens_2d, return_hidden=(1, 3, 0))
    assert len(hidden) == 3 and all(h.shape == (B, GV, D) for h in hidden)
    assert torch.allclose(hidden[1], out)  # block 3 is the last one
    assert not torch.allclose(hidden[0], hidden[2])
    with pytest.raises(ValueError, match="return_hidden"):
        encoder(x, pos, return_hidden=(4,))


def test_drop_path_is_identity_in_eval_and_drops_samples_in_training():
    drop = kat.DropPath(0.5)
    x = torch.randn(64, 3, 4) + 10.0
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = (y != 0).all(dim=(1, 2))  # a sample is dropped or kept as a whole
    assert ((y == 0).all(dim=(1, 2)) | kept).all() and 0 < kept.sum() < 64
    assert torch.allclose(y[kept], 2.0 * x[kept])  # kept samples are rescaled by 1 / keep_prob
    encoder = kat.KATransformer(D, depth=3, num_heads=HEADS, drop_path_rate=0.9).eval()
    inputs = make_inputs()
    assert torch.equal(encoder(inputs[0], inputs[0], inputs[1]), encoder(inputs[0], inputs[0], inputs[1]))


@pytest.mark.parametrize("fusion", ["aligned", "cross"])
def test_gradients_reach_qkv_from_cross_term(fusion):
    block = make_block(fusion=fusion)
    x, tokens_2d = make_inputs()
    tokens_2d.requires_grad_(True)
    queries = block.attn._split_heads(x @ block.attn.qkv.weight[:D].T)  # Eq. (9)  (B, h, Gv, D/h)
    cross_only = block.attn._cross_sum(x, queries, tokens_2d, None)  # sum_s T_cross^s only
    cross_only.square().sum().backward()
    grad_q, grad_k, grad_v = block.attn.qkv.weight.grad.chunk(3, dim=0)
    assert grad_v.abs().sum() > 0 and tokens_2d.grad.abs().sum() > 0
    if fusion == "cross":  # the softmax over all 2-D tokens trains W_Q and W_K
        assert grad_q.abs().sum() > 0 and grad_k.abs().sum() > 0
    else:  # identity fast path: softmax over one entry is constant, so only W_V learns from it (documented)
        assert grad_q.abs().sum() == 0 and grad_k.abs().sum() == 0


def test_point_mae_initialisation():
    encoder = kat.KATransformer(D, depth=2, num_heads=HEADS)
    linear_weights = torch.cat([m.weight.flatten() for m in encoder.modules() if isinstance(m, nn.Linear)])
    assert abs(linear_weights.std().item() - 0.02) < 0.003
    assert all(torch.all(m.bias == 0) for m in encoder.modules() if isinstance(m, nn.Linear) and m.bias is not None)
    assert torch.all(encoder.norm.weight == 1) and torch.all(encoder.norm.bias == 0)


# ---------------------------------------------------------------- attn_mask over one joint sequence (joint_mae.py)
def test_attn_mask_all_true_equals_no_mask():
    torch.manual_seed(4)
    encoder = kat.KATransformer(D, depth=2, num_heads=HEADS).eval()
    x, pos = torch.randn(B, 7, D), torch.randn(B, 7, D)
    everything = torch.ones(B, 1, 7, 7, dtype=torch.bool)
    assert torch.allclose(encoder(x, pos), encoder(x, pos, attn_mask=everything), atol=1e-6)
    assert torch.equal(encoder(x, pos), encoder(x, pos, attn_mask=None))


def test_attn_mask_gives_masked_keys_zero_weight():
    attention = make_block().attn
    x = torch.randn(B, 6, D)
    mask = torch.ones(B, 1, 6, 6, dtype=torch.bool)
    mask[:, :, :3, 4] = False  # queries 0-2 may not attend to key 4
    out = attention(x, attn_mask=mask)
    # against an explicit per-head softmax with the masked logits excluded
    queries, keys, values = (attention._split_heads(x @ w.T) for w in attention.qkv.weight.chunk(3, dim=0))
    logits = (queries @ keys.transpose(-1, -2) / math.sqrt(D // HEADS)).masked_fill(~mask, float("-inf"))
    weights = logits.softmax(-1)  # (B, h, 6, 6)
    assert torch.all(weights[:, :, :3, 4] == 0)
    assert torch.allclose(out, attention.proj((weights @ values).transpose(1, 2).flatten(2)), atol=1e-5)
    # changing token 4 (its key and value) leaves the rows that cannot see it unchanged, and moves the others
    changed = x.clone()
    changed[:, 4] += 3.0 * torch.randn(B, D)
    after = attention(changed, attn_mask=mask)
    assert torch.allclose(out[:, :3], after[:, :3], atol=1e-6)
    assert not torch.allclose(out[:, 3:], after[:, 3:], atol=1e-4)
    unmasked = attention(x)
    assert not torch.allclose(unmasked[:, :3], attention(changed)[:, :3], atol=1e-4)  # without the mask it leaks


def test_attn_mask_is_refused_with_2d_tokens():
    block = make_block()
    x, tokens_2d = make_inputs()
    with pytest.raises(ValueError, match="attn_mask"):
        block(x, tokens_2d, attn_mask=torch.ones(B, 1, GV, GV, dtype=torch.bool))
