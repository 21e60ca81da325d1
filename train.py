"""Train and evaluate HaltingVT: the one-command sanity run, and the real loop (CPU or CUDA, one GPU or many).

    python train.py                                   # the sanity run: demo dataset, tiny model, under 2 minutes
    python train.py --halting-map VIDEO --resume runs/sanity/best.pt   # Fig. 4: runs/sanity/halting_map.png
    python train.py --predict VIDEO [VIDEO ...] --resume runs/sanity/best.pt   # top-5, GFLOPs, halting depth
    python train.py --train k200_train.txt --val k200_val.txt --root /data/kinetics --num-classes 200 \
        --model deit_small --init deit_small_patch16_224-cd65a155.pth
    torchrun --standalone --nproc-per-node=8 train.py ...   # the same, one process per GPU

One training step (paper Sec. 3.4 and Eq. 9): a batch of B videos becomes 2B clips, each video's real clip and
its static fake (data.collate); both go through the model; loss = task + alpha_p * ponder + alpha_m * motion.
Evaluation runs the model in drop mode (halted tokens leave the computation) and reports top-1/top-5 (or mAP),
motion accuracy on each validation video's real clip and its fake, GFLOPs spent per video, halting depths.
The training loop is `fit`; the ablations of Tables 1 and 2 are `python bench.py --ablation`.

Two sets of defaults: the real-data ones follow the config files of the authors' public release
(dun-research/HaltingVT); the sanity run changes only what is listed in DEMO_PRESET. Every value in either can
be overridden by its flag. Axis letters as in haltingvt.py: B batch, L joint layers, K tokens entering the
joint stage.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import checkpoints
import data
import losses
from haltingvt import HaltingVT, HaltingVTConfig, dense_gflops
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
# cores in under 2 minutes. Each choice below was measured on this setting (README, "The sanity run"):
# - 48 x 48 frames (img_size; data.DEMO_TRAIN_SCALE and DEMO_EVAL_SHORT_SIDE scale the 72 x 72 videos to match):
#   9 patches a frame instead of 64 x 64's 16, so a step costs about half as much (bench.py --step); at 4 frames
#   instead of 8 the model learnt more slowly per step than the cost fell.
# - keep_ratio 0.3: 3 of the 9 patches of each frame go on to the joint layers, enough for the one mover (at
#   64 x 64 R = 0.3 was the most accurate setting of the ablation); cheaper steps, so more of them fit.
# - AdamW at lr 1e-3, weight decay 0.05, 32 videos (64 clips) a step: the usual from-scratch ViT recipe; at
#   lr 1e-5 nothing moves, at 2e-3 it stalled, and 16 videos a step needed about twice the steps.
# - embed_std 1.0: position and time embeddings that start distinct and strong beside the patch content; the
#   class needs where *and* when the mover is, and at 0.3 the model sat at chance for a third of the run or more
#   (at DeiT's 0.02, and the paper's zero time embedding, for most of it).
# - task_on_fakes False: a static fake clip of the demo cannot tell its class by construction, so the task loss
#   on it is noise (at 16 videos a step it kept the run at chance); the Motion Loss still sees both clips.
# - alpha_p 0.03 (the paper: 5e-4): from scratch, at 5e-4 the scores never rose and nothing halted; at 0.01
#   (halting warm-up 24) tokens halted later, spending up to 0.50x the dense GFLOPs, and top-1 was no better.
# - halting_warmup: no halting for the first 10 epochs, then a ramp (halting_ramp): started at once, halting
#   took the class token out at the first joint layer before the later layers had learnt anything.
# - randaugment off: the demo runs without torchvision, and its few synthetic clips need no more variety.
# Decoded demo videos are tiny, so they are cached in RAM after the first epoch.
DEMO_PRESET = dict(model="tiny", img_size=48, keep_ratio=0.3, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                   epochs=36, warmup_epochs=1, batch_size=32, eval_every=6, log_every=5, cache=True, embed_std=1.0,
                   task_on_fakes=False, halting_warmup=20, alpha_p=0.03, train_scale=data.DEMO_TRAIN_SCALE,
                   eval_short_side=data.DEMO_EVAL_SHORT_SIDE, randaugment=False)

# How much higher beta starts during --halting-warmup: sigmoid(gamma * x0 - beta - 20) is ~0 for any
# x0 a fresh model has, so every token runs through every joint layer while the layers learn something.
BETA_OFF = 20.0

# Parameters without weight decay: the embeddings and class token (the release's config means to spare them, but
# its keys match no parameter, so it decays everything), norms and biases.
NO_DECAY = ("cls_token", "pos_embed", "time_embed")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was left as it was."""


class UsageError(Exception):
    """A mistake in the command: main prints it as one line, `error: --flag value: what is wrong`, and exits with
    status 2 (HALTINGVT_DEBUG=1 shows the traceback). Any other exception is a bug and keeps its traceback."""


