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
# Presets and defaults: a setting is its flag, else (--resume) the run's own, else the preset's, else its default

BOOL = argparse.BooleanOptionalAction  # --name and --no-name
# Every setting: name=(default, how its flag reads, its help). How: int, float or str; a list of choices; an action
# ("store_false": the flag is --no-name); or add_argument's keywords. Default None: worked out where it is used.
SETTINGS = {
    # TSN segments of the video files, decoded as the run goes; a bad video is skipped and logged
    "data": dict(
        train=(None, str, "training list file (`path label ...`) or class-folder root; without it: the demo"),
        val=(None, str, "validation list file or class-folder root"),
        root=(None, str, "folder the list files' paths are relative to (default: the list file's folder)"),
        num_classes=(None, int, "default: from the class folders or the largest label + 1"),
        multi_label=(False, "store_true", "`path l1 l2 ...` lists, BCE loss, mAP (ActivityNet)"),
        on_error=("skip", ["skip", "raise"], "a bad video: skip it (logged; the default) or stop"),
        workers=(0, int, "DataLoader worker processes per training process (0)"),
        train_scale=(None, dict(type=int, nargs=2), "random short side range (default: img_size * 8/7 .. 10/7)"),
        eval_short_side=(None, int, "eval short side before the centre crop (default: img_size * 8/7)"),
        randaugment=(True, BOOL, "RandAugment (Sec. 4.1; off in the demo)"),
        cache=(False, BOOL, "keep decoded videos in RAM (small sets only)"),
        rawframes=(False, "store_true", "lists of frame folders: `frame_dir total_frames label ...`"),
        frame_template=(data.FRAME_TEMPLATE, str, "a frame's file name in its folder (img_{:05}.jpg)"),
        start_index=(1, int, "number of a folder's first frame (1)"),
        frame_interval=(None, int, "T frames this far apart (the release's sampler); default: TSN segments"),
        demo_root=("data/demo", str, "where the sanity run writes its demo dataset (data/demo)"),
        demo_videos=((150, 30), dict(type=int, nargs=2, metavar=("TRAIN", "VAL")), "demo videos per class (150 30)")),
    # None: --model's value (HaltingVTConfig.deit_small(), the paper's; .tiny(), the demo's)
    "model (unset values come from --model, or DEMO_PRESET)": dict(
        model=("deit_small", ["tiny", "deit_small"], "HaltingVTConfig.tiny() or .deit_small()"),
        init=(None, str, "weights to start from: DeiT-S's, a train.py run's or the release's (checkpoints.py)"),
        frames=(None, int, "frames per clip (8 Mini-Kinetics, 10 ActivityNet)"),
        img_size=(None, int, "frame side in pixels"), embed_dim=(None, int, "token width"),
        depth=(None, int, "layers, the Glimpser's and the joint ones"), heads=(None, int, "attention heads"),
        glimpser_depth=(None, int, "divided space-time layers (0: none)"),
        keep_ratio=(None, float, "R of the Glimpser, Eq. (7)"), gamma=(None, float, "Eq. (2)"),
        eps=(None, float, "Eq. (3)"), beta=(None, float, "Eq. (2), subtracted: larger beta halts later"),
        drop_path=(None, float, "stochastic depth"), halting=(True, "store_false", "every joint layer on every token"),
        release_compat=(None, BOOL, "the release's forward (mask execution); default: on for --init of its layout")),
    # the real-data preset: the authors' release config per process (16 videos, 32 clips, a GPU)
    "optimisation (unset values: DEMO_PRESET without --train, else the defaults)": dict(
        preset=(None, ["demo", "real"], "default: demo without --train, else real"),
        optimizer=("adam", ["adam", "adamw"], None), lr=(1e-5, float, "peak learning rate (lr_at)"),
        weight_decay=(1e-5, float, "not on norms, biases, NO_DECAY"), epochs=(20, int, "the schedule's length"),
        warmup_epochs=(5, float, "learning-rate warm-up"),
        batch_size=(16, int, "videos per process; each gives a real and a fake clip"),
        clip_grad=(40.0, float, "max gradient norm"), alpha_p=(5e-4, float, "ponder weight, Eq. (9)"),
        alpha_m=(0.01, float, "motion weight, Eq. (9) (the paper's 0.01; 1 is the release's in effect)"),
        train_mode=(None, ["mask", "drop"], "halted tokens in training (TRAIN_MODE, AMP_TRAIN_MODE)"),
        task_on_fakes=(True, BOOL, "the task loss on the fake clips too"),
        halting_warmup=(0.0, float, "epochs of halting warm-up: off for half, then a linear rise; 0 = off"),
        embed_std=(None, float, "from scratch: pos_embed and time_embed start at this std")),
    "run": dict(
        out=(None, str, "where the run's files go (runs/sanity; a halting map: the checkpoint's folder)"),
        seed=(0, int, None), device=(None, str, "default: cuda if available, else cpu"),
        amp=(False, "store_true", "bf16 autocast (CUDA only)"),
        threads=(None, int, "torch CPU threads per process (default: OMP_NUM_THREADS, or cores / processes)"),
        resume=(None, str, "checkpoint to continue from (or evaluate: --eval-only); default: OUT's unfinished run"),
        overwrite=(False, "store_true", "start afresh in an --out that holds a finished or another run"),
        eval_only=(False, "store_true", "evaluate --resume's or --init's weights on --val"),
        eval_every=(1, int, "evaluate every N epochs (and after the last)"),
        log_every=(20, int, "progress line every N steps"),
        stop_after=(None, int, "stop after N epochs of this run (the schedule still spans --epochs)"),
        predict=(None, dict(nargs="+", metavar="VIDEO"), "top-5 classes, GFLOPs, halting depth with --resume's model"),
        json=(False, "store_true", "with --predict: one JSON object per video, one a line"),
        halting_map=(None, dict(metavar="VIDEO"), "write OUT/halting_map.png (Fig. 4) with --resume's model"),
        map_layers=(None, dict(type=int, nargs="+"), "joint layers (1..L) the map shows (default: up to 3 over 2..L)")),
}
DEFAULTS = {name: row[0] for group in SETTINGS.values() for name, row in group.items()}
# HaltingVTConfig's fields that settings set, by setting
CONFIG_FIELDS = dict(frames="num_frames", img_size="img_size", embed_dim="embed_dim", depth="depth", heads="num_heads",
                     glimpser_depth="glimpser_depth", keep_ratio="keep_ratio", gamma="gamma", beta="beta", eps="eps",
                     drop_path="drop_path", num_classes="num_classes")

