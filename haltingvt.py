"""HaltingVT (Wu et al., "HaltingVT: Adaptive Token Halting Transformer for Efficient Video Recognition") in
pure PyTorch, written to read beside the paper:

    video (B, C, T, H, W)
      -> patch embedding + space and time embeddings               (Sec. 3.1)
      -> Glimpser: divided space-time layers, then top-K per frame  (Sec. 3.3, Eq. 7)
      -> joint space-time layers with per-token ACT halting         (Sec. 3.2, Eqs. 2-4)
      -> halting-weighted class token -> norm -> classifier          (Eq. 6)
                                          -> motion head (real/fake)  (Sec. 3.4, Eq. 8)

Halted tokens really leave the computation (the authors' release only multiplies them by zero), so time falls
with the FLOPs. `drop_halted` picks one of two executions of the same math, with the same logits: drop removes
halted tokens and packs the samples' live tokens back to back, without padding; mask keeps shapes (B, K, D) and
hides halted tokens behind a key mask. Nothing here exists only for speed (docs/speed.md: what was tried, kept,
removed).

Shapes: B batch, C channels, T frames, H/W pixels, S patches per frame, K tokens (class token first), N packed
tokens of several samples, L layers, D width, h heads, d = D / h. Token 0 is the class token, then frame-major
patches: token 1 + t * S + s.
"""
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class HaltingVTConfig:
    img_size: int = 224  # Sec. 4.1: 224x224 crops
    patch_size: int = 16  # DeiT-S patch size
    num_frames: int = 8  # Sec. 4.1: 8 frames on Mini-Kinetics (10 on ActivityNet)
    in_chans: int = 3  # RGB
    embed_dim: int = 384  # DeiT-S width
    depth: int = 12  # DeiT-S layers: Glimpser layers + joint layers
    num_heads: int = 6  # DeiT-S heads
    mlp_ratio: float = 4.0  # DeiT-S MLP ratio
    num_classes: int = 200  # Mini-Kinetics has 200 classes
    glimpser_depth: int = 2  # Sec. 3.3: "two Divided Space-Time transformer layers"; 0 gives a plain Joint VT
    keep_ratio: float = 0.5  # R of Sec. 3.3, 0.5 in the main results (Table 1)
    halting: bool = True  # Sec. 3.2; False runs every joint layer on every token
    gamma: float = 10.0  # Eq. (2), official config
    beta: float = 20.0  # Eq. (2), official config (Table 2's 24.2 GFLOPs row); subtracted, see HaltingStage.scores
    eps: float = 0.01  # Eq. (3), official config
    motion_head: bool = True  # Sec. 3.4: the real/fake head of the Motion Loss
    drop_path: float = 0.1  # stochastic depth of the official config
    release_compat: bool = False  # the release's forward, to run its checkpoints as trained (HaltingStage, Glimpser)

    def __post_init__(self):
        def check(name, ok, why):
            if not ok:
                raise ValueError(f"HaltingVTConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("img_size", "patch_size", "num_frames", "in_chans", "embed_dim", "depth", "num_heads",
                     "num_classes"):
            check(name, getattr(self, name) >= 1, "must be a positive integer")
        check("embed_dim", self.embed_dim % self.num_heads == 0, f"must be a multiple of num_heads={self.num_heads}")
        check("img_size", self.img_size % self.patch_size == 0, f"must be a multiple of patch_size={self.patch_size}")
        check("glimpser_depth", 0 <= self.glimpser_depth < self.depth,
              f"must be in [0, depth={self.depth}): at least one joint layer must remain")
        check("keep_ratio", 0.0 < self.keep_ratio <= 1.0, "must be in (0, 1]")
        check("eps", 0.0 <= self.eps < 1.0, "must be in [0, 1)")
        check("gamma", self.gamma > 0, "must be > 0")
        check("mlp_ratio", self.mlp_ratio > 0, "must be > 0")
        check("drop_path", 0.0 <= self.drop_path < 1.0, "must be in [0, 1)")
        check("eps", self.eps > 0 or not self.release_compat, "must be > 0 with release_compat (halting on > 1 - eps)")

    @classmethod
    def deit_small(cls, **overrides) -> "HaltingVTConfig":
        """The paper's main setting: DeiT-S, 8 frames, Glimpser R=0.5, gamma 10, beta 20, eps 0.01."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "HaltingVTConfig":
        """A model that trains in minutes on 2 CPU cores: 64x64 frames, S = 16, width 64, 8 layers of which 2 form
        the Glimpser. gamma 1, beta 2: from scratch x[..., 0] wanders over several units, and at gamma 10 every
        token halted in the same layer; at gamma 1 the scores add up over a few layers. train.py's sanity run
        (DEMO_PRESET) sets 48x48 frames, R = 0.2, gamma 0.7, beta 1.4 and the demo's 4 classes on top."""
        base = dict(img_size=64, patch_size=16, num_frames=8, embed_dim=64, depth=8, num_heads=4,
                    num_classes=6, glimpser_depth=2, keep_ratio=0.5, gamma=1.0, beta=2.0, eps=0.01,
                    drop_path=0.0)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class HaltingVTOutput:
    logits: torch.Tensor  # (B, num_classes): classifier on the halting-weighted class token, Eq. (6)
    motion_logits: Optional[torch.Tensor]  # (B, 2) real/fake logits (Sec. 3.4), or None without the head
    halt_scores: torch.Tensor  # (L, B, K) h_k^l of the K tokens entering the joint stage; 0 once halted
    halt_depth: torch.Tensor  # (B, K) N_k in 1..L, Eq. (3); in evaluation at most the class token's (not with
    #                           release_compat, where every token runs to its own halt, as in the release)
    remainder: torch.Tensor  # (B, K) r_k, Eq. (4); for a token stopped with its class token: 1 - its sum
    ponder: torch.Tensor  # (B,) mean over tokens of N_k + r_k, Eq. (5)
    tokens_per_layer: torch.Tensor  # (B, depth) tokens entering each layer as drop mode runs it
    keep_index: Optional[torch.Tensor]  # (B, T, kept) patch indices kept by the Glimpser, or None
    gflops: torch.Tensor  # (B,) GFLOPs (multiply-adds) drop mode spends on each sample
    gflops_release: Optional[torch.Tensor] = None  # (B,) with release_compat: the release's count (HaltingVT.forward)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability p (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, ...) -> (B, ...); or packed rows x (N, D) with counts (B,): sample b owns counts[b] rows."""
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(len(x if counts is None else counts)).bernoulli_(1 - self.p) / (1 - self.p)  # (B,)
        if counts is not None:  # each sample's draw over its rows; output_size given: no read-back
            keep = keep.repeat_interleave(counts, output_size=x.shape[0])  # (N,)
        return x * keep.view(-1, *[1] * (x.dim() - 1))


