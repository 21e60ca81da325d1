"""Train and evaluate HaltingVT: the one-command sanity run, and the real loop (CPU or CUDA, one GPU or many).

    python train.py                                   # the sanity run: demo dataset, tiny model, a few minutes
    python train.py --halting-map VIDEO --resume runs/sanity/best.pt   # Fig. 4: runs/sanity/halting_map.png
    python train.py --predict VIDEO [VIDEO ...] --resume runs/sanity/best.pt   # top-5, GFLOPs, halting depth
    python train.py --ablation --out runs/ablation    # Tables 1 and 2 on the demo set: runs/ablation/ablation.md
    python train.py --train k200_train.txt --val k200_val.txt --root /data/kinetics --num-classes 200 \
        --model deit_small --init deit_small_patch16_224-cd65a155.pth
    torchrun --standalone --nproc-per-node=8 train.py ...   # the same, one process per GPU

One training step (paper Sec. 3.4 and Eq. 9): a batch of B videos becomes 2B clips, each video's real clip and
its static fake (data.collate); both go through the model; loss = task + alpha_p * ponder + alpha_m * motion.
Evaluation runs the model in drop mode (halted tokens leave the computation) and reports top-1/top-5 (or mAP),
motion accuracy on each validation video's real clip and its fake, GFLOPs spent per video, halting depths.

Two sets of defaults: the real-data ones follow the authors' release config (NOTES.md); the sanity run changes
only what is listed in DEMO_PRESET. Every value in either can be overridden by its flag.
Axis letters as in haltingvt.py: B batch, L joint layers, K tokens entering the joint stage.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import random
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import data
import losses
from haltingvt import HaltingVT, HaltingVTConfig, dense_gflops, load_pretrained
from losses import haltingvt_loss

log = logging.getLogger("train")

# How the model treats halted tokens while training (evaluation always drops them). "drop" removes them from the
# sequence and is exact with gradients; "mask" keeps fixed shapes. Which is faster is measured by bench.py
# --train (README, "Speed"): drop on the CPU and on a GPU in float32; mask with --amp, where drop mode's
# training step measured 5.5x slower on an H200 (DeiT-S, 16 clips; the cause is not yet known).
TRAIN_MODE, AMP_TRAIN_MODE = "drop", "mask"

# Real-data defaults: the authors' release config, per process: 16 videos (32 clips) per GPU.
REAL_DEFAULTS = dict(model="deit_small", optimizer="adam", lr=1e-5, weight_decay=1e-5, epochs=20,
                     warmup_epochs=5, batch_size=16, clip_grad=40.0, alpha_p=5e-4, alpha_m=0.01, alpha_d=0.0,
                     eval_every=1, log_every=20, cache=False, halting_warmup=0.0,
                     embed_std=None, task_on_fakes=True, randaugment=True)

# The sanity run (no --train): a tiny model learns the synthetic demo set (data.DEMO_DOC) from scratch on 2 CPU
# cores in about 3 minutes. Each choice below was measured on this setting (README, "The sanity run"):
# - AdamW at lr 1e-3, weight decay 0.05, 32 videos (64 clips) a step: the usual from-scratch ViT recipe; at
#   lr 1e-5 nothing moves, at 2e-3 it stalled, and 16 videos a step needed about twice the steps.
# - embed_std 0.3: position and time embeddings that start distinct; at DeiT's 0.02 (and the paper's zero time
#   embedding) the model sat at chance for most of the run.
# - task_on_fakes False: a static fake clip of the demo cannot tell its class by construction, so the task loss
#   on it is noise (at 16 videos a step it kept the run at chance); the Motion Loss still sees both clips.
# - alpha_p 0.05 (the paper: 5e-4): from scratch, at 5e-4 the scores never rose and nothing halted.
# - halting_warmup: no halting for the first 7 epochs, then a ramp (halting_ramp): started at once, halting
#   took the class token out at the first joint layer before the later layers had learnt anything.
# - randaugment off: the demo runs without torchvision, and its few synthetic clips need no more variety.
# Decoded demo videos are tiny, so they are cached in RAM after the first epoch.
DEMO_PRESET = dict(model="tiny", optimizer="adamw", lr=1e-3, weight_decay=0.05, epochs=22, warmup_epochs=1,
                   batch_size=32, eval_every=6, log_every=5, cache=True, embed_std=0.3, task_on_fakes=False,
                   halting_warmup=14, alpha_p=0.05, train_scale=data.DEMO_TRAIN_SCALE,
                   eval_short_side=data.DEMO_EVAL_SHORT_SIDE, randaugment=False)

# How much higher beta starts during --halting-warmup: sigmoid(gamma * x0 - beta - 20) is ~0 for any
# x0 a fresh model has, so every token runs through every joint layer while the layers learn something.
BETA_OFF = 20.0

# Parameters without weight decay: the embeddings and class token (as in the release), norms and biases.
NO_DECAY = ("cls_token", "pos_embed", "time_embed")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was left as it was."""


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Unset values: REAL_DEFAULTS, or DEMO_PRESET without --train (train.py).")
    a = p.add_argument_group("data").add_argument
    a("--train", help="training list file (`path label` or `path l1 l2 ...`) or class-folder root; "
                      "without it: the demo sanity run")
    a("--val", help="validation list file or class-folder root")
    a("--root", help="folder the list files' paths are relative to (default: the list file's folder)")
    a("--num-classes", type=int, help="default: from the class folders or the largest label + 1")
    a("--multi-label", action="store_true", help="`path l1 l2 ...` lists, BCE loss, mAP (ActivityNet)")
    a("--on-error", choices=["skip", "raise"], default="skip",
      help="what a bad video does: skip it (logged; the default), or stop")
    a("--workers", type=int, default=0, help="DataLoader worker processes per training process (default 0)")
    a("--train-scale", type=int, nargs=2, help="random short side range (default: img_size * 8/7 .. 10/7)")
    a("--eval-short-side", type=int, help="eval short side before the centre crop (default: img_size * 8/7)")
    a("--randaugment", action=argparse.BooleanOptionalAction,
      help="torchvision's RandAugment in training (paper Sec. 4.1; default: on with --train, off in the demo)")
    a("--cache", action=argparse.BooleanOptionalAction, help="keep decoded videos in RAM (small sets only)")
    a("--demo-root", default="data/demo", help="where the sanity run writes its demo dataset (data/demo)")
    a("--demo-videos", type=int, nargs=2, default=(100, 20), metavar=("TRAIN", "VAL"),
      help="demo videos per class (100 20)")
    m = p.add_argument_group("model (unset values come from --model, or DEMO_PRESET)").add_argument
    m("--model", choices=["tiny", "deit_small"], help="HaltingVTConfig.tiny() or .deit_small()")
    m("--init", help="weights to start from: a DeiT-S image checkpoint (DeiT's, timm's, any wrapper; inflated), "
                     "a train.py checkpoint (stage 2 of the paper's recipe; loaded as it is) or the release's "
                     "(haltingvt.load_pretrained)")
    m("--frames", type=int, help="frames per clip (8 Mini-Kinetics, 10 ActivityNet)")
    m("--img-size", type=int)
    m("--embed-dim", type=int)
    m("--depth", type=int)
    m("--heads", type=int)
    m("--glimpser-depth", type=int)
    m("--keep-ratio", type=float, help="R of the Glimpser, Eq. (7)")
    m("--gamma", type=float, help="Eq. (2)")
    m("--beta", type=float, help="Eq. (2), subtracted: larger beta halts later")
    m("--eps", type=float, help="Eq. (3)")
    m("--drop-path", type=float)
    m("--no-halting", dest="halting", action="store_false", help="run every joint layer on every token")
    o = p.add_argument_group("optimisation (unset values: real-data defaults, or DEMO_PRESET without --train)")
    o = o.add_argument
    o("--preset", choices=["demo", "real"], help="default: demo without --train, else real")
    o("--optimizer", choices=["adam", "adamw"])
    o("--lr", type=float)
    o("--weight-decay", type=float)
    o("--epochs", type=int)
    o("--warmup-epochs", type=float)
    o("--batch-size", type=int, help="videos per process; each gives a real and a fake clip")
    o("--clip-grad", type=float, help="max gradient norm")
    o("--alpha-p", type=float, help="ponder weight, Eq. (9)")
    o("--alpha-m", type=float, help="motion weight, Eq. (9) (the paper's; see losses.py)")
    o("--alpha-d", type=float, help="weight of the halting-depth prior (not in the paper, see "
                                    "losses.depth_prior_loss); 0 = off")
    o("--depth-prior", type=float, nargs=2, metavar=("MEAN", "STD"),
      help="the prior's Gaussian over joint layers 1..L (default: the middle layer, std L/4)")
    o("--train-mode", choices=["mask", "drop"],
      help="halted tokens in training (default: TRAIN_MODE, or AMP_TRAIN_MODE with --amp)")
    o("--task-on-fakes", action=argparse.BooleanOptionalAction,
      help="apply the task loss to the static fake clips too (the release does; see losses.haltingvt_loss)")
    o("--halting-warmup", type=float, help="epochs of halting warm-up (train.halting_ramp): no halting and no "
                                           "ponder loss for the first half, then a linear rise (0 = off)")
    o("--embed-std", type=float, help="from scratch: start pos_embed and time_embed at this std instead of "
                                      "DeiT's 0.02 and the paper's 0 (ignored with --init)")
    r = p.add_argument_group("run").add_argument
    r("--out", help="for metrics.jsonl, last.pt, best.pt, final.json (runs/sanity; runs/ablation with --ablation;"
                    " with --halting-map: the checkpoint's folder)")
    r("--seed", type=int, default=0)
    r("--device", help="default: cuda if available, else cpu")
    r("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    r("--threads", type=int, help="torch CPU threads per process (default: cores / local processes)")
    r("--resume", help="checkpoint to continue from (or to evaluate, with --eval-only)")
    r("--eval-only", action="store_true")
    r("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    r("--log-every", type=int, help="progress line every N steps")
    r("--stop-after", type=int, help="stop after N epochs of this run (the schedule still spans --epochs)")
    v = p.add_argument_group("prediction, pictures and ablations").add_argument
    v("--predict", nargs="+", metavar="VIDEO", help="print the top-5 classes, GFLOPs and mean halting depth of each "
                                                    "video with the --resume checkpoint, then exit")
    v("--json", action="store_true", help="with --predict: one JSON object per video, one a line")
    v("--halting-map", metavar="VIDEO", help="write OUT/halting_map.png (paper Fig. 4) for this video with the "
                                             "--resume checkpoint, then exit")
    v("--map-layers", type=int, nargs="+", help="joint layers (1..L) whose active tokens the map shows "
                                                "(default: up to 3 spread over 2..L)")
    v("--ablation", action="store_true", help="one training per row of Tables 1 and 2 (ablation_rows), each in "
                                              "its own folder of --out; the table goes to OUT/ablation.md")
    v("--ablation-seeds", type=int, nargs="+", default=[0], help="seeds of each ablation row (0)")
    args = p.parse_args(argv)
    if args.out is None and args.halting_map:
        args.out = str(Path(args.resume).parent) if args.resume else "runs/sanity"
    args.out = args.out or ("runs/ablation" if args.ablation else "runs/sanity")
    return apply_preset(args)


def apply_preset(args):
    """Fill every unset optimisation value from the demo preset or the real-data defaults."""
    args.preset = args.preset or ("real" if args.train else "demo")
    if args.preset == "real" and not (args.train and args.val):
        raise SystemExit("--preset real needs --train and --val")
    preset = {**REAL_DEFAULTS, **(DEMO_PRESET if args.preset == "demo" else {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.train_mode = args.train_mode or (AMP_TRAIN_MODE if args.amp else TRAIN_MODE)
    return args


# ----------------------------------------------------------------------------------------------------------
# Processes and devices
# ----------------------------------------------------------------------------------------------------------

def setup_distributed(args):
    """(rank, world size, device). A process group only when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        if local >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; start "
                             "torchrun with --nproc-per-node at most that, or pass --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) over processes, in place; a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Data, model, optimiser
# ----------------------------------------------------------------------------------------------------------

def build_data(args, rank):
    """(train set, val set, num_classes). The sanity run first writes the demo dataset (rank 0 only)."""
    if args.preset == "demo" and not args.train:
        if rank == 0:
            args_demo = dict(num_train=args.demo_videos[0], num_val=args.demo_videos[1])
            if not data.demo_dataset_ready(args.demo_root, **args_demo):
                log.info("writing the demo dataset to %s", args.demo_root)
            data.make_demo_dataset(args.demo_root, **args_demo)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for the files
        args.train, args.val = f"{args.demo_root}/train.txt", f"{args.demo_root}/val.txt"
    base = getattr(HaltingVTConfig, args.model)()  # frames and size unless the flags say otherwise
    frames, size = args.frames or base.num_frames, args.img_size or base.img_size
    common = dict(root=args.root, num_frames=frames, img_size=size, multi_label=args.multi_label,
                  num_classes=args.num_classes, on_error=args.on_error, seed=args.seed, cache=args.cache,
                  short_side=args.eval_short_side, scale=args.train_scale)
    train = data.VideoDataset(args.train, train=True, randaugment=args.randaugment, **common)
    # validation: each video's real clip and its static fake, for the motion accuracy; labelled with the
    # training set's classes (class folders by name)
    common["num_classes"] = train.num_classes
    val = data.VideoDataset(args.val, train=False, motion_pairs=True, classes=train.classes, **common)
    log_labels_by_index(args, train, val)
    return train, val, train.num_classes


def log_labels_by_index(args, train, val):
    """Say so when one set is a list file and the other class folders: labels then match by index, not name."""
    if train.classes is None and val.classes is not None:
        log.warning("labels by index: the training list file %s names no classes, so the class folders of %s "
                    "are numbered in sorted order (%r is 0)", args.train, args.val, val.classes[0])
    elif train.classes is not None and not Path(args.val).is_dir():
        log.info("labels by index: label i of the validation list file %s means the i-th class folder of %s in "
                 "sorted order (0 is %r)", args.val, args.train, train.classes[0])


def model_config(args, num_classes) -> HaltingVTConfig:
    """The named setting with every model flag that was given on top."""
    flags = dict(num_frames=args.frames, img_size=args.img_size, embed_dim=args.embed_dim, depth=args.depth,
                 num_heads=args.heads, glimpser_depth=args.glimpser_depth, keep_ratio=args.keep_ratio,
                 gamma=args.gamma, beta=args.beta, eps=args.eps, drop_path=args.drop_path)
    overrides = {k: v for k, v in flags.items() if v is not None}
    # no motion loss, no motion head: an untrained head would only add parameters without gradients (DDP)
    overrides.update(num_classes=num_classes, halting=args.halting, motion_head=args.alpha_m != 0)
    return getattr(HaltingVTConfig, args.model)(**overrides)


def build_model(cfg: HaltingVTConfig, args, device):
    model = HaltingVT(cfg)
    if args.embed_std and not args.init:
        with torch.no_grad():
            model.pos_embed.normal_(0, args.embed_std)
            model.time_embed.normal_(0, args.embed_std)
    if args.init:
        log.info("--init %s", args.init)
        load_pretrained(model, data.read_checkpoint(args.init))  # logs what it loaded, left fresh and did not use
    return model.to(device)


def build_optimizer(model, args, steps_per_epoch):
    """Adam(W) with no weight decay on the embeddings, class token, norms and biases; warm-up then cosine.

    The schedule is stepped every iteration (not every epoch), so warm-up is smooth even for short runs:
    LinearLR from 0.1 x lr over the warm-up iterations, then CosineAnnealingLR to 0 (release config).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in NO_DECAY else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class(groups, lr=args.lr)
    total = max(1, args.epochs * steps_per_epoch)
    warm = min(int(args.warmup_epochs * steps_per_epoch), total - 1)
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=total - warm, eta_min=0.0)
    if warm == 0:
        return optimizer, cosine
    linear = sched.LinearLR(optimizer, start_factor=0.1, total_iters=warm)
    return optimizer, sched.SequentialLR(optimizer, [linear, cosine], milestones=[warm])


def epoch_loader(dataset, args, epoch, rank, world, skip_batches=0, train=True):
    """The DataLoader of one epoch.

    Training: a shuffle seeded by (seed, epoch), the same in every process, split between processes
    (DistributedSampler, also for one process); `skip_batches` resumes in the middle of an epoch. The dataset's
    augmentation is seeded by (seed, epoch, index). So an epoch's batches are the same however often the run
    stopped and resumed. Evaluation: each process takes every world-th video, no padding, no duplicates.
    """
    dataset.set_epoch(epoch)
    if train:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed, drop_last=True)
        sampler.set_epoch(epoch)
        order = list(sampler)[skip_batches * args.batch_size:]
    else:
        order = list(range(rank, len(dataset), world))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=order, drop_last=train,
                                       num_workers=args.workers, collate_fn=data.collate,
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_sigint)


def ignore_sigint(worker_id):
    """Ctrl-C reaches the DataLoader workers too; they leave it to the main process, which saves and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def rng_states() -> dict:
    """Every RNG's state in a form weights_only=True loads: Python's (version, 625 ints, gauss) tuple as a list,
    numpy's legacy state tuple with its uint32 key array as an int64 tensor, torch's as tensors."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(internal), gauss],
              "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    """Put back the states rng_states saved."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def plain(value):
    """A run argument as a plain value that weights_only=True loads: tuples become lists, paths strings."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def class_names(dataset, source) -> Optional[list]:
    """The training set's class names: its class folders', or those of a classes.txt beside its list file (one
    name a line, in label order, as the demo set has) when it names every class; otherwise None."""
    if dataset.classes is not None:
        return list(dataset.classes)
    path = Path(source).parent / "classes.txt"
    if not (Path(source).is_file() and path.is_file()):
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(names) != dataset.num_classes:
        log.warning("%s names %d classes, the training set has %d: no class names saved", path, len(names),
                    dataset.num_classes)
        return None
    return names


def save_checkpoint(path, model, optimizer, scheduler, state: dict, cfg: HaltingVTConfig, args, classes=None):
    """A plain dict (tensors, numbers, strings, lists: it loads with weights_only=True), written to a temporary
    file and renamed: a kill at any moment leaves the old file whole. `classes`: the class names, or None."""
    ckpt = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), **state, "config": cfg.to_dict(), "args": plain(vars(args)),
            "classes": classes, "rng": rng_states()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def read_run_checkpoint(path) -> dict:
    """A checkpoint written by train.py, read with weights_only=True; SystemExit naming the file for any other."""
    ckpt = data.read_checkpoint(path)
    if not (isinstance(ckpt, dict) and {"model", "config"} <= ckpt.keys()):
        raise SystemExit(f"{path} was not written by train.py (it has no 'model' and 'config'); to start from "
                         "other weights, pass it to --init")
    return ckpt


def load_checkpoint(path, model, optimizer=None, scheduler=None) -> dict:
    """Load weights (and optimiser, scheduler, RNG states when given); returns the run state to continue."""
    ckpt = read_run_checkpoint(path)
    unwrap(model).load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_states(ckpt["rng"])
    return {k: ckpt[k] for k in ("epoch", "batch_in_epoch", "step", "best")}


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def weights_sha(model) -> str:
    """A hash of every parameter's bytes: equal replicas have equal hashes."""
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

class StopFlag:
    """Set by SIGINT / SIGTERM while the training loop runs (a `with` block, which then puts the previous
    handlers back); the loop saves last.pt at the end of the current step and returns."""

    signals = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.set = False
        self.previous = [signal.signal(sig, self.handle) for sig in self.signals]
        return self

    def __exit__(self, *exc):
        for sig, handler in zip(self.signals, self.previous):
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        log.warning("%s received: saving last.pt after this step", signal.Signals(signum).name)
        self.set = True


def autocast(args, device):
    """bf16 autocast on CUDA with --amp; otherwise a no-op context."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")


def forward_loss(model, batch, args, device, num_classes, ramp=1.0):
    """Eq. (9) on B videos = 2B clips (real, then fake): (loss tensor, parts as floats). `ramp` scales the
    ponder and depth-prior weights (halting_ramp)."""
    video, label, motion = (batch[k].to(device, non_blocking=True) for k in ("video", "label", "motion"))
    with autocast(args, device):  # the losses too: autocast runs cross-entropy in float32
        beta = unwrap(model).cfg.beta + BETA_OFF * (1 - ramp)  # the halting warm-up (halting_ramp)
        out = model(video, drop_halted=args.train_mode == "drop", beta=beta)
        prior = {}
        if args.alpha_d:  # the depth prior, off by default
            L = out.halt_scores.shape[0]
            mean, std = args.depth_prior or ((L + 1) / 2, L / 4)
            prior = dict(alpha_d=args.alpha_d * ramp, depth_target=losses.depth_prior(L, mean, std))
        return haltingvt_loss(out, label, motion, num_classes=num_classes, alpha_p=args.alpha_p * ramp,
                              alpha_m=args.alpha_m, multi_label=args.multi_label,
                              task_on_fakes=args.task_on_fakes, **prior)


def single_threaded(loader):
    """Yield the loader's batches, built with one torch thread (this matters with --workers 0).

    The per-clip resizes and crops are too small to gain from intra-op threads, and on a busy CPU their thread
    hand-offs made a demo batch about 30x slower (3 s instead of 0.1 s on the 2 shared cores here)."""
    threads, batches = torch.get_num_threads(), iter(loader)
    while True:
        torch.set_num_threads(1)
        try:
            batch = next(batches, None)
        finally:
            torch.set_num_threads(threads)
        if batch is None:
            return
        yield batch


def halting_ramp(args, epochs_done: float) -> float:
    """How far halting is switched on, 0..1 (the halting warm-up, not in the paper; 1 without it).

    0 for the first half of --halting-warmup epochs, then a linear rise to 1. The training loop sets beta to
    --beta + BETA_OFF * (1 - ramp) and scales the ponder and depth-prior weights by the ramp. Why: from scratch
    at lr 1e-3, a class token that halts at the first joint layer while the later layers are still noise never
    comes back (its score saturates and the later layers stop receiving gradient); and Adam rescales even the
    ponder loss's tiny gradient on a near-zero score to full-size steps, so the ponder weight must be off too.
    """
    if not args.halting_warmup:
        return 1.0
    half = args.halting_warmup / 2
    return min(max((epochs_done - half) / half, 0.0), 1.0)


def train_one_epoch(model, loader, optimizer, scheduler, run, args, device, num_classes, stop: StopFlag):
    """Train over one epoch's loader. `run` holds epoch, batch_in_epoch, step, steps_per_epoch, t0; updated.

    Returns the mean total loss, or None when a stop signal ended the epoch early. Raises NonFiniteLoss.
    """
    model.train()
    total, count, tick, ticks, skipped = 0.0, 0, time.time(), 0, set()
    for batch in single_threaded(loader):
        skipped.update(batch["skipped"])  # bad videos the dataset passed over (--on-error skip)
        ramp = halting_ramp(args, run["step"] / run["steps_per_epoch"])
        loss, parts = forward_loss(model, batch, args, device, num_classes, ramp)
        # one collective per step: did any process see a bad loss, or a stop signal?
        bad = float(not math.isfinite(parts["total"]))
        flags = all_reduce(torch.tensor([bad, float(stop.set)], device=device), dist.ReduceOp.MAX).tolist()
        if flags[0]:
            raise NonFiniteLoss(f"loss is {parts['total']} at epoch {run['epoch'] + 1}, step {run['step']} "
                                f"(parts {parts}); stopping without writing a checkpoint, so "
                                f"{args.out}/last.pt is the last good state. Try a lower --lr or no --amp.")
        if flags[1]:
            return None  # before this batch's update: --resume starts again from this batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        if not torch.isfinite(grad_norm):  # the same on every process: gradients were already averaged
            raise NonFiniteLoss(f"gradient norm is {grad_norm.item()} at epoch {run['epoch'] + 1}, step "
                                f"{run['step']}; stopping before the update, {args.out}/last.pt is untouched.")
        optimizer.step()
        scheduler.step()
        run["step"] += 1
        run["batch_in_epoch"] += 1
        total, count, ticks = total + parts["total"], count + 1, ticks + 1
        if run["step"] % args.log_every == 0:
            log_progress(run, parts, optimizer, len(batch["video"]) * ticks / (time.time() - tick), args)
            tick, ticks = time.time(), 0
    if skipped:
        log.warning("epoch %d: %d bad videos skipped: %s", run["epoch"] + 1, len(skipped), sorted(skipped)[:3])
    total, count = all_reduce(torch.tensor([total, count], dtype=torch.float64, device=device)).tolist()
    return total / max(count, 1)  # the mean over every process's steps


def log_progress(run, parts, optimizer, clips_per_s, args):
    """One line: step/total, each loss part, lr, clips/s, time left at this run's mean step time."""
    total = args.epochs * run["steps_per_epoch"]
    step_s = (time.time() - run["t0"]) / max(run["step"] - run["start_step"], 1)
    left = time.strftime("%H:%M:%S", time.gmtime((total - run["step"]) * step_s))
    terms = " ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "total")  # task, ponder, motion, ...
    log.info("epoch %d step %d/%d  loss %.4f (%s)  lr %.2e  %.1f clips/s  left %s", run["epoch"] + 1, run["step"],
             total, parts["total"], terms, optimizer.param_groups[0]["lr"], clips_per_s, left)


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------

def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
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


def eval_counters(cfg: HaltingVTConfig) -> dict:
    """evaluate's sums, by name: float64 tensors, scalars but for the per-layer ones."""
    L = cfg.depth - cfg.glimpser_depth
    names = ("videos", "skipped", "top1", "top5", "motion_correct", "motion_clips", "gflops", "depth_sum",
             "tokens")
    return {**{name: torch.zeros((), dtype=torch.float64) for name in names},
            "depth_hist": torch.zeros(L, dtype=torch.float64),  # tokens halted at joint layer 1..L
            "tokens_per_layer": torch.zeros(cfg.depth, dtype=torch.float64)}


def reduce_counters(counters: dict, device) -> dict:
    """Sum each named counter over the processes, all in one all_reduce; each keeps its shape."""
    flat = all_reduce(torch.cat([c.reshape(-1) for c in counters.values()]).to(device)).cpu()
    parts = flat.split([c.numel() for c in counters.values()])
    return {name: part.view_as(c) for (name, c), part in zip(counters.items(), parts)}


def eval_batch(model, batch, args, device, count: dict, scores: list, targets: list):
    """Add one batch (B real clips, then their B fakes: data.collate) to the counters; for multi-label, its
    (B, Y) scores and targets to the lists."""
    video, label, motion = (batch[k].to(device) for k in ("video", "label", "motion"))
    with autocast(args, device):
        out = model(video, drop_halted=True)
    B = len(video) // 2
    logits, label = out.logits[:B].float(), label[:B]
    if args.multi_label:
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
        count["motion_clips"] += len(video)
    count["gflops"] += out.gflops[:B].sum().item()
    count["depth_sum"] += depth.sum().item()
    count["tokens"] += depth.numel()
    L = len(count["depth_hist"])
    count["depth_hist"] += torch.bincount(depth.flatten().cpu() - 1, minlength=L).double()
    count["tokens_per_layer"] += out.tokens_per_layer[:B].sum(0).cpu().double()


def eval_metrics(c: dict, cfg: HaltingVTConfig, multi_label: bool) -> dict:
    """The metrics from the summed counters: means per readable video (nan when there was none)."""
    n, tokens = c["videos"].item() or math.nan, c["tokens"].item() or math.nan
    clips = c["motion_clips"].item() or math.nan  # nan: no motion head
    metrics = {"val_motion_acc": c["motion_correct"].item() / clips, "val_gflops": c["gflops"].item() / n,
               "dense_gflops": dense_gflops(cfg), "halt_depth_mean": c["depth_sum"].item() / tokens,
               "halt_depth_hist": (c["depth_hist"] / tokens).tolist(),
               "tokens_per_layer": (c["tokens_per_layer"] / n).tolist(),
               "val_videos": int(c["videos"].item()), "val_skipped": int(c["skipped"].item())}
    if not multi_label:
        metrics.update(val_top1=c["top1"].item() / n, val_top5=c["top5"].item() / n)
    return metrics


@torch.no_grad()
def evaluate(model, loader, args, device, cfg: HaltingVTConfig) -> dict:
    """Drop mode (halted tokens leave the computation) on each video's real clip; motion accuracy on the
    real clips and their static fakes. Each readable video counts once; an unreadable one is left out, named in
    a warning and counted in val_skipped. The counters are summed across processes (a process may have no
    video at all); every process gets the result."""
    model = unwrap(model).eval()
    count, scores, targets, skipped = eval_counters(cfg), [], [], []
    for batch in single_threaded(loader):
        skipped += batch["skipped"]
        if "video" in batch:  # else every video of the batch was unreadable
            eval_batch(model, batch, args, device, count, scores, targets)
    if skipped:
        log.warning("evaluation: %d unreadable videos left out: %s", len(skipped), skipped[:5])
    count["skipped"] += len(skipped)
    count = reduce_counters(count, device)
    if count["videos"] == 0:
        log.warning("evaluation: no readable validation video; the metrics are nan")
    metrics = eval_metrics(count, cfg, args.multi_label)
    if args.multi_label:
        metrics["val_map"] = average_precision(*gather_scores(scores, targets, cfg.num_classes))
    return metrics


def gather_scores(scores: list, targets: list, num_classes: int):
    """All processes' (scores, targets) for mAP, concatenated: (N, num_classes) each; a process may have none."""
    empty = torch.zeros(0, num_classes)
    scores, targets = torch.cat([empty, *scores]), torch.cat([empty, *targets])
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (scores, targets))
        scores, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return scores, targets


def summary(m: dict) -> str:
    acc = f"val mAP {m['val_map']:.3f}" if "val_map" in m else \
        f"val top-1 {m['val_top1']:.3f} (top-5 {m['val_top5']:.3f})"
    skipped = f" ({m['val_skipped']} unreadable, left out)" if m.get("val_skipped") else ""
    ratio = m["val_gflops"] / m["dense_gflops"]
    return (f"{acc} on {m['val_videos']} videos{skipped}, motion acc {m['val_motion_acc']:.3f}, GFLOPs/video "
            f"{m['val_gflops']:.4f} spent vs {m['dense_gflops']:.4f} dense ({ratio:.2f}x), mean halting depth "
            f"{m['halt_depth_mean']:.2f}, halting hist " + " ".join(f"{h:.2f}" for h in m["halt_depth_hist"]) +
            ", tokens per layer " + " ".join(f"{t:.0f}" for t in m["tokens_per_layer"]))


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Train (or evaluate) as the flags say; returns the last evaluation's metrics."""
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.predict:
            return predict(args, device)
        if args.halting_map:
            return write_halting_map(args, device)
        if args.ablation:
            return ablation(args, sys.argv[1:] if argv is None else argv, rank, world, device)
        result = run(args, rank, world, device)
        if dist.is_initialized():
            dist.barrier()  # no rank tears the process group down while another still uses it
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device) -> dict:
    seed_everything(args.seed)
    if args.amp and device.type != "cuda":
        log.warning("--amp (bf16 autocast) is for CUDA; running in float32 on %s", device)
    train_set, val_set, num_classes = build_data(args, rank)
    cfg = model_config(args, num_classes)
    if args.resume:
        saved = HaltingVTConfig(**read_run_checkpoint(args.resume)["config"])
        if saved != cfg:
            log.warning("--resume: using the checkpoint's model config %s", saved)
        cfg = saved
    model = build_model(cfg, args, device)
    val_loader = epoch_loader(val_set, args, 0, rank, world, train=False)
    if args.eval_only:
        if args.resume:
            load_checkpoint(args.resume, model)
        metrics = evaluate(model, val_loader, args, device, cfg)
        log.info("eval: %s", summary(metrics))
        return metrics
    steps_per_epoch = len(train_set) // world // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training videos are fewer than one batch of {args.batch_size} "
                         f"per process x {world} processes: lower --batch-size")
    optimizer, scheduler = build_optimizer(model, args, steps_per_epoch)
    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best": None}
    if args.resume:
        state = load_checkpoint(args.resume, model, optimizer, scheduler)
        log.info("resumed from %s at epoch %d, step %d", args.resume, state["epoch"], state["step"])
    if world > 1:
        # find_unused_parameters: in drop mode the last joint layers see no token when every token of the
        # batch halted earlier, and without the motion term the motion head gets no gradient.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if rank == 0 and not args.resume:
        (Path(args.out) / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    log.info("model %s; %d parameters; %d train / %d val videos; %d steps/epoch on %d process(es), %s",
             cfg, sum(p.numel() for p in model.parameters()), len(train_set), len(val_set), steps_per_epoch,
             world, device)
    loop = dict(model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg, args=args, device=device,
                rank=rank, world=world, num_classes=num_classes, classes=class_names(train_set, args.train))
    return fit(loop, state, train_set, val_loader, steps_per_epoch)


def fit(loop, state, train_set, val_loader, steps_per_epoch) -> dict:
    """The epoch loop: train, evaluate every --eval-every epochs, save last.pt (and best.pt), log metrics."""
    args, model, rank, world = loop["args"], loop["model"], loop["rank"], loop["world"]
    out = Path(args.out)
    run_state = {**state, "steps_per_epoch": steps_per_epoch, "t0": time.time(), "start_step": state["step"]}
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, state["epoch"] + args.stop_after)
    with StopFlag() as stop:
        metrics = train_epochs(loop, run_state, train_set, val_loader, last_epoch, stop)
    if stop.set:
        return metrics
    if world > 1:  # replicas must agree; the test of the distributed run reads this
        hashes = [None] * world
        dist.all_gather_object(hashes, weights_sha(model))
        metrics["rank_weight_sha"] = hashes
    if rank == 0:
        (out / "final.json").write_text(json.dumps(metrics, indent=1))
        if metrics:
            log.info("done in %.0f s: %s", time.time() - run_state["t0"], summary(metrics))
    return metrics