# The sanity run (no --train): a tiny model learns the synthetic demo set (data.DEMO_DOC) from scratch on 2 CPU
# cores in under 2 minutes; each value was measured there (README, "The sanity run": its settings, why these).
DEMO_PRESET = dict(model="tiny", img_size=48, keep_ratio=0.2, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                   epochs=30, warmup_epochs=1, batch_size=32, eval_every=6, log_every=5, cache=True, embed_std=1.0,
                   task_on_fakes=False, halting_warmup=20, alpha_p=0.0015, alpha_m=1.0, clip_grad=1.0, gamma=0.7,
                   beta=1.4, train_scale=data.DEMO_TRAIN_SCALE, eval_short_side=data.DEMO_EVAL_SHORT_SIDE,
                   randaugment=False)

# Halted tokens in training (evaluation always drops them): "drop" removes them, exact with gradients; "mask" keeps
# fixed shapes. bench.py --train: drop is faster on the CPU and on a GPU in float32; under --amp drop's step was 5.5x
# slower on an H200 (DeiT-S, 16 clips; the cause is not yet known). The release's forward: mask only.
TRAIN_MODE, AMP_TRAIN_MODE = "drop", "mask"
BETA_OFF = 20.0  # beta's rise at the start of --halting-warmup: sigmoid(gamma * x0 - beta - 20) ~ 0, no token halts
# No weight decay on these, norms and biases (the release's config means to spare them; its keys match nothing).
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
    """Every setting (SETTINGS). --resume (but with --predict or --halting-map) continues the run it holds, with its
    saved flags: without them a bare `--resume run/last.pt` would train the demo into runs/sanity."""
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False, argument_default=argparse.SUPPRESS,
               epilog="Unset values: DEMO_PRESET without --train, then SETTINGS' defaults (train.py). A mistake in "
                      "the command is one line and status 2; HALTINGVT_DEBUG=1 shows its traceback.")
    for title, group in SETTINGS.items():
        add = p.add_argument_group(title).add_argument
        for name, (_, how, text) in group.items():
            kind = how if isinstance(how, dict) else {"choices": how} if isinstance(how, list) else \
                {"type": how} if how in (int, float, str) else {"action": how}
            add(f"--{'no-' if how == 'store_false' else ''}{name.replace('_', '-')}", dest=name, help=text, **kind)
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