@contextlib.contextmanager
def blame(flag: str, value, errors=(OSError, ValueError, data.VideoDecodeError)):
    """Turn `errors` raised about what a flag names (a missing file, a list file's bad line, a file that is no
    checkpoint) into a UsageError that starts with the flag as typed."""
    try:
        yield
    except errors as err:
        why = err.strerror if isinstance(err, OSError) and err.filename == str(value) else str(err).strip()
        # an error from a DataLoader worker carries the worker's traceback: keep its last line, the error itself
        why = re.sub(r"^[\w.]+: ", "", why.splitlines()[-1]) if "\n" in why else why
        raise UsageError(f"{flag} {why}" if why.startswith(str(value)) else f"{flag} {value}: {why}") from err


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage text: `--frames: invalid int value: 'x'`
        raise UsageError(f"{message.removeprefix('argument ')} (python train.py --help lists the flags)")


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every unset optimisation value filled in from the preset (apply_preset)."""
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False,
               epilog="Unset values: REAL_DEFAULTS, or DEMO_PRESET without --train (train.py). A mistake in the "
                      "command is one line and status 2; HALTINGVT_DEBUG=1 shows its traceback.")
    for add_flags in (data_flags, model_flags, optimisation_flags, run_flags):
        add_flags(p)
    args = p.parse_args(argv)
    if args.resume and not (args.predict or args.halting_map):
        resume_run_args(args, given_flags(p, sys.argv[1:] if argv is None else argv))
    if args.out is None:
        args.out = str(Path(args.resume).parent) if args.halting_map and args.resume else "runs/sanity"
    return apply_preset(args)


def given_flags(p: argparse.ArgumentParser, argv: list) -> set:
    """The dests of the flags written in `argv` (abbreviations are off, so each is spelt out)."""
    used = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {action.dest for action in p._actions if used & set(action.option_strings)}


def resume_run_args(args, given: set):
    """--resume (and --eval-only --resume) go on with the run the checkpoint holds: its saved flags (data, out,
    epochs, seed, ...), except those given again. Without this, a bare `--resume run/last.pt` would train the
    demo preset into runs/sanity."""
    with blame("--resume", args.resume):
        saved = checkpoints.read_run_checkpoint(args.resume).get("args", {})
    for key, value in saved.items():
        if key not in given and key not in ("resume", "eval_only", "init") and hasattr(args, key):
            setattr(args, key, value)


def data_flags(p: argparse.ArgumentParser):
    a = p.add_argument_group("data").add_argument
    a("--train", help="training list file (`path label` or `path l1 l2 ...`) or class-folder root; "
                      "without it: the demo sanity run")
    a("--val", help="validation list file or class-folder root")
    a("--root", help="folder the list files' paths are relative to (default: the list file's folder)")
    a("--num-classes", type=int, help="default: from the class folders or the largest label + 1")
    a("--multi-label", action="store_true", help="`path l1 l2 ...` lists, BCE loss, mAP (ActivityNet)")
    a("--on-error", choices=["skip", "raise"], default="skip", help="a bad video: skip it (logged) or stop")
    a("--workers", type=int, default=0, help="DataLoader worker processes per training process (default 0)")
    a("--train-scale", type=int, nargs=2, help="random short side range (default: img_size * 8/7 .. 10/7)")
    a("--eval-short-side", type=int, help="eval short side before the centre crop (default: img_size * 8/7)")
    a("--randaugment", action=argparse.BooleanOptionalAction,
      help="torchvision's RandAugment in training (paper Sec. 4.1; default: on with --train, off in the demo)")
    a("--cache", action=argparse.BooleanOptionalAction, help="keep decoded videos in RAM (small sets only)")
    a("--rawframes", action="store_true", help="the lists name frame folders, mmaction2's RawframeDataset lists: "
                                               "`frame_dir total_frames label` (or `... l1 l2 ...`)")
    a("--frame-template", default=data.FRAME_TEMPLATE, help="a frame's file name in its folder (img_{:05}.jpg)")
    a("--start-index", type=int, default=1, help="number of a folder's first frame (1)")
    a("--frame-interval", type=int, help="sample T frames this far apart (mmaction2's SampleFrames, as the release: "
                                         "32 Mini-Kinetics, 64 ActivityNet); default: TSN segments")
    a("--demo-root", default="data/demo", help="where the sanity run writes its demo dataset (data/demo)")
    a("--demo-videos", type=int, nargs=2, default=(100, 20), metavar=("TRAIN", "VAL"),
      help="demo videos per class (100 20)")


def model_flags(p: argparse.ArgumentParser):
    m = p.add_argument_group("model (unset values come from --model, or DEMO_PRESET)").add_argument
    m("--model", choices=["tiny", "deit_small"], help="HaltingVTConfig.tiny() or .deit_small()")
    m("--init", help="weights to start from: a DeiT-S image checkpoint (inflated), a train.py checkpoint (stage 2 "
                     "of the paper's recipe) or the release's (checkpoints.load_pretrained)")
    m("--frames", type=int, help="frames per clip (8 Mini-Kinetics, 10 ActivityNet)")
    for name in ("--img-size", "--embed-dim", "--depth", "--heads", "--glimpser-depth"):
        m(name, type=int)
    for name, where in (("--keep-ratio", "R of the Glimpser, Eq. (7)"), ("--gamma", "Eq. (2)"), ("--eps", "Eq. (3)"),
                        ("--beta", "Eq. (2), subtracted: larger beta halts later"), ("--drop-path", None)):
        m(name, type=float, help=where)
    m("--no-halting", dest="halting", action="store_false", help="run every joint layer on every token")
    m("--release-compat", action=argparse.BooleanOptionalAction,
      help="the release's forward (HaltingVTConfig.release_compat), mask execution; default: on when --init is a "
           "checkpoint of the release's layout")


def optimisation_flags(p: argparse.ArgumentParser):
    o = p.add_argument_group("optimisation (unset values: REAL_DEFAULTS, or DEMO_PRESET without --train)").add_argument
    o("--preset", choices=["demo", "real"], help="default: demo without --train, else real")
    o("--optimizer", choices=["adam", "adamw"])
    for name, kind in (("--lr", float), ("--weight-decay", float), ("--epochs", int), ("--warmup-epochs", float)):
        o(name, type=kind)
    o("--batch-size", type=int, help="videos per process; each gives a real and a fake clip")
    o("--clip-grad", type=float, help="max gradient norm")
    o("--alpha-p", type=float, help="ponder weight, Eq. (9)")
    o("--alpha-m", type=float, help="motion weight, Eq. (9) (the paper's 0.01; 1 is the release's in effect)")
    o("--alpha-d", type=float, help="halting-depth prior weight (not in the paper: losses.depth_prior_loss); 0 off")
    o("--depth-prior", type=float, nargs=2, metavar=("MEAN", "STD"),
      help="the prior's Gaussian over joint layers 1..L (default: the middle layer, std L/4)")
    o("--train-mode", choices=["mask", "drop"],
      help="halted tokens in training (default: TRAIN_MODE, or AMP_TRAIN_MODE with --amp; mask with the "
           "release-compatible forward)")
    o("--task-on-fakes", action=argparse.BooleanOptionalAction,
      help="the task loss on the static fake clips too (as the release; see losses.haltingvt_loss)")
    o("--halting-warmup", type=float, help="epochs of halting warm-up: off for half, then a linear rise; 0 = off")
    o("--embed-std", type=float, help="from scratch: pos_embed and time_embed start at this std (not with --init)")


def run_flags(p: argparse.ArgumentParser):
    r = p.add_argument_group("run").add_argument
    r("--out", help="for metrics.jsonl, last.pt, best.pt, final.json (runs/sanity; with --halting-map: the "
                    "checkpoint's folder)")
    r("--seed", type=int, default=0)
    r("--device", help="default: cuda if available, else cpu")
    r("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    r("--threads", type=int, help="torch CPU threads per process (default: OMP_NUM_THREADS for one process, else "
                                  "cores / local processes)")
    r("--resume", help="checkpoint to continue from (or to evaluate, with --eval-only); without it, an unfinished "
                       "run of the same flags in --out is continued")
    r("--overwrite", action="store_true", help="start afresh in an --out that holds a finished run or another "
                                                "run's files (an unfinished run of the same flags goes on)")
    r("--eval-only", action="store_true")
    r("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    r("--log-every", type=int, help="progress line every N steps")
    r("--stop-after", type=int, help="stop after N epochs of this run (the schedule still spans --epochs)")
    r("--predict", nargs="+", metavar="VIDEO", help="print each video's (file or frame folder) top-5 classes, "
                                                    "GFLOPs and mean halting depth with the --resume checkpoint")
    r("--json", action="store_true", help="with --predict: one JSON object per video, one a line")
    r("--halting-map", metavar="VIDEO", help="write OUT/halting_map.png (paper Fig. 4) for this video (file or "
                                             "frame folder) with the --resume checkpoint, then exit")
    r("--map-layers", type=int, nargs="+", help="joint layers (1..L) the map shows (default: up to 3 over 2..L)")


def apply_preset(args):
    """Fill every unset optimisation value from the demo preset or the real-data defaults."""
    args.preset = args.preset or ("real" if args.train or args.val else "demo")
    if args.preset == "real" and not (args.val and (args.train or args.eval_only)):
        raise UsageError("--preset real needs --train and --val (--eval-only: --val)")
    if args.release_compat and args.train_mode == "drop":
        raise UsageError("--train-mode drop: the release-compatible forward runs in mask mode only (its halted "
                         "tokens stay in the sequence as zeros that every token attends to)")
    preset = {**REAL_DEFAULTS, **(DEMO_PRESET if args.preset == "demo" else {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.train_mode = args.train_mode or ("mask" if args.release_compat else AMP_TRAIN_MODE if args.amp else TRAIN_MODE)
    return args


# The least value of each numeric flag (the model's are checked by HaltingVTConfig, through model_config).
AT_LEAST = dict(batch_size=1, epochs=1, eval_every=1, log_every=1, stop_after=1, threads=1, workers=0, lr=0,
                weight_decay=0, warmup_epochs=0, halting_warmup=0, alpha_p=0, alpha_m=0, alpha_d=0)


def check_args(args):
    """UsageError, before any work, for flags no run can use: a number out of range, a model the flags cannot
    build, --eval-only without weights, RandAugment without a torchvision that imports."""
    for dest, least in AT_LEAST.items():
        if getattr(args, dest) is not None and getattr(args, dest) < least:
            raise UsageError(f"--{dest.replace('_', '-')} {getattr(args, dest)}: must be at least {least}")
    size = model_config(args, 1 if args.num_classes is None else args.num_classes).img_size
    if min(args.eval_short_side or size, *(args.train_scale or [size])) < size:
        raise UsageError(f"--eval-short-side and --train-scale must be at least the crop, {size} (--img-size)")
    if args.eval_only and not (args.resume or args.init):
        raise UsageError("--eval-only needs weights to evaluate: --resume CHECKPOINT (a train.py run's) or --init")
    if args.randaugment and not (args.eval_only or args.predict or args.halting_map):
        try:
            data.rand_augment_class()
        except ImportError as err:
            raise UsageError(str(err)) from None


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
            raise UsageError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; start "
                             "torchrun with --nproc-per-node at most that, or pass --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# CPU threads. At the sanity run's sizes a step is many small operations, each split over the threads, which then
# wait for each other. On an idle machine 2 threads are the fastest on 2 cores, with OpenMP's default waiting (a
# waiting thread spins a little before it sleeps: PASSIVE waits cost about a third more time). Beside other
# CPU-bound processes, though, a thread that waits for a preempted partner spins on a core they need: 2 threads
# took 3.8x their idle time beside two busy loops, 1 thread far less (bench.py --busy, README "The sanity run").
# So train.py runs as many threads as the cores other processes leave idle, looked at before training and again
# after every epoch. Linux only (/proc/stat); elsewhere, and with --threads or OMP_NUM_THREADS, the count is fixed.
PROC_STAT = Path("/proc/stat")


def cpu_seconds() -> Optional[tuple]:
    """(seconds the machine's cores have been busy since boot, CPU seconds of this process, wall seconds), or None
    where PROC_STAT cannot be read."""
    try:
        ticks = [int(v) for v in PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # user nice system idle iowait irq softirq steal: all but idle, iowait
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()


def idle_cores(since: tuple) -> float:
    """Cores that other processes left idle since `since` (cpu_seconds()); this process's own use counts as idle."""
    busy, own, wall = (now - then for now, then in zip(cpu_seconds(), since))
    return (os.cpu_count() or 1) - max(0.0, busy - own) / max(wall, 1e-3)


def cpu_threads(args, world: int, since: Optional[tuple] = None) -> tuple:
    """(torch threads per process, why): --threads; else OMP_NUM_THREADS for one process (torchrun sets it to 1 in
    each process it starts); else, for one process, the cores other processes left idle since `since`
    (cpu_seconds(); None: over the next 0.2 s), at least 1; else the cores shared by the local processes."""
    if args.threads:
        return args.threads, "--threads"
    if world == 1 and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores, local_world = os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world == 1 and since is None and (since := cpu_seconds()):
        time.sleep(0.2)
    if world == 1 and since:
        idle = idle_cores(since)
        return max(1, min(cores, round(idle))), f"{cores} cores, {cores - idle:.1f} busy with other processes"
    return max(1, cores // local_world), f"{cores} cores / {local_world} process(es)"


def set_threads(args, world: int, since: Optional[tuple] = None) -> Optional[tuple]:
    """Set torch's CPU threads (cpu_threads), logged: with OpenMP's waiting policy the first time (the log's first
    line), and later when the count changes. Returns the cpu_seconds() to look again from after an epoch, or None
    when the count is fixed (--threads, OMP_NUM_THREADS, several processes, no PROC_STAT)."""
    threads, why = cpu_threads(args, world, since)
    if since is None:
        policy = os.environ.get("OMP_WAIT_POLICY")
        log.info("CPU: %d torch threads (%s); OpenMP waiting: %s", threads, why,
                 f"OMP_WAIT_POLICY={policy}" if policy else "OpenMP's default (spin a little, then sleep)")
    elif threads != torch.get_num_threads():
        log.info("CPU: %d torch threads from now on (%s)", threads, why)
    torch.set_num_threads(threads)
    return cpu_seconds() if "busy with other processes" in why else None


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
                  short_side=args.eval_short_side, scale=args.train_scale, frame_interval=args.frame_interval,
                  rawframes=args.rawframes, frame_template=args.frame_template, start_index=args.start_index)
    train = None  # --eval-only may come without a training set
    if args.train:
        with blame("--train", args.train):
            train = data.VideoDataset(args.train, train=True, randaugment=args.randaugment and not args.eval_only,
                                      **common)
        common["num_classes"] = train.num_classes
    # validation: each video's real clip and its static fake, for the motion accuracy; labelled with the
    # training set's classes (class folders by name)
    with blame("--val", args.val):
        val = data.VideoDataset(args.val, train=False, motion_pairs=True, classes=train and train.classes, **common)
    if train:
        data.log_labels_by_index(args.train, args.val, train, val)
    return train, val, (train or val).num_classes


# HaltingVTConfig's fields that flags set, and the flags
MODEL_FLAGS = dict(num_frames="--frames", img_size="--img-size", embed_dim="--embed-dim", depth="--depth",
                   num_heads="--heads", glimpser_depth="--glimpser-depth", keep_ratio="--keep-ratio", gamma="--gamma",
                   beta="--beta", eps="--eps", drop_path="--drop-path", num_classes="--num-classes")


def model_config(args, num_classes) -> HaltingVTConfig:
    """The named setting with every model flag that was given on top; UsageError naming the flag for a value
    the model cannot take."""
    dest = lambda field: MODEL_FLAGS[field][2:].replace("-", "_")  # noqa: E731
    overrides = {k: getattr(args, dest(k)) for k in MODEL_FLAGS if getattr(args, dest(k)) is not None}
    # no motion loss, no motion head: an untrained head would only add parameters without gradients
    overrides.update(num_classes=num_classes, halting=args.halting, motion_head=args.alpha_m != 0,
                     release_compat=bool(args.release_compat))
    try:
        return getattr(HaltingVTConfig, args.model)(**overrides)
    except ValueError as err:  # "HaltingVTConfig.<field>=<value>: why"
        field, value, why = re.match(r"HaltingVTConfig\.(\w+)=(.*?): (.*)", str(err)).groups()
        default = "" if getattr(args, dest(field)) is not None else f" (--model {args.model}'s)"
        raise UsageError(f"{MODEL_FLAGS[field]} {value}{default}: {why}") from err


def build_model(cfg: HaltingVTConfig, args, device):
    """The model of `cfg` on `device`, with --init's weights. A checkpoint of the release's layout turns on the
    release-compatible forward (its cfg says so) unless --no-release-compat was given."""
    with blame("--init", args.init):
        ckpt = checkpoints.read_checkpoint(args.init) if args.init else None
    if ckpt is not None and args.release_compat is None and checkpoints.checkpoint_file_layout(ckpt) == "release":
        log.info("--init %s has the release's layout: release-compatible forward on (halted tokens zeroed and "
                 "still attended, halting on > 1 - eps, no class-token residual in the pruning layer; mask "
                 "execution); --no-release-compat turns it off", args.init)
        cfg = dataclasses.replace(cfg, release_compat=True)
    model = HaltingVT(cfg)
    if args.embed_std and not args.init:
        with torch.no_grad():
            model.pos_embed.normal_(0, args.embed_std)
            model.time_embed.normal_(0, args.embed_std)
    if args.init:
        log.info("--init %s", args.init)
        with blame("--init", args.init):
            checkpoints.load_pretrained(model, ckpt)  # logs what it loaded, left fresh and did not use
    return model.to(device)


def build_optimizer(model, args):
    """Adam(W) with no weight decay on the embeddings, class token, norms and biases; train_step sets its
    learning rate each step (lr_at)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in NO_DECAY else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return opt_class(groups, lr=args.lr)


def lr_at(args, epochs_done: float) -> float:
    """The learning rate after `epochs_done` epochs (fractional: counted in samples, so a resumed run on another
    number of processes or batch size continues the same curve in its own steps). Release config: a linear
    warm-up from 0.1 x --lr over --warmup-epochs, then a cosine to 0 at --epochs. (The release steps its cosine
    per epoch, over all 20 epochs from epoch 5 on, so its last epoch runs near 0.2 x lr; this one is smooth.)"""
    warm = args.warmup_epochs
    if epochs_done < warm:
        return args.lr * (0.1 + 0.9 * epochs_done / warm)
    return args.lr * (1 + math.cos(math.pi * (epochs_done - warm) / (args.epochs - warm))) / 2


def weights_sha(model) -> str:
    """A hash of every parameter's bytes: equal replicas have equal hashes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

PROGRESS = ("epoch", "samples_in_epoch", "step", "best")  # the RunState fields every checkpoint keeps


@dataclass
class RunState:
    """A training run: what it trains, and how far it has come. The PROGRESS fields go into every checkpoint and
    --resume puts them back, so a resumed run takes the same samples and learning rates as one that never stopped
    (on another number of processes or batch size, in other steps: progress is counted in samples)."""
    args: argparse.Namespace
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: HaltingVTConfig
    device: torch.device
    rank: int
    world: int
    num_classes: int
    classes: Optional[list]  # class names, for the checkpoints (data.class_names)
    steps_per_epoch: int
    epoch: int = 0  # epochs finished
    samples_in_epoch: int = 0  # samples of the current epoch taken, by all processes (data.train_order)
    step: int = 0  # steps taken in all
    best: Optional[float] = None  # best val top-1 (or mAP) since the halting warm-up (record)
    start_step: int = 0  # the step this process started from, for the time left
    cpu_since: Optional[tuple] = None  # where the next look at the idle cores starts from (set_threads)
    t0: float = field(default_factory=time.time)

    def epochs_done(self) -> float:
        """Epochs done, fractional: what the learning rate (lr_at) and the halting ramp follow."""
        return self.epoch + self.samples_in_epoch / (self.steps_per_epoch * self.args.batch_size * self.world)


def fit(s: RunState, train_set, val_loader) -> dict:
    """The training loop, from where `s` stands to --epochs (or --stop-after more epochs).

    Each epoch: its batches (train_epoch), last.pt, then every --eval-every epochs and after the last an
    evaluation (record: metrics.jsonl, best.pt). last.pt comes first, so a kill during a long evaluation loses that
    evaluation only. SIGINT or SIGTERM (StopFlag) stop the step or evaluation batch under way; after last.pt,
    Stopped. A NaN or infinite loss raises NonFiniteLoss and leaves last.pt as it was. A finished run writes
    final.json (finish). Returns the last evaluation's metrics.
    """
    args, out, metrics = s.args, Path(s.args.out), {}
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, s.epoch + args.stop_after)
    with StopFlag() as stop:
        while s.epoch < last_epoch:
            train_loss = train_epoch(s, train_set, stop)
            if s.cpu_since:  # the CPU threads follow the cores other processes leave idle
                s.cpu_since = set_threads(args, s.world, s.cpu_since)
            save(s, out / "last.pt")
            if train_loss is None:
                raise stopped(s, stop.signum, "training")
            if s.epoch % args.eval_every == 0 or s.epoch == last_epoch:
                metrics = evaluation(s, val_loader, stop, train_loss)
        if s.epoch == args.epochs and not metrics:  # resumed after the last epoch, whose evaluation was cut short
            metrics = evaluation(s, val_loader, stop, None)
        if s.epoch == args.epochs:
            finish(s, metrics)
    return metrics


