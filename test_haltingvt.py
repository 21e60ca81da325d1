"""Tests for haltingvt: shapes, then gradients, then parity with slow, obviously-correct references.

Sections follow the files: haltingvt.py (the network, drop mode's execution), checkpoints.py, losses.py,
data.py, train.py, bench.py. No wall-clock thresholds: timings are benchmark figures (bench.py, the sanity run),
not tests. Tests marked `slow` (a few seconds each: several processes, whole training runs) are left out by
`python -m pytest -q -m "not slow" test_haltingvt.py`; CI runs them all.
"""
import argparse
import ast
import fractions
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tokenize
import tracemalloc
import types
import weakref
import zipfile
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import bench
import checkpoints
import data
import haltingvt
import losses
import train
from checkpoints import load_pretrained
from haltingvt import (Attention, HaltingVT, HaltingVTConfig, count_gflops, dense_gflops, gather_patches,
                       top_k_per_frame)


# ----------------------------------------------------------------------------------------------------------
# haltingvt.py: the network (slow references, halting math, Glimpser, mask/drop modes, gradients, GFLOPs, inputs)
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


def halting_weights(h, eps):
    """The ACT bookkeeping of Eqs. (3), (4), (6) for per-layer scores h (L, ...), the last one taken as 1, in
    closed form (the reference HaltingStage's loop is held to): weights (L, ...) h_l before the halting layer, r at
    it, 0 after (summing to 1; Eq. 6); depth (...) N, the first layer where the running sum reaches 1 - eps
    (Eq. 3), in 1..L; remainder (...) r = 1 - the sum of the scores before layer N (Eq. 4)."""
    L = h.shape[0]
    h = torch.cat([h[:-1], torch.ones_like(h[-1:])])  # h^L := 1
    layer = torch.arange(1, L + 1).view(L, *[1] * (h.dim() - 1))  # (L, 1, ...)
    before = torch.cumsum(torch.cat([torch.zeros_like(h[:1]), h[:-1]]), 0)  # sum_{l' < l} h_l'  (L, ...)
    depth = (before + h >= 1 - eps).int().argmax(0) + 1  # Eq. (3): the first layer where the sum reaches 1 - eps
    remainder = 1 - before.gather(0, (depth - 1).unsqueeze(0)).squeeze(0)  # Eq. (4)
    weights = torch.where(layer < depth, h, torch.where(layer == depth, remainder, torch.zeros_like(h)))
    return weights, depth, remainder


def check_against_slow(h, eps):
    weights, depth, remainder = halting_weights(h, eps)
    flat_h = h.reshape(h.shape[0], -1)
    for j in range(flat_h.shape[1]):
        w_ref, n_ref, r_ref = slow_halting(flat_h[:, j].tolist(), eps)
        assert depth.reshape(-1)[j].item() == n_ref
        assert remainder.reshape(-1)[j].item() == pytest.approx(r_ref, abs=1e-6)
        assert weights.reshape(h.shape[0], -1)[:, j].tolist() == pytest.approx(w_ref, abs=1e-6)
    return weights, depth, remainder


def diverse_model(beta=0.0, batch=6, **overrides):
    """A tiny model whose halting is input-dependent: some class tokens halt early, others late.

    Random weights barely move channel 0 (the halting channel); scaling the joint layers' output projections on
    that channel lets the halting score follow the input. Whether a given seed's draw is diverse enough depends on
    torch's random streams, which change between versions (seed 0 is on torch 2.13, not on 2.11), so this takes
    the first seed whose draw is, with every token halting on its own scores (training mode): class tokens
    halting at two or more layers, and patch tokens halting at three or more, some before their class token and
    some after. The model is returned in evaluation mode; with drop_path 0 training mode differs only in the
    halting (HaltingStage).
    """
    for seed in range(20):
        torch.manual_seed(seed)
        cfg = HaltingVTConfig.tiny(beta=beta, gamma=5.0, drop_path=0.0, **overrides)
        model = HaltingVT(cfg).train()
        with torch.no_grad():
            model.cls_token[0, 0, 0] = 0.0
            for blk in model.joint.blocks:
                blk.attn.proj.weight[0] *= 30
                blk.mlp.fc2.weight[0] *= 10
            video = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
            video = video * torch.linspace(0.2, 3.0, batch).view(batch, 1, 1, 1, 1)
            depth = model(video, drop_halted=False).halt_depth  # (batch, K)
        patch, cls = depth[:, 1:], depth[:, :1]
        if len(cls.unique()) > 1 and len(depth.unique()) >= 3 and (patch < cls).any() and (patch > cls).any():
            return model.eval(), video
    raise AssertionError("no seed in 0..19 gives a model whose halting depends on the input")


def test_halting_weights_matches_slow_loop_on_random_scores():
    torch.manual_seed(0)
    for L in (1, 2, 5, 10):
        h = torch.rand(L, 3, 7) * torch.rand(1, 3, 7)  # a range of speeds
        weights, depth, remainder = check_against_slow(h, eps=0.01)
        assert weights.shape == h.shape and depth.shape == remainder.shape == (3, 7)
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


def tie_model(cfg):
    """A model whose tokens all score sigmoid(2 * 0.75 - 1.5) = 0.5 in every layer (gamma 2, beta 1.5): channel 0
    is 0.75 everywhere and every layer leaves x unchanged."""
    model = HaltingVT(cfg)
    with torch.no_grad():
        for blk in model.joint.blocks:
            for layer in (blk.attn.proj, blk.mlp.fc2):
                layer.weight.zero_(), layer.bias.zero_()
        model.patch_embed.proj.weight[0] = 0.0
        model.patch_embed.proj.bias[0] = 0.75
        model.cls_token[..., 0] = 0.75
        model.pos_embed[..., 0] = 0.0
    return model


@pytest.mark.parametrize("eps, depth, remainder", [(0.5, 1, 1.0), (0.0, 2, 0.5)])
def test_model_halts_where_the_sum_is_exactly_1_minus_eps(eps, depth, remainder):
    """The model's own halting path at a tie: every token scores exactly 0.5 in every layer (channel 0 is 0.75
    everywhere, layers that leave x unchanged, gamma 2 and beta 1.5: sigmoid(0)), so the running sum lands on
    1 - eps exactly, at layer 1 for eps 0.5 and at layer 2 for eps 0. Eq. (3) halts there (>=, not >)."""
    cfg = HaltingVTConfig.tiny(glimpser_depth=0, depth=3, gamma=2.0, beta=1.5, eps=eps)
    model = tie_model(cfg)
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    for training, drop in [(True, False), (True, True), (False, False), (False, True)]:
        with torch.no_grad():
            out = model.train(training)(video, drop_halted=drop)
        assert (out.halt_scores[0] == 0.5).all()
        assert (out.halt_depth == depth).all() and (out.remainder == remainder).all(), (training, drop)
        assert torch.equal(out.ponder, torch.full((2,), depth + remainder))  # Eq. (5)


def test_release_compat_halts_only_past_1_minus_eps():
    """The same tie with the release-compatible forward: the release halts on `> 1 - eps`, so a sum that lands on
    1 - eps = 0.5 exactly at layer 1 runs one layer more, and halts at layer 2 with remainder 1 - 0.5."""
    depth, remainder = 2, 0.5
    cfg = HaltingVTConfig.tiny(glimpser_depth=0, depth=3, gamma=2.0, beta=1.5, eps=0.5, release_compat=True)
    model = tie_model(cfg)
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    for training in (True, False):
        with torch.no_grad():
            out = model.train(training)(video)
        assert (out.halt_scores[0] == 0.5).all()
        assert (out.halt_depth == depth).all() and (out.remainder == remainder).all(), training
        assert torch.equal(out.ponder, torch.full((2,), depth + remainder))  # Eq. (5)


def test_model_halting_invariants_and_loop_agrees_with_halting_weights():
    model, video = diverse_model()
    model.train()  # every token halts on its own scores (Eqs. 3, 4)
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


def test_default_execution_is_drop_in_evaluation_and_mask_in_training():
    """drop_halted=None: evaluation removes halted tokens (packed rows), training masks them (the joint layers
    are called on the fixed (B, K, D) tensor); an explicit value wins."""
    model, video = diverse_model()
    masked = []
    model.joint.blocks[0].register_forward_hook(lambda module, args, out: masked.append(tuple(args[0].shape)))
    with torch.no_grad():
        for training, drop, mask_mode in [(False, None, False), (True, None, True), (False, False, True),
                                          (True, True, False)]:
            masked.clear()
            model.train(training)(video[:2], drop_halted=drop)
            assert bool(masked) == mask_mode, (training, drop)


def test_halted_tokens_take_no_part_in_later_layers():
    """In mask mode a halted token's frozen state stays in the tensor: overwrite it with garbage before the next
    layer, and nothing that layer computes for the live tokens may change (not a key, not a value)."""
    model, video = diverse_model()
    with torch.no_grad():
        depth = model(video, drop_halted=False).halt_depth  # (6, K)
    early = depth[:, 1:] < depth[:, :1]  # patch tokens halting before their class token
    assert early.any(), "diverse_model() should have a patch token that halts before its class token"
    b = int(early.any(1).nonzero()[0])  # the first such video (which one depends on the random draw)
    video, depth = video[b:b + 1], depth[b]
    k = int(early[b].nonzero()[0]) + 1
    with torch.no_grad():
        ref = model(video, drop_halted=False)
    blk = model.joint.blocks[depth[k].item()]  # the first layer it no longer takes part in

    calls = []

    def overwrite(module, args, kwargs):
        x = args[0].clone()
        x[0, k] = 50.0
        calls.append(k)
        return (x,), kwargs

    handle = blk.register_forward_pre_hook(overwrite, with_kwargs=True)
    with torch.no_grad():
        poked = model(video, drop_halted=False)
    handle.remove()
    assert calls  # mask mode ran that layer on the frozen state
    assert torch.allclose(poked.logits, ref.logits, atol=1e-6)
    assert torch.equal(poked.halt_depth, ref.halt_depth)


# A slow, obviously-correct HaltingVT written out from the paper: one sample at a time, attention as the softmax
# of Eq. (1) per head, the halting of Eqs. (2)-(6) as a loop over tokens. It reads the model's weights and
# nothing else of the library.

def ref_layer_norm(norm, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_attention(attn, x):
    """Eq. (1) on one sequence x (n, D), head by head: (n, D), and the class token's row of the attention
    weights averaged over the heads (n,) (Eq. 7's w)."""
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, -1)
    h, d = attn.num_heads, x.shape[-1] // attn.num_heads
    outs, rows = [], []
    for i in range(h):
        part = slice(i * d, (i + 1) * d)
        w = torch.softmax(q[:, part] @ k[:, part].T / math.sqrt(d), -1)  # (n, n)
        outs.append(w @ v[:, part])
        rows.append(w[0])
    return torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias, torch.stack(rows).mean(0)


def ref_mlp(blk, x):
    """The MLP of a pre-norm layer with its residual: x (n, D) -> (n, D)."""
    hidden = ref_layer_norm(blk.norm2, x) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return x + hidden @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def ref_joint_layer(blk, x):
    """A pre-norm layer over the tokens x (n, D) of one sample."""
    return ref_mlp(blk, x + ref_attention(blk.attn, ref_layer_norm(blk.norm1, x))[0])


def ref_divided_layer(blk, x, T, keep=None):
    """A divided space-time layer on one sample's x (1 + T*S, D): temporal attention at each patch position and
    temporal_fc, spatial attention per frame with a copy of the class token (the T outputs averaged), then the
    MLP; with `keep`, each frame first keeps its `keep` patches of highest class-token attention (Eq. 7).
    Returns x and the kept patch indices (T, keep) or None."""
    S = (len(x) - 1) // T
    cls, patches = x[0], x[1:].reshape(T, S, -1).clone()
    for s in range(S):
        out, _ = ref_attention(blk.temporal_attn, ref_layer_norm(blk.temporal_norm1, patches[:, s]))
        patches[:, s] = patches[:, s] + out @ blk.temporal_fc.weight.T + blk.temporal_fc.bias
    cls_out, spatial, kept = [], [], []
    for t in range(T):
        out, row = ref_attention(blk.attn, ref_layer_norm(blk.norm1, torch.cat([cls[None], patches[t]])))
        cls_out.append(out[0])
        spatial.append(patches[t] + out[1:])
        kept.append(sorted(sorted(range(S), key=lambda s: -row[1 + s].item())[:keep or S]))
    tokens = [cls + torch.stack(cls_out).mean(0)] + [spatial[t][s] for t in range(T) for s in kept[t]]
    return ref_mlp(blk, torch.stack(tokens)), torch.tensor(kept) if keep else None