def train_epochs(loop, run_state, train_set, val_loader, last_epoch, stop) -> dict:
    """Epochs until `last_epoch` or a stop signal; returns the last evaluation's metrics."""
    args, model, rank, world = loop["args"], loop["model"], loop["rank"], loop["world"]
    out, metrics = Path(args.out), {}
    while run_state["epoch"] < last_epoch:
        epoch = run_state["epoch"]
        loader = epoch_loader(train_set, args, epoch, rank, world, skip_batches=run_state["batch_in_epoch"])
        train_loss = train_one_epoch(model, loader, loop["optimizer"], loop["scheduler"], run_state, args,
                                     loop["device"], loop["num_classes"], stop)
        if train_loss is None:  # SIGINT / SIGTERM: save where we are; --resume continues mid-epoch
            checkpoint(loop, run_state, out / "last.pt")
            log.warning("stopped at epoch %d, step %d; continue with --resume %s", epoch + 1, run_state["step"],
                        out / "last.pt")
            return metrics
        run_state.update(epoch=epoch + 1, batch_in_epoch=0)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == last_epoch:
            metrics = {"epoch": epoch + 1, "step": run_state["step"], "train_loss": train_loss,
                       **evaluate(model, val_loader, args, loop["device"], loop["cfg"]),
                       "elapsed_s": time.time() - run_state["t0"]}
            record(metrics, run_state, loop, out)
        checkpoint(loop, run_state, out / "last.pt")
    return metrics