def train_epoch(s: RunState, train_set, stop: "StopFlag") -> Optional[float]:
    """The rest of the current epoch, one train_step a batch: the epoch's mean loss, with `s` at the next epoch;
    or None, with `s` before the batch under way, when a process got a stop signal."""
    args = s.args
    s.model.train()
    loader = data.epoch_loader(train_set, args.batch_size, s.epoch, s.rank, s.world, seed=args.seed,
                               workers=args.workers, skip_samples=s.samples_in_epoch)
    sums, skipped, tick = [0.0, 0], set(), (time.time(), s.step)  # loss sum and steps; bad videos
    for batch in data.single_threaded(loader):
        parts = train_step(s, batch, stop)
        if parts is None:  # returning here also shuts the DataLoader workers down before last.pt is written
            return None
        sums, skipped = [sums[0] + parts["total"], sums[1] + 1], skipped | set(batch["skipped"])
        if s.step % args.log_every == 0:
            tick = log_progress(s, parts, len(batch["video"]), tick)
    train_loss = epoch_loss(s, sums, skipped)
    s.epoch, s.samples_in_epoch = s.epoch + 1, 0
    return train_loss


def evaluation(s: RunState, val_loader, stop: "StopFlag", train_loss: Optional[float]) -> dict:
    """Evaluate the epoch just finished and record it: its metrics. Stopped when a stop signal cut it short."""
    log.info("epoch %d: last.pt saved; evaluating on %d videos", s.epoch, len(val_loader.dataset))
    metrics = evaluate(s.model, val_loader, s.args, s.device, s.cfg, stop)
    if metrics is None:
        raise stopped(s, stop.signum, f"the evaluation of epoch {s.epoch}")
    metrics = {"epoch": s.epoch, "step": s.step, "train_loss": train_loss, **metrics, "elapsed_s": time.time() - s.t0}
    record(metrics, s, Path(s.args.out))
    return metrics


