"""Train and evaluate HaltingVT: the one-command sanity run, and the real loop (CPU or CUDA, one GPU or many).

    python train.py                                   # the sanity run: demo dataset, tiny model, under 2 minutes
    python train.py --halting-map VIDEO --resume runs/sanity/best.pt   # Fig. 4: runs/sanity/halting_map.png
    python train.py --predict VIDEO [VIDEO ...] --resume runs/sanity/best.pt   # top-5, GFLOPs, halting depth
    python train.py --train k200_train.txt --val k200_val.txt --root /data/kinetics --num-classes 200 \
        --model deit_small --init deit_small_patch16_224-cd65a155.pth
    torchrun --standalone --nproc-per-node=8 train.py ...   # the same, one process per GPU

A step (Sec. 3.4, Eq. 9): B videos are 2B clips, each real clip and its static fake (data.collate); the loop is
`fit`. Evaluation runs drop mode: top-1/top-5 (or mAP), motion accuracy, GFLOPs spent, halting depths. Axis
letters as in haltingvt.py (B batch, T frames, S patches a frame, L joint layers, K tokens entering them).
"""
import argparse
import contextlib
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoints
import data
from haltingvt import HaltingVT, HaltingVTConfig, dense_gflops
from losses import haltingvt_loss

log = logging.getLogger("train")


# ----------------------------------------------------------------------------------------------------------
# Presets and defaults: a setting is its flag, else (--resume) the run's own, else the preset's, else DEFAULTS'

# Every setting, by its flag's name; None: worked out where it is used.
DEFAULTS = dict(
    # data: TSN segments of the video files, decoded as the run goes; a bad video is skipped and logged
    train=None, val=None, root=None, num_classes=None, multi_label=False, on_error="skip", workers=0,
    train_scale=None, eval_short_side=None, randaugment=True, cache=False, rawframes=False,
    frame_template=data.FRAME_TEMPLATE, start_index=1, frame_interval=None, demo_root="data/demo",
    demo_videos=(150, 30),
    # model: None takes --model's value (HaltingVTConfig.deit_small(), the paper's; .tiny(), the demo's); the
    # release-compatible forward comes on for --init of the release's layout
    model="deit_small", init=None, frames=None, img_size=None, embed_dim=None, depth=None, heads=None,
    glimpser_depth=None, keep_ratio=None, gamma=None, eps=None, beta=None, drop_path=None, halting=True,
    release_compat=None,
    # optimisation: the real-data preset, the authors' release config per process (16 videos, 32 clips, a GPU)
    preset=None, optimizer="adam", lr=1e-5, weight_decay=1e-5, epochs=20, warmup_epochs=5, batch_size=16,
    clip_grad=40.0, alpha_p=5e-4, alpha_m=0.01, train_mode=None, task_on_fakes=True, halting_warmup=0.0,
    embed_std=None,
    # run
    out=None, seed=0, device=None, amp=False, threads=None, resume=None, overwrite=False, eval_only=False,
    eval_every=1, log_every=20, stop_after=None, predict=None, json=False, halting_map=None, map_layers=None)

# The sanity run (no --train): a tiny model learns the synthetic demo set (data.DEMO_DOC) from scratch on 2 CPU
# cores in under 2 minutes. Each choice below was measured on this setting (README, "The sanity run"):
# - 48 x 48 frames (img_size; data.DEMO_TRAIN_SCALE and DEMO_EVAL_SHORT_SIDE scale the 72 x 72 videos to match):
#   9 patches a frame instead of 64 x 64's 16, so a step costs about half as much (bench.py --step); at 4 frames
#   instead of 8 the model learnt more slowly per step than the cost fell.
# - keep_ratio 0.3: 3 of the 9 patches of each frame go on to the joint layers, enough for the one mover; at 0.5
#   and 1.0 the model found the motion no sooner, and the joint layers cost more.
# - AdamW at lr 1e-3, weight decay 0.05, 32 videos (64 clips) a step: the usual from-scratch ViT recipe; at
#   lr 1e-5 nothing moves, at 2e-3 no seed learnt sooner, and 16 videos a step needed about twice the steps.
# - clip_grad 1 (the release: 40): once the motion was found, unclipped steps sent the loss back up for a few
#   epochs on some seeds (seed 2: top-1 0.85 at the end instead of 0.97).
# - embed_std 1.0: position and time embeddings that start distinct and strong beside the patch content; the
#   class needs where *and* when the mover is, and at 0.3 the model sat at chance for a third of the run or more
#   (at DeiT's 0.02, and the paper's zero time embedding, for most of it; at 2.0 too).
# - task_on_fakes False: a static fake clip of the demo cannot tell its class by construction, so the task loss
#   on it is noise (at 16 videos a step it kept the run at chance); the Motion Loss still sees both clips.
# - alpha_m 1, the release's weight in effect (its config's 0.01 is never applied): at 0.01 the motion head stayed
#   at 0.8-0.9 and the class was found later, on some seeds not within the run; at 1 motion accuracy is ~0.99.
# - alpha_p 0.01 (the paper: 5e-4): from scratch, at 5e-4 the scores never rose and nothing halted; at 0.03
#   three quarters of the tokens halted at the second joint layer and the others spread too thinly.
# - 30 epochs, halting_warmup 20: no halting for the first 10 epochs, then a ramp (halting_ramp) to full at 20.
#   Started at once, halting took the class token out at the first joint layer before the later layers had
#   learnt anything. At 24 epochs with the ramp to 16, a seed that found the motion late ended at 0.933; at 30
#   with the ramp to 16, the longer full ponder pressure sent nearly every token out at joint layer 2.
# - randaugment off: the demo runs without torchvision, and its few synthetic clips need no more variety.
# Decoded demo videos are tiny, so they are cached in RAM after the first epoch.
DEMO_PRESET = dict(model="tiny", img_size=48, keep_ratio=0.3, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                   epochs=30, warmup_epochs=1, batch_size=32, eval_every=6, log_every=5, cache=True, embed_std=1.0,
                   task_on_fakes=False, halting_warmup=20, alpha_p=0.01, alpha_m=1.0, clip_grad=1.0,
                   train_scale=data.DEMO_TRAIN_SCALE, eval_short_side=data.DEMO_EVAL_SHORT_SIDE, randaugment=False)

