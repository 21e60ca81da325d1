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
hides halted tokens behind a key mask. Code that exists only for speed is in "Execution machinery", near the end.

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
    beta: float = 20.0  # Eq. (2), official config (Table 2's 24.2 GFLOPs row); subtracted, see halting_score
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
        """A model that trains in minutes on 2 CPU cores (the demo of data.py): 64x64 frames, S = 16, width 64,
        8 layers of which 2 form the Glimpser. gamma 1, beta 2: from scratch x[..., 0] wanders over several units,
        and at gamma 10 every token halted in the same layer; at gamma 1 the scores add up over a few layers."""
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
# Halting math (Eqs. 2-4, 6) as pure functions
# ----------------------------------------------------------------------------------------------------------

def halting_score(x: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """Eq. (2) on a layer's output, from the first channel of each token: (..., D) -> (...).

    The paper prints `+ beta`; the authors' release subtracts it, and only that sign matches Table 2 (a larger
    beta halts less and spends more GFLOPs). We follow the release.
    """
    return torch.sigmoid(gamma * x[..., 0] - beta)


def halting_weights(h: torch.Tensor, eps: float):
    """The ACT bookkeeping of Eqs. (3), (4), (6) for per-layer scores h (L, ...), the last one taken as 1.

    Returns weights (L, ...): h_l before the halting layer, r at it, 0 after (summing to 1; Eq. 6); depth (...):
    N, the first layer where the running sum reaches 1 - eps (Eq. 3), in 1..L; remainder (...): r = 1 - the sum
    of the scores before layer N (Eq. 4)."""
    L = h.shape[0]
    h = torch.cat([h[:-1], torch.ones_like(h[-1:])])  # h^L := 1
    layer = torch.arange(1, L + 1, device=h.device).view(L, *[1] * (h.dim() - 1))  # (L, 1, ...)
    before = torch.cumsum(torch.cat([torch.zeros_like(h[:1]), h[:-1]]), 0)  # sum_{l' < l} h_l'  (L, ...)
    reached = before + h >= 1 - eps  # Eq. (3): has the running sum reached 1 - eps at layer l?
    depth = reached.int().argmax(0) + 1  # first such layer (argmax returns the first maximum)
    remainder = 1 - before.gather(0, (depth - 1).unsqueeze(0)).squeeze(0)  # Eq. (4)
    weights = torch.where(layer < depth, h, torch.where(layer == depth, remainder, torch.zeros_like(h)))
    return weights, depth, remainder


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability p (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, lengths: Optional[list] = None) -> torch.Tensor:
        """x is (B, ...) or, with `lengths`, packed (N, D) where sample i owns lengths[i] rows."""
        if self.p == 0.0 or not self.training:
            return x
        samples = x.shape[0] if lengths is None else len(lengths)
        keep = x.new_empty(samples).bernoulli_(1 - self.p) / (1 - self.p)  # (B,)
        if lengths is not None:  # output_size given: the GPU is not asked for it
            keep = keep.repeat_interleave(to_device(lengths, x.device), output_size=x.shape[0])  # (N,)
        return x * keep.view(-1, *[1] * (x.dim() - 1))


class Mlp(nn.Module):
    """The token-wise MLP: fc1, GELU, fc2."""

    rows = 2048  # tokens per chunk (in_chunks)

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        """(..., D) -> (..., D)."""
        return in_chunks(self.chunk, self.rows, x.reshape(-1, x.shape[-1])).view(x.shape)

    def chunk(self, x):
        return self.fc2(gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, Eq. (1), through F.scaled_dot_product_attention."""

    rows = 2048  # tokens per chunk (in_chunks)
    pad_on_cuda = True  # packed_attention: one padded attention call on a GPU instead of one per sample

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # DeiT uses a qkv bias
        self.proj = nn.Linear(dim, dim)

    def heads(self, x):
        """(B, K, D) -> q, k, v, each a (B, h, K, d) view (not copied: the CPU kernel takes strided heads)."""
        return self.split_heads(self.qkv(x))

    def split_heads(self, qkv):
        """(B, K, 3D) -> q, k, v, each (B, h, K, d)."""
        B, K, D3 = qkv.shape
        qkv = qkv.view(B, K, 3, self.num_heads, D3 // (3 * self.num_heads))
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (3, B, h, K, d)

    def merge(self, o):
        """(B, h, K, d) -> (B, K, D), then the output projection."""
        B, h, K, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, K, h * d))

    def forward(self, x, key_mask: Optional[torch.Tensor] = None):
        """x (B, K, D) -> (B, K, D); key_mask (B, K) bool, True for the tokens that may be attended to."""
        return in_chunks(self.chunk, self.rows, x, key_mask)

    def chunk(self, x, key_mask):
        q, k, v = self.heads(x)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, K)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def forward_with_cls_row(self, x):
        """forward, plus the class token's attention row averaged over heads (Eq. 7's w): x (B, K, D) ->
        (B, K, D), (B, K). Only that row is computed explicitly: O(K) extra work, not O(K^2)."""
        return in_chunks(self.chunk_with_cls_row, self.rows, x)

    def chunk_with_cls_row(self, x):
        q, k, v = self.heads(x)
        out = self.merge(F.scaled_dot_product_attention(q, k, v))
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

    def forward_packed(self, x, lengths: list):
        """forward on x (N, D): several samples' tokens back to back, sample i owning lengths[i] rows."""
        x = x + self.drop_path(packed_attention(self.attn, self.norm1(x), lengths), lengths)
        return x + self.drop_path(self.mlp(self.norm2(x)), lengths)


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
    release_compat: the release's loop (forward_masked), in training and evaluation alike."""

    def __init__(self, blocks: list, gamma: float, beta: float, eps: float, halting: bool, release_compat=False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.gamma, self.beta, self.eps, self.halting = gamma, beta, eps, halting
        self.release_compat = release_compat

    def scores(self, x, layer: int, beta: float):
        """h^l of every token (Eq. 2), forced to 1 at the last layer; all 0 before it without halting."""
        if layer == len(self.blocks) - 1:
            return x.new_ones(x.shape[:-1])
        if not self.halting:
            return x.new_zeros(x.shape[:-1])
        return halting_score(x, self.gamma, beta)

    def forward(self, x, drop: bool, beta: Optional[float] = None) -> dict:
        """x (B, K, D); drop: remove halted tokens (else mask them); beta: Eq. (2)'s beta, None = the stage's.
        Returns x_o (B, D) the halting-weighted class token (Eq. 6), halt_scores (L, B, K), depth (B, K),
        remainder (B, K) and tokens (B, L) entering each layer as drop mode runs it."""
        beta = self.beta if beta is None else beta
        return halting_dropped(self, x, beta) if drop else self.forward_masked(x, beta)

    def forward_masked(self, x, beta: float) -> dict:
        """Fixed shapes: halted tokens stay in x, frozen, and hidden from attention by a key mask. With
        release_compat, the release's loop instead: halted tokens enter each layer as zeros and are attended to (a
        zero token after LayerNorm is the norm's bias: a real key and value), a token halts once its sum passes
        1 - eps (strictly), and every token runs to its own halt in evaluation too."""
        release = self.release_compat
        (B, K, D), L = x.shape, len(self.blocks)
        total = x.new_zeros(B, K)  # running sum of scores, Eq. (3)
        active = torch.ones(B, K, dtype=torch.bool, device=x.device)
        depth = torch.full((B, K), L, dtype=torch.long, device=x.device)
        remainder, x_o = x.new_ones(B, K), x.new_zeros(B, D)
        scores, tokens = [], []
        for l, blk in enumerate(self.blocks):
            tokens.append(active.sum(1))
            if release:
                x = blk(x * active.unsqueeze(-1))  # halted tokens zeroed, still in every attention
            else:
                x = torch.where(active.unsqueeze(-1), blk(x, key_mask=active), x)  # halted tokens stay frozen
            # 1) halting score, 0 for tokens that already halted
            h = self.scores(x, l, beta) * active
            # 2) accumulate; 3) the tokens whose sum reaches 1 - eps halt here, with their remainder
            stop = active & (total + h > 1 - self.eps if release else total + h >= 1 - self.eps)  # Eq. (3)
            if not self.training and not release:  # evaluation: the sample is done when its class token halts
                stop = stop | (active & stop[:, :1])
            r = 1 - total  # Eq. (4)
            depth = torch.where(stop, l + 1, depth)
            remainder = torch.where(stop, r, remainder)
            x_o = x_o + torch.where(stop[:, :1], r[:, :1], h[:, :1]) * x[:, 0]  # Eq. (6); h is 0 once halted
            # 4) halted tokens take no part in later layers
            total, active = total + h, active & ~stop
            scores.append(h)
        return dict(x_o=x_o, halt_scores=torch.stack(scores), depth=depth, remainder=remainder,
                    tokens=torch.stack(tokens, 1))


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


# ==========================================================================================================
# Execution machinery (for speed; the paper's math does not depend on it)
# ==========================================================================================================

def to_device(ints: list, device: torch.device) -> torch.Tensor:
    """A list of Python ints as a tensor on `device`. To a GPU it goes from pinned memory without waiting: a
    plain torch.tensor(ints, device=...) would first wait for every kernel queued before it."""
    t = torch.tensor(ints)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def cat(tensors: list, dim: int = 0) -> torch.Tensor:
    """torch.cat that returns a single tensor as it is instead of copying it (one sample, one group)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def row_groups(lengths: list, rows: int) -> list:
    """Split consecutive samples' lengths into groups of about `rows` token rows (a longer sample alone)."""
    groups, size = [], 0
    for n in lengths:
        if not groups or size + n > rows:
            groups, size = groups + [[]], 0
        groups[-1].append(n)
        size += n
    return groups


def gelu(h: torch.Tensor) -> torch.Tensor:
    """GELU; without autograd, in place: no fresh (rows, hidden) buffer, about 5% of a DeiT-S forward on the CPU.
    (With autograd the in-place op would save a copy of its input for the backward, so nothing is gained.)"""
    return F.gelu(h) if torch.is_grad_enabled() else torch.ops.aten.gelu_(h)


def in_chunks(fn, rows: int, x: torch.Tensor, *rest):
    """fn(x, *rest) on parts of dim 0 of about `rows` token rows (whole samples of x (B, K, D); rows of (N, D)),
    the outputs (tensors or tuples) concatenated; a `rest` entry may be None. Why: small (rows, hidden) buffers
    are reused from the allocator and cache; a fresh (B*K, hidden) one made bias + GELU a third of a CPU forward."""
    step = max(1, rows // (x.shape[1] if x.dim() > 2 else 1))
    if x.shape[0] <= step:
        return fn(x, *rest)
    parts = [[None] * math.ceil(x.shape[0] / step) if t is None else t.split(step) for t in (x, *rest)]
    outs = [fn(*part) for part in zip(*parts)]
    return torch.cat(outs) if torch.is_tensor(outs[0]) else tuple(torch.cat(o) for o in zip(*outs))


def packed_attention(attn: Attention, x: torch.Tensor, lengths: list) -> torch.Tensor:
    """attn over x (N, D), several samples' tokens back to back (sample i owns lengths[i] rows): projections
    over groups of about attn.rows rows of whole samples, attention per sample, so no token sees another
    sample's and nothing is padded. On a GPU, padded_attention (one call beats one launch per sample)."""
    if x.is_cuda and len(lengths) > 1 and attn.pad_on_cuda:
        return padded_attention(attn, x, lengths)
    groups, out = row_groups(lengths, attn.rows), []
    for group, part in zip(groups, x.split([sum(g) for g in groups])):
        q, k, v = attn.heads(part.unsqueeze(0))  # each (1, h, n, d), n = sum(group)
        o = [F.scaled_dot_product_attention(*t) for t in zip(*(a.split(group, dim=2) for a in (q, k, v)))]
        out.append(attn.merge(cat(o, dim=2)).squeeze(0))  # (n, D)
    return cat(out)  # (N, D)


def padded_attention(attn: Attention, x: torch.Tensor, lengths: list) -> torch.Tensor:
    """packed_attention for a GPU, where one attention call per sample costs more in launches than padding does:
    the qkv rows are gathered into a (G, n) grid, n the longest sample, and a key mask hides the padding.
    Padded queries are computed and dropped; the projections still run over the N real rows only."""
    N, G, n = x.shape[0], len(lengths), max(lengths)
    count = to_device(lengths, x.device)  # (G,)
    pos = torch.arange(n, device=x.device)
    valid = pos < count[:, None]  # (G, n)
    index = ((count.cumsum(0) - count)[:, None] + pos).clamp(max=N - 1)  # (G, n) row of x; any for padding
    q, k, v = attn.split_heads(attn.qkv(x)[index])  # each (G, h, n, d)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])  # (G, h, n, d)
    o = o.transpose(1, 2).reshape(G * n, -1)  # (G*n, D)
    return attn.proj(o[torch.nonzero_static(valid.flatten(), size=N).squeeze(1)])  # (N, D)


def halting_dropped(stage: HaltingStage, x: torch.Tensor, beta: float) -> dict:
    """HaltingStage.forward_masked with halted tokens removed: the live tokens of all samples are packed in one
    (N, D) tensor, each sample's class token first while it runs. The bookkeeping stays on the device and reads
    back only the token counts, once per layer (attention needs them as ints): on a GPU every read-back, a
    boolean index x[mask] included, stalls the queue."""
    B, K, D = x.shape
    L, dev = len(stage.blocks), x.device
    sample = torch.arange(B, device=dev).repeat_interleave(K)  # (N,) sample of each packed row
    token = torch.arange(K, device=dev).repeat(B)  # (N,) its index among the sample's K tokens
    x, total = x.reshape(B * K, D), x.new_zeros(B * K)
    counts, lengths = torch.full((B,), K, device=dev), [K] * B  # rows per sample: (B,) and the non-zero ones
    depth = torch.full((B, K), L, dtype=torch.long, device=dev)
    remainder, x_o = x.new_ones(B, K), x.new_zeros(B, D)
    scores, tokens = x.new_zeros(L, B, K), []
    for l, blk in enumerate(stage.blocks):
        tokens.append(counts)
        x = blk.forward_packed(x, lengths)  # (N, D)
        # 1) halting score; 2) accumulate; 3) halt where the sum reaches 1 - eps (Eq. 3), with remainder
        h = stage.scores(x, l, beta)
        stop = total + h >= 1 - stage.eps
        first = (counts.cumsum(0) - counts).clamp(max=len(x) - 1)  # (B,) first row of each sample
        cls = (counts > 0) & (token[first] == 0)  # (B,) the class token still runs (then it is that row)
        if not stage.training:  # evaluation: a sample's tokens stop with its class token
            stop = stop | (cls & stop[first])[sample]
        r = 1 - total  # Eq. (4); for tokens stopped by their class token: what is left of their budget
        at = (sample, token)
        scores = scores.index_put((torch.full_like(token, l), *at), h)
        depth = depth.index_put(at, torch.where(stop, l + 1, depth[at]))
        remainder = remainder.index_put(at, torch.where(stop, r, remainder[at]))
        w = torch.where(cls, torch.where(stop, r, h)[first], 0)  # (B,) class token weights
        x_o = x_o + w.unsqueeze(-1) * x[first]  # Eq. (6)
        # 4) drop the halted tokens
        keep, total = ~stop, total + h
        counts = torch.zeros_like(counts).index_add_(0, sample, keep.long())  # (B,)
        lengths = [n for n in counts.tolist() if n]  # the one read-back of the layer
        if not lengths:
            break
        left = sum(lengths)
        if left < len(keep):
            kept = torch.nonzero_static(keep, size=left).squeeze(1)  # known size: no read-back
            x, total, sample, token = x[kept], total[kept], sample[kept], token[kept]
    tokens += [torch.zeros_like(counts)] * (L - len(tokens))  # layers after every sample stopped
    return dict(x_o=x_o, halt_scores=scores, depth=depth, remainder=remainder, tokens=torch.stack(tokens, 1))


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