def train_step(s: RunState, batch: dict, stop: "StopFlag") -> Optional[dict]:
    """One optimiser step on a batch: the loss parts (floats), or None, with nothing updated, when any process
    got a stop signal (then stop.signum is that signal's on every process). Raises NonFiniteLoss, on every
    process and before any update, on a NaN or infinite loss or gradient norm."""
    model, args, device, num_classes = s.model, s.args, s.device, s.num_classes
    ramp = halting_ramp(args, s.epochs_done())
    loss, parts = forward_loss(model, batch, args, device, num_classes, ramp)
    # one collective per step: did any process see a bad loss, or a stop signal?
    bad = float(not math.isfinite(parts["total"]))
    flags = all_reduce(torch.tensor([bad, float(stop.signum)], device=device), dist.ReduceOp.MAX).tolist()
    if flags[0]:
        raise NonFiniteLoss(f"loss is {parts['total']} at epoch {s.epoch + 1}, step {s.step} (parts {parts}); "
                            f"stopping without writing a checkpoint, so {args.out}/last.pt is the last good state. "
                            "Try a lower --lr or no --amp.")
    if flags[1]:
        stop.signum = int(flags[1])
        return None
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(args, s.epochs_done())
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if s.world > 1:
        average_gradients(model, s.world)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    if not torch.isfinite(grad_norm):  # the same on every process: gradients were already averaged
        raise NonFiniteLoss(f"gradient norm is {grad_norm.item()} at epoch {s.epoch + 1}, step {s.step}; "
                            f"stopping before the update, {args.out}/last.pt is untouched.")
    s.optimizer.step()
    s.step, s.samples_in_epoch = s.step + 1, s.samples_in_epoch + args.batch_size * s.world
    return parts