def record(metrics, run_state, loop, out):
    """Log one evaluation, append it to metrics.jsonl and keep best.pt (rank 0; after the halting warm-up)."""
    key = "val_map" if "val_map" in metrics else "val_top1"
    log.info("epoch %d eval: %s", metrics["epoch"], summary(metrics))
    if loop["rank"] != 0:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    args = loop["args"]
    if halting_ramp(args, metrics["epoch"]) < 1 and metrics["epoch"] < args.epochs:
        return  # best.pt holds a model that halts as configured, not one from the halting warm-up
    if run_state["best"] is None or metrics[key] > run_state["best"]:
        run_state["best"] = metrics[key]
        checkpoint(loop, run_state, out / "best.pt")


def checkpoint(loop, run_state, path):
    if loop["rank"] == 0:
        state = {k: run_state[k] for k in ("epoch", "batch_in_epoch", "step", "best")}
        save_checkpoint(path, loop["model"], loop["optimizer"], loop["scheduler"], state, loop["cfg"],
                        loop["args"], loop["classes"])


# ----------------------------------------------------------------------------------------------------------
# Prediction and halting maps (paper Fig. 4) from a trained checkpoint
# ----------------------------------------------------------------------------------------------------------

def load_trained_model(path, device):
    """(model in eval mode, the checkpoint: "config", "args" (the run's, a dict), "classes", ...), rebuilt from a
    train.py checkpoint alone."""
    ckpt = read_run_checkpoint(path)
    model = HaltingVT(HaltingVTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def eval_clip(path, cfg: HaltingVTConfig, run_args: dict) -> torch.Tensor:
    """The video at `path` as evaluation feeds it to the model: float (C, T, H, W). Raises data.VideoDecodeError
    naming the file."""
    short_side = run_args.get("eval_short_side") or round(cfg.img_size * 8 / 7)  # as data.VideoDataset
    clip = data.read_clip(path, cfg.num_frames, train=False)  # (T, H, W, 3)
    return data.eval_transform(clip, cfg.img_size, short_side)


@torch.no_grad()
def predict_clip(model, video, classes, multi_label: bool, k: int = 5) -> dict:
    """One clip (C, T, H, W) in drop mode: {"top5": [{"label", "class" (name or None), "prob"}, ...] best first,
    "gflops" spent, "halt_depth_mean" (mean joint layer 1..L where its tokens halted), "joint_layers" L}.
    Probabilities: softmax over the classes, or each class's sigmoid for a multi-label run."""
    out = model(video.unsqueeze(0), drop_halted=True)
    logits = out.logits[0].float()
    probs = logits.sigmoid() if multi_label else logits.softmax(0)
    top = probs.topk(min(k, len(probs)))
    best = [{"label": i, "class": classes[i] if classes else None, "prob": p}
            for i, p in zip(top.indices.tolist(), top.values.tolist())]
    return {"top5": best, "gflops": out.gflops[0].item(), "halt_depth_mean": out.halt_depth[0].float().mean().item(),
            "joint_layers": model.cfg.depth - model.cfg.glimpser_depth}


def prediction_text(result: dict) -> str:
    """A --predict result as lines: the video, GFLOPs and depth, then one line per class (name or label)."""
    if "error" in result:
        return f"{result['video']}: error: {result['error']}"
    head = (f"{result['video']}: {result['gflops']:.4f} GFLOPs, mean halting depth {result['halt_depth_mean']:.2f} "
            f"of {result['joint_layers']} joint layers")
    return "\n".join([head] + [f"  {c['prob']:.3f}  {c['class'] if c['class'] is not None else c['label']}"
                               for c in result["top5"]])


def predict(args, device) -> list:
    """--predict: each video through the --resume checkpoint's model and its run's eval pipeline; prints each
    result as it comes (prediction_text, or one JSON object a line with --json). A video that cannot be read is
    printed with its error and the others still run; then SystemExit (status 1) names the failed ones. Returns
    the results (predict_clip's dicts with "video", or {"video", "error"})."""
    if not args.resume:
        raise SystemExit("--predict needs --resume CHECKPOINT")
    model, ckpt = load_trained_model(args.resume, device)
    run_args, classes = ckpt.get("args", {}), ckpt.get("classes")
    results = []
    for path in args.predict:
        try:
            video = eval_clip(path, model.cfg, run_args)
        except data.VideoDecodeError as err:
            result = {"video": path, "error": str(err)}
        else:
            result = {"video": path, **predict_clip(model, video.to(device), classes, run_args.get("multi_label"))}
        print(json.dumps(result) if args.json else prediction_text(result), flush=True)
        results.append(result)
    failed = [r["video"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(results)} videos could not be read: {', '.join(failed)}")
    return results


def map_layers(layers, L) -> list:
    """The joint layers a map shows: the given ones, or up to 3 spread over 2..L (at layer 1 every kept token is
    still active, which the Glimpser row already shows)."""
    if layers:
        if not all(1 <= layer <= L for layer in layers):
            raise SystemExit(f"--map-layers {layers}: joint layers are 1..{L}")
        return list(layers)
    return sorted({round(x) for x in np.linspace(2, L, 3)}) if L > 1 else [1]


@torch.no_grad()
def token_masks(model, video, layers):
    """Run one clip (C, T, H, W) in drop mode: bool masks (1 + len(layers), T, S), data.active_token_masks."""
    out = model(video.unsqueeze(0), drop_halted=True)
    keep_index = out.keep_index[0] if out.keep_index is not None else None
    S = (model.cfg.img_size // model.cfg.patch_size) ** 2
    return data.active_token_masks(keep_index, out.halt_depth[0], S, layers)


def write_halting_map(args, device) -> dict:
    """--halting-map: the video through the run's eval pipeline and the checkpoint's model -> OUT/halting_map.png.

    Rows: the input, the patches the Glimpser kept, the tokens still active at each of `map_layers`; columns:
    the sampled frames. Returns {"path": ..., "active": {row name: fraction of the T x S patches active}}."""
    if not args.resume:
        raise SystemExit("--halting-map needs --resume CHECKPOINT")
    model, ckpt = load_trained_model(args.resume, device)
    cfg = model.cfg
    layers = map_layers(args.map_layers, cfg.depth - cfg.glimpser_depth)
    video = eval_clip(args.halting_map, cfg, ckpt.get("args", {}))  # (C, T, H, W)
    masks = token_masks(model, video.to(device), layers)
    image = data.halting_map(data.display_frames(video.cpu()), masks, cfg.patch_size)
    path = Path(args.out) / "halting_map.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_png(path, image)
    names = ["Glimpser"] + [f"joint layer {layer}" for layer in layers]
    active = {name: m.float().mean().item() for name, m in zip(names, masks)}
    log.info("wrote %s (rows: input, %s); patches active: %s", path, ", ".join(names),
             ", ".join(f"{name} {a:.2f}" for name, a in active.items()))
    return {"path": str(path), "active": active}


# ----------------------------------------------------------------------------------------------------------
# Ablations (paper Tables 1 and 2) at laptop scale
# ----------------------------------------------------------------------------------------------------------

ABLATION_COLUMNS = ("setting", "R", "motion loss", "beta", "seed", "val top-1", "GFLOPs/video",
                    "GFLOPs ratio vs dense", "mean halting depth", "wall time (s)")


def ablation_rows(args) -> list:
    """Table 1: no Glimpser, then R = 0.3, 0.5, 0.7, each with the Motion Loss (alpha_m as set) and without
    (alpha_m = 0). Then Table 2's beta sweep at R = 0.5 with the Motion Loss: beta x 0.5, 1.5, 2 (beta x 1 is
    Table 1's R = 0.5 row). Each row: the model and loss flags that differ from the sanity run."""
    beta = args.beta if args.beta is not None else getattr(HaltingVTConfig, args.model)().beta
    rows = []
    for R in (None, 0.3, 0.5, 0.7):
        for alpha_m in (args.alpha_m, 0.0):
            rows.append(dict(setting="no Glimpser" if R is None else "Glimpser", keep_ratio=R, alpha_m=alpha_m,
                             beta=beta, glimpser_depth=0 if R is None else args.glimpser_depth))
    for factor in (0.5, 1.5, 2.0):
        rows.append(dict(setting="beta sweep", keep_ratio=0.5, alpha_m=args.alpha_m, beta=beta * factor,
                         glimpser_depth=args.glimpser_depth))
    return rows


def table_line(cells) -> str:
    """One markdown table line."""
    return "| " + " | ".join(cells) + " |"


def table_head(columns) -> list:
    """A markdown table's header and rule lines."""
    return [table_line(columns), "|" + "---|" * len(columns)]


def row_cells(row) -> list:
    """An ablation row's setting, R, motion loss and beta, as table cells."""
    R = "-" if row["glimpser_depth"] == 0 else f"{row['keep_ratio']:g}"
    return [row["setting"], R, "yes" if row["alpha_m"] else "no", f"{row['beta']:g}"]


def ablation_line(row, seed, metrics, wall_s) -> str:
    """One markdown table line, in ABLATION_COLUMNS order."""
    cells = [*row_cells(row), str(seed),
             f"{metrics['val_top1']:.3f}", f"{metrics['val_gflops']:.4f}",
             f"{metrics['val_gflops'] / metrics['dense_gflops']:.2f}", f"{metrics['halt_depth_mean']:.2f}",
             f"{wall_s:.0f}"]
    return table_line(cells)


SUMMARY_COLUMNS = ("setting", "R", "motion loss", "beta", "seeds", "val top-1: mean (min-max)",
                   "GFLOPs ratio vs dense", "mean halting depth")


def ablation_summary(results: list) -> list:
    """One line per row over its seeds, in SUMMARY_COLUMNS order: results are (row, seed, metrics) in row order.
    One seed of these short runs moves top-1 by tens of points (README): compare rows by their means."""
    by_row = {}
    for row, seed, metrics in results:
        by_row.setdefault(id(row), (row, []))[1].append(metrics)
    lines = []
    for row, runs in by_row.values():
        top1 = [m["val_top1"] for m in runs]
        ratio = statistics.mean(m["val_gflops"] / m["dense_gflops"] for m in runs)
        depth = statistics.mean(m["halt_depth_mean"] for m in runs)
        cells = [*row_cells(row), str(len(runs)), f"{statistics.mean(top1):.3f} ({min(top1):.3f}-{max(top1):.3f})",
                 f"{ratio:.2f}", f"{depth:.2f}"]
        lines.append(table_line(cells))
    return lines


def ablation(args, argv, rank, world, device) -> list:
    """--ablation: `run` once per row of ablation_rows and seed, with the row's flags on top of the command
    line's (so --epochs and the like apply to every row), each in OUT/<row>; OUT/ablation.md, rewritten after
    every row so that an interrupted ablation keeps the rows it finished. Returns the table's lines."""
    out = Path(args.out)
    head = [f"Made by `python train.py {shlex.join(argv)}` on {time.strftime('%Y-%m-%d %H:%M')}.", "",
            *table_head(ABLATION_COLUMNS)]
    lines, results = [], []
    for i, row in enumerate(ablation_rows(args)):
        for seed in args.ablation_seeds:
            name = f"{i:02d}_R{row['keep_ratio'] if row['glimpser_depth'] != 0 else 'none'}_" \
                   f"motion{int(bool(row['alpha_m']))}_beta{row['beta']:g}_seed{seed}"
            flags = {k: v for k, v in row.items() if k != "setting"}
            row_args = argparse.Namespace(**{**vars(args), **flags, "seed": seed, "out": str(out / name),
                                             "ablation": False, "resume": None, "eval_only": False})
            log.info("ablation run %s", name)
            t0 = time.time()
            metrics = run(row_args, rank, world, device)
            if metrics.get("epoch") != args.epochs:  # a stop signal, or --stop-after: the row is unfinished
                log.warning("ablation stopped in %s; %s has the rows before it", name, out / "ablation.md")
                return lines
            lines.append(ablation_line(row, seed, metrics, time.time() - t0))
            results.append((row, seed, metrics))
            summary = []
            if len(args.ablation_seeds) > 1:
                summary = ["", "Over the seeds:", "", *table_head(SUMMARY_COLUMNS), *ablation_summary(results)]
            if rank == 0:
                (out / "ablation.md").write_text("\n".join(head + lines + summary) + "\n")
    log.info("wrote %s", out / "ablation.md")
    return lines


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLoss as err:
        raise SystemExit(f"error: {err}")