# Halted tokens in training (evaluation always drops them): "drop" removes them, exact with gradients; "mask"
# keeps fixed shapes. bench.py --train: drop is faster on the CPU and on a GPU in float32; under --amp drop's step
# measured 5.5x slower on an H200 (DeiT-S, 16 clips; the cause is not yet known). The release's forward: mask only.
TRAIN_MODE, AMP_TRAIN_MODE = "drop", "mask"
# How much higher beta starts during --halting-warmup: sigmoid(gamma * x0 - beta - 20) is ~0 for any x0 a fresh
# model has, so every token runs through every joint layer while the layers learn something.
BETA_OFF = 20.0
# No weight decay on these, norms and biases (the release's config means to spare them, but its keys match no
# parameter, so it decays everything).
NO_DECAY = ("cls_token", "pos_embed", "time_embed")
# The least value of each numeric flag (the model's are checked by HaltingVTConfig, through model_config).
AT_LEAST = dict(batch_size=1, epochs=1, eval_every=1, log_every=1, stop_after=1, threads=1, workers=0, lr=0,
                weight_decay=0, warmup_epochs=0, halting_warmup=0, alpha_p=0, alpha_m=0)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "final.json")  # what a training run writes into OUT
# The flags a run may go on with changed (a requeued job on other machines): how it runs, not what it learns.
RESUME_FREE = {"resume", "overwrite", "eval_only", "stop_after", "workers", "threads", "device", "log_every",
               "batch_size"}


# ----------------------------------------------------------------------------------------------------------
# The command line

class UsageError(Exception):
    """A mistake in the command: main prints it as one line, `error: --flag value: what is wrong`, and exits with
    status 2 (HALTINGVT_DEBUG=1 shows the traceback). Any other exception is a bug and keeps its traceback."""


@contextlib.contextmanager
def blame(flag: str, value, errors=(OSError, ValueError, data.VideoDecodeError)):
    """Turn `errors` about what a flag names (a missing file, a list's bad line, no checkpoint) into a UsageError."""
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


def parse_args(argv=None) -> argparse.Namespace:
    """Every setting ("Presets and defaults"). --resume, but to predict or draw, goes on with the run it holds:
    without its saved flags a bare `--resume run/last.pt` would train the demo into runs/sanity."""
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False, argument_default=argparse.SUPPRESS,
               epilog="Unset values: DEMO_PRESET without --train, then DEFAULTS (train.py). A mistake in the "
                      "command is one line and status 2; HALTINGVT_DEBUG=1 shows its traceback.")
    data_and_model_flags(p)
    run_flags(p)
    given = vars(p.parse_args(argv))  # the flags written, only those (argument_default=SUPPRESS)
    if given.get("resume") and not (given.get("predict") or given.get("halting_map")):
        saved = read_run(given["resume"]).get("args", {})
        keep = DEFAULTS.keys() - {"resume", "eval_only", "init"}  # and not an older version's flag (--alpha-d)
        given = {**{k: v for k, v in saved.items() if k in keep and v is not None}, **given}
    preset = given.get("preset") or ("real" if given.get("train") or given.get("val") else "demo")
    args = argparse.Namespace(**{**DEFAULTS, **(DEMO_PRESET if preset == "demo" else {}), **given, "preset": preset})
    if args.preset == "real" and not (args.val and (args.train or args.eval_only)):
        raise UsageError("--preset real needs --train and --val (--eval-only: --val)")
    if args.release_compat and args.train_mode == "drop":
        raise UsageError("--train-mode drop: the release-compatible forward runs in mask mode only (its halted "
                         "tokens stay in the sequence as zeros that every token attends to)")
    args.train_mode = args.train_mode or ("mask" if args.release_compat else AMP_TRAIN_MODE if args.amp else TRAIN_MODE)
    if args.out is None:
        args.out = str(Path(args.resume).parent) if args.halting_map and args.resume else "runs/sanity"
    return args


def data_and_model_flags(p: argparse.ArgumentParser):
    a = p.add_argument_group("data").add_argument
    a("--train", help="training list file (`path label ...`) or class-folder root; without it: the demo")
    a("--val", help="validation list file or class-folder root")
    a("--root", help="folder the list files' paths are relative to (default: the list file's folder)")
    a("--num-classes", type=int, help="default: from the class folders or the largest label + 1")
    a("--multi-label", action="store_true", help="`path l1 l2 ...` lists, BCE loss, mAP (ActivityNet)")
    a("--on-error", choices=["skip", "raise"], help="a bad video: skip it (logged; the default) or stop")
    a("--workers", type=int, help="DataLoader worker processes per training process (0)")
    a("--train-scale", type=int, nargs=2, help="random short side range (default: img_size * 8/7 .. 10/7)")
    a("--eval-short-side", type=int, help="eval short side before the centre crop (default: img_size * 8/7)")
    a("--randaugment", action=argparse.BooleanOptionalAction, help="RandAugment (Sec. 4.1; off in the demo)")
    a("--cache", action=argparse.BooleanOptionalAction, help="keep decoded videos in RAM (small sets only)")
    a("--rawframes", action="store_true", help="lists of frame folders: `frame_dir total_frames label ...`")
    a("--frame-template", help="a frame's file name in its folder (img_{:05}.jpg)")
    a("--start-index", type=int, help="number of a folder's first frame (1)")
    a("--frame-interval", type=int, help="T frames this far apart (the release's sampler); default: TSN segments")
    a("--demo-root", help="where the sanity run writes its demo dataset (data/demo)")
    a("--demo-videos", type=int, nargs=2, metavar=("TRAIN", "VAL"), help="demo videos per class (150 30)")
    m = p.add_argument_group("model (unset values come from --model, or DEMO_PRESET)").add_argument
    m("--model", choices=["tiny", "deit_small"], help="HaltingVTConfig.tiny() or .deit_small()")
    m("--init", help="weights to start from: DeiT-S's, a train.py run's or the release's (checkpoints.py)")
    m("--frames", type=int, help="frames per clip (8 Mini-Kinetics, 10 ActivityNet)")
    for name in ("--img-size", "--embed-dim", "--depth", "--heads", "--glimpser-depth"):
        m(name, type=int)
    for name, where in (("--keep-ratio", "R of the Glimpser, Eq. (7)"), ("--gamma", "Eq. (2)"), ("--eps", "Eq. (3)"),
                        ("--beta", "Eq. (2), subtracted: larger beta halts later"), ("--drop-path", None)):
        m(name, type=float, help=where)
    m("--no-halting", dest="halting", action="store_false", help="run every joint layer on every token")
    m("--release-compat", action=argparse.BooleanOptionalAction, help="the release's forward (mask execution)")