def average_gradients(model, world: int):
    """What DistributedDataParallel does, as one all_reduce after backward: each gradient averaged over the
    processes, a missing one counting as zero; a parameter no process gave a gradient keeps none, as in one
    process. (In drop mode a joint layer that no token of a batch reached gets no gradient: DDP would need
    find_unused_parameters=True, and then warns in every process of every run that it found none unused.)"""
    params = list(model.parameters())
    flat = torch.cat([t for p in params for t in (p.grad.reshape(-1) if p.grad is not None else p.new_zeros(
        p.numel()), p.new_tensor([float(p.grad is not None)]))])  # each gradient, then 1 if it exists
    parts = all_reduce(flat).split([p.numel() + 1 for p in params])
    for p, part, got in zip(params, parts, torch.stack([part[-1] for part in parts]).tolist()):
        p.grad = part[:-1].view_as(p) / world if got else None


def forward_loss(model, batch, args, device, num_classes, ramp=1.0):
    """Eq. (9) on B videos = 2B clips (real, then fake): (loss tensor, parts as floats). `ramp` scales the
    ponder and depth-prior weights (halting_ramp)."""
    video, label, motion = (batch[k].to(device, non_blocking=True) for k in ("video", "label", "motion"))
    with autocast(args, device):  # the losses too: autocast runs cross-entropy in float32
        beta = model.cfg.beta + BETA_OFF * (1 - ramp)  # the halting warm-up (halting_ramp)
        out = model(video, drop_halted=args.train_mode == "drop", beta=beta)
        prior = {}
        if args.alpha_d:  # the depth prior, off by default
            L = out.halt_scores.shape[0]
            mean, std = args.depth_prior or ((L + 1) / 2, L / 4)
            prior = dict(alpha_d=args.alpha_d * ramp, depth_target=losses.depth_prior(L, mean, std))
        return haltingvt_loss(out, label, motion, num_classes=num_classes, alpha_p=args.alpha_p * ramp,
                              alpha_m=args.alpha_m, multi_label=args.multi_label,
                              task_on_fakes=args.task_on_fakes, **prior)


def halting_ramp(args, epochs_done: float) -> float:
    """How far halting is switched on, 0..1 (the halting warm-up, not in the paper; 1 without it).

    0 for the first half of --halting-warmup epochs, then a linear rise to 1. forward_loss passes the model
    beta = --beta + BETA_OFF * (1 - ramp) and scales the ponder and depth-prior weights by the ramp. Why: from scratch
    at lr 1e-3, a class token that halts at the first joint layer while the later layers are still noise never
    comes back (its score saturates and the later layers stop receiving gradient); and Adam rescales even the
    ponder loss's tiny gradient on a near-zero score to full-size steps, so the ponder weight must be off too.
    """
    if not args.halting_warmup:
        return 1.0
    half = args.halting_warmup / 2
    return min(max((epochs_done - half) / half, 0.0), 1.0)


