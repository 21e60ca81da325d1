"""The HaltingVT training objective: task, ponder and motion losses, Eq. (5), (8) and (9) of the paper.

Axis letters: B batch (for a Motion Loss batch, the real clips followed by their fake copies), Y classes.

The model hands over one output object with
    logits         (B, Y)  the classifier on x_o (Eq. 6),
    motion_logits  (B, 2)  the motion head on the same x_o, or None when the model has no motion head,
    ponder         (B,)    each sample's mean over its tokens of N_k + r_k (Eq. 3-5), still differentiable.
`haltingvt_loss` turns that and the batch's labels into the scalar that is back-propagated, plus plain floats
for the log. Labels are checked before use: an out-of-range label fails on CPU with an opaque IndexError and on
CUDA with a device-side assert that kills the process, so we raise a ValueError naming the value instead.
"""
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


def haltingvt_loss(out, labels, motion_labels=None, *, num_classes=None, alpha_p=5e-4, alpha_m=0.01,
                   multi_label=False, task_on_fakes=True):
    """Eq. (9): L = L_task + alpha_p * L_ponder + alpha_m * L_motion. Returns (total, parts for the log).

    alpha_p = 5e-4 and alpha_m = 0.01 are the paper's values (Sec. 4.1). The authors' release config sets the
    motion weight to 0.001, but its loss code only uses that number to switch the term on and then adds the
    motion cross-entropy unweighted (alpha_m = 1 in effect); we follow the paper. The motion term is left out
    entirely (not computed) when alpha_m == 0, when the model gives no motion logits, or when no motion labels
    are given (evaluation).
    task_on_fakes=False applies the task loss to the real clips only (motion label 1); the release applies it to
    both clips of a pair, which helps where one frame shows the scene (Kinetics), and only adds noise where a
    static clip cannot tell the class by construction (the demo dataset).
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
    parts["total"] = total.item()
    return total, parts


if __name__ == "__main__":
    from types import SimpleNamespace
    torch.manual_seed(0)
    B, Y = 4, 6
    out = SimpleNamespace(logits=torch.randn(B, Y), motion_logits=torch.randn(B, 2),
                          ponder=torch.full((B,), 5.5))
    total, parts = haltingvt_loss(out, torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 0]))
    print({k: round(v, 4) for k, v in parts.items()})