def run_flags(p: argparse.ArgumentParser):
    o = p.add_argument_group("optimisation (unset values: DEMO_PRESET without --train, else DEFAULTS)").add_argument
    o("--preset", choices=["demo", "real"], help="default: demo without --train, else real")
    o("--optimizer", choices=["adam", "adamw"])
    for name, kind in (("--lr", float), ("--weight-decay", float), ("--epochs", int), ("--warmup-epochs", float)):
        o(name, type=kind)
    o("--batch-size", type=int, help="videos per process; each gives a real and a fake clip")
    o("--clip-grad", type=float, help="max gradient norm")
    o("--alpha-p", type=float, help="ponder weight, Eq. (9)")
    o("--alpha-m", type=float, help="motion weight, Eq. (9) (the paper's 0.01; 1 is the release's in effect)")
    o("--train-mode", choices=["mask", "drop"], help="halted tokens in training (TRAIN_MODE, AMP_TRAIN_MODE)")
    o("--task-on-fakes", action=argparse.BooleanOptionalAction, help="the task loss on the fake clips too")
    o("--halting-warmup", type=float, help="epochs of halting warm-up: off for half, then a linear rise; 0 = off")
    o("--embed-std", type=float, help="from scratch: pos_embed and time_embed start at this std")
    r = p.add_argument_group("run").add_argument
    r("--out", help="where the run's files go (runs/sanity; a halting map: the checkpoint's folder)")
    r("--seed", type=int)
    r("--device", help="default: cuda if available, else cpu")
    r("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    r("--threads", type=int, help="torch CPU threads per process (default: OMP_NUM_THREADS, or cores / processes)")
    r("--resume", help="checkpoint to continue from (or evaluate: --eval-only); default: OUT's unfinished run")
    r("--overwrite", action="store_true", help="start afresh in an --out that holds a finished or another run")
    r("--eval-only", action="store_true")
    r("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    r("--log-every", type=int, help="progress line every N steps")
    r("--stop-after", type=int, help="stop after N epochs of this run (the schedule still spans --epochs)")
    r("--predict", nargs="+", metavar="VIDEO", help="top-5 classes, GFLOPs, halting depth with --resume's model")
    r("--json", action="store_true", help="with --predict: one JSON object per video, one a line")
    r("--halting-map", metavar="VIDEO", help="write OUT/halting_map.png (Fig. 4) with --resume's model")
    r("--map-layers", type=int, nargs="+", help="joint layers (1..L) the map shows (default: up to 3 over 2..L)")


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


# HaltingVTConfig's fields that flags set, and the flags
MODEL_FLAGS = dict(num_frames="--frames", img_size="--img-size", embed_dim="--embed-dim", depth="--depth",
                   num_heads="--heads", glimpser_depth="--glimpser-depth", keep_ratio="--keep-ratio", gamma="--gamma",
                   beta="--beta", eps="--eps", drop_path="--drop-path", num_classes="--num-classes")


def model_config(args, num_classes) -> HaltingVTConfig:
    """--model's config with the model flags given on top; UsageError naming the flag of a value it cannot take."""
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


def read_run(path, flag="--resume") -> dict:
    with blame(flag, path):
        return checkpoints.read_run_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------
# Processes and devices

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
# wait for each other. On an idle machine 2 threads on 2 cores are the fastest with OpenMP's default waiting (spin
# a little, then sleep; PASSIVE waits cost 70% more). Beside other CPU-bound processes a waiting thread spins
# on a core they need, and one thread is far faster (bench.py --busy). So, unless --threads or OMP_NUM_THREADS
# fix it, one process runs as many threads as the cores other processes leave idle, looked at before training and
# after every epoch (Linux's /proc/stat; elsewhere one thread per core).
PROC_STAT = Path("/proc/stat")


def cpu_seconds() -> Optional[tuple]:
    """(seconds the machine's cores have been busy since boot, this process's CPU seconds, wall seconds), or None
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


def fixed_threads(args, world: int) -> Optional[tuple]:
    """(torch threads per process, why) when the count is fixed: --threads; OMP_NUM_THREADS for one process
    (torchrun sets it to 1 in each process it starts); the cores shared by several local processes, or by one
    where PROC_STAT cannot be read. None: the count follows the idle cores (cpu_threads)."""
    if args.threads:
        return args.threads, "--threads"
    if world == 1 and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores, local_world = os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world > 1 or cpu_seconds() is None:
        return max(1, cores // local_world), f"{cores} cores / {local_world} process(es)"
    return None


def cpu_threads(args, world: int, since: Optional[tuple] = None) -> tuple:
    """(torch threads per process, why): fixed_threads, else the cores other processes left idle since `since`
    (cpu_seconds(); None: over the next 0.2 s), at least 1."""
    if fixed := fixed_threads(args, world):
        return fixed
    if since is None:
        since = cpu_seconds()
        time.sleep(0.2)
    cores, idle = os.cpu_count() or 1, idle_cores(since)
    return max(1, min(cores, round(idle))), f"{cores} cores, {cores - idle:.1f} busy with other processes"


def set_threads(args, world: int, since: Optional[tuple] = None) -> Optional[tuple]:
    """Set torch's CPU threads (cpu_threads) and log them: with OpenMP's waiting policy the first time (the log's
    first line), then when they change. Returns the cpu_seconds() to look again from after an epoch, or None when
    the count is fixed (fixed_threads)."""
    threads, why = cpu_threads(args, world, since)
    if since is None:
        policy = os.environ.get("OMP_WAIT_POLICY")
        log.info("CPU: %d torch threads (%s); OpenMP waiting: %s", threads, why,
                 f"OMP_WAIT_POLICY={policy}" if policy else "OpenMP's default (spin a little, then sleep)")
    elif threads != torch.get_num_threads():
        log.info("CPU: %d torch threads from now on (%s)", threads, why)
    torch.set_num_threads(threads)
    return None if fixed_threads(args, world) else cpu_seconds()


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) over processes, in place; a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def plural(n: int, one: str, many: Optional[str] = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"  # `1 video`, `2 videos`


# ----------------------------------------------------------------------------------------------------------
# The loop: data, model, optimiser; a run from the start or from a checkpoint; epochs, steps, stops, checkpoints

class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was left as it was."""


def run(args, rank, world, device) -> dict:
    """One training (or --eval-only evaluation) with these flags: the last evaluation's metrics."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
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
        ckpt = read_run(args.resume)
        if not args.eval_only and finished(ckpt, args):
            log.info("%s is a finished run (epoch %d of %d): nothing to do", args.resume, ckpt["epoch"], args.epochs)
            return json.loads((Path(args.out) / "final.json").read_text())
        saved = HaltingVTConfig(**ckpt["config"])
        if saved != cfg:
            log.warning("--resume: using the checkpoint's model config %s", saved)
        cfg = saved
    model = build_model(cfg, args, device)
    if model.cfg.release_compat and args.train_mode == "drop":  # turned on by --init of the release's layout
        log.info("training in mask mode: the release-compatible forward has no drop mode")
        args.train_mode = "mask"
    val_loader = data.epoch_loader(val_set, args.batch_size, 0, rank, world, workers=args.workers, train=False)
    if args.eval_only:  # check_args: --resume or --init
        if args.resume:
            model.load_state_dict(ckpt["model"])
        metrics = evaluate(model, val_loader, args, device, model.cfg)
        log.info("eval: %s", summary(metrics))
        return metrics
    steps_per_epoch = len(train_set) // world // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size}: the training set has {plural(len(train_set), 'video')}, "
                         f"fewer than one batch per process x {plural(world, 'process', 'processes')}")
    s = RunState(args, model, build_optimizer(model, args), device, rank, world, num_classes, classes,
                 steps_per_epoch, cpu_since=cpu_seconds() if device.type == "cpu" else None)
    start(s)
    log.info("model %s; %d parameters; %d train / %d val videos; %d steps/epoch on %s, %s", model.cfg,
             sum(p.numel() for p in model.parameters()), len(train_set), len(val_set), steps_per_epoch,
             plural(world, "process", "processes"), device)
    if args.halting_warmup:
        log.info("halting warm-up: no halting nor ponder loss until epoch %g, then both rise to full by epoch %g",
                 args.halting_warmup / 2, args.halting_warmup)
    return fit(s, train_set, val_loader)


def build_data(args, rank):
    """(train set or None (--eval-only), val set, num_classes). The sanity run first writes the demo set (rank 0)."""
    if args.preset == "demo" and not args.train:
        if rank == 0:
            counts = dict(num_train=args.demo_videos[0], num_val=args.demo_videos[1])
            if not data.demo_dataset_ready(args.demo_root, **counts):
                log.info("writing the demo dataset to %s", args.demo_root)
            data.make_demo_dataset(args.demo_root, **counts)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for the files
        args.train, args.val = f"{args.demo_root}/train.txt", f"{args.demo_root}/val.txt"
    base = getattr(HaltingVTConfig, args.model)()  # frames and size unless the flags say otherwise
    common = dict(root=args.root, num_frames=args.frames or base.num_frames, img_size=args.img_size or base.img_size,
                  multi_label=args.multi_label, num_classes=args.num_classes, on_error=args.on_error, seed=args.seed,
                  cache=args.cache, short_side=args.eval_short_side, scale=args.train_scale,
                  frame_interval=args.frame_interval, rawframes=args.rawframes, frame_template=args.frame_template,
                  start_index=args.start_index)
    train = None
    if args.train:
        with blame("--train", args.train):
            train = data.VideoDataset(args.train, train=True, randaugment=args.randaugment and not args.eval_only,
                                      **common)
        common["num_classes"] = train.num_classes
    # validation: each video's real clip and its static fake (motion accuracy), labelled with the training classes
    with blame("--val", args.val):
        val = data.VideoDataset(args.val, train=False, motion_pairs=True, classes=train and train.classes, **common)
    if train:
        data.log_labels_by_index(args.train, args.val, train, val)
    return train, val, (train or val).num_classes


def build_model(cfg: HaltingVTConfig, args, device):
    """The model of `cfg` on `device`, with --init's weights; a checkpoint of the release's layout turns on the
    release-compatible forward (in its cfg) unless --no-release-compat was given."""
    with blame("--init", args.init):
        ckpt = checkpoints.read_checkpoint(args.init) if args.init else None
    if ckpt is not None and args.release_compat is None and checkpoints.checkpoint_file_layout(ckpt) == "release":
        log.info("--init %s has the release's layout: release-compatible forward on (halted tokens zeroed and "
                 "still attended, halting on > 1 - eps, no class-token residual in the pruning layer; mask "
                 "execution); --no-release-compat turns it off", args.init)
        cfg = replace(cfg, release_compat=True)
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
    """Adam(W), no weight decay on NO_DECAY, norms and biases; train_step sets the learning rate (lr_at)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in NO_DECAY else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam)(groups, lr=args.lr)


def lr_at(args, epochs_done: float) -> float:
    """The release's schedule, smooth (it steps its cosine per epoch, over all --epochs from the warm-up's end, so
    its last epoch runs near 0.2 x lr): a linear warm-up from 0.1 x --lr, then a cosine to 0 at --epochs."""
    warm = args.warmup_epochs
    if epochs_done < warm:
        return args.lr * (0.1 + 0.9 * epochs_done / warm)
    return args.lr * (1 + math.cos(math.pi * (epochs_done - warm) / (args.epochs - warm))) / 2


def halting_ramp(args, epochs_done: float) -> float:
    """How far halting is on, 0..1: 0 for the first half of --halting-warmup epochs, then a linear rise (1 without
    it). The ponder weight rises with it: Adam rescales even the ponder loss's tiny gradient on a near-zero score
    to full-size steps, which took the class token out at the first joint layer for good."""
    if not args.halting_warmup:
        return 1.0
    half = args.halting_warmup / 2
    return min(max((epochs_done - half) / half, 0.0), 1.0)


PROGRESS = ("epoch", "samples_in_epoch", "step", "best")  # the RunState fields every checkpoint keeps


@dataclass
class RunState:
    """A training run: what it trains and how far it has come (progress is counted in samples, so a run resumed on
    other processes or batch size goes on with the same samples and learning rates, in its own steps)."""
    args: argparse.Namespace
    model: HaltingVT
    optimizer: torch.optim.Optimizer
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

    def epochs_done(self) -> float:  # fractional: what lr_at and halting_ramp follow
        return self.epoch + self.samples_in_epoch / (self.steps_per_epoch * self.args.batch_size * self.world)


def finished(ckpt: dict, args) -> bool:
    """Whether the checkpoint's run trained all its epochs and wrote OUT/final.json (after its last evaluation)."""
    return ckpt["epoch"] >= args.epochs and (Path(args.out) / "final.json").exists()


def claim_out(args):
    """A training run without --resume whose OUT holds a run already. A requeued job runs the same command again,
    so an unfinished run there of these flags (but RESUME_FREE) goes on (args.resume becomes its last.pt), even
    with --overwrite, which a job script may hold. A finished run, another run's flags or files: UsageError saying
    what to do, or with --overwrite a fresh run (start clears the files)."""
    out, last = Path(args.out), Path(args.out) / "last.pt"
    found = [name for name in RUN_FILES if (out / name).exists()]
    if args.resume or not found:
        return
    problem, hint = f"another run's {', '.join(found)}", ""
    if "last.pt" in found:
        ckpt = read_run(last)
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


def start(s: RunState):
    """Continue from --resume (resume), give every process rank 0's weights, make OUT (a fresh run clears the
    RUN_FILES of one it replaces: --overwrite)."""
    if s.args.resume:
        resume(s)
    if s.world > 1:  # train_step averages the gradients, so the replicas then stay equal
        flat = torch.nn.utils.parameters_to_vector(s.model.parameters())
        dist.broadcast(flat, 0)
        torch.nn.utils.vector_to_parameters(flat, s.model.parameters())
    Path(s.args.out).mkdir(parents=True, exist_ok=True)
    if s.rank == 0 and not s.args.resume:
        for name in RUN_FILES:
            (Path(s.args.out) / name).unlink(missing_ok=True)


def resume(s: RunState):
    """Weights, optimiser, RNG states and progress from the --resume checkpoint; logs where the run goes on, and
    how, when the number of processes or the batch size changed."""
    with blame("--resume", s.args.resume):
        ckpt = checkpoints.load_checkpoint(s.args.resume, s.model, s.optimizer)
    for key in PROGRESS:
        setattr(s, key, ckpt[key])
    s.start_step, best = s.step, Path(s.args.out) / "best.pt"
    if best.exists():  # written after its epoch's last.pt, so its score can be newer
        kept = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
        if kept["epoch"] <= s.epoch and (s.best is None or kept["best"] > s.best):
            s.best = kept["best"]
    log.info("resuming from %s, epoch %d, step %d", s.args.resume, s.epoch + 1, s.step)
    was = (ckpt.get("world", s.world), ckpt["args"].get("batch_size", s.args.batch_size))
    if was != (s.world, s.args.batch_size):
        log.info("%d process(es) x %d videos a step, was %d x %d: epoch %d goes on after its first %d samples, the "
                 "learning rate over the %d steps left", s.world, s.args.batch_size, *was, s.epoch + 1,
                 s.samples_in_epoch, round((s.args.epochs - s.epochs_done()) * s.steps_per_epoch))


def fit(s: RunState, train_set, val_loader) -> dict:
    """Train from where `s` stands to --epochs (or --stop-after more): the last evaluation's metrics. Each epoch:
    its steps, last.pt, then (every --eval-every epochs and the last) an evaluation; last.pt first, so a kill during
    a long evaluation loses that evaluation only. SIGINT or SIGTERM: the step or evaluation batch under way ends,
    last.pt, then stopped's SystemExit. A finished run writes final.json."""
    args, metrics = s.args, {}
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, s.epoch + args.stop_after)
    with StopFlag() as stop:
        while s.epoch < last_epoch:
            train_loss = train_epoch(s, train_set, stop)
            if s.cpu_since:  # the CPU threads follow the cores other processes leave idle
                s.cpu_since = set_threads(args, s.world, s.cpu_since)
            save(s, Path(args.out) / "last.pt")
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
    """The rest of the current epoch: the mean loss over every process's steps, with `s` at the next epoch; or None,
    with `s` before the batch under way, when a process got a stop signal."""
    s.model.train()
    loader = data.epoch_loader(train_set, s.args.batch_size, s.epoch, s.rank, s.world, seed=s.args.seed,
                               workers=s.args.workers, skip_samples=s.samples_in_epoch)
    sums, skipped, tick = [0.0, 0], set(), (time.time(), s.step)  # loss sum and steps; bad videos
    for batch in data.single_threaded(loader):
        parts = train_step(s, batch, stop)
        if parts is None:  # returning here also shuts the DataLoader workers down before last.pt is written
            return None
        sums, skipped = [sums[0] + parts["total"], sums[1] + 1], skipped | set(batch["skipped"])
        if s.step % s.args.log_every == 0:
            tick = log_progress(s, parts, len(batch["video"]), tick)
    if skipped:  # --on-error skip
        log.warning("epoch %d: %s skipped: %s", s.epoch + 1, plural(len(skipped), "bad video"), sorted(skipped)[:3])
    total, count = all_reduce(torch.tensor(sums, dtype=torch.float64, device=s.device)).tolist()
    s.epoch, s.samples_in_epoch = s.epoch + 1, 0
    return total / max(count, 1)