def log_progress(s: RunState, parts: dict, batch_clips: int, tick: tuple) -> tuple:
    """One line: step/total, each loss part, lr, clips/s since `tick` (time, step), time left at this run's mean
    step time. Returns the next tick."""
    total, now = s.step + round((s.args.epochs - s.epochs_done()) * s.steps_per_epoch), time.time()
    clips_per_s = batch_clips * (s.step - tick[1]) / (now - tick[0])
    step_s = (now - s.t0) / max(s.step - s.start_step, 1)
    left = time.strftime("%H:%M:%S", time.gmtime((total - s.step) * step_s))
    terms = " ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "total")  # task, ponder, motion, ...
    ramp = halting_ramp(s.args, s.step / s.steps_per_epoch)
    warmup = "" if ramp == 1 else "  halting warm-up: off" if ramp == 0 else f"  halting warm-up: {ramp:.2f} on"
    log.info("epoch %d step %d/%d  loss %.4f (%s)  lr %.4e  %.1f clips/s  left %s%s", s.epoch + 1, s.step, total,
             parts["total"], terms, s.optimizer.param_groups[0]["lr"], clips_per_s, left, warmup)
    return now, s.step


def epoch_loss(s: RunState, sums: list, skipped: set) -> float:
    """The epoch's mean total loss over every process's steps, from this process's [loss sum, steps]; logs the
    bad videos the dataset passed over (--on-error skip)."""
    if skipped:
        log.warning("epoch %d: %s skipped: %s", s.epoch + 1, plural(len(skipped), "bad video"), sorted(skipped)[:3])
    total, count = all_reduce(torch.tensor(sums, dtype=torch.float64, device=s.device)).tolist()
    return total / max(count, 1)


class StopFlag:
    """The number of the SIGINT or SIGTERM received while the training loop runs (`signum`; 0 before one), in a
    `with` block that then puts the previous handlers back. The loop stops at the next step or evaluation batch."""

    signals = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = 0
        self.previous = [signal.signal(sig, self.handle) for sig in self.signals]
        return self

    def __exit__(self, *exc):
        for sig, handler in zip(self.signals, self.previous):
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        log.warning("%s received: stopping after the step or evaluation batch under way", signal.Signals(signum).name)
        self.signum = signum


class Stopped(SystemExit):
    """A signal stopped the run, last.pt saved: exit status 128 + its number (130 SIGINT, 143 SIGTERM), as a shell
    reports a process the signal killed, so that a script can tell it from a finished run."""


def stopped(s: RunState, signum: int, during: str) -> Stopped:
    """Log what was saved and, last, how to continue; the Stopped to raise."""
    script = sys.argv[0] if sys.argv[0].endswith("train.py") else __file__
    launcher = ["python"] if s.world == 1 else ["torchrun", f"--nproc-per-node={s.world}"]
    command = shlex.join([*launcher, script, "--resume", str(Path(s.args.out) / "last.pt")])
    log.info("%s: stopped during %s; %s/last.pt holds the run at step %d, %d samples into epoch %d. To continue, "
             "run the same command again, or: %s", signal.Signals(signum).name, during, s.args.out, s.step,
             s.samples_in_epoch, s.epoch + 1, command)
    return Stopped(128 + signum)


def autocast(args, device):
    """bf16 autocast on CUDA with --amp; otherwise a no-op context."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------

def reduce_counters(counters: dict, device) -> dict:
    """Sum each named counter over the processes, all in one all_reduce; each keeps its shape."""
    flat = all_reduce(torch.cat([c.reshape(-1) for c in counters.values()]).to(device)).cpu()
    parts = flat.split([c.numel() for c in counters.values()])
    return {name: part.view_as(c) for (name, c), part in zip(counters.items(), parts)}


@torch.no_grad()
def evaluate(model, loader, args, device, cfg: HaltingVTConfig, stop: Optional["StopFlag"] = None):
    """Drop mode (halted tokens leave the computation) on each video's real clip; motion accuracy on the
    real clips and their static fakes. Each readable video counts once; an unreadable one is left out, named in
    a warning and counted in val_skipped. The counters are summed across processes (a process may have no
    video at all); every process gets the result. None, on every process, when a process got a stop signal
    (it stops after the batch under way; stop.signum is then that signal's everywhere)."""
    model.eval()
    count, scores, targets, skipped = losses.eval_counters(cfg.depth, cfg.glimpser_depth), [], [], []
    for batch in data.single_threaded(loader):
        if stop and stop.signum:
            break
        skipped += batch["skipped"]
        if "video" not in batch:  # every video of the batch was unreadable
            continue
        video, label, motion = (batch[k].to(device) for k in ("video", "label", "motion"))
        with autocast(args, device):
            out = model(video, drop_halted=not cfg.release_compat)  # B real clips, then their B fakes
        losses.add_eval_batch(count, out, label, motion, args.multi_label, scores, targets)
    if stop is not None:  # did any process get a stop signal? (every process takes part in this collective)
        stop.signum = int(all_reduce(torch.tensor([stop.signum], device=device), dist.ReduceOp.MAX).item())
        if stop.signum:
            return None
    if skipped:
        log.warning("evaluation: %s left out: %s", plural(len(skipped), "unreadable video"), skipped[:5])
    count["skipped"] += len(skipped)
    count = reduce_counters(count, device)
    if count["videos"] == 0:
        log.warning("evaluation: no readable validation video; the metrics are nan")
    metrics = losses.eval_metrics(count, dense_gflops(cfg), args.multi_label)
    if cfg.num_classes <= 5:
        metrics.pop("val_top5", None)  # every class is in the top 5
    if args.multi_label:
        metrics["val_map"] = losses.average_precision(*gather_scores(scores, targets, cfg.num_classes))
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
    acc = f"val mAP {m['val_map']:.3f}" if "val_map" in m else f"val top-1 {m['val_top1']:.3f}" + \
        (f" (top-5 {m['val_top5']:.3f})" if "val_top5" in m else "")
    skipped = f" ({m['val_skipped']} unreadable, left out)" if m.get("val_skipped") else ""
    ratio = m["val_gflops"] / m["dense_gflops"]
    release = f" ({m['val_gflops_release']:.4f} as the release counts)" if "val_gflops_release" in m else ""
    return (f"{acc} on {plural(m['val_videos'], 'video')}{skipped}, motion acc {m['val_motion_acc']:.3f}, GFLOPs/video "
            f"{m['val_gflops']:.4f} spent{release} vs {m['dense_gflops']:.4f} dense ({ratio:.2f}x), mean halting depth "
            f"{m['halt_depth_mean']:.2f}, halting hist " + " ".join(f"{h:.2f}" for h in m["halt_depth_hist"]) +
            ", tokens per layer " + " ".join(f"{t:.0f}" for t in m["tokens_per_layer"]))


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    """Train (or evaluate, predict, draw a halting map) as the flags say: the last evaluation's metrics (or the
    --predict results, or write_halting_map's summary). A UsageError ends it with its one line and status 2."""
    try:
        args = parse_args(argv)
        check_args(args)
        with processes(args) as (rank, world, device):
            if args.predict:
                return predict(args, device)
            if args.halting_map:
                return write_halting_map(args, device)
            with blame("--on-error", args.on_error, data.VideoDecodeError):  # only "raise" lets one through
                return run(args, rank, world, device)
    except UsageError as err:
        if os.environ.get("HALTINGVT_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def processes(args):
    """(rank, world size, device) for the block, with logging on (INFO on rank 0). Leaving it, every process
    waits for the others, then the process group (torchrun) is torn down."""
    rank, world, device = setup_distributed(args)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if device.type == "cpu":
        set_threads(args, world)
    try:
        yield rank, world, device
        if dist.is_initialized():
            dist.barrier()  # no rank tears the process group down while another still uses it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank, world, device) -> dict:
    """One training (or --eval-only evaluation) with these flags: the last evaluation's metrics."""
    seed_everything(args.seed)
    if not args.eval_only:
        log.info("outputs: %s (metrics.jsonl, last.pt, best.pt, final.json)", args.out)
    if args.amp and device.type != "cuda":
        log.warning("--amp (bf16 autocast) is for CUDA; running in float32 on %s", device)
    train_set, val_set, num_classes = build_data(args, rank)
    with blame("--train", args.train):  # checks a classes.txt's names against the labels
        classes = data.class_names(train_set, args.train) if train_set else None
    if not args.eval_only:
        claim_out(args)
    cfg = model_config(args, num_classes)
    if args.resume:
        with blame("--resume", args.resume):
            ckpt = checkpoints.read_run_checkpoint(args.resume)
        if not args.eval_only and finished(ckpt, args):
            log.info("%s is a finished run (epoch %d of %d): nothing to do", args.resume, ckpt["epoch"], args.epochs)
            return json.loads((Path(args.out) / "final.json").read_text())
        saved = HaltingVTConfig(**ckpt["config"])
        if saved != cfg:
            log.warning("--resume: using the checkpoint's model config %s", saved)
        cfg = saved
    model = build_model(cfg, args, device)
    cfg = model.cfg  # the release-compatible forward may have been turned on
    if cfg.release_compat and args.train_mode == "drop":
        log.info("training in mask mode: the release-compatible forward has no drop mode")
        args.train_mode = "mask"
    val_loader = data.epoch_loader(val_set, args.batch_size, 0, rank, world, workers=args.workers, train=False)
    if args.eval_only:  # check_args: --resume or --init
        if args.resume:
            with blame("--resume", args.resume):
                checkpoints.load_checkpoint(args.resume, model)
        metrics = evaluate(model, val_loader, args, device, cfg)
        log.info("eval: %s", summary(metrics))
        return metrics
    steps_per_epoch = len(train_set) // world // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size}: the training set has {plural(len(train_set), 'video')}, "
                         f"fewer than one batch per process x {plural(world, 'process', 'processes')}")
    s = RunState(args, model, build_optimizer(model, args), cfg, device, rank, world, num_classes, classes,
                 steps_per_epoch, cpu_since=cpu_seconds() if device.type == "cpu" else None)
    start(s)
    log.info("model %s; %d parameters; %d train / %d val videos; %d steps/epoch on %s, %s",
             cfg, sum(p.numel() for p in model.parameters()), len(train_set), len(val_set), steps_per_epoch,
             plural(world, "process", "processes"), device)
    if args.halting_warmup:
        log.info("halting warm-up: no halting nor ponder loss until epoch %g, then both rise to full by epoch %g",
                 args.halting_warmup / 2, args.halting_warmup)
    return fit(s, train_set, val_loader)


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "final.json")  # what a training run writes into OUT
# The flags a run may go on with changed (a requeued job on other machines): how it runs, not what it learns.
RESUME_FREE = {"resume", "overwrite", "eval_only", "stop_after", "workers", "threads", "device", "log_every",
               "batch_size"}


