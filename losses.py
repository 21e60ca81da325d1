"""The HaltingVT training objective: task, ponder and motion losses, Eq. (5), (8) and (9) of the paper; and the
evaluation's metrics, summed over batches from the same output object.

Axis letters: B batch (for a Motion Loss batch, the real clips followed by their fake copies), Y classes.

The model hands over one output object with
    logits         (B, Y)  the classifier on x_o (Eq. 6),
    motion_logits  (B, 2)  the motion head on the same x_o, or None when the model has no motion head,
    ponder         (B,)    each sample's mean over its tokens of N_k + r_k (Eq. 3-5), still differentiable;
and evaluation also reads halt_depth (B, K), gflops (B,) and tokens_per_layer (B, layers) from it.
`haltingvt_loss` turns that and the batch's labels into the scalar that is back-propagated, plus plain floats
for the log. Labels are checked before use: an out-of-range label fails on CPU with an opaque IndexError and on
CUDA with a device-side assert that kills the process, so we raise a ValueError naming the value instead.
"""
import math

import torch
import torch.nn.functional as F


def check_labels(labels, num_classes, multi_label=False):
    """Raise ValueError unless `labels` are valid targets for `num_classes` classes.

    Single-label: integer class indices (B,) in [0, num_classes). Multi-label: 0/1 targets (B, num_classes).
    """
    if multi_label:
        if labels.dim() != 2 or labels.shape[-1] != num_classes:
            raise ValueError(f"multi-label targets must have shape (B, {num_classes}), got {tuple(labels.shape)}")
        bad = labels[(labels != 0) & (labels != 1)]
        if bad.numel():
            raise ValueError(f"multi-label targets must be 0 or 1, got {bad[0].item()}")
        return
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices of shape (B,), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"label {bad[0].item()} is outside [0, {num_classes})")


def task_loss(logits, labels, multi_label=False):
    """L_task of Eq. (6): cross-entropy of the classifier on x_o.

    Single-label (Mini-Kinetics): softmax cross-entropy with integer labels (B,).
    Multi-label (ActivityNet): binary cross-entropy with logits against 0/1 targets (B, Y), averaged over B*Y.
    """
    check_labels(labels, logits.shape[-1], multi_label)
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def ponder_loss(ponder):
    """L_ponder of Eq. (5): the mean of N_k + r_k over tokens (done by the model, per sample) and over the batch.

    Minimising it lowers N_k (halt earlier) and r_k = 1 - (scores before the halting layer) (Eq. 4), i.e. it
    raises the halting scores h_k^l: the pressure towards fewer tokens that the task loss balances.
    """
    return ponder.mean()  # (B,) -> ()


def motion_loss(motion_logits, motion_labels):
    """L_motion of Eq. (8): 2-way cross-entropy, real video (label 1) against its static fake (label 0)."""
    bad = motion_labels[(motion_labels != 0) & (motion_labels != 1)]
    if bad.numel():
        raise ValueError(f"motion label {bad[0].item()} is not 0 (fake) or 1 (real)")
    return F.cross_entropy(motion_logits, motion_labels.long())


def depth_prior(num_layers, mean, std):
    """A discretised Gaussian over the joint layers 1..L: (L,), summing to 1."""
    layer = torch.arange(1, num_layers + 1, dtype=torch.float64)
    p = torch.exp(-0.5 * ((layer - mean) / std) ** 2)
    return (p / p.sum()).float()


def depth_prior_loss(halt_scores, target):
    """KL(target || p), p_l = the batch's mean halting score at joint layer l, normalised over layers.

    Not in the paper, nor in use in the authors' release (which stores a `use_distr_prior` flag that nothing
    reads): A-ViT's "distribution prior". The ponder loss alone pushes every score up, and nothing pushes a patch
    token's score down (its halt is a discrete decision, so the task loss sends it no gradient): at small scale
    every token then halts at the first joint layer. Pulling the layer-wise mean of the scores towards a Gaussian
    over depth keeps halting spread over layers. halt_scores (L, B, K), target (L,) -> ().
    """
    p = halt_scores.mean(dim=(1, 2))  # (L,)
    p = p / p.sum()
    target = target.to(p)
    return (target * (target.log() - p.clamp_min(1e-8).log())).sum()


def haltingvt_loss(out, labels, motion_labels=None, *, num_classes=None, alpha_p=5e-4, alpha_m=0.01,
                   multi_label=False, alpha_d=0.0, depth_target=None, task_on_fakes=True):
    """Eq. (9): L = L_task + alpha_p * L_ponder + alpha_m * L_motion. Returns (total, parts for the log).

    alpha_p = 5e-4 and alpha_m = 0.01 are the paper's values (Sec. 4.1). The authors' release config sets the
    motion weight to 0.001, but its loss code only uses that number to switch the term on and then adds the
    motion cross-entropy unweighted (alpha_m = 1 in effect); we follow the paper. The motion term is left out
    entirely (not computed) when alpha_m == 0, when the model gives no motion logits, or when no motion labels
    are given (evaluation).
    task_on_fakes=False applies the task loss to the real clips only (motion label 1); the release applies it to
    both clips of a pair, which helps where one frame shows the scene (Kinetics), and only adds noise where a
    static clip cannot tell the class by construction (the demo dataset).
    With alpha_d > 0 the depth prior (`depth_prior_loss`, not in the paper; off by default) is added with
    `depth_target` (L,) as its target.
    """
    num_classes = out.logits.shape[-1] if num_classes is None else num_classes
    if out.logits.shape[-1] != num_classes:
        raise ValueError(f"logits have {out.logits.shape[-1]} classes but num_classes is {num_classes}")
    real = slice(None) if task_on_fakes or motion_labels is None else motion_labels == 1
    l_task = task_loss(out.logits[real], labels[real], multi_label)
    l_ponder = ponder_loss(out.ponder)
    total = l_task + alpha_p * l_ponder  # Eq. (9), first two terms
    parts = {"task": l_task.item(), "ponder": l_ponder.item(), "motion": 0.0}
    if alpha_m != 0 and out.motion_logits is not None and motion_labels is not None:
        l_motion = motion_loss(out.motion_logits, motion_labels)
        total = total + alpha_m * l_motion  # Eq. (9), third term
        parts["motion"] = l_motion.item()
    if alpha_d != 0:
        l_depth = depth_prior_loss(out.halt_scores, depth_target)
        total = total + alpha_d * l_depth
        parts["depth"] = l_depth.item()
    parts["total"] = total.item()
    return total, parts