def train_step(s: RunState, batch: dict, stop: "StopFlag") -> Optional[dict]:
    """One optimiser step: the loss parts (floats); or None, nothing updated, when any process got a stop signal
    (stop.signum is then that signal's everywhere). NonFiniteLoss, on every process before any update, for a NaN or
    infinite loss or gradient norm."""
    args = s.args
    loss, parts = forward_loss(s.model, batch, args, s.device, s.num_classes, halting_ramp(args, s.epochs_done()))
    bad = float(not math.isfinite(parts["total"]))  # one collective a step: a bad loss or a stop signal anywhere?
    flags = all_reduce(torch.tensor([bad, float(stop.signum)], device=s.device), dist.ReduceOp.MAX).tolist()
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
        average_gradients(s.model, s.world)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), args.clip_grad)
    if not torch.isfinite(grad_norm):  # the same on every process: gradients were already averaged
        raise NonFiniteLoss(f"gradient norm is {grad_norm.item()} at epoch {s.epoch + 1}, step {s.step}; "
                            f"stopping before the update, {args.out}/last.pt is untouched.")
    s.optimizer.step()
    s.step, s.samples_in_epoch = s.step + 1, s.samples_in_epoch + args.batch_size * s.world
    return parts


def average_gradients(model, world: int):
    """DistributedDataParallel's averaging as one all_reduce, a missing gradient counting as zero; one no process
    has stays None. (In drop mode a joint layer no token reached has none: DDP would need find_unused_parameters,
    and then warns in every process of every run that it found none unused.)"""
    params = list(model.parameters())
    flat = torch.cat([t for p in params for t in (p.grad.reshape(-1) if p.grad is not None else p.new_zeros(
        p.numel()), p.new_tensor([float(p.grad is not None)]))])  # each gradient, then 1 if it exists
    parts = all_reduce(flat).split([p.numel() + 1 for p in params])
    for p, part, got in zip(params, parts, torch.stack([part[-1] for part in parts]).tolist()):
        p.grad = part[:-1].view_as(p) / world if got else None