def model_config(args, num_classes) -> HaltingVTConfig:
    """--model's config with the model flags given on top; UsageError naming the flag of a value it cannot take."""
    overrides = {field: getattr(args, name) for name, field in CONFIG_FIELDS.items() if getattr(args, name) is not None}
    # no motion loss, no motion head: an untrained head would only add parameters without gradients
    overrides.update(num_classes=num_classes, halting=args.halting, motion_head=args.alpha_m != 0,
                     release_compat=bool(args.release_compat))
    try:
        return getattr(HaltingVTConfig, args.model)(**overrides)
    except ValueError as err:  # "HaltingVTConfig.<field>=<value>: why"
        field, value, why = re.match(r"HaltingVTConfig\.(\w+)=(.*?): (.*)", str(err)).groups()
        name = next(name for name, f in CONFIG_FIELDS.items() if f == field)
        default = "" if getattr(args, name) is not None else f" (--model {args.model}'s)"
        raise UsageError(f"--{name.replace('_', '-')} {value}{default}: {why}") from err

def read_run(path, flag="--resume") -> dict:
    with blame(flag, path):
        return checkpoints.read_run_checkpoint(path)

# ----------------------------------------------------------------------------------------------------------
# Processes and devices

@contextlib.contextmanager
def processes(args):
    """(rank, world size, device) for the block, logging on (INFO on rank 0), CPU threads set. A process group only
    where torchrun set WORLD_SIZE > 1; leaving, every process waits for the others, then the group is torn down."""
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

# CPU threads: at the sanity run's sizes the threads split many small operations and wait for each other; with
# OpenMP's default waiting (a short spin), 2 threads on 2 idle cores are the fastest, but beside busy processes a
# spinning thread takes a core they need and 1 thread is far faster (README, "Threads"; bench.py --busy).
PROC_STAT = Path("/proc/stat")