def claim_out(args):
    """A training run without --resume whose OUT holds a run already. A requeued or restarted job runs the same
    command again, so an unfinished run there with these flags (but RESUME_FREE) is continued: args.resume becomes
    its last.pt, even with --overwrite (a job script may hold it). A finished run, another run's flags or files:
    UsageError saying what to do, or with --overwrite a fresh run (start clears the files)."""
    out, last = Path(args.out), Path(args.out) / "last.pt"
    found = [name for name in RUN_FILES if (out / name).exists()]
    if args.resume or not found:
        return
    if "last.pt" not in found:
        problem, hint = f"another run's {', '.join(found)}", ""
    else:
        with blame("--resume", last):
            ckpt = checkpoints.read_run_checkpoint(last)
        saved, now = ckpt.get("args", {}), checkpoints.plain(vars(args))
        differ = [f"--{k.replace('_', '-')} {saved[k]} there, {now[k]} now"
                  for k in sorted(saved.keys() & now.keys() - RESUME_FREE) if saved[k] != now[k]]
        if not differ and not finished(ckpt, args):
            args.resume = str(last)
            return
        problem = f"a run with other flags ({'; '.join(differ)})" if differ else \
            f"a finished run (epoch {ckpt['epoch']} of {args.epochs})"
        hint = f"; --resume {last} continues that run" if differ else f"; --resume {last} --eval-only evaluates it"
    if not args.overwrite:
        raise UsageError(f"--out {out} holds {problem}: choose another --out, or pass --overwrite to replace it{hint}")


def finished(ckpt: dict, args) -> bool:
    """Whether the checkpoint's run trained all its epochs and wrote OUT/final.json (after its last evaluation)."""
    return ckpt["epoch"] >= args.epochs and (Path(args.out) / "final.json").exists()