class Mlp(nn.Module):
    """The token-wise MLP: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        """(..., D) -> (..., D)."""
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, Eq. (1), through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # DeiT uses a qkv bias
        self.proj = nn.Linear(dim, dim)

    def heads(self, x):
        """(B, K, D) -> q, k, v, each a (B, h, K, d) view (not copied: the CPU kernel takes strided heads)."""
        B, K, D = x.shape
        return self.qkv(x).view(B, K, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, key_mask: Optional[torch.Tensor] = None):
        """x (B, K, D) -> (B, K, D); key_mask (B, K) bool, True for the tokens that may be attended to."""
        q, k, v = self.heads(x)  # each (B, h, K, d)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, K)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # Eq. (1): softmax(q k^T / sqrt(d)) v
        return self.proj(o.transpose(1, 2).flatten(2))  # (B, h, K, d) -> (B, K, D)

    def forward_with_cls_row(self, x):
        """forward, plus the class token's attention row averaged over heads (Eq. 7's w): x (B, K, D) ->
        (B, K, D), (B, K). Only that row is computed explicitly: O(K) extra work, not O(K^2)."""
        q, k, v = self.heads(x)  # each (B, h, K, d)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))  # Eq. (1)
        w = (q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (B, h, 1, K)
        return out, w.mean(1).squeeze(1)  # (B, K, D), (B, K)


class Block(nn.Module):
    """A pre-norm transformer layer (DeiT's block); in the joint stage it attends over all live tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, key_mask: Optional[torch.Tensor] = None):
        """x (B, K, D) -> (B, K, D); key_mask (B, K) hides tokens from attention (mask mode)."""
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DividedBlock(Block):
    """A divided space-time layer (TimeSformer): temporal attention at each patch position over the T frames,
    through a `temporal_fc` (zero at first, so an image checkpoint starts unchanged); spatial attention within
    each frame, with its own copy of the class token, the T copies' outputs averaged; then the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__(dim, num_heads, mlp_ratio, drop_path)
        self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.temporal_attn = Attention(dim, num_heads)
        self.temporal_fc = nn.Linear(dim, dim)

    def forward(self, x, num_frames: int):
        """x (B, 1+T*S, D) -> (B, 1+T*S, D): attention, then the MLP."""
        return self.feed_forward(self.attend(x, num_frames, cls_row=False)[0])

    def attend(self, x, num_frames: int, *, cls_row: bool, cls_residual: bool = True):
        """Both attentions with their residuals: x (B, 1+T*S, D) -> x (B, 1+T*S, D) and, with `cls_row`, the
        class token's spatial attention (B, T, S) that the Glimpser prunes by (else None). cls_residual=False:
        the class token leaves as its averaged attention output alone (the release's pruning layer)."""
        B, K, D = x.shape
        T, S = num_frames, (K - 1) // num_frames
        cls, patches = x[:, :1], x[:, 1:]  # (B, 1, D), (B, T*S, D)
        # 1) temporal attention at each patch position
        xt = patches.view(B, T, S, D).transpose(1, 2).reshape(B * S, T, D)
        xt = self.temporal_attn(self.temporal_norm1(xt))  # (B*S, T, D)
        xt = xt.view(B, S, T, D).transpose(1, 2).reshape(B, T * S, D)
        patches = patches + self.drop_path(self.temporal_fc(xt))
        # 2) spatial attention within each frame, each frame with a copy of the class token
        xs = torch.cat([cls.expand(B, T, D).unsqueeze(2), patches.view(B, T, S, D)], 2)  # (B, T, 1+S, D)
        xs = self.norm1(xs.view(B * T, 1 + S, D))
        xs, row = self.attn.forward_with_cls_row(xs) if cls_row else (self.attn(xs), None)
        xs = xs.view(B, T, 1 + S, D)
        res = torch.cat([xs[:, :, 0].mean(1, keepdim=True), xs[:, :, 1:].reshape(B, T * S, D)], 1)
        x = torch.cat([cls if cls_residual else torch.zeros_like(cls), patches], 1) + self.drop_path(res)
        return x, None if row is None else row[:, 1:].reshape(B, T, S)

    def feed_forward(self, x):
        """The MLP with its residual, on the tokens left: (B, K, D) -> (B, K, D)."""
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------------
# The Glimpser (Sec. 3.3)
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def top_k_per_frame(attn: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` patches of highest class-token attention in each frame (Eq. 7): attn (B, T, S) -> indices
    (B, T, keep), sorted so the kept tokens keep their order."""
    return attn.topk(keep, dim=-1).indices.sort(dim=-1).values


def gather_patches(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep the indexed patches of each frame: x (B, 1+T*S, D), index (B, T, k) -> (B, 1+T*k, D)."""
    B, K, D = x.shape
    T = index.shape[1]
    patches = x[:, 1:].view(B, T, -1, D)  # (B, T, S, D)
    kept = patches.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, D))  # (B, T, k, D)
    return torch.cat([x[:, :1], kept.flatten(1, 2)], 1)  # the class token is never pruned


class Glimpser(nn.Module):
    """Divided space-time layers; in the last, each frame keeps its top ceil(R * S) patches (Eq. 7), as in the
    authors' release after its spatial attention (whose class-token row scores them) and before its MLP. The
    class token keeps its residual there as in every layer (the release drops it in that layer only, which reads
    as a slip: the class token would restart from its attention output); cls_residual=False does as the release."""

    def __init__(self, blocks: list, keep_ratio: float, cls_residual: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.keep_ratio, self.cls_residual = keep_ratio, cls_residual

    def forward(self, x, num_frames: int):
        """x (B, 1+T*S, D) -> x (B, 1+T*k, D), keep_index (B, T, k) with k = ceil(R * S)."""
        *layers, last = self.blocks
        for blk in layers:
            x = blk(x, num_frames)  # (B, 1+T*S, D)
        x, cls_attn = last.attend(x, num_frames, cls_row=True, cls_residual=self.cls_residual)  # (B, 1+T*S, D),
        # and the class token's attention (B, T, S)
        index = top_k_per_frame(cls_attn, math.ceil(self.keep_ratio * cls_attn.shape[-1]))  # (B, T, k)
        return last.feed_forward(gather_patches(x, index)), index  # the MLP on 1 + T*k tokens


# ----------------------------------------------------------------------------------------------------------
# The joint stage with ACT halting (Sec. 3.2)
# ----------------------------------------------------------------------------------------------------------

class HaltingStage(nn.Module):
    """Joint space-time layers where every token, the class token included, halts on its own (Eqs. 2-4).

    After a sample's class token halts, its other tokens depend on the mode (never on mask or drop execution):
      - training: every token runs until it halts by its own scores, so its N_k and r_k are those of Eqs. (3)
        and (4) and enter the ponder loss (Eq. 5), as in the authors' release; x_o (Eq. 6) no longer changes;
      - evaluation: the sample stops when its class token halts (where inference saves time); a token still
        running gets the class token's depth and the remainder of its budget, 1 - its sum so far.
    The logits are the same either way; depths, remainders and token counts report what ran.
    release_compat: the release's loop, in training and evaluation alike: halted tokens enter each layer as zeros
    and are attended to (a zero token after LayerNorm is the norm's bias: a real key and value), a token halts
    once its sum passes 1 - eps (strictly), and every token runs to its own halt in evaluation too."""

    def __init__(self, blocks: list, gamma: float, beta: float, eps: float, halting: bool, release_compat=False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.gamma, self.beta, self.eps, self.halting = gamma, beta, eps, halting
        self.release_compat = release_compat

    def scores(self, x0, layer: int, beta: float):
        """h^l of every token from the first channel x0 = x[..., 0] of its layer output (B, K), forced to 1 at
        the last layer; all 0 before it without halting. The paper prints Eq. (2) with `+ beta`; the authors'
        release subtracts it, and only that sign matches Table 2 (a larger beta halts less and spends more
        GFLOPs). We follow the release."""
        if layer == len(self.blocks) - 1:
            return torch.ones_like(x0)
        return torch.sigmoid(self.gamma * x0 - beta) if self.halting else torch.zeros_like(x0)  # Eq. (2)

    def forward(self, x, drop: bool, beta: Optional[float] = None) -> dict:
        """x (B, K, D); drop: remove halted tokens (else mask them); beta: Eq. (2)'s beta, None = the stage's.
        Returns x_o (B, D) the halting-weighted class token (Eq. 6), halt_scores (L, B, K), depth (B, K),
        remainder (B, K) and tokens (B, L) entering each layer as drop mode runs it."""
        beta, release = self.beta if beta is None else beta, self.release_compat
        (B, K, D), L, dev = x.shape, len(self.blocks), x.device
        total = x.new_zeros(B, K)  # running sum of scores, Eq. (3)
        active = torch.ones(B, K, dtype=torch.bool, device=dev)  # the tokens still running
        depth = torch.full((B, K), L, dtype=torch.long, device=dev)
        remainder, x_o = x.new_ones(B, K), x.new_zeros(B, D)
        if drop:  # x packed (N, D), the running tokens only; row (N,): each row's token as b * K + k
            row = torch.arange(B * K, device=dev)
            x, row, first, counts, lengths = pack_running(x.reshape(B * K, D), row, active)
        scores, tokens = [], []
        for l, blk in enumerate(self.blocks):
            tokens.append(active.sum(1))
            # 0) the layer on the running tokens: the modes differ only in what halted tokens do
            if drop:  # removed (pack_running below)
                x = packed_block(blk, x, counts, lengths)  # (N, D)
            elif release:  # zeroed, but still attended to
                x = blk(x * active.unsqueeze(-1))
            else:  # frozen, and hidden from attention by a key mask
                x = torch.where(active.unsqueeze(-1), blk(x, key_mask=active), x)
            x0 = x.new_zeros(B * K).index_put((row,), x[:, 0]).view(B, K) if drop else x[..., 0]  # (B, K) channel 0
            x_cls = x[first] if drop else x[:, 0]  # (B, D) the class token (once halted, weighted by 0 below)
            # 1) halting score, 0 for tokens that already halted
            h = self.scores(x0, l, beta) * active
            # 2) accumulate; 3) the tokens whose sum reaches 1 - eps halt here, with their remainder
            stop = active & (total + h > 1 - self.eps if release else total + h >= 1 - self.eps)  # Eq. (3)
            if not self.training and not release:  # evaluation: the sample is done when its class token halts
                stop = stop | (active & stop[:, :1])
            r = 1 - total  # Eq. (4)
            depth = torch.where(stop, l + 1, depth)
            remainder = torch.where(stop, r, remainder)
            x_o = x_o + torch.where(stop[:, :1], r[:, :1], h[:, :1]) * x_cls  # Eq. (6); h is 0 once halted
            # 4) halted tokens take no part in later layers
            total, active = total + h, active & ~stop
            scores.append(h)
            if drop:
                x, row, first, counts, lengths = pack_running(x, row, active)
                if not lengths:  # every sample has stopped
                    break
        tokens += [torch.zeros_like(tokens[0])] * (L - len(tokens))
        scores += [torch.zeros_like(scores[0])] * (L - len(scores))
        return dict(x_o=x_o, halt_scores=torch.stack(scores), depth=depth, remainder=remainder,
                    tokens=torch.stack(tokens, 1))


def pack_running(x: torch.Tensor, row: torch.Tensor, active: torch.Tensor) -> tuple:
    """Drop mode: keep the rows of x (N, D) whose token still runs. row (N,): each row's token as b * K + k;
    active (B, K). Returns x (N', D) and row (N',) of the running tokens, in order; first (B,): each sample's
    first row (its class token while it runs); counts (B,): rows per sample; lengths: the non-zero counts as
    ints, which attention needs. That is the one read-back of a layer: the rest stays on the device, since on a
    GPU every read-back (a boolean index x[mask] included) stalls the launch queue."""
    counts = active.sum(1)  # (B,)
    lengths = [n for n in counts.tolist() if n]
    kept = torch.nonzero_static(active.flatten()[row], size=sum(lengths)).squeeze(1)  # known size: no read-back
    first = (counts.cumsum(0) - counts).clamp(max=max(sum(lengths) - 1, 0))  # (B,)
    return x[kept], row[kept], first, counts, lengths


def packed_block(blk: Block, x: torch.Tensor, counts: torch.Tensor, lengths: list) -> torch.Tensor:
    """Block.forward on drop mode's packed rows x (N, D) (pack_running): sample b owns counts[b] rows (B,), and
    lengths lists the non-zero counts as ints."""
    x = x + blk.drop_path(packed_attention(blk.attn, blk.norm1(x), lengths), counts)
    return x + blk.drop_path(blk.mlp(blk.norm2(x)), counts)


def packed_attention(attn: Attention, x: torch.Tensor, lengths: list) -> torch.Tensor:
    """attn over x (N, D), several samples' tokens back to back (sample i owns lengths[i] rows) -> (N, D): each
    sample attends only to its own tokens, and nothing is padded."""
    q, k, v = attn.heads(x.unsqueeze(0))  # each (1, h, N, d)
    o = [F.scaled_dot_product_attention(*t) for t in zip(*(a.split(lengths, 2) for a in (q, k, v)))]  # Eq. (1)
    return attn.proj(torch.cat(o, 2).transpose(1, 2).flatten(2)).squeeze(0)  # (1, h, N, d) -> (N, D)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------

def resize_pos_embed(pos: torch.Tensor, grid: tuple) -> torch.Tensor:
    """(1, 1+S0, D) position embedding of a square grid -> (1, 1+gh*gw, D) by bicubic interpolation."""
    g0 = math.isqrt(pos.shape[1] - 1)
    if (g0, g0) == tuple(grid):
        return pos
    patch = pos[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)  # (1, D, g0, g0)
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patch.flatten(2).transpose(1, 2)], 1)


def resize_time_embed(time: torch.Tensor, T: int) -> torch.Tensor:
    """(1, T0, D) time embedding -> (1, T, D) by linear interpolation."""
    if time.shape[1] == T:
        return time
    return F.interpolate(time.transpose(1, 2), size=T, mode="linear", align_corners=False).transpose(1, 2)


class HaltingVT(nn.Module):
    """The network of the module docstring, built from a HaltingVTConfig; forward returns a HaltingVTOutput."""

    def __init__(self, cfg: HaltingVTConfig):
        super().__init__()
        self.cfg = cfg
        D, g = cfg.embed_dim, cfg.glimpser_depth
        S = (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, D, cfg.patch_size, cfg.patch_size)  # DeiT's key name
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + S, D))  # shared by every frame
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, D))  # zero at start: Sec. 3.1
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linearly rising
        layer = dict(dim=D, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
        # the release's pruning layer drops the class token's residual; with R = 1 it does not prune
        cls_residual = not (cfg.release_compat and cfg.keep_ratio < 1)
        self.glimpser = Glimpser([DividedBlock(**layer, drop_path=dpr[i]) for i in range(g)],
                                 cfg.keep_ratio, cls_residual) if g else None
        self.joint = HaltingStage([Block(**layer, drop_path=dpr[i]) for i in range(g, cfg.depth)],
                                  cfg.gamma, cfg.beta, cfg.eps, cfg.halting, cfg.release_compat)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, cfg.num_classes)
        self.motion_head = nn.Linear(D, 2) if cfg.motion_head else None
        for m in self.modules():  # DeiT's initialisation
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02), nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for blk in self.glimpser.blocks if self.glimpser else []:
            nn.init.zeros_(blk.temporal_fc.weight), nn.init.zeros_(blk.temporal_fc.bias)

    def embed(self, video):
        """(B, C, T, H, W) -> tokens (B, 1+T*S, D) with space and time embeddings."""
        B, C, T, H, W = video.shape
        grid = (H // self.cfg.patch_size, W // self.cfg.patch_size)
        x = self.patch_embed.proj(video.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, D, gh, gw)
        x = x.flatten(2).transpose(1, 2).reshape(B, T, -1, x.shape[1])  # (B, T, S, D)
        pos = resize_pos_embed(self.pos_embed, grid)  # (1, 1+S, D)
        x = x + pos[:, None, 1:] + resize_time_embed(self.time_embed, T).unsqueeze(2)
        cls = self.cls_token + pos[:, :1]  # the class token gets only its position embedding
        return torch.cat([cls.expand(B, -1, -1), x.flatten(1, 2)], 1)

    def forward(self, video: torch.Tensor, drop_halted: Optional[bool] = None,
                beta: Optional[float] = None) -> HaltingVTOutput:
        """video (B, C, T, H, W): any T, H and W multiples of patch_size (the embeddings are resized), else
        ValueError. drop_halted: remove halted tokens (True) or mask them (False); None = drop in evaluation,
        mask in training; with cfg.release_compat mask always (True is a ValueError). beta: Eq. (2)'s beta for this
        call (a halting warm-up raises it), None = cfg.beta."""
        c, p = self.cfg, self.cfg.patch_size
        if video.dim() != 5 or video.shape[1] != c.in_chans or video.shape[-1] % p or video.shape[-2] % p:
            raise ValueError(f"expected video of shape (B, C={c.in_chans}, T, H, W) with H and W multiples of "
                             f"patch_size={p}, got {tuple(video.shape)}")
        B, _, T, H, W = video.shape
        S = (H // p) * (W // p)
        drop = (not self.training and not c.release_compat) if drop_halted is None else drop_halted
        if drop and c.release_compat:
            raise ValueError("drop_halted=True with release_compat: the release's halted tokens stay in the sequence "
                             "as zeros that every token attends to, which only mask execution computes")
        x = self.embed(video)  # (B, 1+T*S, D)
        keep_index = None
        if self.glimpser is not None:
            x, keep_index = self.glimpser(x, T)  # (B, 1+T*k, D), (B, T, k)
        out = self.joint(x, drop, beta)
        x_o, depth, remainder = self.norm(out["x_o"]), out["depth"], out["remainder"]
        glimpsed = out["tokens"].new_full((B, c.glimpser_depth), 1 + T * S)
        tokens, release = torch.cat([glimpsed, out["tokens"]], 1), None
        if c.release_compat:  # GFLOPs counted both ways: the release counts every token until its own halt;
            release = count_gflops(c, tokens, T, S)  # ours stops a sample with its class token, as drop mode does
            tokens = torch.cat([glimpsed, tokens_until_class_halts(depth, c.depth - c.glimpser_depth)], 1)
        return HaltingVTOutput(
            logits=self.head(x_o), motion_logits=self.motion_head(x_o) if self.motion_head is not None else None,
            halt_scores=out["halt_scores"], halt_depth=depth, remainder=remainder,
            ponder=(depth + remainder).mean(1),  # Eq. (5)
            tokens_per_layer=tokens, keep_index=keep_index, gflops=count_gflops(c, tokens, T, S),
            gflops_release=release)


# ----------------------------------------------------------------------------------------------------------
# GFLOPs: one multiply-add = one FLOP; the patch-embedding conv, every Linear, QK^T and AV; norms, softmax,
# GELU and additions are not counted (fvcore's convention: DeiT-S on one 224x224 image is 4.6 GFLOPs)
# ----------------------------------------------------------------------------------------------------------

def count_gflops(cfg: HaltingVTConfig, tokens_per_layer: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """GFLOPs each sample spends, from the tokens entering each layer: (B, depth) -> (B,)."""
    D, hidden, g = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.glimpser_depth
    keep = math.ceil(cfg.keep_ratio * S)  # patches per frame the Glimpser keeps (Eq. 7)
    macs = T * S * cfg.in_chans * cfg.patch_size ** 2 * D  # patch embedding
    for i in range(g):  # divided layers; the last also computes the class token's attention row, then prunes
        last = i == g - 1
        macs += T * S * 5 * D * D + S * 2 * T * T * D  # temporal: qkv, proj, temporal_fc over T*S; QK^T, AV
        macs += T * (1 + S) * 4 * D * D + T * 2 * (1 + S) ** 2 * D + (T * (1 + S) * D if last else 0)  # spatial
        macs += (1 + T * (keep if last else S)) * 2 * D * hidden  # the MLP
    n = tokens_per_layer[:, g:].double()  # (B, joint layers)
    macs = macs + (n * (4 * D * D + 2 * D * hidden) + 2 * n * n * D).sum(1)  # qkv, proj, MLP per token; QK^T, AV
    macs = macs + D * (cfg.num_classes + (2 if cfg.motion_head else 0))  # the heads
    return (macs / 1e9).float()


def tokens_until_class_halts(depth: torch.Tensor, L: int) -> torch.Tensor:
    """Tokens entering each of L joint layers when a sample stops with its class token: depth (B, K) N_k, class
    token first -> (B, L)."""
    stop = torch.minimum(depth, depth[:, :1])  # (B, K)
    return (stop.unsqueeze(1) >= torch.arange(1, L + 1, device=depth.device).view(1, L, 1)).sum(2)  # (B, L)


def dense_gflops(cfg: HaltingVTConfig, num_frames: Optional[int] = None, img_size: Optional[int] = None) -> float:
    """GFLOPs of the same model as a plain Joint VT: no Glimpser, no halting, every token in every layer."""
    T, size = num_frames or cfg.num_frames, img_size or cfg.img_size
    S = (size // cfg.patch_size) ** 2
    dense = HaltingVTConfig(**{**cfg.to_dict(), "glimpser_depth": 0, "halting": False})
    return count_gflops(dense, torch.full((1, cfg.depth), 1 + T * S), T, S).item()


def __getattr__(name):  # haltingvt.load_pretrained still works: it lives in checkpoints.py, which imports this file
    if name == "load_pretrained":
        from checkpoints import load_pretrained
        return load_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    cfg = HaltingVTConfig.tiny()
    model = HaltingVT(cfg).eval()
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        out = model(video)
    print("logits", tuple(out.logits.shape), "ponder", out.ponder.tolist())
    print("tokens per layer", out.tokens_per_layer.tolist())
    print(f"GFLOPs {out.gflops.tolist()} (dense {dense_gflops(cfg):.3f})")