def cpu_seconds() -> Optional[tuple]:
    """(core-seconds the machine has been busy since boot, this process's CPU seconds, wall seconds); None where
    PROC_STAT cannot be read."""
    try:
        ticks = [int(v) for v in PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # user nice system idle iowait irq softirq steal: all but idle, iowait
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()

def cpu_threads(args, world: int, since: Optional[tuple] = None) -> tuple:
    """(torch threads per process, why, whether fixed). Fixed: --threads; OMP_NUM_THREADS for one process (torchrun
    sets 1 in each); the cores over the local processes when several, or when PROC_STAT cannot be read. Else the
    cores others left idle since `since` (cpu_seconds(); None: over the next 0.2 s), at least 1."""
    cores, local_world = os.cpu_count() or 1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if args.threads:
        return args.threads, "--threads", True
    if world == 1 and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS", True
    if world > 1 or cpu_seconds() is None:
        return max(1, cores // local_world), f"{cores} cores / {local_world} process(es)", True
    if since is None:
        since = cpu_seconds()
        time.sleep(0.2)
    busy, own, wall = (now - then for now, then in zip(cpu_seconds(), since))
    others = max(0.0, busy - own) / max(wall, 1e-3)  # cores busy with other processes
    return max(1, min(cores, round(cores - others))), f"{cores} cores, {others:.1f} busy with other processes", False

def set_threads(args, world: int, since: Optional[tuple] = None) -> Optional[tuple]:
    """Set torch's CPU threads (cpu_threads) and log them: the first time with OpenMP's waiting policy (the log's
    first line), then when they change. Returns the cpu_seconds() to look again from, or None if fixed."""
    threads, why, fixed = cpu_threads(args, world, since)
    if since is None:
        policy = os.environ.get("OMP_WAIT_POLICY")
        log.info("CPU: %s (%s); OpenMP waiting: %s", plural(threads, "torch thread"), why,
                 f"OMP_WAIT_POLICY={policy}" if policy else "OpenMP's default (spin a little, then sleep)")
    elif threads != torch.get_num_threads():
        log.info("CPU: %s from now on (%s)", plural(threads, "torch thread"), why)
    torch.set_num_threads(threads)
    return None if fixed else cpu_seconds()

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
    random.seed(args.seed)  # Python's; numpy's global RNG is not seeded: nothing draws from it
    torch.manual_seed(args.seed)
    if args.amp and device.type != "cuda":
        log.warning("--amp (bf16 autocast) is for CUDA; running in float32 on %s", device)
    train_set, val_set, num_classes = build_data(args, rank)
    with blame("--train", args.train):  # checks a classes.txt's names against the labels
        classes = data.class_names(train_set, args.train) if train_set else None
    if not args.eval_only:
        claim_out(args)  # before saying where the outputs go: an OUT that holds another run is a usage error
        log.info("outputs: %s (metrics.jsonl, last.pt, best.pt, final.json)", args.out)
    cfg, ckpt = model_config(args, num_classes), read_run(args.resume) if args.resume else None
    if ckpt and not args.eval_only and finished(ckpt, args):
        log.info("%s is a finished run (epoch %d of %d): nothing to do", args.resume, ckpt["epoch"], args.epochs)
        return json.loads((Path(args.out) / "final.json").read_text())
    if ckpt and HaltingVTConfig(**ckpt["config"]) != cfg:
        cfg = HaltingVTConfig(**ckpt["config"])
        log.warning("--resume: using the checkpoint's model config %s", cfg)
    model = build_model(cfg, args, device)
    if model.cfg.release_compat and args.train_mode == "drop":  # turned on by --init of the release's layout
        log.info("training in mask mode: the release-compatible forward has no drop mode")
        args.train_mode = "mask"
    val_loader = data.epoch_loader(val_set, args.batch_size, 0, rank, world, workers=args.workers, train=False)
    if args.eval_only:  # check_args: --resume or --init
        if ckpt:
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
    """How far halting is on, 0..1: 0 for half the --halting-warmup epochs, then a linear rise (1 without). The ponder
    weight follows: Adam scales its tiny gradient to full steps, which took the class token out at joint layer 1."""
    half = args.halting_warmup / 2
    return min(max((epochs_done - half) / half, 0.0), 1.0) if half else 1.0

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
    """A training run without --resume into an OUT that holds a run. A requeued job runs the same command again, so
    an unfinished run of these flags (but RESUME_FREE) goes on, args.resume its last.pt, even with --overwrite (a job
    script may hold it). Else a UsageError saying what to do, or with --overwrite a fresh run (start clears OUT)."""
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
    """Weights, optimiser, RNG states and progress from --resume, logged (and how it goes on with other processes or
    batch size); rank 0's weights to every process; OUT made, a fresh run's RUN_FILES cleared (--overwrite)."""
    args, out = s.args, Path(s.args.out)
    if args.resume:
        with blame("--resume", args.resume):
            ckpt = checkpoints.load_checkpoint(args.resume, s.model, s.optimizer)
        for key in PROGRESS:
            setattr(s, key, ckpt[key])
        s.start_step = s.step
        if (out / "best.pt").exists():  # written after its epoch's last.pt, so its score can be newer
            kept = torch.load(out / "best.pt", map_location="cpu", weights_only=True, mmap=True)
            if kept["epoch"] <= s.epoch and (s.best is None or kept["best"] > s.best):
                s.best = kept["best"]
        log.info("resuming from %s, epoch %d, step %d", args.resume, s.epoch + 1, s.step)
        was = (ckpt.get("world", s.world), ckpt["args"].get("batch_size", args.batch_size))
        if was != (s.world, args.batch_size):
            log.info("%d process(es) x %d videos a step, was %d x %d: epoch %d goes on after its first %d samples, "
                     "the learning rate over the %d steps left", s.world, args.batch_size, *was, s.epoch + 1,
                     s.samples_in_epoch, round((args.epochs - s.epochs_done()) * s.steps_per_epoch))
    if s.world > 1:  # train_step averages the gradients, so the replicas then stay equal
        flat = torch.nn.utils.parameters_to_vector(s.model.parameters())
        dist.broadcast(flat, 0)
        torch.nn.utils.vector_to_parameters(flat, s.model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    if s.rank == 0 and not args.resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)

def fit(s: RunState, train_set, val_loader) -> dict:
    """Train from `s` to --epochs (or --stop-after more): the last evaluation's metrics. Each epoch: its steps, then
    last.pt (so a kill during a long evaluation loses only that), then every --eval-every epochs and at the last an
    evaluation. SIGINT or SIGTERM: the step or batch under way ends, last.pt, stopped's SystemExit."""
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
    """One optimiser step: the loss parts (floats); None, nothing updated, when any process got a stop signal (then
    stop.signum everywhere). NonFiniteLoss, everywhere before any update, for a NaN or infinite loss or grad norm."""
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
    """DDP's averaging in one all_reduce, a missing gradient as zero; one no process has stays None (in drop mode a
    joint layer no token reached has none: DDP would need find_unused_parameters, and warn in every run)."""
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
    ramp = halting_ramp(s.args, s.epochs_done())
    warmup = "" if ramp == 1 else "  halting off (warm-up)" if ramp == 0 else f"  halting {ramp:.2f} on (warm-up)"
    log.info("epoch %d step %d/%d  loss %.4f (unweighted: %s)  lr %.4e  %.1f clips/s  left %s%s", s.epoch + 1,
             s.step, total, parts["total"], terms, s.optimizer.param_groups[0]["lr"], clips_per_s, left, warmup)
    return now, s.step

class StopFlag:
    """`signum`: the SIGINT or SIGTERM received in the `with` block (0 before one); the loop then stops at the next
    step or evaluation batch. Leaving the block puts the previous handlers back."""
    signum = 0

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
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
    warm = " (halting as configured; training is still in its halting warm-up)" \
        if halting_ramp(s.args, metrics["epoch"]) < 1 else ""
    log.info("epoch %d eval: %s%s", metrics["epoch"], summary(metrics), warm)
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
    process may have none): every process gets the metrics, or None when any got a stop signal (stop.signum)."""
    model.eval()
    sums = dict.fromkeys(("videos", "top1", "top5", "motion_correct", "motion_clips", "gflops", "gflops_release",
                          "skipped"), 0.0)
    L, f64 = cfg.depth - cfg.glimpser_depth, torch.float64
    layers = torch.zeros(L, dtype=f64), torch.zeros(cfg.depth, dtype=f64)  # tokens halted at joint layer 1..L; entering
    scores, targets, skipped = [], [], []
    for batch in data.single_threaded(loader):
        if stop and stop.signum:
            break
        skipped += batch["skipped"]
        if "video" in batch:  # else every video of the batch was unreadable
            video, label, motion = (batch[k].to(device) for k in ("video", "label", "motion"))
            with autocast(args, device):
                out = model(video, drop_halted=not cfg.release_compat)  # B real clips, then their B fakes
            add_eval_batch(sums, layers, out, label, motion, scores if args.multi_label else None, targets)
    if stop is not None:  # a stop signal in any process? (every process takes part in this collective)
        stop.signum = int(all_reduce(torch.tensor([stop.signum], device=device), dist.ReduceOp.MAX).item())
        if stop.signum:
            return None
    if skipped:
        log.warning("evaluation: %s left out: %s", plural(len(skipped), "unreadable video"), skipped[:5])
    sums["skipped"] = len(skipped)
    flat = all_reduce(torch.cat([torch.tensor([*sums.values()], dtype=f64), *layers]).to(device)).cpu()  # one call
    sums, (halted, entering) = dict(zip(sums, flat.tolist())), flat[len(sums):].split([L, cfg.depth])
    if args.multi_label:  # mAP over every process's (N, Y) scores and targets; a process may have none
        empty = torch.zeros(0, cfg.num_classes)
        parts = [(torch.cat([empty, *scores]), torch.cat([empty, *targets]))]
        if dist.is_initialized():
            parts, mine = [None] * dist.get_world_size(), parts[0]
            dist.all_gather_object(parts, mine)
        sums["map"] = average_precision(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return eval_metrics(sums, halted, entering, cfg)

def add_eval_batch(sums: dict, layers: tuple, out, label, motion, scores: Optional[list], targets: list):
    """Add a batch's output (B real clips, then their B fakes) to the sums and to `layers` (tokens halted at each
    joint layer, tokens entering each layer); multi-label (`scores` a list): its (B, Y) logits and targets."""
    B = len(out.logits) // 2
    logits, label, depth = out.logits[:B].float(), label[:B], out.halt_depth[:B]  # depth (B, K): N_k, 1..L
    if scores is not None:  # AP ranks by the logits: sigmoid would tie confident scores by rounding them to exactly 1
        scores.append(logits.cpu()), targets.append(label.float().cpu())
    else:
        top5 = logits.topk(min(5, logits.shape[1]), 1).indices  # (B, 5)
        sums["top1"] += (top5[:, 0] == label).sum().item()
        sums["top5"] += (top5 == label[:, None]).any(1).sum().item()
    if out.motion_logits is not None:  # no motion head when the run has no Motion Loss
        sums["motion_correct"] += (out.motion_logits.argmax(1) == motion).sum().item()
        sums["motion_clips"] += len(out.logits)
    if out.gflops_release is not None:  # a release-compatible forward: the release's count too
        sums["gflops_release"] += out.gflops_release[:B].sum().item()
    sums["videos"] += B
    sums["gflops"] += out.gflops[:B].sum().item()
    layers[0].add_(torch.bincount(depth.flatten().cpu() - 1, minlength=len(layers[0])))
    layers[1].add_(out.tokens_per_layer[:B].sum(0).cpu())

def eval_metrics(c: dict, halted, entering, cfg: HaltingVTConfig) -> dict:
    """The metrics from the sums over every process: means per readable video (nan when there was none)."""
    n, tokens = c["videos"] or math.nan, halted.sum().item() or math.nan
    if not c["videos"]:
        log.warning("evaluation: no readable validation video; the metrics are nan")
    metrics = {"val_motion_acc": c["motion_correct"] / (c["motion_clips"] or math.nan),  # nan: no motion head
               "val_gflops": c["gflops"] / n, "dense_gflops": dense_gflops(cfg),
               "halt_depth_mean": (halted * torch.arange(1, len(halted) + 1)).sum().item() / tokens,
               "halt_depth_hist": (halted / tokens).tolist(), "tokens_per_layer": (entering / n).tolist(),
               "val_videos": int(c["videos"]), "val_skipped": int(c["skipped"])}
    if c["gflops_release"]:  # counted (no video costs nothing)
        metrics["val_gflops_release"] = c["gflops_release"] / n
    if "map" in c:
        metrics["val_map"] = c["map"]
    else:  # top-5 only beyond 5 classes: every class is in the top 5
        metrics.update(val_top1=c["top1"] / n, **({"val_top5": c["top5"] / n} if cfg.num_classes > 5 else {}))
    return metrics

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
def predict(args, device) -> list:
    """--predict: each video through --resume's model (drop mode) and its run's eval pipeline, printed as it comes
    (lines, or a JSON object with --json): the top 5 classes with their softmax (multi-label: sigmoid) probability,
    GFLOPs spent, the mean halting depth of L joint layers. A video that cannot be read prints its error and the
    others still run; then SystemExit (status 1) names those. The results: {"video", "top5": [{"label", "class"
    (name or None), "prob"}, ...] best first, "gflops", "halt_depth_mean", "joint_layers"} or {"video", "error"}."""
    model, run_args, classes = trained_model(args, device, "--predict")
    results = []
    for path in args.predict:
        try:
            video = eval_clip(args, run_args, model.cfg, path).to(device)
        except data.VideoDecodeError as err:
            results.append({"video": path, "error": str(err)})
            print(json.dumps(results[-1]) if args.json else f"{path}: error: {err}", flush=True)
            continue
        out = model(video.unsqueeze(0), drop_halted=not model.cfg.release_compat)
        logits = out.logits[0].float()
        top = (logits.sigmoid() if run_args.get("multi_label") else logits.softmax(0)).topk(min(5, len(logits)))
        results.append({"video": path, "top5": [{"label": i, "class": classes[i] if classes else None, "prob": p}
                                                for i, p in zip(top.indices.tolist(), top.values.tolist())],
                        "gflops": out.gflops[0].item(), "halt_depth_mean": out.halt_depth[0].float().mean().item(),
                        "joint_layers": model.cfg.depth - model.cfg.glimpser_depth})
        print(json.dumps(results[-1]) if args.json else prediction_text(results[-1]), flush=True)
    failed = [r["video"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(results)} videos could not be read: {', '.join(failed)}")
    return results

def prediction_text(r: dict) -> str:
    """A --predict result as lines: the video, GFLOPs and depth, then a line per class (its name, else its label)."""
    head = f"{r['video']}: {r['gflops']:.4f} GFLOPs, mean halting depth {r['halt_depth_mean']:.2f} of " \
        f"{r['joint_layers']} joint layers"
    return "\n".join([head] + [f"  {c['prob']:.3f}  {c['class'] if c['class'] is not None else c['label']}"
                               for c in r["top5"]])

@torch.no_grad()
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
    out = model(video.unsqueeze(0).to(device), drop_halted=not cfg.release_compat)  # mask if release-compatible
    masks = active_token_masks(out.keep_index[0] if out.keep_index is not None else None, out.halt_depth[0],
                               (cfg.img_size // cfg.patch_size) ** 2, layers)  # (1 + len(layers), T, S)
    names = ["Glimpser"] + [f"joint layer {layer}" for layer in layers]
    image = label_map(halting_map(display_frames(video), masks, cfg.patch_size), ["input"] + names,
                      [f"frame {i}" for i in frames])
    path = Path(args.out) / "halting_map.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, image)
    active = {name: m.float().mean().item() for name, m in zip(names, masks)}
    log.info("wrote %s (rows: input, %s); patches active: %s", path, ", ".join(names),
             ", ".join(f"{name} {a:.2f}" for name, a in active.items()))
    return {"path": str(path), "active": active}

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