def plural(n: int, one: str, many: Optional[str] = None) -> str:
    """`1 video`, `2 videos`."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def start(s: RunState):
    """Continue from --resume (resume), wrap the model for several processes, make OUT (a fresh run clears the
    RUN_FILES of one it replaces: --overwrite)."""
    out = Path(s.args.out)
    if s.args.resume:
        resume(s)
    if s.world > 1:  # every process starts from rank 0's weights; train_step averages the gradients
        flat = torch.nn.utils.parameters_to_vector(s.model.parameters())
        dist.broadcast(flat, 0)
        torch.nn.utils.vector_to_parameters(flat, s.model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    if s.rank == 0 and not s.args.resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


def resume(s: RunState):
    """Weights, optimiser, RNG states and progress from the --resume checkpoint; logs where the run goes on, and
    how, when the number of processes or the batch size changed."""
    with blame("--resume", s.args.resume):
        ckpt = checkpoints.load_checkpoint(s.args.resume, s.model, s.optimizer)
    for key in PROGRESS:
        setattr(s, key, ckpt[key])
    s.start_step = s.step
    best = Path(s.args.out) / "best.pt"  # written after its epoch's last.pt, so its score can be newer
    if best.exists():
        kept = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
        if kept["epoch"] <= s.epoch and (s.best is None or kept["best"] > s.best):
            s.best = kept["best"]
    log.info("resuming from %s, epoch %d, step %d", s.args.resume, s.epoch + 1, s.step)
    was = (ckpt.get("world", s.world), ckpt["args"].get("batch_size", s.args.batch_size))
    if was != (s.world, s.args.batch_size):
        log.info("%d process(es) x %d videos a step, was %d x %d: epoch %d goes on after its first %d samples, the "
                 "learning rate over the %d steps left", s.world, s.args.batch_size, *was, s.epoch + 1,
                 s.samples_in_epoch, round((s.args.epochs - s.epochs_done()) * s.steps_per_epoch))


def record(metrics: dict, s: RunState, out: Path):
    """Log one evaluation, append it to metrics.jsonl and keep best.pt (rank 0; after the halting warm-up)."""
    key = "val_map" if "val_map" in metrics else "val_top1"
    log.info("epoch %d eval: %s", metrics["epoch"], summary(metrics))
    if s.rank != 0:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if halting_ramp(s.args, metrics["epoch"]) < 1 and metrics["epoch"] < s.args.epochs:
        return  # best.pt holds a model that halts as configured, not one from the halting warm-up
    if s.best is None or metrics[key] > s.best:
        s.best = metrics[key]
        save(s, out / "best.pt")


def save(s: RunState, path: Path):
    """The run as it stands to `path` (rank 0; checkpoints.save_checkpoint)."""
    if s.rank == 0:
        progress = {**{k: getattr(s, k) for k in PROGRESS}, "world": s.world}
        checkpoints.save_checkpoint(path, s.model, s.optimizer, progress, s.cfg, s.args, s.classes)


def finish(s: RunState, metrics: dict):
    """The end of a run: every replica's weight hash (several processes), OUT/final.json, the closing line."""
    if s.world > 1:  # replicas must agree; the test of the distributed run reads this
        hashes = [None] * s.world
        dist.all_gather_object(hashes, weights_sha(s.model))
        metrics["rank_weight_sha"] = hashes
    if s.rank == 0:
        (Path(s.args.out) / "final.json").write_text(json.dumps(metrics, indent=1))
        if metrics:
            log.info("done in %.0f s (outputs in %s): %s", time.time() - s.t0, s.args.out, summary(metrics))


# ----------------------------------------------------------------------------------------------------------
# Prediction and halting maps (paper Fig. 4) from a trained checkpoint
# ----------------------------------------------------------------------------------------------------------

def load_trained_model(path, device):
    """(model in eval mode, the checkpoint: "config", "args" (the run's, a dict), "classes", ...), rebuilt from a
    train.py checkpoint alone."""
    with blame("--resume", path):
        ckpt = checkpoints.read_run_checkpoint(path)
    model = HaltingVT(HaltingVTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


@torch.no_grad()
def predict_clip(model, video, classes, multi_label: bool, k: int = 5) -> dict:
    """One clip (C, T, H, W) in drop mode: {"top5": [{"label", "class" (name or None), "prob"}, ...] best first,
    "gflops" spent, "halt_depth_mean" (mean joint layer 1..L where its tokens halted), "joint_layers" L}.
    Probabilities: softmax over the classes, or each class's sigmoid for a multi-label run."""
    out = model(video.unsqueeze(0), drop_halted=not model.cfg.release_compat)
    logits = out.logits[0].float()
    probs = logits.sigmoid() if multi_label else logits.softmax(0)
    top = probs.topk(min(k, len(probs)))
    best = [{"label": i, "class": classes[i] if classes else None, "prob": p}
            for i, p in zip(top.indices.tolist(), top.values.tolist())]
    return {"top5": best, "gflops": out.gflops[0].item(), "halt_depth_mean": out.halt_depth[0].float().mean().item(),
            "joint_layers": model.cfg.depth - model.cfg.glimpser_depth}


def eval_clip(args, run_args: dict, cfg: HaltingVTConfig, path):
    """A video file or frame folder through the run's eval pipeline (its short side and sampler; the frame files
    named as this command's flags say)."""
    return data.eval_clip(path, cfg.num_frames, cfg.img_size, run_args.get("eval_short_side"),
                          frame_interval=run_args.get("frame_interval"), template=args.frame_template,
                          start_index=args.start_index)


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
        raise UsageError("--predict needs --resume CHECKPOINT")
    model, ckpt = load_trained_model(args.resume, device)
    run_args, classes = ckpt.get("args", {}), ckpt.get("classes")
    results = []
    for path in args.predict:
        try:
            video = eval_clip(args, run_args, model.cfg, path)
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
            raise UsageError(f"--map-layers {' '.join(map(str, layers))}: joint layers are 1..{L}")
        return list(layers)
    return sorted({round(x) for x in np.linspace(2, L, 3)}) if L > 1 else [1]


def write_halting_map(args, device) -> dict:
    """--halting-map: the video through the run's eval pipeline and the checkpoint's model -> OUT/halting_map.png.

    Rows: the input, the patches the Glimpser kept, the tokens still active at each of `map_layers`; columns:
    the sampled frames. Returns {"path": ..., "active": {row name: fraction of the T x S patches active}}."""
    if not args.resume:
        raise UsageError("--halting-map needs --resume CHECKPOINT")
    model, ckpt = load_trained_model(args.resume, device)
    cfg = model.cfg
    layers = map_layers(args.map_layers, cfg.depth - cfg.glimpser_depth)
    with blame("--halting-map", args.halting_map):
        video = eval_clip(args, ckpt.get("args", {}), cfg, args.halting_map)  # (C, T, H, W)
        source = Path(args.halting_map)  # the column labels: the frames sampled, numbered from 0
        n = data.count_frame_files(source, args.frame_template, args.start_index) if source.is_dir() else \
            data.count_frames(source)
    frames = data.sample_indices(n, cfg.num_frames, False, frame_interval=ckpt.get("args", {}).get("frame_interval"))
    masks = data.token_masks(model, video.to(device), layers)  # (1 + len(layers), T, S)
    image = data.halting_map(data.display_frames(video.cpu()), masks, cfg.patch_size)
    names = ["Glimpser"] + [f"joint layer {layer}" for layer in layers]
    image = data.label_map(image, ["input"] + names, [f"frame {i}" for i in frames])  # in the picture itself
    path = Path(args.out) / "halting_map.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_png(path, image)
    active = {name: m.float().mean().item() for name, m in zip(names, masks)}
    log.info("wrote %s (rows: input, %s); patches active: %s", path, ", ".join(names),
             ", ".join(f"{name} {a:.2f}" for name, a in active.items()))
    return {"path": str(path), "active": active}


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLoss as err:
        raise SystemExit(f"error: {err}")