def forward_loss(model, batch, args, device, num_classes, ramp=1.0):
    """Eq. (9) on B videos = 2B clips (real, then fake): (loss, parts as floats). The halting warm-up's `ramp`
    (halting_ramp) raises beta by BETA_OFF * (1 - ramp) and scales the ponder weight."""
    video, label, motion = (batch[k].to(device, non_blocking=True) for k in ("video", "label", "motion"))
    with autocast(args, device):  # the losses too: autocast runs cross-entropy in float32
        out = model(video, drop_halted=args.train_mode == "drop", beta=model.cfg.beta + BETA_OFF * (1 - ramp))
        return haltingvt_loss(out, label, motion, num_classes=num_classes, alpha_p=args.alpha_p * ramp,
                              alpha_m=args.alpha_m, multi_label=args.multi_label, task_on_fakes=args.task_on_fakes)


def autocast(args, device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")  # --amp


def log_progress(s: RunState, parts: dict, batch_clips: int, tick: tuple) -> tuple:
    """One line: step/total, each loss part, lr, clips/s since `tick` (time, step), time left. The next tick."""
    total, now = s.step + round((s.args.epochs - s.epochs_done()) * s.steps_per_epoch), time.time()
    clips_per_s = batch_clips * (s.step - tick[1]) / (now - tick[0])
    left = time.strftime("%H:%M:%S", time.gmtime((total - s.step) * (now - s.t0) / max(s.step - s.start_step, 1)))
    terms = " ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "total")  # task, ponder, motion
    ramp = halting_ramp(s.args, s.step / s.steps_per_epoch)
    warmup = "" if ramp == 1 else "  halting warm-up: off" if ramp == 0 else f"  halting warm-up: {ramp:.2f} on"
    log.info("epoch %d step %d/%d  loss %.4f (%s)  lr %.4e  %.1f clips/s  left %s%s", s.epoch + 1, s.step, total,
             parts["total"], terms, s.optimizer.param_groups[0]["lr"], clips_per_s, left, warmup)
    return now, s.step


class StopFlag:
    """`signum`: the SIGINT or SIGTERM received in the `with` block (0 before one); the loop then stops at the next
    step or evaluation batch. Leaving the block puts the previous handlers back."""
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


def stopped(s: RunState, signum: int, during: str) -> SystemExit:
    """Log, last, how to continue; the SystemExit to raise, status 128 + the signal's number (130 SIGINT, 143
    SIGTERM) as a shell reports a process the signal killed, so a script can tell it from a finished run."""
    script = sys.argv[0] if sys.argv[0].endswith("train.py") else __file__
    launcher = ["python"] if s.world == 1 else ["torchrun", f"--nproc-per-node={s.world}"]
    command = shlex.join([*launcher, script, "--resume", str(Path(s.args.out) / "last.pt")])
    log.info("%s: stopped during %s; %s/last.pt holds the run at step %d, %d samples into epoch %d. To continue, "
             "run the same command again, or: %s", signal.Signals(signum).name, during, s.args.out, s.step,
             s.samples_in_epoch, s.epoch + 1, command)
    return SystemExit(128 + signum)


def save(s: RunState, path: Path):
    if s.rank == 0:  # PROGRESS and the number of processes beside the weights (checkpoints.save_checkpoint)
        progress = {**{k: getattr(s, k) for k in PROGRESS}, "world": s.world}
        checkpoints.save_checkpoint(path, s.model, s.optimizer, progress, s.model.cfg, s.args, s.classes)


def record(metrics: dict, s: RunState, out: Path):
    """Log one evaluation, append it to metrics.jsonl and keep best.pt (rank 0; after the halting warm-up)."""
    log.info("epoch %d eval: %s", metrics["epoch"], summary(metrics))
    if s.rank != 0:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if halting_ramp(s.args, metrics["epoch"]) < 1 and metrics["epoch"] < s.args.epochs:
        return  # best.pt holds a model that halts as configured, not one from the halting warm-up
    key = "val_map" if "val_map" in metrics else "val_top1"
    if s.best is None or metrics[key] > s.best:
        s.best = metrics[key]
        save(s, out / "best.pt")


def finish(s: RunState, metrics: dict):
    """The end of a run: every replica's weight hash (several processes), OUT/final.json, the closing line."""
    if s.world > 1:  # replicas must agree; the test of the distributed run reads this
        state = sorted(s.model.state_dict().items())
        sha = hashlib.sha256(b"".join(k.encode() + t.detach().cpu().contiguous().numpy().tobytes() for k, t in state))
        metrics["rank_weight_sha"] = [None] * s.world
        dist.all_gather_object(metrics["rank_weight_sha"], sha.hexdigest())
    if s.rank == 0:
        (Path(s.args.out) / "final.json").write_text(json.dumps(metrics, indent=1))
        if metrics:
            log.info("done in %.0f s (outputs in %s): %s", time.time() - s.t0, s.args.out, summary(metrics))


# ----------------------------------------------------------------------------------------------------------
# Evaluation: top-1/top-5 or mAP, motion accuracy, GFLOPs and halting depths, summed batch by batch

def evaluation(s: RunState, val_loader, stop: StopFlag, train_loss: Optional[float]) -> dict:
    """Evaluate the epoch just finished and record it: its metrics (stopped's SystemExit when a signal cut it)."""
    log.info("epoch %d: last.pt saved; evaluating on %d videos", s.epoch, len(val_loader.dataset))
    metrics = evaluate(s.model, val_loader, s.args, s.device, s.model.cfg, stop)
    if metrics is None:
        raise stopped(s, stop.signum, f"the evaluation of epoch {s.epoch}")
    metrics = {"epoch": s.epoch, "step": s.step, "train_loss": train_loss, **metrics, "elapsed_s": time.time() - s.t0}
    record(metrics, s, Path(s.args.out))
    return metrics


@torch.no_grad()
def evaluate(model, loader, args, device, cfg: HaltingVTConfig, stop: Optional[StopFlag] = None):
    """Drop mode on each video's real clip; motion accuracy on the real clips and their fakes. Each readable video
    counts once; an unreadable one is left out, named in a warning, counted in val_skipped. Sums over processes (a
    process may have no video); every process gets the result, or None everywhere when a process got a stop signal
    (it stops after the batch under way; stop.signum is then that signal's everywhere)."""
    model.eval()
    count, scores, targets, skipped = eval_counters(cfg.depth, cfg.glimpser_depth), [], [], []
    for batch in data.single_threaded(loader):
        if stop and stop.signum:
            break
        skipped += batch["skipped"]
        if "video" not in batch:  # every video of the batch was unreadable
            continue
        video, label, motion = (batch[k].to(device) for k in ("video", "label", "motion"))
        with autocast(args, device):
            out = model(video, drop_halted=not cfg.release_compat)  # B real clips, then their B fakes
        add_eval_batch(count, out, label, motion, args.multi_label, scores, targets)
    if stop is not None:  # a stop signal in any process? (every process takes part in this collective)
        stop.signum = int(all_reduce(torch.tensor([stop.signum], device=device), dist.ReduceOp.MAX).item())
        if stop.signum:
            return None
    if skipped:
        log.warning("evaluation: %s left out: %s", plural(len(skipped), "unreadable video"), skipped[:5])
    count["skipped"] += len(skipped)
    sizes = [c.numel() for c in count.values()]
    flat = all_reduce(torch.cat([c.reshape(-1) for c in count.values()]).to(device)).cpu()  # all in one all_reduce
    count = {name: part.view_as(c) for (name, c), part in zip(count.items(), flat.split(sizes))}
    if count["videos"] == 0:
        log.warning("evaluation: no readable validation video; the metrics are nan")
    metrics = eval_metrics(count, dense_gflops(cfg), args.multi_label)
    if cfg.num_classes <= 5:
        metrics.pop("val_top5", None)  # every class is in the top 5
    if args.multi_label:
        metrics["val_map"] = average_precision(*gather_scores(scores, targets, cfg.num_classes))
    return metrics


def eval_counters(depth, glimpser_depth):
    """The evaluation's sums by name, float64: scalars, but the per-layer ones."""
    names = ("videos", "skipped", "top1", "top5", "motion_correct", "motion_clips", "gflops", "gflops_release",
             "depth_sum", "tokens")
    return {**{name: torch.zeros((), dtype=torch.float64) for name in names},
            "depth_hist": torch.zeros(depth - glimpser_depth, dtype=torch.float64),  # halted at joint layer 1..L
            "tokens_per_layer": torch.zeros(depth, dtype=torch.float64)}


def add_eval_batch(count, out, label, motion, multi_label, scores, targets):
    """Add a batch's output (B real clips, then their B fakes) to the counters; multi-label: its (B, Y) scores and
    targets to the lists."""
    B = len(out.logits) // 2
    logits, label, depth = out.logits[:B].float(), label[:B], out.halt_depth[:B]  # depth (B, K): N_k, 1..L
    if multi_label:  # AP ranks by the logits: sigmoid would tie confident scores by rounding them to exactly 1
        scores.append(logits.cpu()), targets.append(label.float().cpu())
    else:
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices  # (B, 5)
        count["top1"] += (top5[:, 0] == label).sum().item()
        count["top5"] += (top5 == label[:, None]).any(1).sum().item()
    count["videos"] += B
    if out.motion_logits is not None:  # no motion head when the run has no Motion Loss
        count["motion_correct"] += (out.motion_logits.argmax(1) == motion).sum().item()
        count["motion_clips"] += len(out.logits)
    count["gflops"] += out.gflops[:B].sum().item()
    if out.gflops_release is not None:  # a release-compatible forward: the release's count too
        count["gflops_release"] += out.gflops_release[:B].sum().item()
    count["depth_sum"] += depth.sum().item()
    count["tokens"] += depth.numel()
    count["depth_hist"] += torch.bincount(depth.flatten().cpu() - 1, minlength=len(count["depth_hist"])).double()
    count["tokens_per_layer"] += out.tokens_per_layer[:B].sum(0).cpu().double()


def eval_metrics(c, dense_gflops, multi_label):
    """The metrics from the summed counters: means per readable video (nan when there was none), `dense_gflops`
    beside those spent, val_gflops_release (every token until its own halt) where the forward counted it."""
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


def gather_scores(scores: list, targets: list, num_classes: int):
    """All processes' (scores, targets) for mAP, concatenated: (N, num_classes) each; a process may have none."""
    empty = torch.zeros(0, num_classes)
    scores, targets = torch.cat([empty, *scores]), torch.cat([empty, *targets])
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (scores, targets))
        scores, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return scores, targets