# ----------------------------------------------------------------------------------------------------------
# Evaluation metrics: top-1/top-5 or mAP, motion accuracy, GFLOPs and halting depths, summed batch by batch
# ----------------------------------------------------------------------------------------------------------

def average_precision(scores, targets):
    """Mean over classes (with at least one positive) of the average precision: scores, targets (B, Y)."""
    aps = []
    for s, t in zip(scores.T, targets.T):
        if t.sum() == 0:
            continue
        t = t[s.argsort(descending=True)]
        hits = t.cumsum(0)
        precision = hits / torch.arange(1, len(t) + 1)
        aps.append((precision * t).sum() / t.sum())
    return torch.stack(aps).mean().item() if aps else float("nan")


def eval_counters(depth, glimpser_depth):
    """The evaluation's sums, by name, for a model of `depth` layers: float64 tensors, scalars but for the
    per-layer ones."""
    names = ("videos", "skipped", "top1", "top5", "motion_correct", "motion_clips", "gflops", "gflops_release",
             "depth_sum", "tokens")
    return {**{name: torch.zeros((), dtype=torch.float64) for name in names},
            "depth_hist": torch.zeros(depth - glimpser_depth, dtype=torch.float64),  # halted at joint layer 1..L
            "tokens_per_layer": torch.zeros(depth, dtype=torch.float64)}


def add_eval_batch(count, out, label, motion, multi_label, scores, targets):
    """Add one batch's drop-mode output (B real clips, then their B fakes) to the counters; for multi-label, its
    (B, Y) scores and targets to the lists."""
    B = len(out.logits) // 2
    logits, label = out.logits[:B].float(), label[:B]
    if multi_label:
        # AP depends on the ranking alone: logits rank as the probabilities do, without the ties that sigmoid
        # makes by rounding confident scores to exactly 1
        scores.append(logits.cpu()), targets.append(label.float().cpu())
    else:
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices  # (B, 5)
        count["top1"] += (top5[:, 0] == label).sum().item()
        count["top5"] += (top5 == label[:, None]).any(1).sum().item()
    depth = out.halt_depth[:B]  # (B, K) joint layer 1..L where each token halted
    count["videos"] += B
    if out.motion_logits is not None:  # no motion head when the run has no Motion Loss
        count["motion_correct"] += (out.motion_logits.argmax(1) == motion).sum().item()
        count["motion_clips"] += len(out.logits)
    count["gflops"] += out.gflops[:B].sum().item()
    if out.gflops_release is not None:  # a release-compatible forward: the release's count too
        count["gflops_release"] += out.gflops_release[:B].sum().item()
    count["depth_sum"] += depth.sum().item()
    count["tokens"] += depth.numel()
    L = len(count["depth_hist"])
    count["depth_hist"] += torch.bincount(depth.flatten().cpu() - 1, minlength=L).double()
    count["tokens_per_layer"] += out.tokens_per_layer[:B].sum(0).cpu().double()


def eval_metrics(c, dense_gflops, multi_label):
    """The metrics from the summed counters: means per readable video (nan when there was none).
    `dense_gflops`: a video's GFLOPs without pruning or halting, reported beside those spent; val_gflops_release
    (the release's count, every token until its own halt) where the model's forward gave it (release_compat)."""
    n, tokens = c["videos"].item() or math.nan, c["tokens"].item() or math.nan
    clips = c["motion_clips"].item() or math.nan  # nan: no motion head
    metrics = {"val_motion_acc": c["motion_correct"].item() / clips, "val_gflops": c["gflops"].item() / n,
               "dense_gflops": dense_gflops, "halt_depth_mean": c["depth_sum"].item() / tokens,
               "halt_depth_hist": (c["depth_hist"] / tokens).tolist(),
               "tokens_per_layer": (c["tokens_per_layer"] / n).tolist(),
               "val_videos": int(c["videos"].item()), "val_skipped": int(c["skipped"].item())}
    if c["gflops_release"].item():  # counted (no video costs nothing)
        metrics["val_gflops_release"] = c["gflops_release"].item() / n
    if not multi_label:
        metrics.update(val_top1=c["top1"].item() / n, val_top5=c["top5"].item() / n)
    return metrics


if __name__ == "__main__":
    from types import SimpleNamespace
    torch.manual_seed(0)
    B, Y = 4, 6
    out = SimpleNamespace(logits=torch.randn(B, Y), motion_logits=torch.randn(B, 2),
                          ponder=torch.full((B,), 5.5))
    total, parts = haltingvt_loss(out, torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 0]))
    print({k: round(v, 4) for k, v in parts.items()})