def ref_embed(model, video, pos=None, time=None):
    """One clip (C, T, H, W) -> (1 + T*S, D): patches projected, plus the spatial position embedding of their
    place and the time embedding of their frame; the class token gets its position embedding only. pos (1+S, D)
    and time (T, D): the embeddings for this size, the model's own by default."""
    conv, p = model.patch_embed.proj, model.cfg.patch_size
    C, T, H, W = video.shape
    pos = model.pos_embed[0] if pos is None else pos
    time = model.time_embed[0] if time is None else time
    tokens = [model.cls_token[0, 0] + pos[0]]
    for t in range(T):
        for i in range(H // p):
            for j in range(W // p):
                pixels = video[:, t, i * p:(i + 1) * p, j * p:(j + 1) * p]
                s = i * (W // p) + j
                tokens.append((conv.weight * pixels).sum((1, 2, 3)) + conv.bias + pos[1 + s] + time[t])
    return torch.stack(tokens)


def ref_halting(model, x, beta, training):
    """Eqs. (2)-(6) for one sample's tokens x (K, D) entering the joint stage, token by token. Returns x_o (D,),
    the scores (L, K), N (K,) and r (K,). A halted token leaves: later layers run on the others only. In
    evaluation the sample stops when its class token halts; its running tokens take that layer as N and 1 - their
    sum so far as r."""
    cfg, blocks = model.cfg, model.joint.blocks
    L, K = len(blocks), len(x)
    live, total = list(range(K)), [0.0] * K
    N, r, scores, x_o = [L] * K, [1.0] * K, torch.zeros(L, K, dtype=x.dtype), 0
    for l, blk in enumerate(blocks):
        if not live:
            break
        x = x.clone()
        x[live] = ref_joint_layer(blk, x[live])
        for k in live:
            scores[l, k] = 1.0 if l == L - 1 else torch.sigmoid(cfg.gamma * x[k, 0] - beta).item()  # Eq. (2)
        halt = [k for k in live if total[k] + scores[l, k].item() >= 1 - cfg.eps]  # Eq. (3)
        if 0 in live:  # Eq. (6): the class token's score before its halting layer, its remainder at it
            x_o = x_o + (1 - total[0] if 0 in halt else scores[l, 0].item()) * x[0]
        if not training and 0 in halt:
            halt = live
        for k in halt:
            N[k], r[k] = l + 1, 1 - total[k]  # Eq. (4)
        for k in live:
            total[k] += scores[l, k].item()
        live = [k for k in live if k not in halt]
    return x_o, scores, torch.tensor(N), torch.tensor(r, dtype=x.dtype)


@torch.no_grad()
def ref_forward(model, video, beta, training, pos=None, time=None):
    """The reference HaltingVT on a batch (B, C, T, H, W): a dict of the outputs it checks. pos, time: as
    ref_embed."""
    cfg, T = model.cfg, video.shape[2]
    S = (video.shape[3] // cfg.patch_size) * (video.shape[4] // cfg.patch_size)
    outs = []
    for clip in video:
        x, kept = ref_embed(model, clip, pos, time), None
        for i, blk in enumerate(model.glimpser.blocks):
            last = i == len(model.glimpser.blocks) - 1
            x, kept = ref_divided_layer(blk, x, T, math.ceil(cfg.keep_ratio * S) if last else None)
        x_o, scores, N, r = ref_halting(model, x, beta, training)
        x_o = ref_layer_norm(model.norm, x_o)
        outs.append(dict(logits=x_o @ model.head.weight.T + model.head.bias, keep_index=kept, halt_scores=scores,
                         motion_logits=x_o @ model.motion_head.weight.T + model.motion_head.bias,
                         halt_depth=N, remainder=r, ponder=(N + r).mean()))
    return {k: torch.stack([o[k] for o in outs], 1 if k == "halt_scores" else 0) for k in outs[0]}


def reference_model():
    """diverse_model(), in float64, with everything the paper's equations could get wrong made to matter: a
    non-zero time embedding and temporal_fc, gamma 5 and beta 0.5 (Eq. 2), and class tokens that halt where
    their remainder differs from their score (Eq. 6)."""
    model, video = diverse_model(beta=0.5, batch=4)
    torch.manual_seed(1)
    with torch.no_grad():
        model.time_embed.normal_(0, 0.05)
        for blk in model.glimpser.blocks:
            blk.temporal_fc.weight.normal_(0, 0.05), blk.temporal_fc.bias.normal_(0, 0.05)
    return model.double(), video.double()


@pytest.mark.parametrize("training", [False, True])
def test_model_matches_a_reference_written_from_the_paper(training):
    """Every output the paper defines, in mask and drop mode, against ref_forward on the same weights."""
    model, video = reference_model()
    model.train(training)
    ref = ref_forward(model, video, model.cfg.beta, training)
    N, r, h = ref["halt_depth"], ref["remainder"], ref["halt_scores"]
    # a real test: class tokens halt at two or more layers, one where r and h differ (Eq. 6), and blocks change x
    assert len(N[:, 0].unique()) > 1 and (N[:, 0] < len(model.joint.blocks)).any()
    at = h[N[:, 0] - 1, torch.arange(len(N)), 0]  # (B,) the class token's score at its halting layer
    assert ((r[:, 0] - at).abs() > 0.05).any()
    for drop in (False, True):
        with torch.no_grad():
            out = model(video, drop_halted=drop)
        assert torch.equal(out.keep_index, ref["keep_index"])
        assert torch.equal(out.halt_depth, N), drop
        for name in ("logits", "motion_logits", "remainder", "ponder", "halt_scores"):
            assert torch.allclose(getattr(out, name), ref[name], rtol=0, atol=1e-9), (name, drop)


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
    mlp_tokens = []  # tokens each Glimpser layer's MLP runs on
    for blk in model.glimpser.blocks:
        blk.mlp.register_forward_hook(lambda module, args, out: mlp_tokens.append(args[0].shape[1]))
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        out = model(video)
    kept = math.ceil(0.3 * S)
    assert mlp_tokens == [1 + cfg.num_frames * S, 1 + cfg.num_frames * kept]  # the last prunes before its MLP
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


def identity_stage(L, dim=8):
    """A joint stage of L layers that leave x unchanged (zero output projections), with gamma 1 and beta 0, so a
    token whose channel 0 holds logit(p) scores p in every layer (Eq. 2)."""
    blocks = [haltingvt.Block(dim, 2, 2.0, 0.0) for _ in range(L)]
    with torch.no_grad():
        for blk in blocks:
            for layer in (blk.attn.proj, blk.mlp.fc2):
                layer.weight.zero_(), layer.bias.zero_()
    return haltingvt.HaltingStage(blocks, gamma=1.0, beta=0.0, eps=0.01, halting=True)


@pytest.mark.parametrize("drop", [False, True])
def test_halting_by_hand_a_class_token_that_halts_first(drop):
    """4 joint layers, one sample of 3 tokens: the class token scores 1.0 at joint layer 1, each patch 0.1 per
    layer (the last layer forces 1). Training, Eqs. (3)-(5): N = [1, 4, 4], r = [1, 1 - 0.3, 1 - 0.3], ponder
    (2 + 4.7 + 4.7) / 3 = 3.8. Evaluation stops the sample with its class token: N = [1, 1, 1], r = [1, 1, 1]."""
    stage = identity_stage(4)
    x = torch.zeros(1, 3, 8)
    x[0, 0, 0] = 50.0  # sigmoid(50) is 1.0 in float32
    x[0, 1:, 0] = math.log(0.1 / 0.9)  # sigmoid: 0.1
    with torch.no_grad():
        out = stage.train()(x, drop)
    assert out["depth"].tolist() == [[1, 4, 4]]
    assert out["remainder"][0].tolist() == pytest.approx([1.0, 0.7, 0.7], abs=1e-6)
    assert (out["depth"] + out["remainder"]).mean().item() == pytest.approx(3.8, abs=1e-6)  # Eq. (5)
    assert out["tokens"].tolist() == [[3, 2, 2, 2]]  # the patches ran on
    assert torch.allclose(out["x_o"], x[:, 0])  # Eq. (6): all of x_o comes from joint layer 1
    with torch.no_grad():
        out = stage.eval()(x, drop)
    assert out["depth"].tolist() == [[1, 1, 1]] and out["remainder"].tolist() == [[1.0, 1.0, 1.0]]
    assert out["tokens"].tolist() == [[3, 0, 0, 0]] and torch.allclose(out["x_o"], x[:, 0])


@pytest.mark.parametrize("drop", [False, True])
def test_halting_by_hand_a_class_token_that_runs_on_alone(drop):
    """Training, 3 joint layers, 2 samples of 3 tokens. Sample 0: every token scores 0.2 (all run to the end).
    Sample 1: its patches halt at once (score 1.0), its class token scores 0.3, 0.3 and then 1 (forced), so
    from layer 2 it is the last sample's only token: r = 0.4 and x_o = 0.3 x + 0.3 x + 0.4 x = x (Eq. 6)."""
    stage = identity_stage(3)
    x = torch.randn(2, 3, 8)
    x[:, :, 0] = math.log(0.2 / 0.8)
    x[1, 0, 0], x[1, 1:, 0] = math.log(0.3 / 0.7), 50.0
    with torch.no_grad():
        out = stage.train()(x, drop)
    assert out["depth"].tolist() == [[3, 3, 3], [3, 1, 1]] and out["tokens"].tolist() == [[3, 3, 3], [3, 1, 1]]
    assert out["remainder"][1].tolist() == pytest.approx([0.4, 1.0, 1.0], abs=1e-6)
    assert torch.allclose(out["x_o"], x[:, 0], atol=1e-5)


def test_mask_and_drop_modes_agree_and_batches_are_independent():
    model, video = diverse_model()
    with torch.no_grad():
        masked = model(video, drop_halted=False)
        dropped = model(video, drop_halted=True)
        alone = [model(video[i:i + 1], drop_halted=True) for i in range(len(video))]
    for name in ("logits", "motion_logits", "gflops", "remainder", "ponder"):
        a, b = getattr(masked, name), getattr(dropped, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        c = torch.cat([getattr(o, name) for o in alone])
        assert torch.allclose(c, b, rtol=1e-5, atol=1e-6), name
    assert torch.equal(masked.tokens_per_layer, dropped.tokens_per_layer)
    assert torch.equal(masked.halt_depth, dropped.halt_depth)
    assert (masked.gflops < dense_gflops(model.cfg)).all()


@pytest.mark.parametrize("drop", [False, True])
def test_evaluation_stops_a_sample_with_its_class_token(drop):
    """In evaluation a token still running when its class token halts stops there: its depth is the class
    token's, its remainder what is left of its budget then; every other token is as in training. The logits
    do not change."""
    model, video = diverse_model()
    with torch.no_grad():
        ran = model(video, drop_halted=drop)
        own = model.train()(video, drop_halted=drop)
    cls = own.halt_depth[:, :1]  # (B, 1)
    late = own.halt_depth > cls
    assert late.any()
    layer = torch.arange(1, own.halt_scores.shape[0] + 1).view(-1, 1, 1)
    left = 1 - (own.halt_scores * (layer < cls)).sum(0)  # (B, K) 1 - sum of scores before the class token's layer
    assert torch.equal(ran.halt_depth, torch.minimum(own.halt_depth, cls))
    assert torch.allclose(ran.remainder, torch.where(late, left, own.remainder), atol=1e-6)
    assert torch.allclose(ran.logits, own.logits, rtol=1e-5, atol=1e-6)
    assert (ran.tokens_per_layer <= own.tokens_per_layer).all() and (ran.gflops < own.gflops).any()


def both_modes(model, video):
    """Mask then drop mode on the same model: their outputs and the gradients of logits + ponder + motion logits
    with respect to every parameter, flattened."""
    outs, grads = [], []
    for drop in (False, True):
        model.zero_grad()
        out = model(video, drop_halted=drop)
        (out.logits.square().sum() + out.ponder.sum() + out.motion_logits.square().sum()).backward()
        outs.append(out)
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in model.parameters()]))
    return outs, grads


@pytest.mark.parametrize("training", [False, True])
def test_mask_and_drop_modes_agree_on_halting_and_gradients(training):
    """With class tokens halting before some of their patch tokens, mask and drop mode give the same depths,
    remainders, ponder and gradients of logits + ponder + motion logits. In training each mode's depths and
    remainders are also the per-token loop's (Eqs. 3, 4) on that mode's own recorded scores."""
    model, video = diverse_model()
    model.train(training)
    (masked, dropped), grads = both_modes(model, video[:3])
    assert torch.equal(masked.halt_depth, dropped.halt_depth)
    assert torch.equal(masked.tokens_per_layer, dropped.tokens_per_layer)
    for name in ("remainder", "ponder", "logits", "gflops"):
        assert torch.allclose(getattr(masked, name), getattr(dropped, name), rtol=1e-5, atol=1e-6), name
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    if not training:
        return
    assert (masked.halt_depth[:, 1:] > masked.halt_depth[:, :1]).any()  # the case this is about
    for out in (masked, dropped):
        h = out.halt_scores.detach()  # (L, B, K)
        for b, k in np.ndindex(*out.halt_depth.shape):
            _, n, r = slow_halting(h[:, b, k].tolist(), model.cfg.eps)
            assert out.halt_depth[b, k].item() == n and out.remainder[b, k].item() == pytest.approx(r, abs=1e-6)


def plain_attention(attn, x, heads):
    """Softmax attention of x (n, D) over itself, every token a key, one query row at a time: (n, D) and the
    head-averaged attention rows (n, n)."""
    n, D = x.shape
    d = D // heads
    q, k, v = attn.qkv(x).view(n, 3, heads, d).unbind(1)  # each (n, h, d)
    outs, rows = [], []
    for i in range(n):
        w = torch.einsum("hd,khd->hk", q[i], k).mul(d ** -0.5).softmax(-1)  # (h, n)
        outs.append(attn.proj(torch.einsum("hk,khd->hd", w, v).reshape(D)))
        rows.append(w.mean(0))
    return torch.stack(outs), torch.stack(rows)


def release_glimpser(model, x, T):
    """The release's Glimpser (glimpser_helpers.py) on one sample's tokens x (1 + T*S, D): in the pruning layer
    the class token is the mean of its per-frame attention outputs, without its residual."""
    cfg, D = model.cfg, x.shape[1]
    S, blocks = (x.shape[0] - 1) // T, model.glimpser.blocks
    for i, blk in enumerate(blocks):
        cls, patches = x[0], x[1:].view(T, S, D)
        temporal = [plain_attention(blk.temporal_attn, blk.temporal_norm1(patches[:, s]), cfg.num_heads)[0]
                    for s in range(S)]
        patches = patches + blk.temporal_fc(torch.stack(temporal, 1))  # (T, S, D)
        spatial = [plain_attention(blk.attn, blk.norm1(torch.cat([cls[None], patches[t]])), cfg.num_heads)
                   for t in range(T)]
        cls_out = torch.stack([out[0] for out, _ in spatial]).mean(0)
        patches = patches + torch.stack([out[1:] for out, _ in spatial])
        if i == len(blocks) - 1 and cfg.keep_ratio < 1:
            cls, keep = cls_out, math.ceil(cfg.keep_ratio * S)
            patches = torch.stack([patches[t, rows[0, 1:].topk(keep).indices] for t, (_, rows) in enumerate(spatial)])
        else:
            cls = cls + cls_out
        x = torch.cat([cls[None], patches.reshape(-1, D)])
        x = x + blk.mlp(blk.norm2(x))
    return x


def release_joint(model, x):
    """The release's halting loop (haltingvt_model.py) on one sample's tokens x (K, D), token by token and layer
    by layer: halted tokens enter each layer as zeros and stay keys and values; `>` for reached, `<` for not
    reached. Returns x_o (D,) and the ponder cost, the mean of rho."""
    cfg, K, blocks = model.cfg, x.shape[0], model.joint.blocks
    c, R, rho, mask = [0.0] * K, [1.0] * K, [0.0] * K, [True] * K
    out, x_o = x, torch.zeros(x.shape[1])
    for l, blk in enumerate(blocks):
        y = torch.stack([out[k] if mask[k] else torch.zeros_like(out[k]) for k in range(K)])
        y = y + plain_attention(blk.attn, blk.norm1(y), cfg.num_heads)[0]
        y = y + blk.mlp(blk.norm2(y))
        for k in range(K):
            h = 1.0 if l == len(blocks) - 1 else torch.sigmoid(cfg.gamma * y[k, 0] - cfg.beta).item()
            c[k], running = c[k] + h, mask[k]
            rho[k] += running
            if c[k] > 1 - cfg.eps and running:  # case 1: the threshold is passed here
                rho[k] += R[k]
                x_o = x_o + R[k] * y[0] if k == 0 else x_o
            if c[k] < 1 - cfg.eps:  # case 2: not reached
                R[k] -= h
                x_o = x_o + h * y[0] if k == 0 else x_o
            mask[k] = c[k] < 1 - cfg.eps
        out = y
    return x_o, sum(rho) / K


def test_release_compat_matches_the_releases_loop_token_by_token():
    """release_compat against the release's forward written out per token and layer, in training and evaluation:
    logits, motion logits and ponder agree; the same weights with the flag off give other logits."""
    model, video = diverse_model()
    video = video[:4]
    compat = HaltingVT(HaltingVTConfig(**{**model.cfg.to_dict(), "release_compat": True}))
    compat.load_state_dict(model.state_dict())
    with torch.no_grad():
        x = compat.embed(video)
        ref = [release_joint(compat, release_glimpser(compat, x[b], video.shape[2])) for b in range(len(video))]
        x_o = compat.norm(torch.stack([x_o for x_o, _ in ref]))
        ponder = torch.tensor([p for _, p in ref])
        for training in (True, False):
            out = compat.train(training)(video)
            assert torch.allclose(out.logits, compat.head(x_o), atol=1e-5)
            assert torch.allclose(out.motion_logits, compat.motion_head(x_o), atol=1e-5)
            assert torch.allclose(out.ponder, ponder, atol=1e-5)
            assert (model.train(training)(video, drop_halted=False).logits - out.logits).abs().max() > 1e-2
    assert (out.halt_depth[:, 0] < len(model.joint.blocks)).any()  # class tokens halted early: the case at stake
    with pytest.raises(ValueError, match="drop_halted=True with release_compat"):
        compat(video, drop_halted=True)


def test_release_compat_counts_gflops_both_ways():
    """With release_compat the output counts GFLOPs as the release does (every token until its own halt) and as
    drop mode would spend them (a sample stops with its class token); without it there is one count."""
    model, video = diverse_model()
    compat = HaltingVT(HaltingVTConfig(**{**model.cfg.to_dict(), "release_compat": True}))
    compat.load_state_dict(model.state_dict())
    cfg, g, L = compat.cfg, compat.cfg.glimpser_depth, len(compat.joint.blocks)
    T, S = video.shape[2], (cfg.img_size // cfg.patch_size) ** 2
    with torch.no_grad():
        out = compat.eval()(video)
    assert model(video).gflops_release is None
    depth, glimpsed = out.halt_depth, out.tokens_per_layer[:, :g]  # each token's own N_k: no stop in evaluation
    for counted, stop in ((out.gflops_release, depth), (out.gflops, torch.minimum(depth, depth[:, :1]))):
        joint = torch.tensor([[int((row >= l).sum()) for l in range(1, L + 1)] for row in stop])  # a loop
        assert torch.allclose(counted, count_gflops(cfg, torch.cat([glimpsed, joint], 1), T, S))
    assert (out.gflops <= out.gflops_release).all() and (out.gflops < out.gflops_release).any()


def module_state(model):
    """Every module's attribute names, its public attribute values, and a copy of every tensor."""
    attrs = [(name, set(vars(m)), {k: v for k, v in vars(m).items() if not k.startswith("_")})
             for name, m in model.named_modules()]
    return attrs, {k: v.clone() for k, v in model.state_dict().items()}


def test_forward_beta_is_a_model_built_with_that_beta_and_nothing_on_the_model_changes():
    """forward(beta=b) gives what the same weights give with cfg.beta = b, in training and evaluation, masked
    and dropped; no forward writes anything on any module (attributes and tensors as they were before)."""
    model, video = diverse_model()  # cfg.beta = 0
    other = HaltingVT(HaltingVTConfig(**{**model.cfg.to_dict(), "beta": 1.5}))
    other.load_state_dict(model.state_dict())
    for training, drop in [(True, False), (True, True), (False, False), (False, True)]:
        model.train(training), other.train(training)
        before = module_state(model)
        with torch.no_grad():
            got, want = model(video, drop_halted=drop, beta=1.5), other(video, drop_halted=drop)
            default = model(video, drop_halted=drop)
        attrs, tensors = module_state(model)
        assert attrs == before[0] and all(torch.equal(tensors[k], v) for k, v in before[1].items())
        for name in ("logits", "halt_scores", "halt_depth", "remainder", "ponder", "tokens_per_layer", "gflops"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert not torch.equal(default.halt_depth, got.halt_depth)  # beta did change the halting
        assert model.joint.beta == 0.0


def test_stochastic_depth_drops_whole_samples_in_drop_mode_as_in_mask_mode():
    """Training with drop_path 0.5 and no halting, the same seed: drop mode (packed rows) skips a layer's
    branch for the same whole samples as mask mode, so the logits agree; and the branches really were dropped."""
    torch.manual_seed(0)
    cfg = HaltingVTConfig.tiny(drop_path=0.5, halting=False)
    model = HaltingVT(cfg).train()
    video = torch.randn(3, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    logits = []
    for drop in (False, True):
        torch.manual_seed(1)
        with torch.no_grad():
            logits.append(model(video, drop_halted=drop).logits)
    assert torch.allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(video).logits, logits[1], atol=1e-3)


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
    beta = torch.tensor(model.cfg.beta, requires_grad=True)
    out = model(video[:2], drop_halted=False, beta=beta)
    (grad,) = torch.autograd.grad(out.ponder.sum(), beta)
    h = out.halt_scores.detach()  # (L, B, K)
    layer = torch.arange(1, h.shape[0] + 1).view(-1, 1, 1)
    expected = (h * (1 - h) * (layer < out.halt_depth)).sum(0).mean(1).sum()
    assert expected > 0  # a larger score (smaller beta) lowers the ponder cost
    assert grad.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("keep_ratio, gflops", [(0.3, 17.63), (0.5, 26.53), (0.7, 37.21)])
def test_gflops_paper_scale_figures(keep_ratio, gflops):
    """DeiT-S at 8x224^2 without halting: the Glimpser's last MLP and the 10 joint layers run on 1 + 8 ceil(R S)
    tokens. The dense Joint VT spends 56.47."""
    assert dense_gflops(HaltingVTConfig.deit_small()) == pytest.approx(56.47, rel=5e-3)
    cfg = HaltingVTConfig.deit_small(halting=False, keep_ratio=keep_ratio)
    S, T = 196, 8
    tokens = torch.tensor([[1 + T * S] * 2 + [1 + T * math.ceil(keep_ratio * S)] * 10])
    assert count_gflops(cfg, tokens, T, S).item() == pytest.approx(gflops, rel=5e-3)


def test_gflops_match_flop_counter_on_a_drop_mode_forward():
    """FlopCounterMode counts 2 per multiply-add. It does not see inside the fused CPU attention kernel, so the
    test runs attention through PyTorch's math backend, whose matmuls it does count."""
    model, video = diverse_model()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(video, drop_halted=True)
    assert out.gflops.sum().item() == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-6)
    assert len(out.gflops.unique()) > 1  # samples really spent different amounts


@pytest.mark.parametrize("overrides", [
    dict(glimpser_depth=1), dict(glimpser_depth=3),  # the pruning layer first, or third of three
    dict(embed_dim=4, num_heads=1, img_size=32, num_frames=2, depth=3, mlp_ratio=1.0, num_classes=2),  # 1 MAC shows
    dict(embed_dim=4, num_heads=1, img_size=32, num_frames=2, depth=3, mlp_ratio=1.0, motion_head=False),
])
def test_gflops_match_flop_counter_for_other_shapes(overrides):
    torch.manual_seed(0)
    cfg = HaltingVTConfig.tiny(**overrides)
    model = HaltingVT(cfg).eval()
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(video, drop_halted=True)
    assert out.gflops.sum().item() == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-6)


def ref_resize_time(time, T):
    """Linear interpolation of rows (T0, D) -> (T, D), sample centres aligned (align_corners=False), by hand."""
    T0, rows = len(time), []
    for i in range(T):
        src = min(max((i + 0.5) * T0 / T - 0.5, 0.0), T0 - 1)
        lo = math.floor(src)
        hi = min(lo + 1, T0 - 1)
        rows.append((1 - (src - lo)) * time[lo] + (src - lo) * time[hi])
    return torch.stack(rows)


def ref_bicubic(v, n):
    """Rows of v (n0, ...) resampled to n by cubic convolution (a = -0.75), sample centres aligned, the edge rows
    repeated past the border: bicubic interpolation along one axis, written out."""
    def w(t, a=-0.75):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0
    n0, rows = len(v), []
    for i in range(n):
        src = (i + 0.5) * n0 / n - 0.5
        lo = math.floor(src)
        rows.append(sum(w(src - (lo + k)) * v[min(max(lo + k, 0), n0 - 1)] for k in (-1, 0, 1, 2)))
    return torch.stack(rows)


def test_resized_embeddings_by_hand():
    torch.manual_seed(0)
    time = torch.randn(1, 4, 3)
    assert haltingvt.resize_time_embed(time, 4) is time
    for T in (2, 5, 8):
        assert torch.allclose(haltingvt.resize_time_embed(time, T)[0], ref_resize_time(time[0], T), atol=1e-6)
    pos = torch.randn(1, 17, 3)  # the class token's entry, then a 4 x 4 grid, row-major
    out = haltingvt.resize_pos_embed(pos, (6, 5))[0]  # (1 + 30, 3)
    assert torch.equal(out[0], pos[0, 0])  # the class token's entry is kept as it is
    grid = ref_bicubic(ref_bicubic(pos[0, 1:].view(4, 4, 3), 6).transpose(0, 1), 5).transpose(0, 1)  # (6, 5, 3)
    assert torch.allclose(out[1:], grid.reshape(30, 3), atol=1e-5)
    assert torch.equal(haltingvt.resize_pos_embed(pos, (4, 4)), pos)


def test_other_frame_counts_and_sizes_resize_the_embeddings():
    """2 frames of 96 x 80 on a model of 8 frames of 64 x 64: the reference with the time embedding
    interpolated by hand and the position embedding resized to the 6 x 5 grid."""
    model, _ = reference_model()
    video = torch.randn(2, 3, 2, 96, 80, dtype=torch.float64)
    pos = haltingvt.resize_pos_embed(model.pos_embed, (6, 5))[0]
    ref = ref_forward(model, video, model.cfg.beta, False, pos, ref_resize_time(model.time_embed[0].detach(), 2))
    with torch.no_grad():
        out = model(video)
    S = 6 * 5
    assert out.keep_index.shape == (2, 2, math.ceil(0.5 * S)) and torch.equal(out.keep_index, ref["keep_index"])
    assert out.tokens_per_layer[0, 0] == 1 + 2 * S
    assert torch.allclose(out.logits, ref["logits"], rtol=0, atol=1e-9)


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


def code_lines(src: str) -> int:
    """Lines of code of a source text: lines holding a token, docstrings and comments not counted."""
    docs = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines, skip = set(), {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docs)


def copy_unit(src: str, roots: tuple) -> str:
    """What an engineer copies out of a file to use `roots`: the file's imports, then every top-level definition
    the roots use, transitively (found by walking the AST for the names they read), in the file's order."""
    tree = ast.parse(src)
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defs.update((t.id, n) for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name))
    used, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in used:
            used.add(name)
            todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs]
    nodes = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) or any(defs[u] is n for u in used)]
    lines = src.splitlines()
    first = lambda n: min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])])
    return "\n\n\n".join("\n".join(lines[first(n) - 1:n.end_lineno]) for n in nodes) + "\n"


@pytest.mark.parametrize("roots, budget", [(("Glimpser", "DividedBlock"), 110), (("HaltingStage", "Block"), 140),
                                           (("HaltingVT",), 320)])
def test_copyable_units_run_on_their_own(roots, budget, monkeypatch):
    """The Glimpser with its divided layer, the halting stage with its joint layer (drop mode included) and the
    whole network, each copied out with its imports alone into a fresh module, stay within their line budgets
    (and the file within 560 lines) and compute what the library's own classes compute."""
    source = Path(haltingvt.__file__).read_text()
    assert len(source.splitlines()) <= 560  # the whole file, read top to bottom beside the paper
    code = copy_unit(source, roots)
    assert code_lines(code) <= budget, code
    copied = types.ModuleType("copied_unit")
    monkeypatch.setitem(sys.modules, "copied_unit", copied)  # dataclasses look their module up
    exec(compile(code, "copied_unit", "exec"), copied.__dict__)
    torch.manual_seed(0)
    with torch.no_grad():
        if roots[0] == "Glimpser":
            unit = copied.Glimpser([copied.DividedBlock(16, 2, 2.0, 0.0) for _ in range(2)], 0.5).eval()
            ref = haltingvt.Glimpser([haltingvt.DividedBlock(16, 2, 2.0, 0.0) for _ in range(2)], 0.5).eval()
            ref.load_state_dict(unit.state_dict())
            x = torch.randn(2, 1 + 4 * 9, 16)  # T = 4 frames of S = 9 patches
            for a, b in zip(unit(x, 4), ref(x, 4)):
                assert torch.equal(a, b)
        elif roots[0] == "HaltingStage":
            unit = copied.HaltingStage([copied.Block(16, 2, 2.0, 0.0) for _ in range(4)], 1.0, 0.0, 0.01, True)
            ref = haltingvt.HaltingStage([haltingvt.Block(16, 2, 2.0, 0.0) for _ in range(4)], 1.0, 0.0, 0.01, True)
            ref.load_state_dict(unit.state_dict())
            x = torch.randn(3, 10, 16)
            for drop in (False, True):
                a, b = unit.eval()(x, drop), ref.eval()(x, drop)
                assert all(torch.equal(a[k], b[k]) for k in b)
                assert (a["tokens"][:, -1] < 10).all()  # tokens halted: drop mode removed some
        else:
            unit = copied.HaltingVT(copied.HaltingVTConfig.tiny()).eval()
            ref = HaltingVT(HaltingVTConfig.tiny()).eval()
            ref.load_state_dict(unit.state_dict())
            video = torch.randn(2, 3, 8, 64, 64)
            assert torch.equal(unit(video).logits, ref(video).logits)


# ----------------------------------------------------------------------------------------------------------
# haltingvt.py: drop mode's execution (packed attention, read-backs)
# ----------------------------------------------------------------------------------------------------------

def test_pack_running_keeps_the_running_rows_and_each_samples_first_row_is_a_valid_row():
    """pack_running against a loop over tokens: the running rows in order, their counts, and each sample's first
    row; a sample with none still gets a valid row (its class token is weighted by 0 then), down to the batch in
    which one token is left in all and a later sample has none."""
    B, K, D = 3, 4, 2
    x = torch.arange(B * K * D, dtype=torch.float32).reshape(B * K, D)
    patterns = [[[1, 1, 0, 1], [1, 0, 0, 0], [0, 1, 1, 0]], [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
                [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]]]
    for pattern in patterns:
        active = torch.tensor(pattern, dtype=torch.bool)
        rows = [b * K + k for b in range(B) for k in range(K) if pattern[b][k]]
        packed, row, first, counts, lengths = haltingvt.pack_running(x, torch.arange(B * K), active)
        assert row.tolist() == rows and torch.equal(packed, x[rows])
        assert counts.tolist() == [sum(p) for p in pattern] and lengths == [sum(p) for p in pattern if sum(p)]
        for b in range(B):
            assert 0 <= first[b] < len(rows), (pattern, b)  # x[first] never reads past the packed rows
            if counts[b]:
                assert rows[first[b]] == b * K + pattern[b].index(1)  # the sample's first running token


def test_packed_attention_matches_per_sample_attention():
    """packed_attention (drop mode's attention over several samples' tokens back to back) gives plain attention
    over each sample alone, values and gradients, for samples of different lengths."""
    torch.manual_seed(0)
    attn = Attention(16, 4)
    lengths = [5, 1, 9, 3]
    x = torch.randn(sum(lengths), 16, requires_grad=True)
    grad = torch.randn(sum(lengths), 16)
    (g,) = torch.autograd.grad(haltingvt.packed_attention(attn, x, lengths), x, grad)
    for y, part, dy, dx in zip(haltingvt.packed_attention(attn, x, lengths).split(lengths), x.split(lengths),
                               grad.split(lengths), g.split(lengths)):
        ref = attn(part.unsqueeze(0)).squeeze(0)
        assert torch.allclose(y, ref, atol=1e-6)
        assert torch.allclose(dx, torch.autograd.grad(ref, part, dy)[0], atol=1e-6)


class DataDependentOps(TorchDispatchMode):
    """Records the ops whose result a GPU would have to send back to the host before the next launch: shapes
    that depend on values (nonzero, boolean indexing, unique, repeat_interleave without its output size),
    Python scalars (item, bool(tensor)) and tensors built from host data (torch.tensor(list), which then goes
    to the device). `.tolist()` does not pass through this mode."""

    SYNCING = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default",
               "aten.masked_select.default", "aten.unique_consecutive.default", "aten._unique2.default",
               "aten.unique_dim.default", "aten.lift_fresh.default"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        unsized = func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        if str(func) in self.SYNCING or bool_index or unsized:
            self.seen.append(str(func))
        return func(*args, **kwargs)


def test_drop_mode_reads_nothing_back_but_the_token_counts():
    """Drop mode's bookkeeping stays on the device: no value-dependent shape, no Python scalar, no host-built
    tensor in a whole forward, nor in training with stochastic depth and the backward (its one read-back per
    layer, the token counts, goes through .tolist()). On a GPU each of these drains the launch queue: eight of
    them per layer halved the speed on an H200 (README)."""
    model, video = diverse_model()
    ops = DataDependentOps()
    with torch.no_grad(), ops:
        out = model(video, drop_halted=True)
    assert (out.tokens_per_layer[:, -1] < out.tokens_per_layer[:, 2]).all()  # tokens did halt and leave
    assert ops.seen == []
    # training: stochastic depth on packed rows, and the backward
    model.train()
    for blk in model.joint.blocks:
        blk.drop_path.p = 0.1
    ops.seen = []
    with ops:
        out = model(video, drop_halted=True)
        (out.logits.sum() + out.ponder.sum()).backward()
    assert ops.seen == []