def average_precision(scores, targets):
    """Mean over classes (with at least one positive) of the average precision: scores, targets (N, Y)."""
    aps = []
    for s, t in zip(scores.T, targets.T):
        if t.sum() > 0:
            t = t[s.argsort(descending=True)]
            aps.append((t.cumsum(0) / torch.arange(1, len(t) + 1) * t).sum() / t.sum())  # precision at each hit
    return torch.stack(aps).mean().item() if aps else float("nan")


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
# Prediction and the halting map (paper Fig. 4) from a trained checkpoint

def trained_model(args, device, flag: str):
    """(model in eval mode, its run's flags, its class names) from --resume, a train.py checkpoint."""
    if not args.resume:
        raise UsageError(f"{flag} needs --resume CHECKPOINT")
    ckpt = read_run(args.resume)
    model = HaltingVT(HaltingVTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt.get("args", {}), ckpt.get("classes")


def eval_clip(args, run_args: dict, cfg: HaltingVTConfig, path):
    """A video file or frame folder through the run's eval pipeline (the frame files as this command names them)."""
    return data.eval_clip(path, cfg.num_frames, cfg.img_size, run_args.get("eval_short_side"),
                          frame_interval=run_args.get("frame_interval"), template=args.frame_template,
                          start_index=args.start_index)


@torch.no_grad()
def predict_clip(model, video, classes, multi_label: bool, k: int = 5) -> dict:
    """One clip (C, T, H, W) in drop mode: {"top5": [{"label", "class" (name or None), "prob"}, ...] best first,
    "gflops" spent, "halt_depth_mean" (joint layer 1..L), "joint_layers" L}. Probabilities: softmax, or each
    class's sigmoid for a multi-label run."""
    out = model(video.unsqueeze(0), drop_halted=not model.cfg.release_compat)
    logits = out.logits[0].float()
    top = (logits.sigmoid() if multi_label else logits.softmax(0)).topk(min(k, len(logits)))
    best = [{"label": i, "class": classes[i] if classes else None, "prob": p}
            for i, p in zip(top.indices.tolist(), top.values.tolist())]
    return {"top5": best, "gflops": out.gflops[0].item(), "halt_depth_mean": out.halt_depth[0].float().mean().item(),
            "joint_layers": model.cfg.depth - model.cfg.glimpser_depth}


def predict(args, device) -> list:
    """--predict: each video through --resume's model and its run's eval pipeline, printed as it comes (lines, or
    a JSON object with --json). A video that cannot be read prints its error and the others still run; then
    SystemExit (status 1) names those. The results: predict_clip's dicts with "video", or {"video", "error"}."""
    model, run_args, classes = trained_model(args, device, "--predict")
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


def prediction_text(result: dict) -> str:
    """A --predict result as lines: the video, GFLOPs and depth, then one line per class (name or label)."""
    if "error" in result:
        return f"{result['video']}: error: {result['error']}"
    head = (f"{result['video']}: {result['gflops']:.4f} GFLOPs, mean halting depth {result['halt_depth_mean']:.2f} "
            f"of {result['joint_layers']} joint layers")
    return "\n".join([head] + [f"  {c['prob']:.3f}  {c['class'] if c['class'] is not None else c['label']}"
                               for c in result["top5"]])


def write_halting_map(args, device) -> dict:
    """--halting-map: the video through the run's eval pipeline and --resume's model -> OUT/halting_map.png.
    Columns: the sampled frames; rows: the input, the patches the Glimpser kept, the tokens still active at each
    joint layer of --map-layers. Returns {"path", "active": {row name: share of the T x S patches active}}."""
    model, run_args, _ = trained_model(args, device, "--halting-map")
    cfg, L = model.cfg, model.cfg.depth - model.cfg.glimpser_depth
    if not all(1 <= layer <= L for layer in args.map_layers or []):
        raise UsageError(f"--map-layers {' '.join(map(str, args.map_layers))}: joint layers are 1..{L}")
    # by default up to 3 layers over 2..L: at layer 1 every kept token is active, as the Glimpser row shows
    layers = list(args.map_layers or (sorted({round(x) for x in np.linspace(2, L, 3)}) if L > 1 else [1]))
    with blame("--halting-map", args.halting_map):
        video = eval_clip(args, run_args, cfg, args.halting_map)  # (C, T, H, W)
        source = Path(args.halting_map)  # the column labels: the frames sampled, numbered from 0
        n = data.count_frame_files(source, args.frame_template, args.start_index) if source.is_dir() else \
            data.count_frames(source)
    frames = data.sample_indices(n, cfg.num_frames, False, frame_interval=run_args.get("frame_interval"))
    masks = token_masks(model, video.to(device), layers)  # (1 + len(layers), T, S)
    names = ["Glimpser"] + [f"joint layer {layer}" for layer in layers]
    image = label_map(halting_map(display_frames(video.cpu()), masks, cfg.patch_size), ["input"] + names,
                      [f"frame {i}" for i in frames])
    path = Path(args.out) / "halting_map.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, image)
    active = {name: m.float().mean().item() for name, m in zip(names, masks)}
    log.info("wrote %s (rows: input, %s); patches active: %s", path, ", ".join(names),
             ", ".join(f"{name} {a:.2f}" for name, a in active.items()))
    return {"path": str(path), "active": active}


@torch.no_grad()
def token_masks(model, video, layers):
    """One clip (C, T, H, W) through the model in drop mode (mask mode when release-compatible): bool
    (1 + len(layers), T, S), the patches the Glimpser kept, then those active at each joint layer in `layers`."""
    out = model(video.unsqueeze(0), drop_halted=not model.cfg.release_compat)
    S = (model.cfg.img_size // model.cfg.patch_size) ** 2
    return active_token_masks(out.keep_index[0] if out.keep_index is not None else None, out.halt_depth[0], S, layers)


def active_token_masks(keep_index, halt_depth, num_patches, layers):
    """Which patches of one clip take part where: keep_index (T, k) the patches the Glimpser kept per frame, or None
    (no Glimpser: every patch); halt_depth (1 + T*k,) N_k of the tokens entering the joint stage, the class token
    first. bool (1 + len(layers), T, S): row 0 the patches kept, then for each joint layer l in `layers` those with
    N_k >= l (Eq. 3; in drop mode the tokens left when the class token halts carry its N_k, so stop with it)."""
    halt_depth = halt_depth.cpu()
    if keep_index is None:
        keep_index = torch.arange(num_patches).expand((halt_depth.shape[0] - 1) // num_patches, num_patches)
    keep_index = keep_index.cpu()
    T, k = keep_index.shape
    depth = halt_depth[1:].view(T, k)  # (T*k,) -> (T, k), the patch tokens' N_k
    frame = torch.arange(T).unsqueeze(1).expand(T, k)  # (T, k) frame of each token
    masks = torch.zeros(1 + len(layers), T, num_patches, dtype=torch.bool)
    masks[0, frame, keep_index] = True
    for i, layer in enumerate(layers, start=1):
        masks[i, frame, keep_index] = depth >= layer  # pruned patches stay False
    return masks


DARKEN = 0.25  # brightness left to a pruned or halted patch
GAP = 2  # white pixels between the tiles of a halting map


def display_frames(video):
    """Undo data's normalisation for display: float (C, T, H, W) -> uint8 (T, H, W, 3)."""
    return (video * data.STD + data.MEAN).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def halting_map(frames, masks, patch_size, scale=2):
    """A grid, a column per frame: row 0 the frames, then a row per mask with the patches it leaves out darkened to
    DARKEN. frames uint8 (T, H, W, 3), masks bool (R, T, S), S = (H/p) * (W/p) row-major -> uint8
    ((1 + R) * (scale*H + GAP), T * (scale*W + GAP), 3), nearest-neighbour upscaled by `scale`."""
    T, H, W, _ = frames.shape
    tiles = [frames]
    for mask in masks:  # (T, S) -> (T, H, W): one patch covers patch_size x patch_size pixels
        pixel = mask.view(T, H // patch_size, W // patch_size).repeat_interleave(patch_size, 1)
        shade = torch.where(pixel.repeat_interleave(patch_size, 2), 1.0, DARKEN).unsqueeze(-1)  # (T, H, W, 1)
        tiles.append((frames.float() * shade).round().to(torch.uint8))
    image = torch.stack(tiles).repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # (rows, T, sH, sW, 3)
    image = F.pad(image.permute(0, 1, 4, 2, 3), (0, GAP, 0, GAP), value=255)  # white right and below a tile
    rows, T, C, h, w = image.shape
    return image.permute(0, 3, 1, 4, 2).reshape(rows * h, T * w, C).numpy()  # (rows, h, T, w, 3) -> (rows*h, T*w, 3)


# A 3x5 pixel font for the map's labels (no imaging library needed): a glyph is 5 rows, top first, each an octal
# digit whose 3 bits are its pixels (7 = ###, 5 = #.#, 2 = .#.).
FONT = dict(zip("0123456789AEFGIJLMNOPRSTUY ", "75557 26227 71747 71717 55711 74717 74757 71111 75757 75717 25755 "
                "74647 74644 74557 72227 11157 44447 57755 65555 25552 65644 65655 34216 72222 55557 55222 00000"
                .split()))


def text_mask(text, scale=2):
    """`text` in FONT's letters (lower case drawn as upper) -> bool (5 * scale, 4 * len(text) * scale), a blank
    column after each glyph."""
    glyphs = [[[int(row) >> (2 - c) & 1 for c in range(3)] + [0] for row in FONT[ch]] for ch in text.upper()]
    mask = torch.tensor(glyphs, dtype=torch.bool).permute(1, 0, 2).reshape(5, -1)  # (n, 5, 4) -> (5, 4n)
    return mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()


def label_map(image, rows, columns, scale=2):
    """Row names left of the rows and column names above the columns, black on white: uint8 (R*h, C*w, 3) of
    R x C equal tiles -> uint8 (7*scale + R*h, left + C*w, 3)."""
    h, w = image.shape[0] // len(rows), image.shape[1] // len(columns)
    top, left = 7 * scale, max(4 * len(name) for name in rows) * scale + 2 * scale
    canvas = np.full((top + image.shape[0], left + image.shape[1], 3), 255, np.uint8)
    canvas[top:, left:] = image
    for i, name in enumerate(rows):  # vertically centred on the row, left-aligned
        mask = text_mask(name, scale)
        y = top + i * h + (h - mask.shape[0]) // 2
        canvas[y:y + mask.shape[0], scale:scale + mask.shape[1]][mask] = 0
    for j, name in enumerate(columns):  # above the column, cut at its width
        mask = text_mask(name, scale)[:, :w]
        canvas[scale:6 * scale, left + j * w:left + j * w + mask.shape[1]][mask] = 0
    return canvas


def write_png(path, image):
    """Write a uint8 (H, W, 3) image with PyAV's PNG encoder, through a temporary file and a rename."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(b"".join(bytes(p) for p in packets + codec.encode(None)))  # None flushes the encoder
    tmp.replace(path)


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLoss as err:
        raise SystemExit(f"error: {err}")
