"""Tests for haltingvt: shapes, then gradients, then parity with slow, obviously-correct references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from haltingvt import (HaltingVT, HaltingVTConfig, count_gflops, dense_gflops, gather_patches, halting_weights,
                       load_deit, top_k_per_frame)


# ----------------------------------------------------------------------------------------------------------
# Slow references
# ----------------------------------------------------------------------------------------------------------

def slow_halting(h, eps):
    """Eqs. (3), (4), (6) for one token, in plain Python: h is a list of per-layer scores."""
    L = len(h)
    h = list(h[:-1]) + [1.0]
    total = 0.0
    for n in range(1, L + 1):
        if total + h[n - 1] >= 1 - eps:  # case 1: threshold reached at layer n
            r = 1 - total
            return [h[l] for l in range(n - 1)] + [r] + [0.0] * (L - n), n, r
        total += h[n - 1]  # case 2: not reached, go on
    raise AssertionError("unreachable: the last score is 1")


def check_against_slow(h, eps):
    weights, depth, remainder = halting_weights(h, eps)
    flat_h = h.reshape(h.shape[0], -1)
    for j in range(flat_h.shape[1]):
        w_ref, n_ref, r_ref = slow_halting(flat_h[:, j].tolist(), eps)
        assert depth.reshape(-1)[j].item() == n_ref
        assert remainder.reshape(-1)[j].item() == pytest.approx(r_ref, abs=1e-6)
        assert weights.reshape(h.shape[0], -1)[:, j].tolist() == pytest.approx(w_ref, abs=1e-6)
    return weights, depth, remainder


def diverse_model(seed=0, beta=0.0, **overrides):
    """A tiny model whose halting is input-dependent: some class tokens halt early, others late.

    Random weights barely move channel 0 (the halting channel); scaling the joint layers' output projections on
    that channel lets the halting score follow the input.
    """
    torch.manual_seed(seed)
    cfg = HaltingVTConfig.tiny(beta=beta, gamma=5.0, drop_path=0.0, **overrides)
    model = HaltingVT(cfg).eval()
    with torch.no_grad():
        model.cls_token[0, 0, 0] = 0.0
        for blk in model.joint.blocks:
            blk.attn.proj.weight[0] *= 30
            blk.mlp.fc2.weight[0] *= 10
    video = torch.randn(6, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    video = video * torch.linspace(0.2, 3.0, 6).view(6, 1, 1, 1, 1)
    return model, video


# ----------------------------------------------------------------------------------------------------------
# Halting math
# ----------------------------------------------------------------------------------------------------------

def test_halting_weights_matches_slow_loop_on_random_scores():
    torch.manual_seed(0)
    for L in (1, 2, 5, 10):
        h = torch.rand(L, 3, 7) * torch.rand(1, 3, 7)  # a range of speeds
        weights, depth, remainder = check_against_slow(h, eps=0.01)
        assert torch.allclose(weights.sum(0), torch.ones(3, 7))
        assert ((1 <= depth) & (depth <= L)).all()
        assert ((0 < remainder) & (remainder <= 1)).all()


@pytest.mark.parametrize("scores, eps, depth", [
    ([0.25, 0.25, 0.3, 0.9], 0.5, 2),  # the sum lands exactly on 1 - eps: halts there (Eq. 3 uses >=)
    ([0.5, 0.5, 0.5], 0.0, 2),  # eps = 0: halts only at a full 1
    ([0.5, 0.49, 0.0], 0.0, 3),  # eps = 0 and the sum stays below 1: runs to the end
    ([1.0, 1.0, 1.0], 0.01, 1),  # all ones: halts at once with remainder 1
    ([0.0, 0.0, 0.0], 0.01, 3),  # all zeros: runs to the end, remainder 1
    ([0.3], 0.01, 1),  # L = 1: the last (only) layer is forced to 1
])
def test_halting_weights_edge_cases(scores, eps, depth):
    h = torch.tensor(scores).view(-1, 1)
    weights, n, r = check_against_slow(h, eps)
    assert n.item() == depth
    assert weights.sum().item() == pytest.approx(1.0)


def test_model_halting_invariants_and_loop_agrees_with_halting_weights():
    model, video = diverse_model()
    with torch.no_grad():
        out = model(video, drop_halted=False)
    L = len(model.joint.blocks)
    weights, depth, remainder = halting_weights(out.halt_scores, model.cfg.eps)
    assert torch.equal(depth, out.halt_depth)
    assert torch.allclose(remainder, out.remainder, atol=1e-6)
    assert torch.allclose(weights.sum(0), torch.ones_like(remainder))
    assert ((1 <= out.halt_depth) & (out.halt_depth <= L)).all()
    assert ((0 < out.remainder) & (out.remainder <= 1)).all()
    before = torch.stack([out.halt_scores[: n - 1, b, k].sum() for b, n_row in enumerate(out.halt_depth)
                          for k, n in enumerate(n_row.tolist())])
    assert (before < 1 - model.cfg.eps).all()
    assert torch.allclose(out.ponder, (out.halt_depth + out.remainder).mean(1))  # Eq. (5)
    joint = out.tokens_per_layer[:, model.cfg.glimpser_depth:]
    assert (joint[:, 1:] <= joint[:, :-1]).all()
    # the setting really is diverse: tokens halt at several layers, some class tokens early
    assert len(out.halt_depth.unique()) >= 3 and (out.halt_depth[:, 0] < L).any()


def test_halted_tokens_take_no_part_in_later_layers():
    """In mask mode a halted token's frozen state stays in the tensor: overwrite it with garbage before the next
    layer, and nothing that layer computes for the live tokens may change (not a key, not a value)."""
    model, video = diverse_model()
    with torch.no_grad():
        ref = model(video[:1], drop_halted=False)
    depth = ref.halt_depth[0]
    k = int(torch.nonzero(depth[1:] < depth[0])[0]) + 1  # a patch token halting before its class token
    blk = model.joint.blocks[depth[k].item()]  # the first layer it no longer takes part in

    def overwrite(module, args, kwargs):
        x = args[0].clone()
        x[0, k] = 50.0
        return (x,), kwargs

    handle = blk.register_forward_pre_hook(overwrite, with_kwargs=True)
    with torch.no_grad():
        poked = model(video[:1], drop_halted=False)
    handle.remove()
    assert torch.allclose(poked.logits, ref.logits, atol=1e-6)
    assert torch.equal(poked.halt_depth, ref.halt_depth)


# ----------------------------------------------------------------------------------------------------------
# Glimpser
# ----------------------------------------------------------------------------------------------------------

def test_top_k_per_frame_matches_sort():
    torch.manual_seed(0)
    attn = torch.rand(3, 4, 20)
    for keep in (1, 7, 20):
        index = top_k_per_frame(attn, keep)
        ref = attn.argsort(-1, descending=True)[..., :keep].sort(-1).values
        assert torch.equal(index, ref)


def test_gather_patches_matches_loop():
    torch.manual_seed(0)
    B, T, S, k, D = 2, 3, 5, 2, 4
    x = torch.randn(B, 1 + T * S, D)
    index = torch.stack([torch.randperm(S)[:k].sort().values for _ in range(B * T)]).view(B, T, k)
    out = gather_patches(x, index)
    ref = [[x[b, 0]] + [x[b, 1 + t * S + s] for t in range(T) for s in index[b, t].tolist()] for b in range(B)]
    assert torch.equal(out, torch.stack([torch.stack(r) for r in ref]))


def test_glimpser_keeps_top_k_by_class_token_attention():
    torch.manual_seed(0)
    cfg = HaltingVTConfig.tiny(keep_ratio=0.3)
    model = HaltingVT(cfg).eval()
    S = (cfg.img_size // cfg.patch_size) ** 2
    seen = {}
    attn = model.glimpser.blocks[-1].attn
    original = attn.forward_with_cls_row

    def spy(x):
        out, row = original(x)
        # reference: the full attention matrix, written out, its class-token row averaged over heads
        q, k, _ = attn.heads(x)
        full = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)  # (B*T, h, 1+S, 1+S)
        seen["row"] = full[:, :, 0].mean(1)
        assert torch.allclose(row, seen["row"], atol=1e-6)
        return out, row

    attn.forward_with_cls_row = spy
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        out = model(video)
    kept = math.ceil(0.3 * S)
    assert out.keep_index.shape == (2, cfg.num_frames, kept)
    row = seen["row"][:, 1:].view(2, cfg.num_frames, S)
    ref = row.argsort(-1, descending=True)[..., :kept].sort(-1).values
    assert torch.equal(out.keep_index, ref)
    assert (out.tokens_per_layer[:, cfg.glimpser_depth] == 1 + cfg.num_frames * kept).all()  # class token kept


def test_keep_ratio_one_keeps_every_token():
    cfg = HaltingVTConfig.tiny(keep_ratio=1.0, halting=False)
    model = HaltingVT(cfg).eval()
    S = (cfg.img_size // cfg.patch_size) ** 2
    with torch.no_grad():
        out = model(torch.randn(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size))
    assert torch.equal(out.keep_index[0], torch.arange(S).expand(cfg.num_frames, S))
    assert (out.tokens_per_layer == 1 + cfg.num_frames * S).all()


# ----------------------------------------------------------------------------------------------------------
# Mask and drop modes
# ----------------------------------------------------------------------------------------------------------

def test_mask_and_drop_modes_agree_and_batches_are_independent():
    model, video = diverse_model()
    with torch.no_grad():
        masked = model(video, drop_halted=False)
        dropped = model(video, drop_halted=True)
        alone = [model(video[i:i + 1], drop_halted=True) for i in range(len(video))]
    for name in ("logits", "motion_logits", "gflops"):
        a, b = getattr(masked, name), getattr(dropped, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        c = torch.cat([getattr(o, name) for o in alone])
        assert torch.allclose(c, b, rtol=1e-5, atol=1e-6), name
    assert torch.equal(masked.tokens_per_layer, dropped.tokens_per_layer)
    by_cls = masked.halt_depth <= masked.halt_depth[:, :1]  # halted no later than the class token
    assert torch.equal(masked.halt_depth[by_cls], dropped.halt_depth[by_cls])
    assert torch.allclose(masked.remainder[by_cls], dropped.remainder[by_cls], atol=1e-6)
    # in drop mode the tokens still running when the class token halts stop with it
    late = ~by_cls
    assert late.any()
    assert torch.equal(dropped.halt_depth[late], dropped.halt_depth[:, :1].expand_as(late)[late])
    assert (masked.gflops < dense_gflops(model.cfg)).all()


def test_drop_mode_gradients_match_mask_mode():
    model, video = diverse_model()
    video = video[:3]
    grads = []
    for drop in (False, True):
        model.zero_grad()
        out = model(video, drop_halted=drop)
        out.logits.square().sum().backward()
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop", [False, True])
def test_every_parameter_gets_a_finite_gradient(drop):
    torch.manual_seed(0)
    cfg = HaltingVTConfig.tiny(beta=3.0, keep_ratio=1.0)
    model = HaltingVT(cfg).train()
    with torch.no_grad():  # temporal_fc starts at zero, which would block the temporal attention's gradient
        for blk in model.glimpser.blocks:
            blk.temporal_fc.weight.normal_(0, 0.02)
    out = model(torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size), drop_halted=drop)
    (out.logits.sum() + out.ponder.sum() + out.motion_logits.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_ponder_gradient_reaches_halting_scores_through_remainders():
    """beta moves only the scores, not the token states, so Eqs. (4)-(5) give d ponder / d beta exactly:
    dr_k/d beta = -sum_{l < N_k} dh_k^l/d beta = sum_{l < N_k} h (1 - h), averaged over the K tokens."""
    model, video = diverse_model()
    beta = torch.tensor(model.joint.beta, requires_grad=True)
    model.joint.beta = beta
    out = model(video[:2], drop_halted=False)
    (grad,) = torch.autograd.grad(out.ponder.sum(), beta)
    h = out.halt_scores.detach()  # (L, B, K)
    layer = torch.arange(1, h.shape[0] + 1).view(-1, 1, 1)
    expected = (h * (1 - h) * (layer < out.halt_depth)).sum(0).mean(1).sum()
    assert expected > 0  # a larger score (smaller beta) lowers the ponder cost
    assert grad.item() == pytest.approx(expected.item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# GFLOPs
# ----------------------------------------------------------------------------------------------------------

def test_gflops_paper_scale_figures():
    assert dense_gflops(HaltingVTConfig.deit_small()) == pytest.approx(56.5, abs=0.1)
    cfg = HaltingVTConfig.deit_small(halting=False)
    S, T = 196, 8
    tokens = torch.tensor([[1 + T * S] * 2 + [1 + T * 98] * 10])
    assert count_gflops(cfg, tokens, T, S).item() == pytest.approx(27.5, abs=0.1)


def test_gflops_match_flop_counter_on_a_drop_mode_forward():
    """FlopCounterMode counts 2 per multiply-add. It does not see inside the fused CPU attention kernel, so the
    test runs attention through PyTorch's math backend, whose matmuls it does count."""
    model, video = diverse_model()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(video, drop_halted=True)
    assert out.gflops.sum().item() == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-6)
    assert len(out.gflops.unique()) > 1  # samples really spent different amounts