# ----------------------------------------------------------------------------------------------------------
# checkpoints.py: reading files, the weights in any wrapper and layout (image, release, train.py), the run checkpoint
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


def test_load_pretrained_matches_a_plain_vit_on_one_frame():
    state = fake_deit_state()
    cfg = HaltingVTConfig.deit_small(num_frames=1, keep_ratio=1.0, halting=False, num_classes=1000)
    model = HaltingVT(cfg).eval()
    report = load_pretrained(model, {"model": state})
    assert report["unused"] == []
    assert set(report["missing"]) == {"time_embed", "motion_head.weight", "motion_head.bias",
                                      "glimpser.blocks.0.temporal_fc.weight", "glimpser.blocks.0.temporal_fc.bias",
                                      "glimpser.blocks.1.temporal_fc.weight", "glimpser.blocks.1.temporal_fc.bias"}
    torch.manual_seed(0)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model(image.unsqueeze(2)).logits
        ref = reference_vit(state, image)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_load_pretrained_resizes_pos_embed_skips_a_foreign_head_and_reports_keys(tmp_path):
    state = fake_deit_state(D=64, depth=3, grid=14, classes=1000)
    state["dist_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)
    cfg = HaltingVTConfig.tiny(embed_dim=64, depth=3, num_heads=4, glimpser_depth=1, num_classes=5)
    model = HaltingVT(cfg)
    with torch.no_grad():
        model.time_embed.fill_(1.0)
    report = load_pretrained(model, checkpoints.read_checkpoint(str(path)))
    assert report["unused"] == ["dist_token"]
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
        load_pretrained(model, state)


SMALL_DEIT = dict(D=64, depth=3, grid=4, classes=1000)  # fake_deit_state's shapes for HaltingVTConfig.tiny below


def small_deit_model(**overrides):
    """A tiny HaltingVT with fake_deit_state(**SMALL_DEIT)'s shapes: width 64, 3 layers (1 Glimpser), 64 px."""
    return HaltingVT(HaltingVTConfig.tiny(**{**dict(embed_dim=64, depth=3, num_heads=4, glimpser_depth=1),
                                             **overrides}))


def assert_deit_arrived(model, state):
    """Every DeiT tensor sits where the inflation puts it, value for value (written out, not via the loader)."""
    g = model.cfg.glimpser_depth
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight"):
        assert torch.equal(model.state_dict()[name], state[name]), name
    for i in range(model.cfg.depth):
        blk = model.glimpser.blocks[i] if i < g else model.joint.blocks[i - g]
        for part in ("norm1.weight", "attn.qkv.weight", "attn.proj.bias", "norm2.bias", "mlp.fc1.weight",
                     "mlp.fc2.weight"):
            assert torch.equal(blk.state_dict()[part], state[f"blocks.{i}.{part}"]), (i, part)
        if i < g:
            assert torch.equal(blk.temporal_attn.qkv.weight, state[f"blocks.{i}.attn.qkv.weight"])
            assert (blk.temporal_fc.weight == 0).all() and (blk.temporal_fc.bias == 0).all()
    assert (model.time_embed == 0).all()


class Hook:
    """Stands for any class another codebase pickles into its checkpoints; records whether it was ever rebuilt."""
    rebuilt = []

    def __setstate__(self, state):
        Hook.rebuilt.append(state)


def image_checkpoints(state):
    """An image state dict in the forms people have, each as torch.save receives it."""
    ema = {k: v + 1 for k, v in state.items()}  # different values: the loader must take the raw weights
    namespace = argparse.Namespace(model="deit_small_patch16_224", lr=5e-4, input_size=224, mixup=(0.8, 1.0))
    return {
        "raw": state,
        "model": {"model": state},
        "state_dict": {"state_dict": state, "epoch": 10, "arch": "deit_small_patch16_224"},
        "model_ema only": {"model_ema": state, "epoch": 3},
        "ddp module. prefix": {"model": {f"module.{k}": v for k, v in state.items()}},
        "lightning model. prefix": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": 5},
        "deit main.py": {"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
                         "epoch": 299, "model_ema": ema, "scaler": {"scale": 65536.0}, "args": namespace},
        "timm train.py": {"epoch": 9, "arch": "deit_small_patch16_224", "state_dict": state, "state_dict_ema": ema,
                          "optimizer": {"state": {}, "param_groups": []}, "args": namespace, "version": 2,
                          "metric": 71.2},
        # pytorch/examples' ImageNet main.py (and MoCo v3's main_lincls.py): a 0-dim tensor beside the weights
        "imagenet main.py": {"epoch": 90, "arch": "vit_small", "best_acc1": torch.tensor(73.2),
                             "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}},
        "raw, a note under model": {**state, "model": {"name": "deit_small"}},  # the top level is the weights
    }


@pytest.mark.parametrize("form", list(image_checkpoints({})))
def test_load_pretrained_image_checkpoint_forms(tmp_path, form):
    state = fake_deit_state(**SMALL_DEIT)
    path = tmp_path / "ckpt.pth"
    torch.save(image_checkpoints(state)[form], path)
    model = small_deit_model()
    report = load_pretrained(model, checkpoints.read_checkpoint(path))
    assert_deit_arrived(model, state)
    fresh = {"time_embed", "head.weight", "head.bias", "motion_head.weight", "motion_head.bias",
             "glimpser.blocks.0.temporal_fc.weight", "glimpser.blocks.0.temporal_fc.bias"}
    assert report["layout"] == "image" and set(report["missing"]) == fresh and report["unused"] == []
    assert report["loaded"] == len(model.state_dict()) - len(fresh)
    sizes = {k: v.numel() for k, v in model.state_dict().items()}
    assert report["share"] == pytest.approx(1 - sum(sizes[k] for k in fresh) / sum(sizes.values()))
    assert report["notes"] == ["head: 1000 outputs in the file, 6 in the model: left fresh"]


def write_safetensors(path, state):
    """The safetensors format written out: 8-byte header size, JSON header (dtype, shape, byte range), bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in state.items():
        blob = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_read_checkpoint_reads_safetensors(tmp_path):
    state = fake_deit_state(**SMALL_DEIT)
    write_safetensors(tmp_path / "model.safetensors", state)
    model = small_deit_model()
    assert load_pretrained(model, checkpoints.read_checkpoint(tmp_path / "model.safetensors"))["layout"] == "image"
    assert_deit_arrived(model, state)


def test_read_checkpoint_refuses_a_class_it_does_not_allow(tmp_path):
    path = tmp_path / "hooked.pth"
    torch.save({"model": fake_deit_state(**SMALL_DEIT), "hook": Hook()}, path)
    model = small_deit_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"hooked\.pth: refused to unpickle test_haltingvt\.Hook"):
        load_pretrained(model, checkpoints.read_checkpoint(path))
    assert Hook.rebuilt == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_pretrained_that_matches_too_little_raises_saying_what_the_file_holds():
    model = small_deit_model()
    with pytest.raises(ValueError, match=r"no ViT weights found.*'state_dict', 'epoch'.*'encoder\.weight'"):
        load_pretrained(model, {"state_dict": {"encoder.weight": torch.zeros(3)}, "epoch": 1})
    shallow = fake_deit_state(**{**SMALL_DEIT, "depth": 2})
    with pytest.raises(ValueError, match=r"lacks 12 of the model's backbone tensors.*joint\.blocks\.1\.norm1"):
        load_pretrained(model, {"model": shallow})
    layer_scale = {**fake_deit_state(**SMALL_DEIT), "blocks.1.ls1.gamma": torch.ones(64)}
    with pytest.raises(ValueError, match=r"no place for.*blocks\.1\.ls1\.gamma"):
        load_pretrained(model, layer_scale)


def test_load_pretrained_position_embeddings_of_other_sizes_and_tokens():
    state = fake_deit_state(**{**SMALL_DEIT, "grid": 6})  # as a DeiT trained at 384 px: 1 + 24*24 at 224
    model = small_deit_model()
    load_pretrained(model, state)
    grid = state["pos_embed"][:, 1:].reshape(1, 6, 6, 64).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(model.pos_embed, torch.cat([state["pos_embed"][:, :1], resized], 1), atol=1e-6)
    distilled = {**fake_deit_state(**SMALL_DEIT), "dist_token": torch.ones(1, 1, 64),
                 "head_dist.weight": torch.ones(1000, 64), "head_dist.bias": torch.ones(1000)}
    pos = distilled["pos_embed"]
    distilled["pos_embed"] = torch.cat([pos[:, :1], torch.full((1, 1, 64), 7.0), pos[:, 1:]], 1)  # (1, 2+16, D)
    report = load_pretrained(model, distilled)
    assert torch.equal(model.pos_embed, pos)  # the distillation token's entry dropped
    assert set(report["unused"]) == {"dist_token", "head_dist.weight", "head_dist.bias"}
    assert [n.split(":")[0] for n in report["notes"]] == ["head", "dist_token"]
    no_class_entry = {**fake_deit_state(**SMALL_DEIT), "pos_embed": pos[:, 1:]}  # (1, 16, D)
    load_pretrained(model, no_class_entry)
    assert (model.pos_embed[:, 0] == 0).all() and torch.equal(model.pos_embed[:, 1:], pos[:, 1:])


def random_video_model(**overrides):
    """A tiny video model with every tensor random, the time embedding and each temporal_fc included."""
    torch.manual_seed(3)
    model = HaltingVT(HaltingVTConfig.tiny(embed_dim=32, depth=4, num_heads=2, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def release_names(state: dict, g: int) -> dict:
    """Our names -> the release's (its HaltingVT backbone under backbone.model., HaltingVTHead as cls_head), as
    its model code defines them: one flat blocks.i list, heads fc_cls and fc_motion."""
    out = {}
    for key, value in state.items():
        if key.startswith("glimpser.blocks."):
            key = "blocks." + key[len("glimpser.blocks."):]
        elif key.startswith("joint.blocks."):
            i, rest = key[len("joint.blocks."):].split(".", 1)
            key = f"blocks.{int(i) + g}.{rest}"
        if key.startswith(("head.", "motion_head.")):
            head, rest = key.split(".", 1)
            out[f"cls_head.{'fc_cls' if head == 'head' else 'fc_motion'}.{rest}"] = value
        else:
            out["backbone.model." + key] = value
    return out


def test_load_pretrained_release_checkpoint_maps_every_tensor(tmp_path):
    source = random_video_model()
    names = release_names(source.state_dict(), g=2)
    ckpt = {"meta": {"epoch": 20, "mmengine_version": "0.7.3", "dataset_meta": None},
            "state_dict": dict(reversed(names.items()))}  # temporal tensors first: no order may matter
    torch.save(ckpt, tmp_path / "release.pth")
    model = HaltingVT(source.cfg)
    report = load_pretrained(model, checkpoints.read_checkpoint(tmp_path / "release.pth"))
    assert report["layout"] == "release" and report["missing"] == [] and report["unused"] == []
    assert report["share"] == 1.0
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_load_pretrained_video_state_dict_loads_as_it_is_and_a_foreign_head_stays_fresh():
    source = random_video_model()
    model = HaltingVT(HaltingVTConfig(**{**source.cfg.to_dict(), "num_classes": 9}))
    fresh_head = model.head.weight.detach().clone()
    report = load_pretrained(model, {"model": source.state_dict()})
    assert report["layout"] == "video" and set(report["missing"]) == {"head.weight", "head.bias"}
    assert report["notes"] == ["head: 6 outputs in the file, 9 in the model: left fresh"]
    assert torch.equal(model.head.weight, fresh_head)
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(model.state_dict()[name], value), name  # time_embed and temporal_fc too


def test_load_report_counts_a_fresh_head_out_of_the_share(caplog):
    caplog.set_level(logging.INFO)
    source = HaltingVT(HaltingVTConfig.tiny(num_classes=2)).state_dict()
    model = HaltingVT(HaltingVTConfig.tiny(num_classes=1))
    report = load_pretrained(model, source)
    total = sum(t.numel() for t in model.state_dict().values())
    assert report["share"] == (total - 64 - 1) / total and report["missing"] == ["head.weight", "head.bias"]
    assert f"loaded {len(source) - 2} of {len(source)} tensors (99.9% of the parameters)" in caplog.text  # not 100.0%


def test_load_pretrained_is_also_haltingvt_load_pretrained():
    assert haltingvt.load_pretrained is checkpoints.load_pretrained
    with pytest.raises(AttributeError, match="no_such_name"):
        haltingvt.no_such_name  # noqa: B018


def test_save_checkpoint_is_plain_values_and_restores_every_rng(tmp_path):
    model = HaltingVT(HaltingVTConfig.tiny(embed_dim=32, depth=3, num_heads=2))
    args = train.parse_args(["--out", str(tmp_path)])
    args.list_root = tmp_path  # a Path; --demo-videos is a tuple
    optimizer = train.build_optimizer(model, args)
    random.seed(1), torch.manual_seed(3)
    random.gauss(0, 1)  # Python's state now holds a cached Gaussian
    state = {"epoch": 1, "samples_in_epoch": 0, "step": 2, "best": 0.5}
    checkpoints.save_checkpoint(tmp_path / "c.pt", model, optimizer, state, model.cfg, args, ["a", "b"])
    expected = [random.gauss(0, 1), random.random(), torch.rand(3)]
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["classes"] == ["a", "b"] and ckpt["args"]["list_root"] == str(tmp_path)
    assert ckpt["args"]["demo_videos"] == list(train.DEFAULTS["demo_videos"]) and ckpt["config"] == model.cfg.to_dict()
    random.seed(9), torch.manual_seed(9)
    checkpoints.set_rng_states({**ckpt["rng"], "numpy": ["MT19937", torch.zeros(624), 0, 0, 0.0]})  # older files
    again = [random.gauss(0, 1), random.random(), torch.rand(3)]
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
    torch.save({"model": fake_deit_state(**SMALL_DEIT)}, tmp_path / "deit.pth")
    with pytest.raises(ValueError, match=r"deit\.pth: not written by train\.py.*--init"):  # train.py: --resume ...
        checkpoints.load_checkpoint(tmp_path / "deit.pth", model)


# ----------------------------------------------------------------------------------------------------------
# losses.py
# ----------------------------------------------------------------------------------------------------------

def _out(logits, motion_logits=None, ponder=None):
    ponder = torch.zeros(logits.shape[0]) if ponder is None else ponder
    return SimpleNamespace(logits=logits, motion_logits=motion_logits, ponder=ponder)


def _hand_ce(rows, targets):
    """Mean over rows of -log softmax(row)[target], written out."""
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(rows, targets)) / len(rows)


def test_loss_task_is_cross_entropy_by_hand():
    rows = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    got = losses.task_loss(torch.tensor(rows), torch.tensor([2, 0]))
    assert got.item() == pytest.approx(_hand_ce(rows, [2, 0]), rel=1e-6)


def test_loss_multi_label_is_bce_by_hand():
    rows, targets = [[2.0, -1.0, 0.0]], [[1.0, 0.0, 1.0]]
    sig = [1 / (1 + math.exp(-v)) for v in rows[0]]
    hand = -sum(y * math.log(s) + (1 - y) * math.log(1 - s) for s, y in zip(sig, targets[0])) / 3
    got = losses.task_loss(torch.tensor(rows), torch.tensor(targets), multi_label=True)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    # integer multi-hot targets (as a list file gives them), and through Eq. (9)
    got = losses.task_loss(torch.tensor(rows), torch.tensor([[1, 0, 1]]), multi_label=True)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    _, parts = losses.haltingvt_loss(_out(torch.tensor(rows)), torch.tensor([[1, 0, 1]]), multi_label=True)
    assert parts["task"] == pytest.approx(hand, rel=1e-6)


def test_loss_total_is_eq9_by_hand():
    rows, motion_rows = [[0.2, 0.1, -0.3], [1.0, 0.0, 0.0]], [[0.5, -0.5], [2.0, -1.0]]  # labels matter
    out = _out(torch.tensor(rows), torch.tensor(motion_rows), torch.tensor([6.0, 8.0]))
    total, parts = losses.haltingvt_loss(out, torch.tensor([1, 0]), torch.tensor([1, 0]))
    task, motion = _hand_ce(rows, [1, 0]), _hand_ce(motion_rows, [1, 0])
    assert parts["task"] == pytest.approx(task, rel=1e-6)
    assert parts["motion"] == pytest.approx(motion, rel=1e-6)
    assert parts["ponder"] == pytest.approx(7.0)
    assert total.item() == pytest.approx(task + 5e-4 * 7.0 + 0.01 * motion, rel=1e-6)
    assert parts["total"] == pytest.approx(total.item())
    assert all(type(v) is float for v in parts.values())


def test_loss_motion_is_cross_entropy_with_real_as_class_1():
    """Eq. (8): logit 1 of the motion head means real (label 1), logit 0 fake (label 0). Logits that favour
    "real" cost less on a real clip than on a fake one, so swapped labels give another loss."""
    rows = [[-1.0, 2.0], [0.3, 0.1], [1.5, -0.5]]
    got = losses.motion_loss(torch.tensor(rows), torch.tensor([1, 0, 0]))
    assert got.item() == pytest.approx(_hand_ce(rows, [1, 0, 0]), rel=1e-6)
    real = losses.motion_loss(torch.tensor([[-1.0, 2.0]]), torch.tensor([1])).item()
    fake = losses.motion_loss(torch.tensor([[-1.0, 2.0]]), torch.tensor([0])).item()
    assert real == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6) and fake == pytest.approx(
        math.log(1 + math.exp(3.0)), rel=1e-6)


def test_loss_num_classes_must_match_the_logits():
    with pytest.raises(ValueError, match="logits have 6 classes but num_classes is 5"):
        losses.haltingvt_loss(_out(torch.zeros(2, 6)), torch.tensor([0, 1]), num_classes=5)


def test_loss_task_on_real_clips_only():
    rows = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [2.0, 0.0, 0.0]]
    out = _out(torch.tensor(rows), torch.zeros(3, 2))
    labels, motion = torch.tensor([2, 0, 1]), torch.tensor([1, 0, 1])
    _, parts = losses.haltingvt_loss(out, labels, motion, alpha_m=0.0, task_on_fakes=False)
    assert parts["task"] == pytest.approx(_hand_ce([rows[0], rows[2]], [2, 1]), rel=1e-6)
    _, parts = losses.haltingvt_loss(out, labels, motion, alpha_m=0.0)
    assert parts["task"] == pytest.approx(_hand_ce(rows, [2, 0, 1]), rel=1e-6)


def test_loss_alpha_m_zero_drops_motion_exactly():
    logits, motion_logits = torch.randn(2, 4), torch.randn(2, 2, requires_grad=True)
    ponder = torch.tensor([3.0, 5.0])
    expected = losses.task_loss(logits, torch.tensor([3, 1])) + 5e-4 * 4.0
    # the invalid motion label 7 would raise if the motion term were computed at all
    total, parts = losses.haltingvt_loss(_out(logits, motion_logits, ponder), torch.tensor([3, 1]),
                                         torch.tensor([7, 0]), alpha_m=0.0)
    assert total.item() == expected.item() and parts["motion"] == 0.0
    total2, parts2 = losses.haltingvt_loss(_out(logits, None, ponder), torch.tensor([3, 1]), torch.tensor([1, 0]))
    assert total2.item() == expected.item() and parts2["motion"] == 0.0


def test_loss_ponder_gradient_raises_halting_score():
    # One token, 2 layers: h1 = sigmoid(s) < 1 - eps at layer 1, so it halts at the last layer (h2 := 1):
    # N = 2, r = 1 - h1 (Eq. 4), ponder = N + r = 3 - h1 (Eq. 5). d loss / d s = -alpha_p * h1 * (1 - h1) < 0,
    # so gradient descent raises the score: the ponder loss pushes towards halting earlier.
    s = torch.tensor(0.3, requires_grad=True)
    h1 = torch.sigmoid(s)
    ponder = (2 + (1 - h1)).reshape(1)  # (B=1,)
    total, _ = losses.haltingvt_loss(_out(torch.zeros(1, 3), ponder=ponder), torch.tensor([0]))
    total.backward()
    h = torch.sigmoid(torch.tensor(0.3)).item()
    assert s.grad.item() < 0
    assert s.grad.item() == pytest.approx(-5e-4 * h * (1 - h), rel=1e-5)


def test_loss_bad_labels_raise_with_value():
    out = _out(torch.zeros(2, 6), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="label 7 "):
        losses.haltingvt_loss(out, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="label -1 "):
        losses.haltingvt_loss(out, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="label 5 "):  # num_classes given: checked against it
        losses.haltingvt_loss(_out(torch.zeros(1, 5)), torch.tensor([5]), num_classes=5)
    with pytest.raises(ValueError, match="motion label 2"):
        losses.haltingvt_loss(out, torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0 or 1, got 2"):
        losses.task_loss(torch.zeros(1, 3), torch.tensor([[0.0, 2.0, 1.0]]), multi_label=True)
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        losses.task_loss(torch.zeros(1, 3), torch.tensor([[0.0, 1.0]]), multi_label=True)


# ----------------------------------------------------------------------------------------------------------
# data.py: reading videos, transforms, datasets, the demo set
# ----------------------------------------------------------------------------------------------------------

GREY_STEP = 12  # frame k of a test video is grey level 12 * k, so a decoded frame tells its index


def _grey_video(path, n, height=32, width=48, faststart=False):
    frames = np.stack([np.full((height, width, 3), GREY_STEP * k, np.uint8) for k in range(n)])
    if not faststart:
        data.write_video(path, frames)
        return path
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:  # index before the data
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def _frame_ids(clip):
    return [round(f.float().mean().item() / GREY_STEP) for f in clip]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"v20": _grey_video(d / "v20.mp4", 20), "v5": _grey_video(d / "v5.mp4", 5),
            "fast20": _grey_video(d / "fast20.mp4", 20, faststart=True), "dir": d}


def test_data_sample_indices_by_hand():
    # n = 20, T = 8: segments of 2.5 frames, midpoints 1.25, 3.75, 6.25, ... -> frames 1, 3, 6, ...
    assert data.sample_indices(20, 8, train=False) == [1, 3, 6, 8, 11, 13, 16, 18]
    # fewer frames than T: midpoints (i + 0.5) * 5 / 8 -> frames repeat
    assert data.sample_indices(5, 8, train=False) == [0, 0, 1, 2, 2, 3, 4, 4]
    assert data.sample_indices(7, 2, train=False) == [1, 5]  # midpoints 1.75 and 5.25
    assert data.sample_indices(4, 1, train=False) == [2]
    for seed in range(20):
        idx = data.sample_indices(20, 8, train=True, rng=random.Random(seed))
        assert idx == data.sample_indices(20, 8, train=True, rng=random.Random(seed))  # reproducible
        assert all(math.floor(i * 2.5) <= k <= math.ceil((i + 1) * 2.5) - 1 for i, k in enumerate(idx))
    draws = {tuple(data.sample_indices(20, 8, True, random.Random(s))) for s in range(20)}
    assert len(draws) > 5  # training really is random


def mmaction_sample_frames(n, T, I, test_mode, offset=None):
    """mmaction2's SampleFrames(clip_len=T, frame_interval=I, num_clips=1), its 'loop' rule, by its own steps:
    the indices for the clip start `offset` (training) and the starts training may draw."""
    if test_mode:
        offsets = [max(n - ((T - 1) * I + 1), 0) // 2]
    else:
        avg = n - T * I + 1  # (num_frames - ori_clip_len + 1) // num_clips
        offsets = list(range(avg)) if avg > 0 else [0]  # randint(avg); avg == 0: around(0 * ratio) = 0; else 0
    offset = offsets[0] if offset is None else offset
    return [int(i) for i in np.mod(offset + np.arange(T) * I, n)], offsets


@pytest.mark.parametrize("n, T, I", [(300, 8, 32), (256, 8, 32), (255, 8, 32), (250, 8, 32), (225, 8, 32),
                                     (100, 8, 32), (1, 8, 32), (700, 10, 64), (20, 4, 5), (3, 4, 1)])
def test_data_strided_sampler_is_mmaction_sample_frames(n, T, I):
    assert data.sample_indices(n, T, False, frame_interval=I) == mmaction_sample_frames(n, T, I, True)[0]
    drawn = set()
    for seed in range(200):
        got = data.sample_indices(n, T, True, random.Random(seed), frame_interval=I)
        starts = mmaction_sample_frames(n, T, I, False)[1]
        assert got in [mmaction_sample_frames(n, T, I, False, o)[0] for o in starts]
        drawn.add(tuple(got))
    assert len(drawn) >= min(len(starts), 10)  # training draws the start at random


def test_data_read_clip_eval_takes_segment_centres(videos):
    clip = data.read_clip(videos["v20"], 8)
    assert clip.dtype == torch.uint8 and clip.shape == (8, 32, 48, 3)
    assert _frame_ids(clip) == [1, 3, 6, 8, 11, 13, 16, 18]


def test_data_read_clip_train_stays_in_segments(videos):
    for seed in range(4):
        ids = _frame_ids(data.read_clip(videos["v20"], 8, train=True, rng=random.Random(seed)))
        assert ids == data.sample_indices(20, 8, True, random.Random(seed))
        assert all(math.floor(i * 2.5) <= k <= math.ceil((i + 1) * 2.5) - 1 for i, k in enumerate(ids))


def test_data_short_video_repeats_frames(videos):
    clip = data.read_clip(videos["v5"], 8)
    assert clip.shape[0] == 8 and _frame_ids(clip) == [0, 0, 1, 2, 2, 3, 4, 4]


def _bad_file(kind, d, v20):
    path = d / f"bad_{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "truncated":  # first half of a real mp4 whose index (moov) is at the end
        content = v20.read_bytes()
        path.write_bytes(content[: len(content) // 2])
    elif kind == "audio_only":
        with av.open(str(path), "w") as container:
            stream = container.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "truncated", "audio_only"])
def test_data_bad_files_raise_naming_the_path(videos, kind):
    path = _bad_file(kind, videos["dir"], videos["v20"])
    with pytest.raises(data.VideoDecodeError, match=str(path)):
        data.read_clip(path, 8)


def test_data_truncated_after_index_decodes_the_frames_it_has(videos):
    # With the index first (faststart) a cut file still opens: the header says 20 frames, the last packets are
    # gone or cut short, and the decoder fails inside the damaged tail. The frames before it are the video.
    content = videos["fast20"].read_bytes()
    path = videos["dir"] / "cut_fast.mp4"

    def cut(n):
        """Write the file without its last n bytes: (decodable frames, packets)."""
        path.write_bytes(content[: len(content) - n])
        try:
            return len(data.read_all_frames(path)), data.count_frames(path)
        except data.VideoDecodeError:
            return 0, 0

    # The shortest cut that drops a packet and leaves fewer good frames than packets (40 bytes with PyAV's bundled
    # libx264; searched, so another encoder build still finds the case): read_clip resamples over the good frames.
    n = next((n for n in range(10, 2000, 10) if 1 < cut(n)[0] < cut(n)[1] < 20), None)
    assert n is not None, "no cut of the file's tail left a damaged last packet"
    decodable, _ = cut(n)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 20  # the header lies
    assert _frame_ids(data.read_clip(path, 8)) == data.sample_indices(decodable, 8, train=False)
    path.write_bytes(content[: len(content) // 2])  # only a broken first frame left: nothing decodes
    with pytest.raises(data.VideoDecodeError, match=str(path)):
        data.read_clip(path, 8)


def _damaged(path, codec, k, n=20):
    """A grey video (frame k at grey GREY_STEP * k, 8 fps, a keyframe every 5 frames) whose frame k has a damaged
    packet: zeroed, all of it for MJPEG (its JPEG header too), the middle half for H.264 and VP9."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = 32, 48
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = {"threads": "1", "g": "5", **({"bf": "2"} if codec == "libx264" else {})}
        for j in range(n):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 48, 3), GREY_STEP * j, np.uint8),
                                                                   format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        packet = sorted((p for p in container.demux(video=0) if p.size), key=lambda p: p.pts)[k]
        start, end = (0, packet.size) if codec == "mjpeg" else (packet.size // 4, 3 * packet.size // 4)
        start, end = packet.pos + start, packet.pos + end
    raw = bytearray(path.read_bytes())
    raw[start:end] = bytes(end - start)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("codec, ext", [("mjpeg", "avi"), ("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_data_decoding_goes_on_past_a_damaged_packet(tmp_path, caplog, monkeypatch, codec, ext):
    path = _damaged(tmp_path / f"damaged.{ext}", codec, 11)  # frame 11 of 20: keyframes at 0, 5, 10, 15
    centres = data.sample_indices(20, 8, train=False)
    assert centres == [1, 3, 6, 8, 11, 13, 16, 18]
    for read in ("seeking", "every frame", "sequential"):
        if read == "sequential":  # as for a file whose timestamps cannot number the frames: frames in output order
            monkeypatch.setattr(data, "_frame_index", lambda packets: None)
        stats = {}
        ids = _frame_ids(data.read_all_frames(path) if read == "every frame" else data.read_clip(path, 8, stats=stats))
        ids = [ids[k] for k in centres] if read == "every frame" else ids
        # (in output order the lost frame is placed where the decoder reports it: with B-frames, on another frame)
        assert stats.get("lost", 1) == 1 or read == "sequential" and stats["lost"] == 0, read
        assert stats.get("frames", 20) == 20
        # the whole video, not the frames before the damage; exact but in the damaged frame's group of pictures,
        # whose later frames FFmpeg decodes from a stand-in reference (concealed, as players show them)
        assert [i for i, k in zip(ids, centres) if not 10 <= k < 15] == [1, 3, 6, 8, 16, 18], read
        if codec == "mjpeg":  # every frame stands alone: only frame 11 is lost, shown by a neighbour
            assert ids[4] in (10, 12) and ids[5] == 13, read
    assert data.read_all_frames(path).shape[0] == 20
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [f"{path}: 1 of the 8 frames read could not be decoded and show their nearest decodable "
                     "neighbour (1 damaged packets skipped)"]  # once per file, however often it is read


def _h264(path, frames, fps=25, rotation=None, **options):
    """Write uint8 (n, H, W, 3) frames as H.264 (libx264 with 3 B-frames, plus `options`), optionally tagged with
    a display rotation of `rotation` degrees counter-clockwise, as a phone tags portrait video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "yuv420p"
        stream.options = {"preset": "veryfast", "threads": "1", "bf": "3", **options}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())
    return path


def _remux(src, dst, first=0, offset=0):
    """Copy the packets of `src` into `dst` without decoding, as `ffmpeg -ss ... -c copy` cuts: from the keyframe
    before frame `first`, with timestamps shifted so that frame `first` is shown at `offset` ticks. The frames
    before it stay in the file as hidden pre-roll, with negative timestamps (an mp4 edit list marks them)."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as target:
        stream_in = source.streams.video[0]
        stream_out = target.add_stream_from_template(stream_in)
        packets = [p for p in source.demux(stream_in) if p.size > 0]
        shown = sorted(p.pts for p in packets)[first]
        at = next(j for j, p in enumerate(packets) if p.pts == shown)
        key = max(j for j in range(at + 1) if packets[j].is_keyframe)
        for p in packets[key:]:
            p.pts, p.dts, p.stream = p.pts - shown + offset, p.dts - shown + offset, stream_out
            target.mux(p)
    return dst


def _sequential(path):
    """The reference: every frame of the file's only video stream, decoded in order, uint8 (n, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_data_seeking_gives_the_frames_of_a_sequential_decode(tmp_path):
    frames = np.stack(list(bench.scene_frames(400, 48, 64)))  # a pan and a moving square: every frame differs
    plain = _h264(tmp_path / "plain.mp4", frames, g="30")  # B-frames, a keyframe every 30 frames
    cut = _remux(plain, tmp_path / "cut.mp4", first=77)  # hidden pre-roll: the header counts its frames too
    late = _remux(plain, tmp_path / "late.mkv", offset=5000)  # starts at 5 s; Matroska has no frame count
    for path, n in [(plain, 400), (cut, 400 - 77), (late, 400)]:
        reference = _sequential(path)
        assert len(reference) == n and data.count_frames(path) == n
        with av.open(str(path)) as container:
            header = container.streams.video[0]
            assert {cut: header.frames > n, late: header.frames == 0 and header.start_time > 0}.get(path, True)
        for seed in range(5):
            stats = {}
            with bench.one_core():  # one decoder thread, as in a DataLoader worker: no frame-thread latency
                clip = data.read_clip(path, 8, train=True, rng=random.Random(seed), stats=stats)
            indices = data.sample_indices(n, 8, train=True, rng=random.Random(seed))
            assert np.array_equal(clip.numpy(), reference[indices]), (path.name, seed)
            # only what seeking needs: the packets from each frame's keyframe to it, plus the few that the
            # decoder's B-frame reordering holds back per frame; a sequential decode would need max(indices) + 1
            assert stats["minimum"] <= stats["decoded"] <= stats["minimum"] + 4 * 8 < max(indices) // 2


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_data_display_rotation_is_applied(tmp_path, degrees):
    upright = np.full((40, 24, 3), 90, np.uint8)  # as the player shows it: portrait, 24 wide and 40 tall
    upright[:8, :8], upright[:8, -8:] = (230, 20, 20), (20, 230, 20)  # red top-left, green top-right corner
    stored = np.rot90(upright, k=-degrees // 90)  # the camera stored it turned clockwise by `degrees` ...
    path = _h264(tmp_path / f"r{degrees}.mp4", np.repeat(stored[None], 4, 0), rotation=degrees)  # ... tagged back

    def corners(frame):  # mean colour of each corner block: top-left, top-right, bottom-left, bottom-right
        h, w = frame.shape[:2]
        return torch.stack([frame[y:y + h // 6, x:x + w // 6].float().mean((0, 1)) for y in (0, h - h // 6)
                            for x in (0, w - w // 6)])

    clip = data.read_clip(path, 2)
    assert clip.shape == (2, 40, 24, 3)
    # within the encoder's loss on saturated colour; a wrongly turned frame is 140 levels off in some corner
    assert (corners(clip[0]) - corners(torch.from_numpy(upright))).abs().max() <= 20
    small = data.read_clip(path, 2, short_side=12)  # scaling and rotation together
    assert small.shape == (2, 20, 12, 3)
    assert (corners(small[0]) - corners(torch.from_numpy(upright))).abs().max() <= 30  # and blurred edges


def test_data_anamorphic_video_comes_out_with_square_pixels(tmp_path, monkeypatch):
    # a round disc on a 112 x 64 screen, stored squeezed to 80 x 64 and tagged with sample aspect ratio 7:5
    # (as DV, HDV and DVD video is): a player stretches it back, and so must the reader
    y, x = np.mgrid[0:64, 0:112] + 0.5
    disc = np.where(((x - 56) ** 2 + (y - 32) ** 2 <= 24 ** 2)[..., None], 230, 40).astype(np.float32)
    stored = F.interpolate(torch.from_numpy(disc).permute(2, 0, 1)[None], size=(64, 80), mode="area")[0]
    stored = np.repeat(stored.expand(3, -1, -1).permute(1, 2, 0).round().byte().numpy()[None], 4, 0)
    path = tmp_path / "sar.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 80, 64, "yuv420p"
        stream.codec_context.sample_aspect_ratio = fractions.Fraction(7, 5)
        container.mux([p for image in stored for p in stream.encode(av.VideoFrame.from_ndarray(image))])
        container.mux(stream.encode())

    def aspect(frame):  # width / height of the bright disc
        ys, xs = np.nonzero(frame[..., 1].numpy() > 135)
        return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)

    for read in ("seeking", "sequential"):
        if read == "sequential":  # the other path of the reader (see the damaged-packet test)
            monkeypatch.setattr(data, "_frame_index", lambda packets: None)
        clip, small = data.read_clip(path, 2), data.read_clip(path, 2, short_side=32)
        assert clip.shape == (2, 64, 112, 3) and small.shape == (2, 32, 56, 3), read
        assert abs(aspect(clip[0]) - 1) < 0.05 and abs(aspect(small[1]) - 1) < 0.08, read  # stored: 0.71
    assert data.read_all_frames(path).shape == (4, 64, 112, 3)


def test_data_reads_the_recording_not_a_thumbnail_or_cover_art(tmp_path):
    def poster(container, disposition):
        image = av.VideoFrame.from_ndarray(np.full((64, 64, 3), (250, 200, 0), np.uint8), format="rgb24")
        stream = container.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt, stream.disposition = 64, 64, "yuvj420p", disposition
        return stream, stream.encode(image) + stream.encode()

    # a one-frame thumbnail track listed first and marked default (some cameras write this): FFmpeg's own
    # "best" stream is the thumbnail, which the reader must not take
    thumb_first = tmp_path / "thumb_first.mp4"
    with av.open(str(thumb_first), "w") as container:
        thumb, packets = poster(container, av.stream.Disposition.default)
        video = container.add_stream("libx264", rate=8)
        video.width, video.height, video.pix_fmt = 48, 32, "yuv420p"
        container.mux(packets)
        for k in range(20):
            image = np.full((32, 48, 3), GREY_STEP * k, np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
    with av.open(str(thumb_first)) as container:
        assert container.streams.best("video").index == 0 and container.streams.video[0].frames == 1
    clip = data.read_clip(thumb_first, 8)
    assert clip.shape == (8, 32, 48, 3) and _frame_ids(clip) == [1, 3, 6, 8, 11, 13, 16, 18]
    # a song with cover art (an attached picture): no video at all, not eight copies of the poster
    song = tmp_path / "song.m4a"
    with av.open(str(song), "w", format="mp4") as container:
        audio = container.add_stream("aac", rate=16000)
        _, packets = poster(container, av.stream.Disposition.attached_pic)
        container.mux(packets)
        sound = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        sound.sample_rate = 16000
        container.mux(audio.encode(sound) + audio.encode())
    with pytest.raises(data.VideoDecodeError, match=f"no video stream in {song}"):
        data.read_clip(song, 8)


COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (235, 235, 235), (16, 16, 16), (128, 128, 128)]


@pytest.mark.parametrize("codec, matrix, full_range", [("libx264", "ITU601", False), ("libx264", "ITU709", False),
                                                       ("libx264", "ITU601", True), ("libx264", "ITU709", True),
                                                       ("libvpx-vp9", "ITU709", True)])
def test_data_colours_follow_the_videos_matrix_and_range(tmp_path, codec, matrix, full_range):
    # Six flat 16 x 16 patches, encoded losslessly as YUV by the given matrix and range and tagged so. Read as
    # BT.601 limited range whatever the tags (what PyAV before 17 did), the BT.709 files come out up to 27
    # levels off and the full-range VP9 file (yuv420p tagged full, not yuvj420p) 20.
    image = np.zeros((32, 48, 3), np.uint8)
    for k, colour in enumerate(COLOURS):
        image[(k // 3) * 16:(k // 3 + 1) * 16, (k % 3) * 16:(k % 3 + 1) * 16] = colour
    path = tmp_path / f"colours.{'webm' if 'vp9' in codec else 'mp4'}"
    value_range = "JPEG" if full_range else "MPEG"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.options = {"lossless": "1"} if "vp9" in codec else {"qp": "0", "preset": "ultrafast"}
        # the tags, as FFmpeg numbers them: colour space BT.709 = 1, SMPTE 170M (BT.601) = 6
        stream.codec_context.colorspace = 1 if matrix == "ITU709" else 6
        stream.codec_context.color_range = av.video.reformatter.ColorRange[value_range].value
        for _ in range(2):
            yuv = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=matrix, dst_color_range=value_range)
            container.mux(stream.encode(yuv))
        container.mux(stream.encode())
    frame = data.read_clip(path, 1)[0].int()
    for k, colour in enumerate(COLOURS):
        patch = frame[(k // 3) * 16 + 4:(k // 3) * 16 + 12, (k % 3) * 16 + 4:(k % 3) * 16 + 12]
        assert (patch - torch.tensor(colour)).abs().max() <= 4, (k, colour)


def test_data_any_failure_while_reading_is_a_video_decode_error(videos, monkeypatch):
    def fails(self, frame):  # a failure after the decoder, as numpy's on a frame it cannot reshape
        raise ValueError("cannot reshape array of size 7")
    monkeypatch.setattr(data._Clip, "rgb", fails)
    path = videos["v20"]
    for read in (lambda p: data.read_clip(p, 4), data.read_all_frames):
        with pytest.raises(data.VideoDecodeError, match=f"{path}: ValueError: cannot reshape"):
            read(path)


def test_data_frames_are_scaled_down_while_decoding(tmp_path):
    # colour waves, encoded losslessly (but for 4:2:0 chroma): the truth is torch's resize of the frames written
    y, x = np.mgrid[0:96, 0:160]
    frames = np.stack([np.stack([128 + 80 * np.sin(2 * np.pi * (x + 3 * k) / 37 + c) * np.cos(2 * np.pi * y / 29)
                                 for c in (0, 2, 4)], -1) for k in range(4)]).round().astype(np.uint8)
    path = _h264(tmp_path / "big.mp4", frames, qp="0")
    full, small = data.read_clip(path, 2), data.read_clip(path, 2, short_side=48)
    assert full.shape == (2, 96, 160, 3) and small.shape == (2, 48, 80, 3)
    shown = frames[data.sample_indices(4, 2, train=False)]  # (2, 96, 160, 3)
    truth = data.resize_short_side(torch.from_numpy(shown).permute(0, 3, 1, 2).float(), 48).permute(0, 2, 3, 1)
    # about 1.5 levels from 4:2:0 alone; FFmpeg's scaler without full chroma interpolation was 5.7, a pixel off 13
    assert (small.float() - truth).abs().mean() < 3.5
    assert data.read_clip(path, 2, short_side=200).shape == (2, 96, 160, 3)  # never scaled up
    assert data.read_all_frames(path, short_side=48).shape == (4, 48, 80, 3)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that torch ops allocate while active and that are still alive, and their peak.
    A view or an in-place op allocates nothing; a storage's weakref callback fires when its last view dies."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is None or storage.data_ptr() in inputs | self.seen or storage.nbytes() == 0:
                continue
            self.seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.data_ptr(), storage.nbytes())
        return out


def test_data_large_training_sample_stays_within_3x_its_scaled_clip(tmp_path):
    # A 1280 x 720 source and a small training setting (short side 112-140, 96 crops): the clip decoded at the
    # largest short side, 8 x 140 x 249 x 3 bytes, is 1/26 of the full-size uint8 clip, so a full-size frame
    # stack, let alone a float one, is far over the bound. Peak = numpy's peak (tracemalloc) + torch's peak.
    path = _h264(tmp_path / "hd.mp4", np.stack(list(bench.scene_frames(8, 720, 1280))), preset="ultrafast")
    listed = _write(tmp_path / "hd.txt", f"{path.name} 0\n")
    ds = data.VideoDataset(listed, num_frames=8, img_size=96, train=True, scale=(112, 140))
    with LiveTensorBytes():
        ds[0]  # warm-up: codec libraries, lazy imports and caches are not the sample's memory
    clip_bytes = 8 * 140 * 249 * 3
    tracemalloc.start()
    try:
        with LiveTensorBytes() as torch_bytes:
            sample = ds[0]
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sample["video"].shape == sample["fake"].shape == (3, 8, 96, 96)
    assert torch_bytes.peak > sample["video"].numel() * 4  # the probe sees the sample's own output
    assert numpy_peak + torch_bytes.peak < 3 * clip_bytes, (numpy_peak / clip_bytes, torch_bytes.peak / clip_bytes)


def _write(path, text):
    path.write_text(text)
    return path


def test_data_list_file_labels(tmp_path):
    assert data.parse_list_line("my clips/a b.mp4 3", multi_label=False) == ("my clips/a b.mp4", [3])
    assert data.parse_list_line("clip 2.mp4 5 7", multi_label=True) == ("clip 2.mp4", [5, 7])
    assert data.parse_list_line("   ", multi_label=False) is None
    for name in ("a b.mp4", "sub/c.mp4", "x 1.mp4", "y.mp4"):  # listed files must exist (not decoded here)
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    single = _write(tmp_path / "single.txt", "a b.mp4 2\n\nsub/c.mp4 0\n")
    ds = data.VideoDataset(single, num_frames=8, img_size=32, train=False)
    assert [(p, l) for p, l in ds.samples] == [(tmp_path / "a b.mp4", [2]), (tmp_path / "sub/c.mp4", [0])]
    assert ds.num_classes == 3 and ds.classes is None
    with pytest.raises(FileNotFoundError, match=r"2 of the 2 listed files do not exist, e.g. \['/videos/a b.mp4'"):
        data.VideoDataset(single, root="/videos", num_frames=8, img_size=32, train=False)  # a wrong root
    multi = _write(tmp_path / "multi.txt", "x 1.mp4 0 3\ny.mp4 2\n")
    ds = data.VideoDataset(multi, num_frames=8, img_size=32, train=False, multi_label=True, num_classes=5)
    assert ds.samples[0] == (tmp_path / "x 1.mp4", [0, 3])
    assert ds._label([0, 3]).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="must be >= img_size"):  # the crop would not fit after the resize
        data.VideoDataset(single, num_frames=8, img_size=32, train=True, scale=(30, 40))


def test_data_out_of_range_labels_raise(tmp_path):
    bad = _write(tmp_path / "bad.txt", "a.mp4 1\nb.mp4 3\n")
    with pytest.raises(ValueError, match="line 2: label 3 "):
        data.VideoDataset(bad, num_frames=8, img_size=32, train=False, num_classes=3)
    neg = _write(tmp_path / "neg.txt", "a.mp4 -1\n")
    with pytest.raises(ValueError, match="line 1: label -1 "):
        data.VideoDataset(neg, num_frames=8, img_size=32, train=False)
    nolabel = _write(tmp_path / "nolabel.txt", "a.mp4\n")
    with pytest.raises(ValueError, match="line 1"):
        data.VideoDataset(nolabel, num_frames=8, img_size=32, train=False)


def test_data_class_folders_sorted_with_spaces(tmp_path, videos):
    for name in ["walk the dog", "ride a bike"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "v 1.mp4").write_bytes(videos["v5"].read_bytes())
    (tmp_path / "ride a bike" / "notes.txt").write_text("not a video")  # taken, then a bad video
    ds = data.VideoDataset(tmp_path, num_frames=4, img_size=32, train=False, short_side=32)
    assert ds.classes == ["ride a bike", "walk the dog"]
    assert [(p.parent.name, p.name, l) for p, l in ds.samples] == [
        ("ride a bike", "notes.txt", [0]), ("ride a bike", "v 1.mp4", [0]), ("walk the dog", "v 1.mp4", [1])]
    assert ds[2]["label"] == 1 and ds[2]["video"].shape == (3, 4, 32, 32)
    assert ds[0] == {"skipped": [str(tmp_path / "ride a bike" / "notes.txt")]}


def test_data_class_folders_take_every_file_and_the_decoder_decides(tmp_path, videos, caplog):
    caplog.set_level(logging.INFO)
    files = {"clapping": ["0.mp4", "1.MTS", "2.m2ts", "3.3gp", ".DS_Store", "._0.mp4"],
             "jumping": ["0.wmv", "Thumbs.db"]}
    for name, names in files.items():
        (tmp_path / name / "sub").mkdir(parents=True)  # a folder inside a class is not a video
        for f in names:  # every one a video but the two hidden files and Thumbs.db, whatever the extension
            (tmp_path / name / f).write_bytes(b"not a video" if f in (".DS_Store", "._0.mp4", "Thumbs.db") else
                                               videos["v20"].read_bytes())
    ds = data.VideoDataset(tmp_path, num_frames=4, img_size=32, train=False, short_side=32, motion_pairs=False)
    assert [(p.parent.name, p.name, l) for p, l in ds.samples] == [
        ("clapping", "0.mp4", [0]), ("clapping", "1.MTS", [0]), ("clapping", "2.m2ts", [0]), ("clapping", "3.3gp", [0]),
        ("jumping", "0.wmv", [1]), ("jumping", "Thumbs.db", [1])]
    assert f"{tmp_path}: 6 files in 2 classes: clapping 4, jumping 2" in caplog.text
    assert [ds[i]["label"] for i in range(5)] == [0, 0, 0, 0, 1]
    assert ds[5] == {"skipped": [str(tmp_path / "jumping" / "Thumbs.db")]}  # the decoder said no: a bad video


def test_data_missing_listed_files_are_reported_together_and_other_spellings_found(tmp_path, videos, caplog):
    nfc, nfd = "caf\u00e9", "cafe\u0301"  # "café" composed (Linux, Windows) and decomposed (macOS)
    for rel in ["Clips/a.mp4", f"Clips/{nfc}.mp4", "Clips/Case.mp4", "Clips/x.mp4", "Clips/X.mp4"]:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(videos["v5"].read_bytes())
    listed = ["Clips\\a.mp4", f"Clips/{nfd}.mp4", "clips/case.MP4",  # Windows separators, macOS NFD, case
              "Clips/x.MP4",  # two files match it ignoring case: not found
              *(f"Clips/gone{i}.mp4" for i in range(7))]
    lst = _write(tmp_path / "l.txt", "".join(f"{rel} {i % 2}\n" for i, rel in enumerate(listed)))
    common = dict(num_frames=4, img_size=32, short_side=32, train=False, motion_pairs=False)
    ds = data.VideoDataset(lst, **common)
    assert ds.samples == [(tmp_path / "Clips/a.mp4", [0]), (tmp_path / f"Clips/{nfc}.mp4", [1]),
                          (tmp_path / "Clips/Case.mp4", [0])]
    assert ds[1]["video"].shape == (3, 4, 32, 32)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    gone = [str(tmp_path / "Clips/x.MP4")] + [str(tmp_path / f"Clips/gone{i}.mp4") for i in range(4)]
    assert warnings == [f"{lst}: 8 of the 11 listed files do not exist, e.g. {gone}; left out"]  # one line
    with pytest.raises(FileNotFoundError, match=r"8 of the 11 listed files do not exist"):
        data.VideoDataset(lst, on_error="raise", **common)


def test_data_list_file_with_a_bom_and_windows_line_ends(tmp_path, videos):
    (tmp_path / "clip0.mp4").write_bytes(videos["v5"].read_bytes())
    (tmp_path / "my clips").mkdir()
    (tmp_path / "my clips/b.mp4").touch()
    text = "clip0.mp4 0\r\nmy clips/b.mp4 2\r\n\r\n"  # as Notepad saves "UTF-8 with BOM"
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = data.VideoDataset(tmp_path / "bom.txt", num_frames=4, img_size=32, train=False, short_side=32)
    assert ds.samples == [(tmp_path / "clip0.mp4", [0]), (tmp_path / "my clips/b.mp4", [2])]
    sample = ds[0]
    assert sample["label"] == 0 and sample["skipped"] == [] and sample["video"].shape == (3, 4, 32, 32)
    (tmp_path / "multi.txt").write_bytes(b"\xef\xbb\xbfclip 1.mp4 0 3\r\ny.mp4 2\r\n")
    assert data.read_list_file(tmp_path / "multi.txt", multi_label=True) == [(tmp_path / "clip 1.mp4", [0, 3]),
                                                                              (tmp_path / "y.mp4", [2])]


def write_jpeg_frames(folder, frames, start_index=1):
    """uint8 (n, H, W, 3) frames as folder/img_00001.jpg, ... (mmaction2's layout), encoded with PyAV."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(frames):
        codec = av.CodecContext.create("mjpeg", "w")
        codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "yuvj420p"
        codec.time_base = Fraction(1, 25)
        packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
        (folder / data.FRAME_TEMPLATE.format(start_index + k)).write_bytes(
            b"".join(bytes(p) for p in packets + codec.encode(None)))
    return folder


@pytest.mark.parametrize("interval", [None, 3])
def test_data_frame_folder_gives_the_videos_frames(tmp_path, interval):
    """A video's frames written as JPEG come back, at the sampled indices, within 3 grey levels of the video."""
    video = tmp_path / "v.mp4"
    data.write_video(video, data.render_demo_video(2, np.random.default_rng(0)))
    frames = data.read_all_frames(video)  # (16, 72, 72, 3)
    folder = write_jpeg_frames(tmp_path / "frames", frames.numpy())
    for train, rng in ((False, None), (True, random.Random(1))):
        want = data.sample_indices(16, 8, train, random.Random(1) if train else None, interval)
        got = data.read_frames(folder, 8, train, rng, frame_interval=interval)
        assert got.shape == (8, 72, 72, 3)
        assert (got.float() - frames[want].float()).abs().mean(dim=(1, 2, 3)).max() < 3
        assert (got.float() - frames[want[::-1]].float()).abs().mean() > 3  # the frames differ: order tells
    clip = data.eval_clip(folder, 8, 64, frame_interval=interval)  # --predict and --halting-map take folders
    assert (clip - data.eval_clip(video, 8, 64, frame_interval=interval)).abs().mean() * data.STD < 3


def test_data_eval_clip_is_the_evaluations_clip(tmp_path):
    """--predict and --halting-map see the pixels the evaluation sees: a 72 x 72 video and its frame folder, scaled
    to a short side of 55 and cropped to 48, give data.eval_clip exactly the VideoDataset(train=False) clip."""
    video = tmp_path / "v.mp4"
    data.write_video(video, data.render_demo_video(1, np.random.default_rng(3)))
    folder = write_jpeg_frames(tmp_path / "frames", data.read_all_frames(video).numpy())
    (tmp_path / "videos.txt").write_text("v.mp4 0\n")
    (tmp_path / "folders.txt").write_text("frames 16 0\n")
    for listing, source, rawframes in (("videos.txt", video, False), ("folders.txt", folder, True)):
        val = data.VideoDataset(tmp_path / listing, num_frames=8, img_size=48, train=False, short_side=55,
                                rawframes=rawframes, num_classes=1)
        assert torch.equal(data.eval_clip(source, 8, 48, 55), val[0]["video"]), listing


def test_data_rawframe_lists_missing_frames_and_counts(tmp_path, caplog):
    frames = np.stack([np.full((32, 32, 3), GREY_STEP * k, np.uint8) for k in range(12)])
    write_jpeg_frames(tmp_path / "a b", frames)
    write_jpeg_frames(tmp_path / "short", frames[:6])
    gap = write_jpeg_frames(tmp_path / "gap", frames)
    (gap / "img_00005.jpg").unlink()  # frame 4, which the evaluation samples
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "img_00001.jpg").write_bytes(b"not a jpeg")
    listed = _write(tmp_path / "list.txt", "a b 12 0 3\nshort 12 1\ngap 12 2\nbroken 1 1\nnone 5 0\n")
    common = dict(num_frames=4, img_size=32, train=False, short_side=32, multi_label=True, num_classes=4,
                  rawframes=True, frame_interval=3)
    ds = data.VideoDataset(listed, **common)
    assert ds.samples[0] == (tmp_path / "a b", [0, 3]) and ds.frame_counts[tmp_path / "a b"] == 12
    assert _frame_ids(train.display_frames(ds[0]["video"])) == [1, 4, 7, 10]  # the centred start, (12 - 10) // 2
    assert ds[0]["label"].tolist() == [1, 0, 0, 1]
    with caplog.at_level(logging.WARNING):
        ids = [_frame_ids(train.display_frames(ds[1]["video"])) for _ in range(2)]
    assert ids == [[0, 3, 0, 3]] * 2  # sampled within the 6 frames there are (wrapping), said once
    assert caplog.text.count("the list says 12 frames, the folder holds 6") == 1
    assert len(ds) == 4  # the missing folder "none" is left out when the dataset is built, as a missing video is
    with pytest.raises(FileNotFoundError, match="none"):
        data.VideoDataset(listed, **common, on_error="raise")
    present = _write(tmp_path / "present.txt", "a b 12 0 3\nshort 12 1\ngap 12 2\nbroken 1 1\n")
    for i, folder, name in ((2, "gap", "gap/img_00005.jpg"), (3, "broken", "broken/img_00001.jpg")):
        assert ds[i] == {"skipped": [str(tmp_path / folder)]}  # a bad video: left out of an evaluation
        with pytest.raises(data.VideoDecodeError, match=name):  # the file named
            data.VideoDataset(present, **common, on_error="raise")[i]
    assert data.count_frame_files(tmp_path / "a b") == 12  # no list: counted from the files
    with pytest.raises(ValueError, match="frame_template"):
        data.VideoDataset(listed, **common, frame_template="img_{:05}_{}.jpg")


def _class_folders(root, names, video):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "0.mp4").write_bytes(video.read_bytes())
    return root


def test_data_validation_folders_take_the_training_labels_by_name(tmp_path, videos, caplog):
    names = ["abseiling", "bowling", "walk the dog"]
    train_set = data.VideoDataset(_class_folders(tmp_path / "train", names, videos["v5"]), num_frames=4,
                                  img_size=32, train=True)
    val_root = _class_folders(tmp_path / "val", ["abseiling", "walk the dog"], videos["v5"])  # no bowling
    val = data.VideoDataset(val_root, num_frames=4, img_size=32, train=False, short_side=32,
                            classes=train_set.classes)
    assert val.classes == names and val.num_classes == 3
    assert [(p.parent.name, l) for p, l in val.samples] == [("abseiling", [0]), ("walk the dog", [2])]
    assert val[1]["label"] == 2
    assert "no videos of 1 of the 3 classes: ['bowling']" in caplog.text
    # numbered on their own, the folders would shift "walk the dog" onto "bowling": refused
    with pytest.raises(ValueError, match="2 class folders but num_classes is 3"):
        data.VideoDataset(val_root, num_frames=4, img_size=32, train=False, num_classes=3)
    _class_folders(tmp_path / "val", ["curling"], videos["v5"])
    with pytest.raises(ValueError, match=r"class folders \['curling'\] are not among the 3 training classes"):
        data.VideoDataset(val_root, num_frames=4, img_size=32, train=False, classes=names)
    # a list file beside class folders: its labels are indices into the training classes, and must name one
    (tmp_path / "a.mp4").touch()
    listed = data.VideoDataset(_write(tmp_path / "val.txt", "a.mp4 2\n"), num_frames=4, img_size=32,
                               train=False, classes=names)
    assert listed.classes == names and listed.samples == [(tmp_path / "a.mp4", [2])]
    with pytest.raises(ValueError, match="line 1: label 3 is outside"):
        data.VideoDataset(_write(tmp_path / "bad.txt", "a.mp4 3\n"), num_frames=4, img_size=32, train=False,
                          classes=names)


def test_data_bad_video_skipped_in_training_left_out_in_evaluation(tmp_path, videos, caplog):
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    bad = str(tmp_path / "bad.mp4")
    lst = _write(tmp_path / "l.txt", f"{videos['v20']} 0\nbad.mp4 1\n{videos['v5']} 2\n")
    common = dict(num_frames=4, img_size=32, short_side=32, scale=(32, 32), motion_pairs=False)
    training = data.VideoDataset(lst, train=True, **common)
    sample = training[1]  # bad.mp4 -> the next video, deterministically
    assert sample["label"] == 2 and sample["skipped"] == [bad] and training.bad_files == {tmp_path / "bad.mp4"}
    assert training[1]["skipped"] == [bad]  # listed again (the epoch's count), not decoded again:
    assert caplog.text.count("skipping a bad video") == 1
    evaluation = data.VideoDataset(lst, train=False, **common)
    assert evaluation[1] == {"skipped": [bad]}  # left out, not replaced by video 2 (which would count twice)
    assert evaluation[1] == {"skipped": [bad]}
    batch = data.collate([evaluation[i] for i in range(3)])
    assert batch["label"].tolist() == [0, 2] and batch["video"].shape[0] == 2 and batch["skipped"] == [bad]
    assert data.collate([evaluation[1]]) == {"skipped": [bad]}  # a batch of unreadable videos only
    strict = data.VideoDataset(lst, train=False, on_error="raise", **common)
    with pytest.raises(data.VideoDecodeError, match="bad.mp4"):
        strict[1]
    all_bad = data.VideoDataset(_write(tmp_path / "b.txt", "bad.mp4 0\n"), train=True, **common)
    with pytest.raises(RuntimeError, match="none of the 1 videos"):
        all_bad[0]


def test_data_transforms_by_hand():
    # frame pixel (y, x) = 10 * y + x on all channels, 8 x 12: short side 8 -> no resize; centre 4 x 4 crop
    # takes rows 2..5, columns 4..7; normalisation maps v to (v - 127.5) / 127.5.
    grid = torch.arange(8)[:, None] * 10 + torch.arange(12)[None, :]  # (H, W)
    clip = grid[None, :, :, None].expand(3, 8, 12, 3).to(torch.uint8)  # (T, H, W, 3)
    out = data.eval_transform(clip, size=4, short_side=8)
    assert out.shape == (3, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out[0, 0], (grid[2:6, 4:8].float() - 127.5) / 127.5)
    # training with the scale pinned to the original size: a 4 x 4 window of the original, not flipped
    out = data.train_transform(clip, size=4, scale=(8, 8), rng=random.Random(3))
    pix = (out[1, 2] * 127.5 + 127.5).round()
    top, left = divmod(int(pix[0, 0]), 10)
    assert torch.equal(pix, grid[top:top + 4, left:left + 4].float())
    assert torch.equal(out[:, 0], out[:, 2])  # the same crop for every frame
    assert data.resize_short_side(torch.zeros(1, 3, 30, 60), 20).shape == (1, 3, 20, 40)
    # channels and frames keep their places: (T, H, W, 3) -> (C, T, H, W), channel c of frame t is 40 t + 10 c
    clip = (torch.arange(2)[:, None] * 40 + torch.arange(3)[None, :] * 10).view(2, 1, 1, 3).expand(2, 8, 8, 3)
    out = data.eval_transform(clip.to(torch.uint8).contiguous(), size=4, short_side=8)
    for t, c in np.ndindex(2, 3):
        assert torch.equal(out[c, t], torch.full((4, 4), (40 * t + 10 * c - 127.5) / 127.5))


def test_data_clip_is_resized_in_one_call_as_frame_by_frame():
    # the transforms resize the whole clip at once; each frame must come out as if resized alone (no frame mixed
    # into another, the same crop window in every frame): the reference resizes frame by frame
    clip = torch.randint(0, 256, (5, 72, 90, 3), dtype=torch.uint8)
    out = data._resized_crop(clip, 54, 3, 11, 48)  # (T, 3, 48, 48)
    for t in range(5):
        frame = clip[t].permute(2, 0, 1)[None].contiguous()  # (1, 3, 72, 90)
        assert torch.equal(out[t], data.resize_short_side(frame, 54)[0, :, 3:51, 11:59])


def test_data_motion_pair_and_collate(videos):
    clip = data.read_clip(videos["v20"], 8)
    rng = random.Random(0)
    real, fake = data.make_motion_pair(clip, lambda c: data.train_transform(c, 24, (28, 36), rng), rng)
    assert real.shape == fake.shape == (3, 8, 24, 24) and real.dtype == fake.dtype == torch.float32
    assert -1 <= fake.min() and fake.max() <= 1 and -1 <= real.min() and real.max() <= 1
    assert all(torch.equal(fake[:, t], fake[:, 0]) for t in range(8))  # static: every frame the same
    pixels = lambda c: data.eval_transform(c, 32, 32)  # no crop: the fake's frame is one of the sampled frames
    frames = [pixels(clip)[:, t] for t in range(8)]
    shown = {next(t for t in range(8) if torch.equal(data.make_motion_pair(clip, pixels, random.Random(s))[1][:, 0],
                                                     frames[t])) for s in range(12)}
    assert len(shown) > 2  # a random one
    assert not torch.equal(real[:, 0], real[:, 7])  # the real clip moves (grey level changes)
    batch = data.collate([{"video": real, "fake": fake, "label": 4, "skipped": []},
                          {"video": real + 1, "fake": fake + 1, "label": 2, "skipped": ["x.mp4"]}])
    assert batch["video"].shape == (4, 3, 8, 24, 24)
    assert torch.equal(batch["video"][1], real + 1) and torch.equal(batch["video"][2], fake)
    assert batch["label"].tolist() == [4, 2, 4, 2] and batch["motion"].tolist() == [1, 1, 0, 0]
    assert batch["skipped"] == ["x.mp4"]
    single = data.collate([{"video": real, "label": torch.tensor([1.0, 0.0]), "skipped": []}] * 3)
    assert single["video"].shape == (3, 3, 8, 24, 24) and single["label"].shape == (3, 2)
    assert single["motion"].tolist() == [1, 1, 1]


def test_data_train_order_resumes_on_other_processes_without_repeats():
    n, epoch, seed = 23, 3, 5
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=2, rank=1, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    assert data.train_order(n, 2, epoch, 1, 2, seed=seed) == list(sampler)[:10]  # its order, whole batches
    # 2 processes x 3 videos stop after 2 steps; 3 processes x 2 videos take the rest of the epoch
    taken = [i for rank in range(2) for i in data.train_order(n, 3, epoch, rank, 2, seed=seed)[:2 * 3]]
    rest = [data.train_order(n, 2, epoch, rank, 3, seed=seed, skip_samples=12) for rank in range(3)]
    assert sorted(taken) == sorted(shuffle[:12])  # a prefix of the shuffle
    assert [len(r) for r in rest] == [2, 2, 2] and sorted(sum(rest, [])) == sorted(shuffle[12:18])
    # (the last 5 samples fill no step of 3 x 2: left out, as an epoch's tail always is)


def test_data_dataset_reproducible_and_cache_identical(videos, tmp_path):
    lst = _write(tmp_path / "l.txt", f"{videos['v20']} 0\n{videos['v5']} 1\n")
    kw = dict(num_frames=8, img_size=24, train=True, scale=(28, 36), seed=5)
    ds, cached = data.VideoDataset(lst, **kw), data.VideoDataset(lst, cache=True, **kw)
    a, b, c = ds[0], ds[0], cached[0]
    assert set(a) == {"video", "fake", "label", "skipped"}
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["video"], c["video"])
    assert torch.equal(a["fake"], c["fake"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["video"], a["video"])


def hide_torchvision(monkeypatch):
    """As if torchvision were not installed: importing it raises ImportError."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)


def test_data_randaugment_without_torchvision_says_what_to_install(videos, monkeypatch):
    hide_torchvision(monkeypatch)
    clip = data.read_clip(videos["v5"], 4)
    says = r"pip install torchvision.*or pass --no-randaugment"
    with pytest.raises(ImportError, match=says):
        data.train_transform(clip, 24, (28, 32), random.Random(0), randaugment=True)
    lst = videos["dir"] / "one.txt"
    lst.write_text(f"{videos['v5']} 0\n")
    with pytest.raises(ImportError, match=says):
        data.VideoDataset(lst, num_frames=4, img_size=24, train=True, randaugment=True)


def broken_torchvision(monkeypatch, tmp_path):
    """A torchvision that is installed but built for another torch: importing it raises what such a build does."""
    hide_torchvision(monkeypatch)
    monkeypatch.delitem(sys.modules, "torchvision")
    (tmp_path / "torchvision").mkdir(parents=True)
    (tmp_path / "torchvision/__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))


def test_data_a_broken_torchvision_is_reported_like_a_missing_one(monkeypatch, tmp_path):
    broken_torchvision(monkeypatch, tmp_path)
    with pytest.raises(ImportError, match=r"\(RuntimeError: operator torchvision::nms does not exist\): install the "
                                          r"build for torch .* with `pip install torchvision==.*or pass --no-rand"):
        data.rand_augment_class()


def test_data_torchvision_install_command_matches_the_torch_build():
    cpu = "https://download.pytorch.org/whl/cpu"
    assert data.torchvision_install_command("2.13.0+cpu") == f"pip install torchvision==0.28.0 --index-url {cpu}"
    assert data.torchvision_install_command("2.5.1") == "pip install torchvision==0.20.1"  # PyPI's own build
    assert data.torchvision_install_command("2.7.1+cu126").endswith("0.22.1 --index-url "
                                                                  "https://download.pytorch.org/whl/cu126")
    assert data.torchvision_install_command("1.13.1") == "pip install torchvision==0.14.1"


def test_data_demo_dataset_is_deterministic(tmp_path):
    a = data.make_demo_dataset(tmp_path / "a", seed=3, num_train=2, num_val=1)
    b = data.make_demo_dataset(tmp_path / "b", seed=3, num_train=2, num_val=1)
    other = data.make_demo_dataset(tmp_path / "c", seed=4, num_train=2, num_val=1)
    for key in ("train", "val", "classes_file"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert a["classes_file"].read_text().splitlines() == data.DEMO_CLASSES
    lines = a["train"].read_text().splitlines()
    assert len(lines) == 2 * len(data.DEMO_CLASSES) and lines[0] == "videos/train/move down/0000.mp4 0"
    first = tmp_path / "a" / "videos/train/move left/0001.mp4"
    clip_a = data.read_clip(first, 8)
    assert clip_a.shape == (8, data.DEMO_SIZE, data.DEMO_SIZE, 3)
    assert torch.equal(clip_a, data.read_clip(tmp_path / "b" / "videos/train/move left/0001.mp4", 8))
    assert not torch.equal(clip_a, data.read_clip(tmp_path / "c" / "videos/train/move left/0001.mp4", 8))
    assert data.read_all_frames(first).shape[0] == data.DEMO_FRAMES
    # complete: a second call rewrites nothing; the class folders read as a folder dataset with the same labels
    mtime = first.stat().st_mtime_ns
    data.make_demo_dataset(tmp_path / "a", seed=3, num_train=2, num_val=1)
    assert first.stat().st_mtime_ns == mtime and data.demo_dataset_ready(tmp_path / "a", seed=3, num_train=2,
                                                                          num_val=1)
    folders = data.VideoDataset(tmp_path / "a" / "videos" / "train", num_frames=8, img_size=64, train=False)
    listed = data.VideoDataset(a["train"], num_frames=8, img_size=64, train=False)
    assert folders.classes == data.DEMO_CLASSES
    assert [(p, l) for p, l in folders.samples] == [(p, l) for p, l in listed.samples]
    assert other["train"].read_bytes() == a["train"].read_bytes()  # same names, different videos


def test_data_demo_mover_stays_in_view_and_paired_classes_share_positions():
    # Every training crop keeps the region _SAFE in view: the whole mover must stay inside it.
    lo, hi = data._SAFE
    half = data._SHAPE_SIZE[1] / 2
    for label, name in enumerate(data.DEMO_CLASSES):
        rng = np.random.default_rng([7, label])
        paths = np.stack([data._trajectory(label, rng) for _ in range(300)])  # (videos, frames, 2) as (x, y)
        assert paths.min() >= lo + half and paths.max() <= hi - half, name
        span = np.linalg.norm(paths[:, -1] - paths[:, 0], axis=-1)  # 34-42 px at 72: into the next 16-px patch
        assert span.min() >= 34 and span.max() <= 42 and span.max() - span.min() > 6, name  # at 48 x 48
    # Opposite classes are the same random draw played backwards in time, so over a clip the mover visits the
    # same positions with the same probability: one frame cannot tell "move left" from "move right".
    def path(name, seed):
        return data._trajectory(data.DEMO_CLASSES.index(name), np.random.default_rng(seed))
    for seed in range(5):
        assert np.allclose(path("move left", seed), path("move right", seed)[::-1])
        assert np.allclose(path("move up", seed), path("move down", seed)[::-1])


# ----------------------------------------------------------------------------------------------------------
# train.py: settings, training, evaluation with its metrics, prediction, the halting map
# ----------------------------------------------------------------------------------------------------------

# A model far smaller than tiny() and a demo set of 3 training and 1 validation video per class: each run takes
# seconds. At 4 classes and 4 videos a step, an epoch is 3 steps, so a test can stop a run in the middle of one.
DEMO_TRAIN, DEMO_VAL = 3, 1  # videos per class
TRAIN_VIDEOS, VAL_VIDEOS = DEMO_TRAIN * len(data.DEMO_CLASSES), DEMO_VAL * len(data.DEMO_CLASSES)
BATCH = 4
STEPS = TRAIN_VIDEOS // BATCH  # an epoch's steps on 1 process
SMALL = ["--embed-dim", "32", "--depth", "4", "--heads", "2", "--frames", "4", "--batch-size", str(BATCH),
         "--log-every", "1", "--eval-every", "1"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo dataset with DEMO_TRAIN training and DEMO_VAL validation videos per class, shared by this module's
    tests."""
    root = tmp_path_factory.mktemp("demo")
    data.make_demo_dataset(root, num_train=DEMO_TRAIN, num_val=DEMO_VAL)
    return root


def small_run(demo, out, *extra):
    return ["--demo-root", str(demo), "--demo-videos", str(DEMO_TRAIN), str(DEMO_VAL), "--out", str(out), *SMALL,
            *extra]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_train_demo_preset_is_the_only_difference():
    demo_args = vars(train.parse_args([]))
    real_args = vars(train.parse_args(["--train", "t.txt", "--val", "v.txt"]))
    differ = {k for k in demo_args if demo_args[k] != real_args[k]}
    assert differ == set(train.DEMO_PRESET) | {"train", "val", "preset"}
    assert real_args["optimizer"] == "adam" and real_args["lr"] == 1e-5 and real_args["weight_decay"] == 1e-5
    assert real_args["epochs"] == 20 and real_args["warmup_epochs"] == 5 and real_args["clip_grad"] == 40
    assert train.parse_args(["--lr", "0.5"]).lr == 0.5  # a flag beats the preset


def test_train_threads_come_from_the_flag_then_the_environment_then_the_cores(monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train.cpu_threads(train.parse_args(["--threads", "5"]), world=1) == (5, "--threads", True)
    assert train.cpu_threads(train.parse_args([]), world=1) == (3, "OMP_NUM_THREADS", True)
    # torchrun sets OMP_NUM_THREADS=1 for each process it starts: several processes share the cores instead
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.cpu_threads(train.parse_args([]), world=2)[0] == max(1, os.cpu_count() // 2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert train.cpu_threads(train.parse_args([]), world=2)[0] == max(1, os.cpu_count() // 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.set_threads(train.parse_args(["--threads", "1"]), 1) is None  # a fixed count: no second look
    assert "CPU: 1 torch thread (--threads); OpenMP waiting: OMP_WAIT_POLICY=ACTIVE" in caplog.text


def test_train_threads_follow_the_cores_other_processes_leave_idle(tmp_path, monkeypatch, caplog):
    """Without --threads or OMP_NUM_THREADS, one process runs as many threads as the cores that the other
    processes left idle (from /proc/stat, this process's own CPU time taken out), at least 1, and looks again."""
    stat, clock, hz = tmp_path / "stat", {}, os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr(train, "PROC_STAT", stat)
    monkeypatch.setattr(train.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)

    def at(busy, own, wall):  # the machine's busy core-seconds (half user, half system), this process's, the clock
        stat.write_text(f"cpu  {busy * hz / 2:.0f} 7 {busy * hz / 2:.0f} {999 * hz} {3 * hz} 0 0 0 0 0\ncpu0 1 2\n")
        monkeypatch.setattr(train.time, "process_time", lambda: own)
        monkeypatch.setattr(train.time, "monotonic", lambda: wall)
        return train.cpu_seconds()

    args, since = train.parse_args([]), at(busy=100, own=5, wall=10)
    for busy, own, expect in ((0.3, 0.0, 4), (3.6, 1.0, 1), (3.2, 0.5, 1), (1.7, 0.0, 2), (4.0, 0.1, 1)):
        at(busy=100 + busy, own=5 + own, wall=11)  # one second later
        threads, why, fixed = train.cpu_threads(args, 1, since)
        assert (threads, why, fixed) == (expect, f"4 cores, {busy - own:.1f} busy with other processes", False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="train"):
            at(busy=100, own=5, wall=10)
            since = train.set_threads(args, 1)  # looks over 0.2 s: nothing else ran -> all 4 cores
            assert torch.get_num_threads() == 4 and since == train.cpu_seconds()
            at(busy=100 + 3.5, own=5 + 0.8, wall=11)
            assert train.set_threads(args, 1, since) and torch.get_num_threads() == 1
        said = [r.getMessage() for r in caplog.records]
        assert said == ["CPU: 4 torch threads (4 cores, 0.0 busy with other processes); OpenMP waiting: OpenMP's "
                        "default (spin a little, then sleep)",
                        "CPU: 1 torch thread from now on (4 cores, 2.7 busy with other processes)"]
    finally:
        torch.set_num_threads(before)
    stat.unlink()  # not Linux: the cores, shared by the local processes, and no second look
    assert train.cpu_threads(args, 1) == (4, "4 cores / 1 process(es)", True) and train.set_threads(args, 1) is None
    torch.set_num_threads(before)


def test_train_randaugment_on_for_real_data_off_in_the_demo_and_the_flag_wins(demo, monkeypatch):
    real = ["--train", str(demo / "train.txt"), "--val", str(demo / "val.txt")]
    assert train.parse_args(real).randaugment is True and train.parse_args([]).randaugment is False
    assert train.parse_args(real + ["--no-randaugment"]).randaugment is False
    assert train.parse_args(["--randaugment"]).randaugment is True
    hide_torchvision(monkeypatch)
    with pytest.raises(ImportError, match="--no-randaugment"):  # before any model is built
        train.build_data(train.parse_args(real), rank=0)
    train_set, _, _ = train.build_data(train.parse_args(real + ["--no-randaugment"]), rank=0)
    assert train_set.randaugment is False


def test_train_mode_default_follows_amp_and_a_flag_beats_it():
    real = ["--train", "t.txt", "--val", "v.txt"]
    assert train.parse_args(real).train_mode == train.TRAIN_MODE == "drop"
    assert train.parse_args(real + ["--amp"]).train_mode == train.AMP_TRAIN_MODE == "mask"
    assert train.parse_args(real + ["--amp", "--train-mode", "drop"]).train_mode == "drop"
    assert train.parse_args(["--train-mode", "mask"]).train_mode == "mask"


def test_train_evaluates_a_release_checkpoint_on_frame_folders(tmp_path, caplog):
    """--eval-only --init of a release-layout checkpoint on an mmaction2 frame-folder list, with no training set:
    the release-compatible forward comes on (logged) and both GFLOPs counts are reported; --no-release-compat
    and any other layout leave it off; --train-mode drop with it is an error."""
    source = random_video_model()
    torch.save({"state_dict": release_names(source.state_dict(), g=2)}, tmp_path / "release.pth")
    torch.save({"model": source.state_dict()}, tmp_path / "video.pth")
    lines = []
    for i in range(3):
        frames = data.render_demo_video(i, np.random.default_rng(i))  # (16, 72, 72, 3)
        write_jpeg_frames(tmp_path / "frames" / f"v{i}", frames)
        lines.append(f"frames/v{i} 16 {i}\n")
    val = _write(tmp_path / "val.txt", "".join(lines))
    flags = ["--eval-only", "--val", str(val), "--rawframes", "--frame-interval", "2", "--model", "tiny",
             "--embed-dim", "32", "--depth", "4", "--heads", "2", "--num-classes", "6", "--beta", "0",
             "--out", str(tmp_path / "run"), "--threads", "1"]
    with caplog.at_level(logging.INFO, logger="train"):
        compat = train.main(flags + ["--init", str(tmp_path / "release.pth")])
    assert "has the release's layout: release-compatible forward on" in caplog.text
    assert compat["val_videos"] == 3 and compat["val_gflops"] <= compat["val_gflops_release"]
    for init, extra in (("release.pth", ["--no-release-compat"]), ("video.pth", [])):
        plain = train.main(flags + ["--init", str(tmp_path / init), *extra])
        assert "val_gflops_release" not in plain and plain["val_top1"] >= 0
    with pytest.raises(train.UsageError, match="--train-mode drop: .*mask mode only"):
        train.parse_args(flags + ["--release-compat", "--train-mode", "drop"])
    assert train.parse_args(flags + ["--release-compat"]).train_mode == "mask"


def test_train_optimizer_groups_and_schedule():
    args = train.parse_args(["--train", "t.txt", "--val", "v.txt", "--epochs", "4", "--warmup-epochs", "1"])
    model = train.HaltingVT(train.HaltingVTConfig.tiny(embed_dim=32, depth=3, num_heads=2))
    optimizer = train.build_optimizer(model, args)
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "time_embed", "norm.weight", "head.bias"} <= no_decay_names
    assert all(p.ndim > 1 for p in decay["params"]) and "head.weight" not in no_decay_names
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    lrs = [train.lr_at(args, step / 10) for step in range(41)]  # 10 steps an epoch
    assert lrs[0] == pytest.approx(1e-6)  # warm-up starts at 0.1 x lr
    assert max(lrs) == pytest.approx(1e-5) and lrs.index(max(lrs)) == 10  # peak after the warm-up epoch
    assert lrs[25] == pytest.approx(0.5e-5) and lrs[40] == pytest.approx(0.0, abs=1e-12)  # cosine to 0


def test_train_average_precision():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.6]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    # class 0: positives ranked 1st and 3rd -> (1/1 + 2/3) / 2; class 1: its one positive ranked 1st -> 1
    assert train.average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_train_sanity_run_writes_metrics_and_checkpoints(demo, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the threads are train.py's choice: it looks again
    looks, set_threads, threads = [], train.set_threads, torch.get_num_threads()
    monkeypatch.setattr(train, "set_threads", lambda *a: looks.append(a[2:]) or set_threads(*a))
    try:
        metrics = train.main(small_run(demo, tmp_path, "--epochs", "2"))
    finally:
        torch.set_num_threads(threads)
    if train.cpu_seconds():  # Linux: before training, then after each epoch from where the last look ended
        assert len(looks) == 3 and looks[0] == () and all(len(since[0]) == 3 for since in looks[1:])
    said = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert said[0].startswith("CPU: ") and " torch threads (" in said[0] and "OpenMP waiting: " in said[0]
    assert said[1] == f"outputs: {tmp_path} (metrics.jsonl, last.pt, best.pt, final.json)"
    warm = train.DEMO_PRESET["halting_warmup"]
    assert f"halting warm-up: no halting nor ponder loss until epoch {warm / 2:g}, then both rise to full by " \
           f"epoch {warm:g}" in said
    assert said[-1].startswith(f"done in") and f"(outputs in {tmp_path})" in said[-1]
    assert all(line.endswith("halting off (warm-up)") for line in said if " step " in line)  # 2 of its epochs
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1] == json.loads((tmp_path / "final.json").read_text())
    assert "val_top5" not in metrics  # 4 demo classes: every class is in the top 5
    for key in ("epoch", "step", "train_loss", "val_top1", "val_motion_acc", "val_gflops",
                "dense_gflops", "halt_depth_mean", "halt_depth_hist", "tokens_per_layer", "elapsed_s"):
        assert key in metrics, key
    assert len(metrics["halt_depth_hist"]) == 2 and sum(metrics["halt_depth_hist"]) == pytest.approx(1)
    assert len(metrics["tokens_per_layer"]) == 4 and 1 <= metrics["halt_depth_mean"] <= 2
    assert 0 < metrics["val_gflops"] <= metrics["dense_gflops"] and metrics["val_videos"] == VAL_VIDEOS
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "epoch", "samples_in_epoch", "step", "world", "config", "rng"} <= ckpt.keys()
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * STEPS and ckpt["config"]["embed_dim"] == 32
    assert (tmp_path / "best.pt").is_file() and not list(tmp_path.glob("*.tmp"))
    # --eval-only on the saved weights gives the same figures
    again = train.main(small_run(demo, tmp_path / "eval", "--eval-only", "--resume", str(tmp_path / "last.pt")))
    assert again["val_top1"] == metrics["val_top1"] and again["val_gflops"] == pytest.approx(metrics["val_gflops"])


@pytest.mark.slow
def test_train_resume_is_exact(demo, tmp_path):
    train.main(small_run(demo, tmp_path / "straight", "--epochs", "2"))
    train.main(small_run(demo, tmp_path / "split", "--epochs", "2", "--stop-after", "1"))
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 1
    train.main(small_run(demo, tmp_path / "split", "--epochs", "2", "--resume", str(tmp_path / "split/last.pt")))
    assert_same_weights(weights(tmp_path / "straight/last.pt"), weights(tmp_path / "split/last.pt"))
    # a bare --resume takes the run's own flags (data, epochs, out, seed...) from the checkpoint, and leaves out
    # the flags this version no longer has (an older run's distribution prior)
    train.main(small_run(demo, tmp_path / "bare", "--epochs", "2", "--stop-after", "1"))
    ckpt = torch.load(tmp_path / "bare/last.pt", weights_only=True)
    ckpt["args"].update(alpha_d=0.1, depth_prior=[2.0, 1.0])
    checkpoints.write_checkpoint(tmp_path / "bare/last.pt", ckpt)
    train.main(["--resume", str(tmp_path / "bare/last.pt")])
    assert_same_weights(weights(tmp_path / "straight/last.pt"), weights(tmp_path / "bare/last.pt"))
    assert len((tmp_path / "bare/metrics.jsonl").read_text().splitlines()) == 2

@pytest.mark.slow
def test_train_two_stage_recipe_base_video_model_then_haltingvt(demo, tmp_path):
    """Sec. 4.1: stage 1 trains a Base Video Model (halting off, no Glimpser pruning); stage 2 starts HaltingVT
    from it with --init and its own settings. At lr 0, every stage-1 tensor must reach stage 2's checkpoint."""
    train.main(small_run(demo, tmp_path / "base", "--epochs", "1", "--no-halting", "--keep-ratio", "1.0"))
    base = weights(tmp_path / "base/last.pt")
    assert base["time_embed"].abs().sum() > 0 and base["glimpser.blocks.0.temporal_fc.weight"].abs().sum() > 0
    stage2_flags = ["--init", str(tmp_path / "base/last.pt"), "--lr", "0", "--keep-ratio", "0.5", "--beta", "-10",
                    "--halting-warmup", "0"]
    metrics = train.main(small_run(demo, tmp_path / "halting", "--epochs", "1", *stage2_flags))
    stage2 = torch.load(tmp_path / "halting/last.pt", weights_only=True)
    assert stage2["model"].keys() == base.keys()
    for name, value in base.items():
        assert torch.equal(stage2["model"][name], value), name
    assert stage2["config"]["halting"] and stage2["config"]["keep_ratio"] == 0.5 and stage2["config"]["beta"] == -10
    assert metrics["halt_depth_mean"] < 2  # of the 2 joint layers: stage 2 halts


def test_train_predict_top5_names_gflops_depth_and_a_bad_video(demo, tmp_path, capsys):
    train.main(small_run(demo, tmp_path / "run", "--epochs", "1"))
    ckpt_path = tmp_path / "run/last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["classes"] == data.DEMO_CLASSES  # from the demo's classes.txt beside its list file
    good = [demo / "videos/val/move left/0000.mp4", demo / "videos/val/move up/0000.mp4"]
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"1 of 3 videos could not be read: .*broken\.mp4"):
        train.main(["--predict", str(good[0]), str(bad), str(good[1]), "--resume", str(ckpt_path), "--json",
                    "--threads", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["video"] for r in lines] == [str(good[0]), str(bad), str(good[1])]
    assert "broken.mp4" in lines[1]["error"] and "top5" not in lines[1]
    model = HaltingVT(HaltingVTConfig(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["model"])
    for path, result in zip(good, lines[::2]):
        clip = data.eval_transform(data.read_clip(path, 4, train=False, short_side=data.DEMO_EVAL_SHORT_SIDE),
                                   model.cfg.img_size, data.DEMO_EVAL_SHORT_SIDE)  # the evaluation's pixels
        with torch.no_grad():
            out = model(clip.unsqueeze(0), drop_halted=True)
        probs = out.logits[0].softmax(0)
        order = probs.argsort(descending=True)[:5].tolist()
        assert len(order) == min(5, len(data.DEMO_CLASSES)) and [c["label"] for c in result["top5"]] == order
        assert [c["class"] for c in result["top5"]] == [data.DEMO_CLASSES[i] for i in order]
        assert [c["prob"] for c in result["top5"]] == pytest.approx(probs[order].tolist())
        assert result["gflops"] == pytest.approx(out.gflops[0].item())
        assert result["halt_depth_mean"] == pytest.approx(out.halt_depth[0].float().mean().item())
    folder = write_jpeg_frames(tmp_path / "frames", data.read_all_frames(good[0]).numpy())  # a frame folder too
    train.main(["--predict", str(folder), "--resume", str(ckpt_path), "--json", "--threads", "1"])
    clip = data.eval_transform(data.read_frames(folder, 4, short_side=data.DEMO_EVAL_SHORT_SIDE), model.cfg.img_size,
                               data.DEMO_EVAL_SHORT_SIDE)
    with torch.no_grad():
        probs = model(clip.unsqueeze(0), drop_halted=True).logits[0].softmax(0)
    result = json.loads(capsys.readouterr().out)
    assert [c["prob"] for c in result["top5"]] == pytest.approx(probs.sort(descending=True).values[:5].tolist())
    torch.save({**ckpt, "classes": None}, tmp_path / "unnamed.pt")
    train.main(["--predict", str(good[0]), "--resume", str(tmp_path / "unnamed.pt"), "--threads", "1"])
    text = capsys.readouterr().out.splitlines()
    best = lines[0]["top5"][0]
    assert text[0].startswith(f"{good[0]}: {lines[0]['gflops']:.4f} GFLOPs, mean halting depth")
    assert text[1] == f"  {best['prob']:.3f}  {best['label']}"  # indices without names
    assert len(text) == 1 + min(5, len(data.DEMO_CLASSES))  # the top 5, or every class when there are fewer


@pytest.mark.slow
def test_train_sigint_saves_and_resumes_mid_epoch(demo, tmp_path, monkeypatch):
    train.main(small_run(demo, tmp_path / "straight", "--epochs", "1"))
    calls = []
    forward_loss = train.forward_loss

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the second step
        return forward_loss(*a, **kw)

    monkeypatch.setattr(train, "forward_loss", interrupted)
    with pytest.raises(SystemExit) as stop:
        train.main(small_run(demo, tmp_path / "split", "--epochs", "1"))
    assert stop.value.code == 130  # 128 + SIGINT, after saving
    ckpt = torch.load(tmp_path / "split/last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["samples_in_epoch"], ckpt["step"]) == (0, 4, 1)  # the second step was not taken
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    monkeypatch.setattr(train, "forward_loss", forward_loss)
    train.main(small_run(demo, tmp_path / "split", "--epochs", "1", "--resume", str(tmp_path / "split/last.pt")))
    assert_same_weights(weights(tmp_path / "straight/last.pt"), weights(tmp_path / "split/last.pt"))


# Preemption and requeue: real signals to train.py run as a cluster job runs it (its own process group), then the
# same command again.

# train.py with each evaluation batch announced and slowed down, so that a test can signal during one
SLOW_EVAL = ("import sys, time, train\n"
             "add = train.add_eval_batch\n"
             "def announced(*a, **kw):\n"
             "    print('eval batch', flush=True)\n"
             "    time.sleep(0.3)\n"
             "    return add(*a, **kw)\n"
             "train.add_eval_batch = announced\n"
             "train.main(sys.argv[1:])\n")


def train_command(demo, out, *extra, slow_eval=False):
    """The small demo run as a job starts it: python train.py ..., one thread."""
    script = ["-c", SLOW_EVAL] if slow_eval else [str(Path(train.__file__))]
    return [sys.executable, *script, *small_run(demo, out, "--threads", "1", *extra)]


def run_job(cmd, actions=(), timeout=240):
    """Run `cmd` in its own process group; when a line of its log first contains a key of `actions`, call that
    action with the process. Returns (exit status, the log's lines)."""
    actions, lines = dict(actions), []
    p = subprocess.Popen(cmd, cwd=Path(train.__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        for line in p.stdout:
            lines.append(line)
            for key in [k for k in actions if k in line]:
                actions.pop(key)(p)
        return p.wait(), lines
    finally:
        timer.cancel()


def children(pid) -> list:
    """The ids of a process's child processes (Linux): a training process's DataLoader workers."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def epochs_recorded(out) -> list:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_sigterm_to_the_job_with_workers_then_the_same_command_goes_on(demo, tmp_path):
    """SIGTERM to the DataLoader workers alone changes nothing; SIGTERM to every process of the job (as a
    cluster sends it) saves last.pt after the step under way and exits 143; the same command again continues the
    run (a requeue), appends to metrics.jsonl and ends with the weights of a run that never stopped."""
    status, log = run_job(train_command(demo, tmp_path / "straight", "--epochs", "2"))
    assert status == 0, "".join(log[-20:])
    # --overwrite in a job script does not throw away the unfinished run of the same flags it finds
    job, workers = train_command(demo, tmp_path / "job", "--epochs", "2", "--workers", "2", "--overwrite"), []

    def term_workers(p):
        workers.extend(children(p.pid))
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    # the workers in the first step of epoch 2, the whole job in its second, before the epoch's last
    assert STEPS >= 3
    status, log = run_job(job, {f"step {STEPS + 1}/": term_workers,
                                f"step {STEPS + 2}/": lambda p: os.killpg(p.pid, signal.SIGTERM)})
    assert len(workers) == 2 and status == 143, "".join(log[-20:])
    ckpt, last = torch.load(tmp_path / "job/last.pt", weights_only=True), tmp_path / "job/last.pt"
    assert ckpt["step"] >= STEPS + 2 and epochs_recorded(tmp_path / "job") == [1]
    assert log[-1].rstrip().endswith(f"run the same command again, or: python {train.__file__} --resume {last}")
    status, log = run_job(job)
    assert status == 0 and f"resuming from {last}, epoch {ckpt['epoch'] + 1}, step {ckpt['step']}\n" in \
        "".join(log), "".join(log[-20:])
    assert epochs_recorded(tmp_path / "job") == [1, 2]
    assert_same_weights(weights(tmp_path / "straight/last.pt"), weights(last))


@pytest.mark.slow
def test_train_two_processes_stopped_mid_epoch_then_resumed_on_one(demo, tmp_path, monkeypatch, caplog):
    """SIGTERM to a torchrun job of 2 processes x 1 video, then the same flags on 1 process x 2 videos: the epoch
    goes on after the samples the 2 processes took, and the learning rate at every step is the schedule in
    epochs, recomputed here by hand."""
    flags = ["--epochs", "2", "--device", "cpu"]  # TRAIN_VIDEOS; demo preset: lr 1e-3, 1 warm-up epoch
    n = TRAIN_VIDEOS
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    status, log = run_job([*torchrun, *train_command(demo, tmp_path, *flags, "--batch-size", "1")[1:]],
                          {"step 2/": lambda p: os.killpg(p.pid, signal.SIGTERM)})  # n / 2 steps an epoch
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["world"] == 2 and ckpt["epoch"] == 0 and ckpt["samples_in_epoch"] == 2 * ckpt["step"], \
        "".join(log[-30:])

    def by_hand(epochs_done):
        if epochs_done < 1:
            return 1e-3 * (0.1 + 0.9 * epochs_done)
        return 1e-3 * (1 + math.cos(math.pi * (epochs_done - 1))) / 2

    logged = [re.search(r"epoch 1 step (\d+)/\d+ .* lr (\S+)", line) for line in log]
    logged = {int(m.group(1)): float(m.group(2)) for m in logged if m}
    assert len(logged) >= 2 and logged == pytest.approx({i: by_hand(2 * (i - 1) / n) for i in logged}, rel=1e-4)
    lrs, train_step = [], train.train_step

    def recorded(s, batch, stop):
        parts = train_step(s, batch, stop)
        lrs.append([group["lr"] for group in s.optimizer.param_groups])
        return parts

    monkeypatch.setattr(train, "train_step", recorded)
    with caplog.at_level(logging.INFO, logger="train"):
        train.main(small_run(demo, tmp_path, *flags, "--batch-size", "2"))
    assert "1 process(es) x 2 videos a step, was 2 x 1" in caplog.text
    taken = ckpt["samples_in_epoch"]
    done = [(taken + 2 * j) / n for j in range((n - taken) // 2)] + [1 + 2 * j / n for j in range(n // 2)]
    assert [lr for lr, _ in lrs] == pytest.approx([by_hand(e) for e in done], rel=1e-12, abs=1e-15)
    assert all(a == b for a, b in lrs)  # both parameter groups


@pytest.mark.slow
def test_train_sigkill_during_evaluation_keeps_the_epochs_training(demo, tmp_path):
    status, log = run_job(train_command(demo, tmp_path, "--epochs", "2", slow_eval=True),
                          {"eval batch": lambda p: os.killpg(p.pid, signal.SIGKILL)})
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert status == -signal.SIGKILL and (ckpt["epoch"], ckpt["samples_in_epoch"], ckpt["step"]) == (1, 0, STEPS)
    assert not (tmp_path / "metrics.jsonl").exists()  # only the evaluation is lost


@pytest.mark.slow
def test_train_sigterm_during_the_last_evaluation_stops_it_within_a_batch(demo, tmp_path):
    job = train_command(demo, tmp_path, "--epochs", "1", "--batch-size", "1", slow_eval=True)  # VAL_VIDEOS eval batches
    status, log = run_job(job, {"eval batch": lambda p: os.kill(p.pid, signal.SIGTERM)})
    assert status == 143 and log.count("eval batch\n") <= 2, "".join(log[-20:])
    assert "stopped during the evaluation of epoch 1" in log[-1] and not (tmp_path / "final.json").exists()
    status, log = run_job(job)  # the same command: the evaluation again, and the run is finished
    assert status == 0 and log.count("eval batch\n") == VAL_VIDEOS and (tmp_path / "final.json").exists()
    assert epochs_recorded(tmp_path) == [1]


def usage_error(capsys, argv) -> str:
    """The one line train.main prints for a mistake in `argv` (it exits with status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_train_out_with_a_finished_or_another_run_is_never_overwritten(demo, tmp_path, caplog, capsys):
    command = small_run(demo, tmp_path, "--epochs", "1")
    train.main(command)
    files = {name: (tmp_path / name).read_bytes() for name in train.RUN_FILES}
    assert re.search(r"finished run \(epoch 1 of 1\): choose another --out, or pass --overwrite to replace it; "
                     r"--resume .*last\.pt --eval-only evaluates it", usage_error(capsys, command))
    assert re.search(r"other flags \(--lr 0\.001 there, 0\.5 now\): choose another --out, or pass --overwrite to "
                     r"replace it; --resume .*last\.pt continues that run", usage_error(capsys, command + ["--lr", "0.5"]))
    with caplog.at_level(logging.INFO, logger="train"):
        final = train.main(["--resume", str(tmp_path / "last.pt")])
    assert "is a finished run (epoch 1 of 1): nothing to do" in caplog.text
    assert final == json.loads(files["final.json"])
    assert files == {name: (tmp_path / name).read_bytes() for name in train.RUN_FILES}  # nothing changed
    (tmp_path / "last.pt").unlink()
    assert "holds another run's best.pt, metrics.jsonl, final.json" in usage_error(capsys, command)
    train.main(command + ["--overwrite", "--lr", "0.5"])
    assert epochs_recorded(tmp_path) == [1] and weights(tmp_path / "best.pt").keys()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["args"]["lr"] == 0.5


@pytest.mark.slow
def test_train_nan_loss_stops_and_keeps_last_good_checkpoint(demo, tmp_path, monkeypatch):
    calls = []
    loss_fn = train.haltingvt_loss

    def nan_in_second_epoch(*a, **kw):
        calls.append(1)
        total, parts = loss_fn(*a, **kw)
        if len(calls) > STEPS:  # the second epoch goes bad
            total, parts = total * float("nan"), {**parts, "total": float("nan")}
        return total, parts

    monkeypatch.setattr(train, "haltingvt_loss", nan_in_second_epoch)
    with pytest.raises(train.NonFiniteLoss, match="loss is nan"):
        train.main(small_run(demo, tmp_path, "--epochs", "2"))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == STEPS
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.slow
def test_train_two_processes_end_with_identical_weights(demo, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(train.__file__)), *small_run(demo, tmp_path, "--epochs", "1", "--batch-size", "2",
                                                 "--threads", "1", "--device", "cpu")]  # gloo, on any machine
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "find_unused_parameters" not in done.stderr  # no warning the user cannot act on
    final = json.loads((tmp_path / "final.json").read_text())
    assert len(final["rank_weight_sha"]) == 2 and len(set(final["rank_weight_sha"])) == 1
    assert final["val_videos"] == VAL_VIDEOS  # each validation video counted once across the two ranks
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == TRAIN_VIDEOS // (2 * 2)  # 2 ranks x 2


def test_train_halting_ramp_is_off_then_linear_then_on():
    args = train.parse_args(["--halting-warmup", "10"])
    assert [train.halting_ramp(args, e) for e in (0, 4.9, 5, 7.5, 10, 30)] == [0, 0, 0, 0.5, 1, 1]
    assert train.halting_ramp(train.parse_args(["--halting-warmup", "0"]), 0) == 1


def test_train_best_checkpoint_waits_for_the_halting_warmup(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(train, "save", lambda s, path: saved.append(s.best))
    monkeypatch.setattr(train, "summary", lambda metrics: "")
    s = SimpleNamespace(args=train.parse_args(["--halting-warmup", "4", "--epochs", "6"]), rank=0, best=None)
    for epoch, top1 in [(1, 0.9), (3, 0.8), (4, 0.5), (5, 0.7), (6, 0.6)]:
        train.record({"epoch": epoch, "val_top1": top1}, s, tmp_path)
    assert saved == [0.5, 0.7]  # nothing while halting ramps up (epochs 1-3), then the best so far
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


@pytest.mark.slow
def test_train_class_folders_and_multi_label(demo, tmp_path):
    folders = ["--train", str(demo / "videos/train"), "--val", str(demo / "videos/val"), "--preset", "demo"]
    metrics = train.main(folders + small_run(demo, tmp_path / "folders", "--epochs", "1"))
    assert metrics["val_videos"] == VAL_VIDEOS and 0 <= metrics["val_top1"] <= 1
    # multi-label list file: each video also carries the next class's label
    lines = []
    for line in (demo / "train.txt").read_text().splitlines():
        path, label = line.rsplit(" ", 1)
        lines.append(f"{path} {label} {(int(label) + 1) % len(data.DEMO_CLASSES)}\n")
    (demo / "multi.txt").write_text("".join(lines))
    multi = ["--train", str(demo / "multi.txt"), "--val", str(demo / "multi.txt"), "--multi-label",
             "--preset", "demo"]
    metrics = train.main(multi + small_run(demo, tmp_path / "multi", "--epochs", "1"))
    assert 0 < metrics["val_map"] <= 1 and "val_top1" not in metrics and metrics["val_videos"] == TRAIN_VIDEOS


def test_train_build_data_labels_validation_by_the_training_classes(tmp_path, videos, caplog):
    caplog.set_level(logging.INFO)
    _class_folders(tmp_path / "train", ["abseiling", "bowling", "cartwheeling"], videos["v5"])
    _class_folders(tmp_path / "val", ["abseiling", "cartwheeling"], videos["v5"])
    args = train.parse_args(["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--no-randaugment"])
    train_set, val, num_classes = train.build_data(args, rank=0)
    assert num_classes == 3 and val.classes == train_set.classes
    assert [(p.parent.name, l) for p, l in val.samples] == [("abseiling", [0]), ("cartwheeling", [2])]
    assert "['bowling']" in caplog.text
    # a validation list file beside training folders, or the other way round: by index, and the log says so
    (tmp_path / "a").touch()
    args = train.parse_args(["--train", str(tmp_path / "train"), "--val", str(_write(tmp_path / "v.txt", "a 2\n")),
                              "--no-randaugment"])
    assert train.build_data(args, rank=0)[1].samples == [(tmp_path / "a", [2])]
    listed = _write(tmp_path / "t.txt", "train/abseiling/0.mp4 0\ntrain/bowling/0.mp4 1\n")
    args = train.parse_args(["--train", str(listed), "--val", str(tmp_path / "val"), "--no-randaugment"])
    assert train.build_data(args, rank=0)[1].samples[1][1] == [1]
    assert caplog.text.count("labels by index") == 2


EVAL_CFG = dict(embed_dim=32, depth=4, num_heads=2, num_frames=4, img_size=32)


def _eval_set(list_file, multi_label):
    """A seeded tiny model, and a list file's validation set as train.py builds it: (model, cfg, args, set)."""
    torch.manual_seed(0)
    cfg = HaltingVTConfig.tiny(**EVAL_CFG)
    args = train.parse_args(["--train", "t.txt", "--val", str(list_file), "--batch-size", "2"] +
                            (["--multi-label"] if multi_label else []))
    val = data.VideoDataset(list_file, num_frames=4, img_size=32, train=False, short_side=32, motion_pairs=True,
                            multi_label=multi_label, num_classes=cfg.num_classes)
    return HaltingVT(cfg).eval(), cfg, args, val


def _evaluate(list_file, multi_label, rank=0, world=1):
    model, cfg, args, val = _eval_set(list_file, multi_label)
    loader = data.epoch_loader(val, args.batch_size, 0, rank, world, train=False)
    return train.evaluate(model, loader, args, torch.device("cpu"), cfg)


@torch.no_grad()
def _by_hand(list_file, multi_label):
    """Each readable video through the model on its own: (its logits, label, gflops, N_k, motion correct)."""
    model, cfg, args, val = _eval_set(list_file, multi_label)
    rows = []
    for i in range(len(val)):
        batch = data.collate([val[i]])
        if "video" not in batch:
            continue
        out = model(batch["video"], drop_halted=True)  # (real, fake)
        motion = (out.motion_logits.argmax(1) == batch["motion"]).tolist()
        rows.append((out.logits[0], batch["label"][0], out.gflops[0].item(), out.halt_depth[0], motion))
    return rows


def test_train_evaluate_counts_each_readable_video_once(tmp_path, videos, caplog):
    for name in ("bad0.mp4", "bad1.mp4"):
        (tmp_path / name).write_bytes(b"not a video")
    # batches of 2: both videos of the first batch are unreadable
    lst = _write(tmp_path / "val.txt", f"bad0.mp4 0\nbad1.mp4 3\n{videos['v20']} 1\n{videos['v5']} 4\n"
                                       f"{videos['fast20']} 5\n")
    metrics = _evaluate(lst, multi_label=False)
    rows = _by_hand(lst, multi_label=False)
    assert metrics["val_videos"] == len(rows) == 3 and metrics["val_skipped"] == 2
    assert "2 unreadable videos left out" in caplog.text and "bad1.mp4" in caplog.text
    top1 = sum(logits.argmax().item() == label for logits, label, *_ in rows) / 3
    top5 = sum(label in logits.topk(5).indices for logits, label, *_ in rows) / 3
    depth = torch.cat([d for *_, d, _ in rows]).double()
    assert metrics["val_top1"] == pytest.approx(top1) and metrics["val_top5"] == pytest.approx(top5)
    assert metrics["val_gflops"] == pytest.approx(sum(r[2] for r in rows) / 3)
    assert metrics["halt_depth_mean"] == pytest.approx(depth.mean().item())
    assert metrics["val_motion_acc"] == pytest.approx(sum(sum(r[4]) for r in rows) / 6)
    assert 0 < top5  # the figures compared are not all zero
    nothing = _evaluate(_write(tmp_path / "bad.txt", "bad0.mp4 0\n"), multi_label=False)
    assert (nothing["val_videos"], nothing["val_skipped"]) == (0, 1) and math.isnan(nothing["val_top1"])


def test_train_no_top5_for_five_classes_or_fewer(tmp_path, videos):
    lst = _write(tmp_path / "val.txt", f"{videos['v20']} 1\n{videos['v5']} 0\n")
    _, _, args, val = _eval_set(lst, multi_label=False)
    model = HaltingVT(HaltingVTConfig.tiny(**EVAL_CFG, num_classes=2)).eval()
    metrics = train.evaluate(model, data.epoch_loader(val, 2, 0, train=False), args, torch.device("cpu"), model.cfg)
    assert "val_top5" not in metrics and "top-5" not in train.summary(metrics)
    assert train.summary(metrics).startswith(f"val top-1 {metrics['val_top1']:.3f} on 2 videos, motion acc")


def _assert_same_metrics(a, b):
    assert a.keys() == b.keys()
    for key in a:
        flat_a, flat_b = np.atleast_1d(np.asarray(a[key], float)), np.atleast_1d(np.asarray(b[key], float))
        np.testing.assert_allclose(flat_a, flat_b, rtol=1e-5, atol=1e-9, err_msg=key)  # nan == nan


def _evaluate_in_process(rank, world, init_file, lists, out_dir):
    """One of `world` processes (torch.multiprocessing.spawn): evaluate each (list file, multi_label)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = [_evaluate(lst, multi, rank, world) for lst, multi in lists]
    finally:
        torch.distributed.destroy_process_group()
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_train_evaluate_with_more_processes_than_videos(tmp_path, videos):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    v20, v5 = videos["v20"], videos["v5"]
    lists = [(_write(tmp_path / "single.txt", f"{v20} 1\n{v5} 4\n"), False),  # 2 videos: process 2 has none
             (_write(tmp_path / "multi.txt", f"{v20} 1 3\n{v5} 4 3\n"), True),
             (_write(tmp_path / "with_bad.txt", f"{v20} 1\nbad.mp4 0\n{v5} 4\n"), False)]  # 1: only bad.mp4
    alone = [_evaluate(lst, multi) for lst, multi in lists]
    assert [m["val_videos"] for m in alone] == [2, 2, 2] and [m["val_skipped"] for m in alone] == [0, 0, 1]
    rows = _by_hand(lists[1][0], multi_label=True)
    logits, targets = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    assert alone[1]["val_map"] == pytest.approx(train.average_precision(logits, targets))
    lists = [(str(lst), multi) for lst, multi in lists]
    torch.multiprocessing.spawn(_evaluate_in_process, args=(3, str(tmp_path / "init"), lists, str(tmp_path)),
                                nprocs=3)
    for rank in range(3):
        for one, three in zip(alone, json.loads((tmp_path / f"{rank}.json").read_text())):
            _assert_same_metrics(one, three)


def test_train_skips_a_corrupt_video(demo, tmp_path, caplog):
    lines = (demo / "train.txt").read_text().splitlines()
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    listing = "".join(f"{demo / line}\n" for line in lines) + f"{tmp_path}/broken.mp4 0\n"
    (tmp_path / "with_bad.txt").write_text(listing)
    args = ["--train", str(tmp_path / "with_bad.txt"), "--val", str(demo / "val.txt"), "--preset", "demo"]
    train.main(args + small_run(demo, tmp_path / "out", "--epochs", "1", "--batch-size", str(len(lines) + 1)))
    assert "1 bad video skipped" in caplog.text and "broken.mp4" in caplog.text  # the plural right


def loop_masks(keep_index, halt_depth, S, layers):
    """The obviously-correct reference: token 1 + t*k + j is frame t, patch keep_index[t][j], with depth N."""
    T = len(keep_index) if keep_index is not None else (len(halt_depth) - 1) // S
    kept = [[keep_index[t][j] for j in range(len(keep_index[t]))] if keep_index is not None else list(range(S))
            for t in range(T)]
    masks = torch.zeros(1 + len(layers), T, S, dtype=torch.bool)
    for t in range(T):
        for j, s in enumerate(kept[t]):
            n = int(halt_depth[1 + t * len(kept[t]) + j])
            masks[0, t, s] = True
            for i, layer in enumerate(layers, start=1):
                masks[i, t, s] = n >= layer
    return masks


def test_map_active_token_masks_match_a_loop():
    g = torch.Generator().manual_seed(0)
    T, S, k, L = 3, 16, 6, 4
    keep = torch.stack([torch.randperm(S, generator=g)[:k] for _ in range(T)])  # (T, k)
    depth = torch.randint(1, L + 1, (1 + T * k,), generator=g)
    got = train.active_token_masks(keep, depth, S, [1, 2, 4])
    assert torch.equal(got, loop_masks(keep.tolist(), depth.tolist(), S, [1, 2, 4]))
    assert got[0].sum() == T * k and torch.equal(got[1], got[0])  # every kept token runs joint layer 1
    depth = torch.randint(1, L + 1, (1 + T * S,), generator=g)  # no Glimpser
    assert torch.equal(train.active_token_masks(None, depth, S, [3]), loop_masks(None, depth.tolist(), S, [3]))


def test_map_darkens_exactly_the_pruned_and_halted_tokens():
    torch.manual_seed(0)
    cfg = HaltingVTConfig.tiny(embed_dim=32, depth=6, num_heads=2, num_frames=4, beta=1.0)
    model = HaltingVT(cfg).eval()
    clip = torch.randint(40, 256, (4, 64, 64, 3), dtype=torch.uint8)  # >= 40: darkening changes every pixel
    video = data.eval_transform(clip, 64, 64)  # (C, T, H, W)
    layers = [2, 3, 4]
    with torch.no_grad():
        out = model(video.unsqueeze(0), drop_halted=True)
    p, S = cfg.patch_size, 16
    expected = loop_masks(out.keep_index[0].tolist(), out.halt_depth[0].tolist(), S, layers)
    assert (~expected[0]).any() and (expected[0] & ~expected[-1]).any() and expected[-1].any()  # a real test
    masks = train.active_token_masks(out.keep_index[0], out.halt_depth[0], S, layers)
    image = train.halting_map(train.display_frames(video), masks, p, scale=2)
    tile_h, tile_w = 2 * 64 + train.GAP, 2 * 64 + train.GAP
    assert image.shape == ((1 + len(expected)) * tile_h, 4 * tile_w, 3)

    def patch(row, t, s):
        top, left = row * tile_h + 2 * p * (s // 4), t * tile_w + 2 * p * (s % 4)
        return image[top:top + 2 * p, left:left + 2 * p].astype(np.float64)

    for t in range(4):
        for s in range(S):
            original = patch(0, t, s)
            assert np.array_equal(original, np.repeat(np.repeat(clip[t, 16 * (s // 4):16 * (s // 4 + 1),
                                  16 * (s % 4):16 * (s % 4 + 1)].numpy(), 2, 0), 2, 1))  # the input row
            for r in range(len(expected)):
                shown = patch(1 + r, t, s)
                if expected[r, t, s]:
                    assert np.array_equal(shown, original), (r, t, s)
                else:
                    assert np.array_equal(shown, np.round(original * train.DARKEN)), (r, t, s)


def test_map_png_round_trips_through_pyav(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (70, 130, 3), dtype=np.uint8)
    train.write_png(tmp_path / "x.png", image)
    with av.open(str(tmp_path / "x.png")) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(decoded, image) and not list(tmp_path.glob("*.tmp"))


def test_map_labels_are_drawn_in_the_picture():
    one = [".#.", "##.", ".#.", ".#.", "###"]  # the font's "1", written out
    expected = np.array([[c == "#" for c in row + "."] for row in one])
    assert np.array_equal(train.text_mask("1", scale=1), expected)
    assert np.array_equal(train.text_mask("1", scale=2), expected.repeat(2, 0).repeat(2, 1))
    assert train.text_mask("joint layer 2", 1).shape == (5, 4 * 13) and train.text_mask("Gg", 1)[:, :4].any()
    rows, columns, tile = ["input", "Glimpser", "joint layer 3"], ["frame 0", "frame 17"], 40
    image = np.full((3 * tile, 2 * tile, 3), 128, np.uint8)
    out = train.label_map(image, rows, columns)
    top, left = out.shape[0] - image.shape[0], out.shape[1] - image.shape[1]
    assert (top, left) == (14, 2 * 2 + 4 * 2 * len("joint layer 3")) and np.array_equal(out[top:, left:], image)
    for i, name in enumerate(rows):  # each row's name, black on white, left of its row
        mask = train.text_mask(name)
        band = out[top + i * tile:top + (i + 1) * tile, :left, 0]
        y = (tile - mask.shape[0]) // 2
        assert np.array_equal(band[y:y + mask.shape[0], 2:2 + mask.shape[1]] == 0, mask)
        assert (band == 0).sum() == mask.sum()
    for j, name in enumerate(columns):  # each column's frame above it, cut at the column's width
        mask = train.text_mask(name)[:, :tile]
        assert np.array_equal(out[2:12, left + j * tile:left + j * tile + mask.shape[1], 0] == 0, mask)


def test_map_command_from_a_trained_checkpoint(demo, tmp_path):
    """The map shows what the checkpoint's own weights do with the video. The run's checkpoint gets gamma 20 and a
    beta between its class token's channel 0 after joint layer 1 and its highest patch's, so some patches halt at
    joint layer 1 and the class token runs on: a picture that other weights would not give."""
    train.main(small_run(demo, tmp_path / "run", "--epochs", "1"))
    video_path = demo / "videos/val/move left/0000.mp4"
    ckpt = torch.load(tmp_path / "run/last.pt", weights_only=True)
    model = HaltingVT(HaltingVTConfig(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["model"])
    video = data.eval_clip(video_path, model.cfg.num_frames, model.cfg.img_size, ckpt["args"]["eval_short_side"])
    with torch.no_grad():  # channel 0 after joint layer 1: beta 0 makes the score sigmoid(gamma * x0)
        score = model.train()(video[None], drop_halted=False, beta=0.0).halt_scores[0, 0].double()
    x0 = torch.logit(score) / ckpt["config"]["gamma"]
    assert x0[1:].max() > x0[0] + 0.1
    threshold = (x0[0] + x0[1:].max()).item() / 2
    ckpt["config"].update(gamma=20.0, beta=20 * threshold - math.log(0.995 / 0.005))  # x0 > threshold halts
    checkpoints.write_checkpoint(tmp_path / "run/last.pt", ckpt)
    S = (model.cfg.img_size // model.cfg.patch_size) ** 2
    kept = math.ceil(model.cfg.keep_ratio * S) / S  # the share of patches the Glimpser keeps
    expected = {}
    for from_file in (True, False):
        torch.manual_seed(0)
        model = HaltingVT(HaltingVTConfig(**ckpt["config"])).eval()
        if from_file:
            model.load_state_dict(ckpt["model"])
        with torch.no_grad():
            out = model(video[None], drop_halted=True)
        expected[from_file] = loop_masks(out.keep_index[0].tolist(), out.halt_depth[0].tolist(), S, [1, 2])
    masks = expected[True]
    assert masks[2].any() and (masks[1] & ~masks[2]).any()  # some kept patches halt at joint layer 1, not all
    assert not torch.equal(masks, expected[False])  # fresh weights would draw another map

    result = train.main(["--halting-map", str(video_path), "--resume", str(tmp_path / "run/last.pt"),
                         "--threads", "1"])
    assert result["path"] == str(tmp_path / "run/halting_map.png")  # default: next to the checkpoint
    assert list(result["active"]) == ["Glimpser", "joint layer 2"]  # 2 joint layers: the default shows layer 2
    assert result["active"]["Glimpser"] == pytest.approx(kept)  # ceil(R S) of every frame's patches
    assert result["active"]["joint layer 2"] == pytest.approx(masks[2].float().mean().item())
    with av.open(result["path"]) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    # input, Glimpser, layer 2 of 4 frames; above them the frame numbers, left of them the row names
    labels, side = (7 * 2, 2 * 2 + 4 * 2 * len("joint layer 2")), 2 * model.cfg.img_size + train.GAP
    assert decoded.shape == (labels[0] + 3 * side, labels[1] + 4 * side, 3)
    picture = train.halting_map(train.display_frames(video), masks[[0, 2]], model.cfg.patch_size)  # input, rows
    assert np.array_equal(decoded[labels[0]:, labels[1]:], picture)
    again = train.main(["--halting-map", str(video_path), "--resume", str(tmp_path / "run/last.pt"), "--threads",
                        "1", "--out", str(tmp_path / "map"), "--map-layers", "1", "2"])
    assert list(again["active"]) == ["Glimpser", "joint layer 1", "joint layer 2"]
    assert again["active"]["joint layer 1"] == pytest.approx(kept)


def usage_mistakes(demo, tmp):
    """{name: (flags, the error line expected)}: each mistake a newcomer makes, on the demo set's files."""
    real = ["--train", str(demo / "train.txt"), "--val", str(demo / "val.txt"), "--no-randaugment"]
    (tmp / "notes.txt").write_text("not a video\n")
    (tmp / "text_as_video.txt").write_text(f"{tmp / 'notes.txt'} 0\n")
    lines = [f"{demo / path} {label}" for path, label in (line.rsplit(" ", 1) for line in
                                                          (demo / "train.txt").read_text().splitlines())]
    (tmp / "lists").mkdir(exist_ok=True)
    shutil.copy(demo / "classes.txt", tmp / "lists/classes.txt")
    n = len(data.DEMO_CLASSES)  # the first label beyond them
    (tmp / "lists/train.txt").write_text("\n".join(lines + [lines[0].rsplit(" ", 1)[0] + f" {n}"]) + "\n")
    _class_folders(tmp / "walk", ["walk"], demo / "videos/val/move up/0000.mp4")
    zipfile.ZipFile(tmp / "clips.zip", "w").writestr("a.txt", "hi")
    torch.save({"weights": torch.ones(2)}, tmp / "other.pth")
    missing = str(tmp / "missing.txt")
    return {
        "frames 0": (["--frames", "0"], r"--frames 0: must be a positive integer"),
        "not an int": (["--frames", "x"], r"--frames: invalid int value: 'x'"),
        "size not a multiple of 16": (["--img-size", "60"], r"--img-size 60: must be a multiple of patch_size=16"),
        "a default made invalid": (["--depth", "2"], r"--glimpser-depth 2 \(--model tiny's\): must be in \[0, depth=2"),
        "batch size 0": (["--batch-size", "0"], r"--batch-size 0: must be at least 1"),
        "negative lr": (["--lr", "-1"], r"--lr -1.0: must be at least 0"),
        "short side below the crop": (["--eval-short-side", "40"], r"--eval-short-side and --train-scale must be at "
                                                                   r"least the crop, 48 \(--img-size\)"),
        "unknown model": (["--model", "big"], r"--model: invalid choice: 'big'"),
        "missing path": (["--train", missing, "--val", missing, "--no-randaugment"],
                         f"--train {re.escape(missing)}: No such file or directory$"),
        "label out of range": (real + ["--num-classes", "3"], r"--train .*train\.txt, line \d+: label [345] is outside"
                                                              r" \[0, 3\)"),
        "label beyond classes.txt": (["--train", str(tmp / "lists/train.txt")] + real[2:],
                                     rf"--train .*train\.txt, line {len(lines) + 1}: label {n} is outside \[0, {n}\), "
                                     rf"beyond the {n} classes .*classes\.txt names"),
        "unknown class folder": (["--train", str(demo / "videos/train"), "--val", str(tmp / "walk")] + real[4:],
                                 rf"--val .*walk: class folders \['walk'\] are not among the {n} training classes"),
        "text file for --init": (real + ["--init", str(tmp / "notes.txt")], r"--init .*notes\.txt: not a checkpoint"),
        "zip for --init": (real + ["--init", str(tmp / "clips.zip")], r"--init .*clips\.zip: a zip archive but not a"
                                                                      r" checkpoint torch\.save wrote"),
        "no weights for --init": (real + ["--init", str(tmp / "other.pth")], r"--init .*other\.pth: no ViT weights"),
        "text file as a video": (["--train", str(tmp / "text_as_video.txt"), "--val", str(tmp / "text_as_video.txt"),
                                  "--on-error", "raise", "--batch-size", "1", "--no-randaugment"],
                                 r"--on-error raise: cannot decode video .*notes\.txt"),
        "eval-only untrained": (["--eval-only"], r"--eval-only needs weights to evaluate: --resume"),
        "predict without a checkpoint": (["--predict", "x.mp4"], r"--predict needs --resume CHECKPOINT"),
        "missing checkpoint": (["--resume", str(tmp / "run.pt")], r"--resume .*run\.pt: No such file or directory$"),
        "not a run's checkpoint": (["--resume", str(tmp / "other.pth")], r"--resume .*other\.pth: not written by "
                                                                        r"train\.py .* pass it to --init"),
        "real preset without data": (["--preset", "real"], r"--preset real needs --train and --val"),
    }


MISTAKES = ["frames 0", "not an int", "size not a multiple of 16", "a default made invalid", "batch size 0",
            "negative lr", "short side below the crop", "unknown model", "missing path", "label out of range",
            "label beyond classes.txt", "unknown class folder", "text file for --init", "zip for --init",
            "no weights for --init", "text file as a video", "eval-only untrained", "predict without a checkpoint",
            "missing checkpoint", "not a run's checkpoint", "real preset without data"]


@pytest.mark.parametrize("name", MISTAKES)
def test_train_each_mistake_is_one_line_naming_the_flag_and_status_2(demo, tmp_path, capsys, name):
    mistakes = usage_mistakes(demo, tmp_path)
    assert list(mistakes) == MISTAKES
    flags, expected = mistakes[name]
    with pytest.raises(SystemExit) as stop:
        train.main(small_run(demo, tmp_path / "out", "--threads", "1") + flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(f"error: {expected}.*", errors[0]), err


@pytest.mark.slow
def test_train_command_line_errors_without_traceback_unless_asked(tmp_path, monkeypatch):
    """The real command: one line and status 2; HALTINGVT_DEBUG=1 shows the traceback; a torchvision that does not
    import stops a real-data run before anything is written, with the pip command that installs the right one."""
    script, env = str(Path(train.__file__)), {**os.environ, "OMP_NUM_THREADS": "1"}
    def run(*flags, **extra):
        return subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120, env={**env, **extra})

    done = run("--frames", "0")
    assert (done.returncode, done.stderr) == (2, "error: --frames 0: must be a positive integer\n")
    debug = run("--frames", "0", HALTINGVT_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UsageError: --frames 0" in debug.stderr
    broken_torchvision(monkeypatch, tmp_path / "site")
    (tmp_path / "t.txt").write_text("a.mp4 0\n")
    done = run("--train", "t.txt", "--val", "t.txt", "--out", "run", PYTHONPATH=str(tmp_path / "site"))
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and not (tmp_path / "run").exists()
    assert re.fullmatch(r"error: RandAugment needs torchvision, which does not import here \(RuntimeError: operator "
                        r"torchvision::nms does not exist\): install the build for torch \S+ with `pip install "
                        r"torchvision==0\.\d+\.\d+.*`, or pass --no-randaugment to train\.py\n", done.stderr)


def test_train_a_broken_torchvision_stops_before_any_work(demo, tmp_path, monkeypatch, capsys):
    broken_torchvision(monkeypatch, tmp_path / "site")
    flags = ["--train", str(demo / "train.txt"), "--val", str(demo / "val.txt"), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        train.main(flags)
    assert stop.value.code == 2 and "operator torchvision::nms does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_gradients_averaged_as_ddp_does(monkeypatch):
    """average_gradients against a second process faked in all_reduce: a gradient missing on one process counts
    as zero, one missing on both stays None."""
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 3), "b": torch.nn.Linear(3, 1), "c": torch.nn.Linear(1, 1)})
    mine = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "b.weight": None, "b.bias": None,
            "c.weight": None, "c.bias": None}
    theirs = {"a.weight": torch.randn(3, 2), "a.bias": None, "b.weight": torch.randn(1, 3), "b.bias": torch.randn(1),
              "c.weight": None, "c.bias": None}
    for name, p in model.named_parameters():
        p.grad = None if mine[name] is None else mine[name].clone()
    other = torch.cat([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1),
                                  torch.tensor([float(g is not None)])])
                       for (name, p), g in zip(model.named_parameters(), theirs.values())])
    monkeypatch.setattr(train, "all_reduce", lambda t, op=None: t.add_(other))
    train.average_gradients(model, world=2)
    for name, p in model.named_parameters():
        if mine[name] is None and theirs[name] is None:
            assert p.grad is None, name
        else:
            zero = torch.zeros_like(p)
            expected = ((mine[name] if mine[name] is not None else zero) +
                        (theirs[name] if theirs[name] is not None else zero)) / 2
            assert torch.equal(p.grad, expected), name


# ----------------------------------------------------------------------------------------------------------
# bench.py: speed, video reading and the ablation
# ----------------------------------------------------------------------------------------------------------

def test_bench_stand_in_clips_pan_the_named_way_and_the_disc_falls():
    left, right, fall = (bench.stand_in_clip(kind, 0, frames=10, height=60, width=80) for kind in bench.CLIP_CLASSES)
    # 200 px over 10 frames: 20 px a frame; panning left, the scene moves left (what was at x + 20 is now at x)
    assert np.array_equal(left[1][:, :-20], left[0][:, 20:]) and not np.array_equal(left[1], left[0])
    assert np.array_equal(right[1][:, 20:], right[0][:, :-20])
    disc = (fall == (230, 60, 40)).all(-1)  # (frames, H, W)
    assert np.all(np.diff([np.argwhere(d)[:, 0].mean() for d in disc]) > 0)  # its mean row goes down
    off = ~(disc[0] | disc[-1])
    assert np.array_equal(fall[0][off], fall[-1][off])  # and the scene stays still


def test_bench_sanity_run_keeps_the_log_and_names_it_when_train_fails(tmp_path, monkeypatch):
    """--sanity keeps each run's log (a row's odd time can be looked up); a failed run names that log."""
    def fake_train(cmd, **kwargs):  # stands in for `python train.py --seed N --out OUT ...`
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "final.json").write_text(json.dumps({"val_top1": 0.5}))
        return subprocess.CompletedProcess(cmd, int(cmd[cmd.index("--seed") + 1]), "CPU: 2 torch threads\n", "warn\n")
    monkeypatch.setattr(bench.subprocess, "run", fake_train)
    assert bench.sanity_run(0, tmp_path)["val_top1"] == 0.5
    assert (tmp_path / "seed0" / "train.log").read_text() == "CPU: 2 torch threads\nwarn\n"
    with pytest.raises(SystemExit, match=r"--seed 3 failed \(3\).*seed3/train\.log"):
        bench.sanity_run(3, tmp_path)
    assert (tmp_path / "seed3" / "train.log").exists()


def test_bench_json_last_line_has_the_required_keys(capsys):
    bench.main(["--json", "--quick", "--tiny", "--batch", "1", "--repeats", "1", "--matmul-size", "128"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"device", "matmul_gflops_per_s", "rows"} <= set(result)
    assert result["matmul_gflops_per_s"] > 0
    names = {r["name"] for r in result["rows"]}
    assert "dense" in names and len(names) >= 4
    assert {r["mode"] for r in result["rows"]} == {"dense", "drop", "mask"}
    for r in result["rows"]:
        assert {"name", "mode", "batch", "gflops_per_video", "ms_per_video", "speedup", "gflops_ratio",
                "of_matmul"} <= set(r)
        assert r["gflops_per_video"] > 0 and r["ms_per_video"] > 0
    dense = next(r for r in result["rows"] if r["name"] == "dense")
    assert dense["mode"] == "dense" and dense["speedup"] == 1.0
    assert all(r["gflops_ratio"] < 1 for r in result["rows"] if r["mode"] != "dense")


def test_bench_data_mode_prints_its_keys(tmp_path, videos, capsys):
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None  # Linux only
    result = bench.main(["--data", "--data-video", str(videos["v20"]), "--data-dir", str(tmp_path), "--repeats", "2",
                         "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == result and out[1].split()[:3] == ["video", "size", "frames"]
    (row,) = result["data"]
    assert {"name", "video", "frames", "clip_frames", "s_per_sample", "samples_per_s", "decoded_per_clip",
            "minimum_per_clip"} <= set(row)
    assert row["name"] == "v20.mp4" and row["video"] == "48x32" and row["frames"] == 20 and row["clip_frames"] == 8
    assert 0 < row["minimum_per_clip"] <= row["decoded_per_clip"] <= 20 and row["samples_per_s"] > 0
    assert cores is None or os.sched_getaffinity(0) == cores  # the timing ran on one core; the cores came back


def test_bench_measure_times_the_rows_round_robin():
    """Every round runs each row once (so drift touches all rows alike); warm-up rounds are run, not counted."""
    calls = []
    seconds = bench.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"),
                            warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_bench_train_step_rows():
    rows = list(bench.train_rows(quick=True, device=torch.device("cpu"), warmup=0, repeats=1, batch=2))
    assert [(r["name"], r["mode"]) for r in rows] == [("tiny", "mask"), ("tiny", "drop")]
    assert all(r["ms_per_step"] > 0 for r in rows)


def test_bench_step_by_part_covers_the_whole_step(tmp_path):
    step = bench.demo_step(tmp_path, ["--embed-dim", "32", "--depth", "4", "--heads", "2", "--batch-size", "4"])
    step()  # the first fills the cache
    start = time.perf_counter()
    parts = step()
    total = time.perf_counter() - start
    assert list(parts) == list(bench.STEP_PARTS)
    assert all(t > 0 for t in parts.values()), parts  # every hook fired, in the order the parts assume
    assert sum(parts.values()) == pytest.approx(total, rel=0.05)


def test_bench_busy_processes_run_beside_the_block_and_end_with_it():
    with bench.busy(2):
        spinners = [p for p in child_commands() if "while True" in p]
        assert len(spinners) == 2
    assert not [p for p in child_commands() if "while True" in p]


def child_commands() -> list:
    """The command lines of this process's children (from /proc: Linux)."""
    me, out = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                out.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError):
            pass  # a process that ended while we looked
    return out


def test_ablation_rows_are_tables_1_and_2():
    rows = bench.ablation_rows(train.parse_args([]))
    table1 = [(r["glimpser_depth"] == 0, r["keep_ratio"], r["alpha_m"] > 0) for r in rows[:8]]
    assert table1 == [(True, None, True), (True, None, False)] + [
        (False, R, m) for R in (0.3, 0.5, 0.7) for m in (True, False)]
    beta = train.DEMO_PRESET["beta"]  # the sanity run's
    assert all(r["beta"] == beta for r in rows[:8])
    assert [r["beta"] for r in rows[8:]] == [beta * 0.5, beta * 1.5, beta * 2]
    assert all(r["keep_ratio"] == 0.5 and r["alpha_m"] > 0 for r in rows[8:])


@pytest.mark.slow
def test_ablation_command_writes_one_line_per_row(demo, tmp_path, monkeypatch):
    rows = bench.ablation_rows
    monkeypatch.setattr(bench, "ablation_rows", lambda args: rows(args)[1:3])  # no Glimpser w/o motion; R=0.3
    lines = bench.main(small_run(demo, tmp_path, "--ablation", "--epochs", "1"))
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert table[0].startswith("Made by `python bench.py ") and "--ablation" in table[0]
    assert table[2] == "| " + " | ".join(bench.ABLATION_COLUMNS) + " |" and table[4:] == lines
    cells = [line.strip("| ").split(" | ") for line in lines]
    beta = f"{train.DEMO_PRESET['beta']:g}"
    assert [c[:5] for c in cells] == [["no Glimpser", "-", "no", beta, "0"], ["Glimpser", "0.3", "yes", beta, "0"]]
    ratios = [float(c[7]) for c in cells]
    assert all(0 < r <= 1 for r in ratios) and ratios[1] < ratios[0]  # the Glimpser saves compute
    no_motion = torch.load(next(tmp_path.glob("00_*")) / "last.pt", weights_only=True)
    assert no_motion["config"]["motion_head"] is False and no_motion["config"]["glimpser_depth"] == 0


def test_ablation_summary_averages_each_row_over_its_seeds():
    rows = bench.ablation_rows(train.parse_args([]))[:2]

    def metrics(top1, gflops, depth):
        return dict(val_top1=top1, val_gflops=gflops, dense_gflops=0.1, halt_depth_mean=depth)
    results = [(rows[0], 0, metrics(0.5, 0.02, 1.0)), (rows[0], 1, metrics(0.8, 0.04, 2.0)),
               (rows[0], 2, metrics(0.2, 0.03, 3.0)), (rows[1], 0, metrics(0.9, 0.05, 4.0))]
    first, second = (line.strip("| ").split(" | ") for line in bench.ablation_summary(results))
    beta = f"{train.DEMO_PRESET['beta']:g}"
    assert first == ["no Glimpser", "-", "yes", beta, "3", "0.500 (0.200-0.800)", "0.30", "2.00"]
    assert second == ["no Glimpser", "-", "no", beta, "1", "0.900 (0.900-0.900)", "0.50", "4.00"]


@pytest.mark.slow
def test_ablation_with_seeds_writes_their_summary(demo, tmp_path, monkeypatch):
    rows = bench.ablation_rows
    monkeypatch.setattr(bench, "ablation_rows", lambda args: rows(args)[2:3])  # R = 0.3 with the Motion Loss
    lines = bench.main(small_run(demo, tmp_path, "--ablation", "--epochs", "1", "--ablation-seeds", "0", "1"))
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert [line.strip("| ").split(" | ")[4] for line in lines] == ["0", "1"]  # one line per seed
    assert table[table.index("Over the seeds:") + 2] == "| " + " | ".join(bench.SUMMARY_COLUMNS) + " |"
    top1 = [float(line.strip("| ").split(" | ")[5]) for line in lines]
    assert table[-1].split(" | ")[4:6] == ["2", f"{sum(top1) / 2:.3f} ({min(top1):.3f}-{max(top1):.3f})"]


def test_ablation_stale_demo_folder_is_rebuilt(demo, monkeypatch):
    assert data.demo_dataset_ready(demo, num_train=DEMO_TRAIN, num_val=DEMO_VAL)
    assert f"version={data.DEMO_VERSION} " in (demo / "DONE").read_text()
    monkeypatch.setattr(data, "DEMO_VERSION", data.DEMO_VERSION + 1)  # the generator changed
    assert not data.demo_dataset_ready(demo, num_train=DEMO_TRAIN, num_val=DEMO_VAL)


def test_bench_profile_sorts_ops_by_kind(capsys):
    assert bench.kind_of("aten::addmm") == bench.kind_of("aten::mm") == "matmul (Linear, conv)"
    assert bench.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention kernel"
    assert bench.kind_of("aten::add") == bench.kind_of("aten::gelu_") == "elementwise (GELU, LayerNorm, adds)"
    assert bench.kind_of("aten::index_put") == "copies and bookkeeping" and bench.kind_of("aten::view") == bench.OTHER
    result = bench.main(["--profile", "--tiny", "--repeats", "1", "--matmul-size", "128"])
    assert [(p["name"], p["mode"]) for p in result["profile"]] == [("dense", "dense"), ("halt R=0.5 beta=4", "drop")]
    for p in result["profile"]:
        assert p["ms_by_kind"]["matmul (Linear, conv)"] > 0 and p["ms_by_kind"]["attention kernel"] > 0
        assert sum(p["top_ops_ms"].values()) <= sum(p["ms_by_kind"].values()) + 1e-9
    parts = result["attention"]  # the dense model's attention taken apart: tiny has 1 + 8 frames x 16 patches
    assert parts["tokens"] == 129 and parts["gflops"] == pytest.approx(2 * 129 ** 2 * 64 / 1e9)  # QK^T + AV
    assert set(parts["ms"]) == {"kernel", "QK^T", "softmax", "AV", "matmul"} and min(parts["ms"].values()) > 0
    out = capsys.readouterr().out
    assert "of op self time per forward" in out and "dense attention over 129 tokens" in out