# ----------------------------------------------------------------------------------------------------------
# DeiT-S initialisation
# ----------------------------------------------------------------------------------------------------------

def fake_deit_state(D=384, depth=12, grid=14, classes=1000, seed=0):
    """A random state dict with timm's DeiT-S key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    state = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + grid * grid, D),
             "patch_embed.proj.weight": r(D, 3, 16, 16), "patch_embed.proj.bias": r(D),
             "norm.weight": 1 + r(D), "norm.bias": r(D), "head.weight": r(classes, D), "head.bias": r(classes)}
    for i in range(depth):
        p = f"blocks.{i}."
        state.update({p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D), p + "attn.qkv.weight": r(3 * D, D),
                      p + "attn.qkv.bias": r(3 * D), p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
                      p + "norm2.weight": 1 + r(D), p + "norm2.bias": r(D), p + "mlp.fc1.weight": r(4 * D, D),
                      p + "mlp.fc1.bias": r(4 * D), p + "mlp.fc2.weight": r(D, 4 * D), p + "mlp.fc2.bias": r(D)})
    return state


def reference_vit(state, image, heads=6):
    """A plain ViT forward, written out: image (1, 3, H, W) -> logits (1, classes)."""
    x = F.conv2d(image, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    x = torch.cat([state["cls_token"], x.flatten(2).transpose(1, 2)], 1) + state["pos_embed"]
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], state[n + ".weight"], state[n + ".bias"], 1e-6)  # noqa: E731
    lin = lambda t, n: t @ state[n + ".weight"].T + state[n + ".bias"]  # noqa: E731
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        p = f"blocks.{i}."
        K, D = x.shape[1], x.shape[2]
        q, k, v = lin(ln(x, p + "norm1"), p + "attn.qkv").view(1, K, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(-1) @ v
        x = x + lin(a.transpose(1, 2).reshape(1, K, D), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        i += 1
    return lin(ln(x, "norm")[:, 0], "head")


def test_load_deit_matches_a_plain_vit_on_one_frame():
    state = fake_deit_state()
    cfg = HaltingVTConfig.deit_small(num_frames=1, keep_ratio=1.0, halting=False, num_classes=1000)
    model = HaltingVT(cfg).eval()
    report = load_deit(model, {"model": state})
    assert report["unexpected"] == []
    assert set(report["missing"]) == {"time_embed", "motion_head.weight", "motion_head.bias",
                                      "glimpser.blocks.0.temporal_fc.weight", "glimpser.blocks.0.temporal_fc.bias",
                                      "glimpser.blocks.1.temporal_fc.weight", "glimpser.blocks.1.temporal_fc.bias"}
    torch.manual_seed(0)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model(image.unsqueeze(2)).logits
        ref = reference_vit(state, image)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_load_deit_resizes_pos_embed_skips_a_foreign_head_and_reports_keys(tmp_path):
    state = fake_deit_state(D=64, depth=3, grid=14, classes=1000)
    state["dist_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)
    cfg = HaltingVTConfig.tiny(embed_dim=64, depth=3, num_heads=4, glimpser_depth=1, num_classes=5)
    model = HaltingVT(cfg)
    with torch.no_grad():
        model.time_embed.fill_(1.0)
    report = load_deit(model, str(path))
    assert report["unexpected"] == ["dist_token"]
    assert {"head.weight", "head.bias", "time_embed"} <= set(report["missing"])
    assert model.pos_embed.shape == (1, 1 + 16, 64)
    assert torch.equal(model.pos_embed[0, 0], state["pos_embed"][0, 0])  # class entry kept as is
    assert (model.time_embed == 0).all()
    blk = model.glimpser.blocks[0]
    assert torch.equal(blk.temporal_attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert torch.equal(blk.temporal_norm1.weight, state["blocks.0.norm1.weight"])
    assert (blk.temporal_fc.weight == 0).all()
    assert torch.equal(model.joint.blocks[1].mlp.fc1.weight, state["blocks.2.mlp.fc1.weight"])
    state["blocks.1.attn.qkv.weight"] = torch.zeros(10, 10)
    with pytest.raises(ValueError, match="joint.blocks.0.attn.qkv.weight"):
        load_deit(model, state)


# ----------------------------------------------------------------------------------------------------------
# Inputs and settings
# ----------------------------------------------------------------------------------------------------------

def test_other_frame_counts_and_sizes_resize_the_embeddings():
    cfg = HaltingVTConfig.tiny()
    model = HaltingVT(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 5, 96, 80))
    S = 6 * 5
    assert out.keep_index.shape == (1, 5, math.ceil(0.5 * S))
    assert out.tokens_per_layer[0, 0] == 1 + 5 * S


@pytest.mark.parametrize("shape", [(1, 3, 8, 64), (1, 1, 8, 64, 64), (1, 3, 8, 60, 64), (1, 3, 8, 64, 70)])
def test_bad_video_shapes_raise(shape):
    model = HaltingVT(HaltingVTConfig.tiny())
    with pytest.raises(ValueError, match=r"expected video of shape \(B, C=3, T, H, W\).*got"):
        model(torch.randn(*shape))


@pytest.mark.parametrize("field, value", [
    ("keep_ratio", 0.0), ("keep_ratio", 1.5), ("embed_dim", 130), ("glimpser_depth", 9), ("glimpser_depth", 8),
    ("eps", 1.0), ("eps", -0.1), ("gamma", 0.0), ("img_size", 70), ("depth", 0), ("drop_path", 1.0),
])
def test_bad_settings_raise(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        HaltingVTConfig.tiny(**{field: value})


def test_plain_joint_vt_and_no_halting():
    cfg = HaltingVTConfig.tiny(glimpser_depth=0, halting=False)
    model = HaltingVT(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size))
    assert out.keep_index is None
    assert (out.halt_depth == cfg.depth).all() and (out.remainder == 1).all()
    assert out.gflops[0].item() == pytest.approx(dense_gflops(cfg), rel=1e-6)
    assert out.halt_scores.shape == (cfg.depth, 2, 1 + cfg.num_frames * 16)
