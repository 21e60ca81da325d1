"""Wall-clock speed of HaltingVT: does the time fall with the GFLOPs?

Times inference at the paper's scale (DeiT-S, 8 frames of 224x224, random weights, float32, eval mode, no grad)
for a dense Joint VT, the Glimpser alone, and the Glimpser with halting in drop mode and in mask mode, at batch
1 and 8; plus a plain float32 matrix product for the machine's GFLOP/s. With `--train`, times one training step
(forward + backward + optimiser) in mask and in drop mode for the tiny and the DeiT-S settings. With
`--ablation`, trains one small model per row of the paper's Tables 1 and 2 and tabulates accuracy and GFLOPs.

    python bench.py            # a table
    python bench.py --json     # the same, then one JSON object on the last line
    python bench.py --quick    # fewer rows and repeats: under a minute on 2 CPU cores
    python bench.py --train    # training steps, mask vs drop (--train-batch N for DeiT-S, --amp for bf16)
    python bench.py --profile  # where a forward's time goes, by kind of op: dense and one drop row
    python bench.py --data     # training samples per second from a short and a long video, frames decoded per clip
    python bench.py --step     # the sanity run's training step by part (data, forward, backward, optimiser)
    python bench.py --busy     # that step at 1 and 2 threads, quiet and beside two CPU-bound processes
    python bench.py --sanity   # `python train.py` itself: seeds 0, 1, 2 one after the other, then seed 0 when busy
    python bench.py --clips clips   # the README's stand-in real-data set: 3 classes of 640x360 clips in clips/
    python bench.py --ablation [train.py flags]   # Tables 1 and 2 on the demo set: runs/ablation/ablation.md

Rows are timed round-robin (`measure`): every round runs each row once, and the matmul too, so a change of the
machine's speed during the run touches every row and the matmul alike; each figure is the median over the rounds.

Random weights halt little at the paper's beta (20): their halting channel x[..., 0] stays near 0, so
h = sigmoid(gamma * x0 - beta) ~ sigmoid(-beta). The halting rows therefore use smaller betas, chosen so the
rows spread over about 0.2x-0.8x of the dense GFLOPs; each row's name carries its R and beta.
"""
import argparse
import contextlib
import json
import logging
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

import data
import train
from haltingvt import HaltingVT, HaltingVTConfig


@dataclass
class Row:
    """One benchmark row: a model setting run in one mode."""
    name: str
    mode: str  # "dense", "drop" or "mask"
    keep_ratio: float = 1.0  # Glimpser R; ignored without a Glimpser
    glimpser: bool = True
    halting: bool = False
    beta: float = 20.0

    def config(self, base: HaltingVTConfig) -> HaltingVTConfig:
        return HaltingVTConfig(**{**base.to_dict(), "glimpser_depth": base.glimpser_depth if self.glimpser else 0,
                                  "keep_ratio": self.keep_ratio, "halting": self.halting, "beta": self.beta,
                                  "gamma": 10.0})  # the paper's gamma, whatever the base setting's


def inference_rows(quick: bool) -> list:
    """dense; Glimpser alone at R = 0.7, 0.5, 0.3; Glimpser + halting at betas that halt (drop, then mask)."""
    halting = [(1.0, 8.0), (1.0, 4.0), (0.5, 4.0), (0.5, 2.0)]  # (R, beta): about 0.8x down to 0.2x dense
    ratios = (0.5,) if quick else (0.7, 0.5, 0.3)
    if quick:
        halting = [halting[1], halting[3]]
    rows = [Row("dense", "dense", glimpser=False)]
    rows += [Row(f"glimpser R={r}", "drop", keep_ratio=r) for r in ratios]
    for mode in ("drop", "mask"):
        rows += [Row(f"halt R={r} beta={b:g}", mode, keep_ratio=r, halting=True, beta=b) for r, b in halting]
    return rows


PROFILED = Row("halt R=0.5 beta=4", "drop", keep_ratio=0.5, halting=True, beta=4.0)  # the row --profile adds
WARMUP = 1  # untimed runs of each row before the timed rounds

log = logging.getLogger("bench")

# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------

def timer(device: torch.device):
    """A function that runs fn() once and returns its wall-clock seconds: CUDA events (synchronised) on a GPU,
    perf_counter on the CPU."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return run


def measure(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds of each function, timed round-robin: every round runs each one once.

    A change of the machine's speed during the run (another process, the clock) then touches every row alike,
    instead of whichever rows were running at the time; on a shared machine this keeps the ratios between rows
    steady even when the absolute times drift."""
    run, times = timer(device), {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            seconds = run(fn)
            if i >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul(device: torch.device, n: int):
    """A float32 (n x n) @ (n x n) product to time, and its FLOPs (2 per multiply-add, as usual for a matmul).
    On CUDA, TF32 is switched off for it so it stays float32 like the model."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def fn():
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            a @ b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return fn, 2 * n ** 3


def inference(row: Row, base: HaltingVTConfig, video: torch.Tensor):
    """The function that runs one row's model on `video` (eval, no grad), and its spent GFLOPs per video."""
    torch.manual_seed(0)  # the same random weights for every row
    model = HaltingVT(row.config(base)).to(video.device).eval()
    drop = row.mode != "mask"

    @torch.no_grad()
    def fn():
        return model(video, drop_halted=drop)
    return fn, fn().gflops.mean().item()


def bench_video(base: HaltingVTConfig, batch: int, device: torch.device) -> torch.Tensor:
    """The random input every row sees: (batch, C, T, H, W), the same draw on every device."""
    shape = (batch, base.in_chans, base.num_frames, base.img_size, base.img_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)


def inference_rows_at(batch: int, base: HaltingVTConfig, quick: bool, device: torch.device, mm, warmup: int,
                      repeats: int) -> tuple:
    """All rows at one batch size, timed round-robin with the matmul: (row dicts, matmul seconds)."""
    video = bench_video(base, batch, device)
    rows = inference_rows(quick)
    fns, gflops = zip(*(inference(row, base, video) for row in rows))
    seconds = measure({"matmul": mm, **dict(enumerate(fns))}, device, warmup, repeats)
    out = [dict(name=row.name, mode=row.mode, batch=batch, gflops_per_video=g, ms_per_video=seconds[i] * 1e3 / batch)
           for i, (row, g) in enumerate(zip(rows, gflops))]
    return [add_ratios(r, out[0]) for r in out], seconds["matmul"]  # out[0] is `dense`


def add_ratios(row: dict, dense: dict) -> dict:
    """speed-up = dense ms / ms, gflops ratio = GFLOPs / dense GFLOPs, efficiency = speed-up x gflops ratio
    (1.0: the time fell exactly as the GFLOPs did), each against `dense` at the same batch size."""
    row["speedup"] = dense["ms_per_video"] / row["ms_per_video"]
    row["gflops_ratio"] = row["gflops_per_video"] / dense["gflops_per_video"]
    row["efficiency"] = row["speedup"] * row["gflops_ratio"]
    row["gflops_per_s"] = 2 * row["gflops_per_video"] / row["ms_per_video"] * 1e3  # 2 FLOPs per multiply-add
    return row


# ----------------------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------------------

def train_step(cfg: HaltingVTConfig, batch: int, drop: bool, device: torch.device, amp: bool = False):
    """One training step to time: forward (task + ponder + motion terms, Eq. 9), backward, Adam; with `amp`, the
    forward in bf16 autocast (CUDA), as `train.py --amp` runs it."""
    torch.manual_seed(0)
    model = HaltingVT(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    video = torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)
    label = torch.randint(cfg.num_classes, (batch,), device=device)
    real = torch.ones(batch, dtype=torch.long, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(video, drop_halted=drop)
            loss = F.cross_entropy(out.logits, label) + 5e-4 * out.ponder.mean() + 0.01 * F.cross_entropy(
                out.motion_logits, real)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def train_rows(quick: bool, device: torch.device, warmup: int, repeats: int, batch: int = 64,
               deit_batch: int = 2, amp: bool = False):
    """Yields ms per training step in mask and in drop mode (timed round-robin): the tiny setting at `batch` clips
    (64 = the demo run's 32 Motion-Loss pairs) and, unless quick, DeiT-S at `deit_batch` with a beta that halts."""
    settings = [("tiny", HaltingVTConfig.tiny(), batch)]
    if not quick:
        settings.append(("deit_small beta=3", HaltingVTConfig.deit_small(beta=3.0), deit_batch))
    for name, cfg, size in settings:
        seconds = measure({mode: train_step(cfg, size, mode == "drop", device, amp) for mode in ("mask", "drop")},
                          device, warmup, repeats)
        for mode, s in seconds.items():
            yield dict(name=name, mode=mode, batch=size, amp=amp, ms_per_step=s * 1e3)


# ----------------------------------------------------------------------------------------------------------
# Where the time goes (--profile)
# ----------------------------------------------------------------------------------------------------------

# Ops by kind, matched on the aten name without leading underscores. Self time is counted, so an op that only
# calls others (aten::linear -> aten::addmm) adds nothing of its own.
KINDS = {"matmul (Linear, conv)": {"addmm", "mm", "bmm", "matmul", "convolution", "mkldnn_convolution",
                                   "cudnn_convolution", "baddbmm"},
         "attention kernel": {"scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_flash_attention",
                              "scaled_dot_product_efficient_attention", "scaled_dot_product_cudnn_attention",
                              "efficient_attention_forward", "flash_attention_forward", "softmax"},
         "elementwise (GELU, LayerNorm, adds)": {"gelu", "gelu_", "native_layer_norm", "add", "add_", "mul",
                                                 "sub", "rsub", "div", "sigmoid", "where", "mean"},
         "copies and bookkeeping": {"cat", "copy_", "clone", "to_copy", "index", "index_put", "index_add_",
                                    "gather", "nonzero_static", "topk", "sort", "cumsum", "stack", "unsafe_view",
                                    "bitwise_and", "bitwise_or", "bitwise_not", "ge", "gt", "clamp", "full",
                                    "zeros_like", "full_like", "new_zeros", "new_ones", "arange", "repeat",
                                    "fill_", "zero_", "empty", "empty_strided", "split_with_sizes", "sum"}}


OTHER = "other (views, dispatch overhead)"


def kind_of(op: str) -> str:
    name = op.split("::")[-1].lstrip("_")
    return next((kind for kind, names in KINDS.items() if name in names), OTHER)


def profile_row(row: Row, base: HaltingVTConfig, video: torch.Tensor, repeats: int) -> dict:
    """ms per forward by kind of op (self time, torch.profiler), and the top ops, for one row."""
    from torch.profiler import ProfilerActivity, profile
    fn, gflops = inference(row, base, video)
    cuda = video.is_cuda
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    self_us = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / repeats for e in events}
    kinds = {kind: 0.0 for kind in [*KINDS, OTHER]}
    for op, us in self_us.items():
        kinds[kind_of(op)] += us / 1e3
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:8]
    return dict(name=row.name, mode=row.mode, batch=video.shape[0], gflops_per_video=gflops,
                ms_by_kind=kinds, top_ops_ms={op: us / 1e3 for op, us in top})


def attention_parts(base: HaltingVTConfig, device: torch.device, repeats: int, mm) -> dict:
    """The dense model's joint attention over all K = 1 + T*S tokens of one video, taken apart: ms of the fused
    kernel (per layer), and of its three steps unfused, QK^T, softmax and AV, each timed on one block of 256
    queries (the CPU kernel's own block) and scaled to all K. The softmax's max, exp and sum are work that the
    FLOP count (QK^T and AV only, as fvcore counts attention) does not see. Each is timed back to back with
    itself, so its data is as warm in the caches as the fused kernel keeps its tiles."""
    h, K = base.num_heads, 1 + base.num_frames * (base.img_size // base.patch_size) ** 2
    d, rows = base.embed_dim // h, min(256, K)
    qkv = torch.randn(1, K, 3, h, d, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (1, h, K, d): strided views, as in the model
    # the unfused steps on contiguous heads, into preallocated outputs: their best case
    block, keys_t, values = q[0, :, :rows].contiguous(), k[0].transpose(-2, -1).contiguous(), v[0].contiguous()
    scores = block @ keys_t  # (h, rows, K)
    probs, out = torch.empty_like(scores), torch.empty(h, rows, d, device=device)
    fns = {"kernel": lambda: F.scaled_dot_product_attention(q, k, v),
           "QK^T": lambda: torch.bmm(block, keys_t, out=scores),  # (h, rows, d) @ (h, d, K)
           "softmax": lambda: torch.softmax(scores, -1, out=probs),
           "AV": lambda: torch.bmm(probs, values, out=out),  # (h, rows, K) @ (h, K, d)
           "matmul": mm}
    seconds = {name: measure({name: fn}, device, 2, max(repeats, 5))[name] for name, fn in fns.items()}
    ms = {name: t * 1e3 * (1 if name in ("kernel", "matmul") else K / rows) for name, t in seconds.items()}
    return dict(tokens=K, gflops=2 * h * K * K * d / 1e9, ms=ms)  # gflops: multiply-adds of QK^T and AV


def print_attention_parts(a: dict, matmul_gflops_per_s: float):
    ms = a["ms"]
    rate = 2 * a["gflops"] / ms["kernel"] * 1e3
    print(f"\ndense attention over {a['tokens']} tokens, per layer: kernel {ms['kernel']:.1f} ms "
          f"({rate:.0f} GFLOP/s, {rate / matmul_gflops_per_s:.0%} of the matmul); unfused: QK^T {ms['QK^T']:.1f} "
          f"+ softmax {ms['softmax']:.1f} + AV {ms['AV']:.1f} = {ms['QK^T'] + ms['softmax'] + ms['AV']:.1f} ms; "
          f"at the matmul's rate its FLOPs would take {2 * a['gflops'] / matmul_gflops_per_s * 1e3:.1f} ms")


def print_profile(p: dict):
    total = sum(p["ms_by_kind"].values())
    print(f"\n{p['name']} ({p['mode']}), batch {p['batch']}: {total:.1f} ms of op self time per forward")
    for kind, ms in p["ms_by_kind"].items():
        print(f"  {kind:<38}{ms:>9.1f} ms {ms / total:>5.0%}")
    print("  top ops: " + ", ".join(f"{op.split('::')[-1]} {ms:.1f}" for op, ms in p["top_ops_ms"].items()))


# ----------------------------------------------------------------------------------------------------------
# Data loading (--data)
# ----------------------------------------------------------------------------------------------------------

# (seconds, width, height, frames per clip): a Kinetics clip (the paper's 8 frames) and an untrimmed
# ActivityNet video (117 s on average; the paper's 10 frames), both 30 fps, a keyframe every 250 frames
# (libx264's default), H.264 with B-frames.
DATA_VIDEOS = {"kinetics-like": (10, 340, 256, 8), "activitynet-like": (120, 1280, 720, 10)}
DATA_FPS = 30


def scene_frames(n: int, height: int, width: int, seed: int = 0):
    """n frames (height, width, 3) uint8 of a camera panning over a smooth textured scene with a square moving
    across it: cheap to draw, and motion that an encoder predicts as it does in real footage."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(30, 225, size=(1, 3, height // 24 + 1, width // 24 + 1)))
    scene = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]  # (3, H, W)
    scene = (scene.permute(1, 2, 0).numpy() + rng.normal(0, 6, size=(height, width, 3))).clip(0, 255)
    scene = scene.astype(np.uint8)
    side = height // 6
    for k in range(n):
        frame = np.roll(scene, (k // 2, 3 * k), axis=(0, 1))  # the pan
        y, x = (k * 5) % (height - side), (k * 7) % (width - side)
        frame[y:y + side, x:x + side] = (240, 200, 40)
        yield frame


def data_video(folder: Path, name: str) -> Path:
    """The benchmark video `name` of DATA_VIDEOS, written with PyAV into `folder` unless already there."""
    seconds, width, height, _ = DATA_VIDEOS[name]
    path = folder / f"{name}-{width}x{height}-{seconds}s.mp4"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.mp4")
        with av.open(str(tmp), "w") as container:
            stream = container.add_stream("libx264", rate=DATA_FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "23", "g": "250"}
            for image in scene_frames(seconds * DATA_FPS, height, width):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
        tmp.replace(path)  # a half-written video is never taken for a finished one
    return path


@contextlib.contextmanager
def one_core():
    """Run the block on one CPU core (and one torch thread), as one DataLoader worker has; restore both after.
    FFmpeg sizes its decoder threads by the CPUs the process may use, so it too gets one. Pinning to a core
    needs Linux; elsewhere only torch is held to one thread."""
    pin, threads = hasattr(os, "sched_setaffinity"), torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if pin else None
    if pin:
        os.sched_setaffinity(0, {min(affinity)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if pin:
            os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


def data_row(name: str, path: Path, num_frames: int, samples: int, folder: Path) -> dict:
    """Training samples (a real clip and its static fake, data.VideoDataset with train=True: DeiT-S sizes, short
    side 256-320, 224 crops, no RandAugment) per second of one video, and the packets decoded per clip beside the
    least that seeking to each sampled frame's keyframe allows, over `samples` draws. The list file goes to
    `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = folder / f"{path.stem}.txt"
    listed.write_text(f"{path.resolve()} 0\n" * (samples + 1))
    ds = data.VideoDataset(listed, num_frames=num_frames, img_size=224, train=True)
    with one_core():
        ds[samples]  # warm-up: codec libraries, page cache
        start = time.perf_counter()
        for i in range(samples):
            ds[i]
        seconds = (time.perf_counter() - start) / samples
    counts = []
    for i in range(samples):
        stats = {}
        data.read_clip(path, num_frames, train=True, rng=random.Random(i), short_side=ds.scale[1], stats=stats)
        counts.append(stats)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        size = f"{stream.width}x{stream.height}"
    return dict(name=name, video=size, frames=counts[0]["frames"], clip_frames=num_frames, s_per_sample=seconds,
                samples_per_s=1 / seconds, decoded_per_clip=statistics.mean(c["decoded"] for c in counts),
                minimum_per_clip=statistics.mean(c["minimum"] for c in counts))


def format_data_row(r: dict) -> str:
    return (f"{r['name']:<18}{r['video']:>10}{r['frames']:>7}{r['clip_frames']:>5}{r['s_per_sample']:>10.3f}"
            f"{r['samples_per_s']:>9.1f}{r['decoded_per_clip']:>9.0f}{r['minimum_per_clip']:>9.0f}"
            f"{r['decoded_per_clip'] / r['minimum_per_clip']:>7.2f}")


DATA_HEADER = (f"{'video':<18}{'size':>10}{'frames':>7}{'T':>5}{'s/sample':>10}{'per s':>9}{'decoded':>9}"
               f"{'minimum':>9}{'ratio':>7}")
DATA_LEGEND = ("one core; s/sample: one training sample (real clip + static fake, the training transforms without "
               "RandAugment); decoded: packets decoded per clip; minimum: those from each sampled frame's keyframe "
               "to it, the least seeking allows; ratio = decoded / minimum.")


def data_rows(folder: Path, videos: list, samples: int):
    """Yields a data_row for each of `videos`: DATA_VIDEOS names, or paths of videos to read 8 frames of."""
    for video in videos:
        if video in DATA_VIDEOS:
            yield data_row(video, data_video(folder, video), DATA_VIDEOS[video][3], samples, folder)
        else:
            yield data_row(Path(video).name, Path(video), 8, samples, folder)


def data_main(args, result: dict) -> dict:
    """--data: the table, row by row, then (--json) the result as one JSON object."""
    print(DATA_HEADER, flush=True)
    result["data"] = []
    for r in data_rows(args.data_dir, args.data_video, args.repeats or 10):
        result["data"].append(r)
        print(format_data_row(r), flush=True)
    print(DATA_LEGEND)
    if args.json:
        print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------------------
# The sanity run's training step by part (--step) and on a busy machine (--busy)
# ----------------------------------------------------------------------------------------------------------

STEP_PARTS = ("data", "forward: embedding", "forward: Glimpser", "forward: joint layers", "forward: heads, loss",
              "backward: heads, joint layers", "backward: Glimpser", "backward: embedding", "optimiser")


def demo_step(folder: Path, flags=()):
    """One step of `python train.py` (and train.py `flags`) to time: a function that builds a batch from a small
    demo set (written to `folder`, cached as the sanity run caches it) and trains on it (train.forward_loss,
    clipping, AdamW) with halting held off, as in the warm-up, the dearest step; it returns {part: seconds}
    (STEP_PARTS)."""
    per_class = -(-train.DEMO_PRESET["batch_size"] // len(data.DEMO_CLASSES))  # one whole batch
    args = train.parse_args(["--demo-root", str(folder / "demo"), "--demo-videos", str(per_class), "1", *flags])
    train_set, _, num_classes = train.build_data(args, 0)
    model = train.build_model(train.model_config(args, num_classes), args, torch.device("cpu")).train()
    optimizer = train.build_optimizer(model, args)
    marks = {}

    def mark(name):
        return lambda *_: marks.__setitem__(name, time.perf_counter())

    def watch(stage, arrived, gradient_done):
        """Mark when `stage`'s input arrives and, in the backward pass, when the gradient of it is complete."""
        def pre_hook(module, inputs):
            mark(arrived)()
            inputs[0].register_hook(mark(gradient_done))
        stage.register_forward_pre_hook(pre_hook)
    watch(model.glimpser, "embedded", "bw glimpser")
    watch(model.joint, "glimpsed", "bw joint")
    model.joint.register_forward_hook(mark("joint"))

    def step():
        t0 = time.perf_counter()
        batch = next(data.single_threaded(data.epoch_loader(train_set, args.batch_size, random.randrange(99))))
        t1 = time.perf_counter()
        loss = train.forward_loss(model, batch, args, torch.device("cpu"), num_classes, ramp=0.0)[0]
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        optimizer.step()
        m = marks
        return dict(zip(STEP_PARTS, (t1 - t0, m["embedded"] - t1, m["glimpsed"] - m["embedded"],
                                     m["joint"] - m["glimpsed"], t2 - m["joint"], m["bw joint"] - t2,
                                     m["bw glimpser"] - m["bw joint"], t3 - m["bw glimpser"],
                                     time.perf_counter() - t3)))
    return step


def step_main(args, result: dict) -> dict:
    """--step: the median ms of each part of the sanity run's step over --repeats steps (after one warm-up), at
    --threads or, as train.py, at the cores other processes leave idle."""
    if not args.threads:
        torch.set_num_threads(train.cpu_threads(train.parse_args([]), world=1)[0])
    step = demo_step(args.data_dir)
    step()
    runs = [step() for _ in range(args.repeats or 5)]
    ms = {part: statistics.median(r[part] for r in runs) * 1e3 for part in STEP_PARTS}
    result["step_ms"] = {**ms, "total": statistics.median(sum(r.values()) for r in runs) * 1e3}
    result["threads"] = torch.get_num_threads()
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY") or "unset (OpenMP's default: spin, then sleep)"
    print(f"the sanity run's step (no halting: the warm-up's), {result['threads']} threads, OMP_WAIT_POLICY "
          f"{result['omp_wait_policy']}:")
    for part, t in result["step_ms"].items():
        print(f"  {part:<32}{t:>8.1f} ms {t / result['step_ms']['total']:>5.0%}")
    if args.json:
        print(json.dumps(result))
    return result


# (name, torch threads (None: train.py's choice, the cores other processes leave idle), OMP_WAIT_POLICY or None
# for OpenMP's default, which spins a little before it sleeps)
BUSY_SETTINGS = [("2 threads, spinning waits", 2, None), ("2 threads, passive waits", 2, "PASSIVE"),
                 ("1 thread", 1, None), ("train.py's choice", None, None)]


def step_ms_in_child(threads: int, policy, repeats: int, folder: Path) -> float:
    """The sanity run's median step (--step) in a fresh process: OpenMP reads its waiting policy once, at start."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update({"OMP_WAIT_POLICY": policy} if policy else {})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", "--json", "--repeats", str(repeats),
           "--data-dir", str(folder), *(["--threads", str(threads)] if threads else [])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["step_ms"]["total"]


@contextlib.contextmanager
def busy(processes: int):
    """`processes` CPU-bound Python loops running beside the block (`python -c "while True: pass"`)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def busy_main(args, result: dict) -> dict:
    """--busy: the sanity run's step under each BUSY_SETTINGS, quiet and then beside two CPU-bound processes;
    the ratio busy / quiet is what a shared machine costs each setting."""
    args.data_dir.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or 5
    quiet = {name: step_ms_in_child(n, policy, repeats, args.data_dir) for name, n, policy in BUSY_SETTINGS}
    with busy(2):
        loaded = {name: step_ms_in_child(n, policy, repeats, args.data_dir) for name, n, policy in BUSY_SETTINGS}
    result["busy"] = [dict(setting=name, quiet_ms=quiet[name], busy_ms=loaded[name], ratio=loaded[name] / quiet[name])
                      for name, _, _ in BUSY_SETTINGS]
    print(f"{'the sanity run step':<28}{'quiet ms':>10}{'busy ms':>10}{'ratio':>7}   (busy: beside 2 CPU-bound "
          "processes)")
    for r in result["busy"]:
        print(f"{r['setting']:<28}{r['quiet_ms']:>10.0f}{r['busy_ms']:>10.0f}{r['ratio']:>7.2f}")
    if args.json:
        print(json.dumps(result))
    return result


def sanity_run(seed: int, folder: Path, name: str = "") -> dict:
    """`python train.py --seed N` in a fresh process, in the environment as given, its demo set written afresh:
    its wall seconds (start-up, the demo set and evaluation included) and its final metrics. Its outputs and log
    go to folder/name/ (default: seedN; train.log: a thread count that changed mid-run shows there)."""
    out, demo = folder / (name or f"seed{seed}"), folder / "demo"
    for path in (out, demo):
        shutil.rmtree(path, ignore_errors=True)
    cmd = [sys.executable, str(Path(train.__file__).resolve()), "--seed", str(seed), "--out", str(out),
           "--demo-root", str(demo)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(run.stdout + run.stderr)
    if run.returncode:
        raise SystemExit(f"train.py --seed {seed} failed ({run.returncode}); its log: {out / 'train.log'}")
    return dict(seed=seed, wall_s=wall_s, **json.loads((out / "final.json").read_text()))


def sanity_main(args, result: dict) -> dict:
    """--sanity: the sanity run whole for each of --seeds, one after the other, then the first seed again beside
    two CPU-bound processes; its busy / quiet wall time is what a shared machine costs it."""
    quiet = [sanity_run(seed, args.data_dir) for seed in args.seeds]
    with busy(2):
        loaded = sanity_run(args.seeds[0], args.data_dir, f"seed{args.seeds[0]}-busy")
    result["sanity"] = dict(quiet=quiet, busy=loaded, busy_ratio=loaded["wall_s"] / quiet[0]["wall_s"])
    print("\n".join(table_head(("seed", "wall time", "val top-1", "motion acc.", "GFLOPs/video (x dense)",
                                 "mean halting depth", "tokens halting at joint layer 1..L"))))
    for r in quiet + [loaded]:
        busy_note = f" ({r['wall_s'] / quiet[0]['wall_s']:.2f}x, busy)" if r is loaded else ""
        print(table_line((str(r["seed"]), f"{r['wall_s']:.0f} s{busy_note}", f"{r['val_top1']:.3f}",
                          f"{r['val_motion_acc']:.3f}",
                          f"{r['val_gflops']:.4f} ({r['val_gflops'] / r['dense_gflops']:.2f}x)",
                          f"{r['halt_depth_mean']:.2f}", ", ".join(f"{h:.2f}" for h in r["halt_depth_hist"]))))
    if args.json:
        print(json.dumps(result))
    return result


# The stand-in for a first run on one's own footage (--clips): README, "A first run on your own clips"
CLIP_CLASSES = ("pan left", "pan right", "falling")


def stand_in_clip(kind: str, seed, frames: int = 100, height: int = 360, width: int = 640) -> np.ndarray:
    """uint8 (frames, height, width, 3), 4 s at 25 fps: a blocky textured scene that the camera pans across, left
    or right, by 200 px; or the same scene still, with a red disc falling through it."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(40, 200, size=(height // 20 + 1, (width + 200) // 20 + 1, 3))
    scene = np.kron(blocks, np.ones((20, 20, 1)))[:height, :width + 200]
    scene = scene + rng.normal(0, 8, size=scene.shape)  # (H, W + 200, 3)
    ys, xs = np.mgrid[:height, :width]
    x0, r = rng.uniform(width / 6, width * 5 / 6), rng.uniform(height / 14, height / 9)
    out = []
    for t in range(frames):
        left = {"pan left": 200 * t // frames, "pan right": 200 - 200 * t // frames}.get(kind, 100)
        frame = scene[:, left:left + width].copy()
        if kind == "falling":
            y = height / 18 + height * 13 / 18 * t / frames  # from the top to near the bottom
            frame[(ys - y) ** 2 + (xs - x0) ** 2 < r * r] = (230, 60, 40)
        out.append(frame.clip(0, 255).astype(np.uint8))
    return np.stack(out)


def clips_main(args, result: dict) -> dict:
    """--clips DIR: DIR/{train,val}/<class>/NN.mp4, 16 training and 4 validation H.264 clips a class."""
    for split, count in (("train", 16), ("val", 4)):
        for c, kind in enumerate(CLIP_CLASSES):
            folder = args.clips / split / kind.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                data.write_video(folder / f"{i:02d}.mp4", stand_in_clip(kind, [c, i, split == "val"]), fps=25)
    result["clips"] = str(args.clips)
    print(f"wrote {args.clips}/train and {args.clips}/val: {', '.join(CLIP_CLASSES)}")
    return result


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


def ablation(args, seeds, argv, rank, world, device) -> list:
    """`train.run` once per row of ablation_rows and seed, with the row's flags on top of the command line's (so
    --epochs and the like apply to every row), each in OUT/<row>; OUT/ablation.md, rewritten after every row so
    that an interrupted ablation keeps the rows it finished. Returns the table's lines."""
    out = Path(args.out)
    head = [f"Made by `python bench.py {shlex.join(argv)}` on {time.strftime('%Y-%m-%d %H:%M')}.", "",
            *table_head(ABLATION_COLUMNS)]
    lines, results = [], []
    for i, row in enumerate(ablation_rows(args)):
        for seed in seeds:
            name = f"{i:02d}_R{row['keep_ratio'] if row['glimpser_depth'] != 0 else 'none'}_" \
                   f"motion{int(bool(row['alpha_m']))}_beta{row['beta']:g}_seed{seed}"
            flags = {k: v for k, v in row.items() if k != "setting"}
            row_args = argparse.Namespace(**{**vars(args), **flags, "seed": seed, "out": str(out / name),
                                             "resume": None, "eval_only": False})
            log.info("ablation run %s", name)
            t0 = time.time()
            metrics = train.run(row_args, rank, world, device)
            if metrics.get("epoch") != args.epochs:  # a stop signal, or --stop-after: the row is unfinished
                log.warning("ablation stopped in %s; %s has the rows before it", name, out / "ablation.md")
                return lines
            lines.append(ablation_line(row, seed, metrics, time.time() - t0))
            results.append((row, seed, metrics))
            summary = []
            if len(seeds) > 1:
                summary = ["", "Over the seeds:", "", *table_head(SUMMARY_COLUMNS), *ablation_summary(results)]
            if rank == 0:
                (out / "ablation.md").write_text("\n".join(head + lines + summary) + "\n")
    log.info("wrote %s", out / "ablation.md")
    return lines


def ablation_main(argv: list) -> list:
    """--ablation: this file's three flags; every other flag is train.py's and applies to every row."""
    p = argparse.ArgumentParser(prog="bench.py --ablation", allow_abbrev=False,
                                description="Tables 1 and 2 on the demo set (or --train data): one train.py run "
                                            "per row; other flags: python train.py --help")
    p.add_argument("--ablation", action="store_true", help="one training per row of Tables 1 and 2")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0], help="seeds of each row (0)")
    p.add_argument("--out", default="runs/ablation", help="a folder per row, and OUT/ablation.md (runs/ablation)")
    own, rest = p.parse_known_args(argv)
    args = train.parse_args([*rest, "--out", own.out])
    with train.processes(args) as (rank, world, device):
        return ablation(args, own.ablation_seeds, argv, rank, world, device)


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


HEADER = (f"{'row':<22}{'mode':<6}{'batch':>6}{'GFLOPs':>9}{'ratio':>7}{'ms/video':>10}{'speed-up':>9}"
          f"{'effic.':>8}{'GFLOP/s':>9}{'of mm':>7}")
LEGEND = ("GFLOPs: multiply-adds per video, as spent (the model's own count); ratio and speed-up against `dense` "
          "at the same batch; effic. = speed-up x ratio (1 = time fell as the GFLOPs did); GFLOP/s at 2 FLOPs per "
          "multiply-add; of mm = share of the GFLOP/s of the matmul timed in the same rounds.")


def format_row(r: dict) -> str:
    return (f"{r['name']:<22}{r['mode']:<6}{r['batch']:>6}{r['gflops_per_video']:>9.2f}{r['gflops_ratio']:>7.2f}"
            f"{r['ms_per_video']:>10.1f}{r['speedup']:>9.2f}{r['efficiency']:>8.2f}{r['gflops_per_s']:>9.1f}"
            f"{r['of_matmul']:>7.0%}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--json", action="store_true", help="end with one JSON object on the last line")
    a("--quick", action="store_true", help="fewer rows and repeats (under a minute on 2 cores)")
    a("--train", action="store_true", help="time training steps, mask vs drop, instead")
    a("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8; quick: 1 2)")
    a("--train-batch", type=int, default=2, help="DeiT-S clips per timed training step (default 2)")
    a("--amp", action="store_true", help="training steps in bf16 autocast, as train.py --amp (CUDA)")
    a("--profile", action="store_true",
      help="instead: where a forward's time goes, by kind of op (torch.profiler), dense and one drop row")
    a("--data", action="store_true", help="instead: training samples per second and frames decoded per clip, "
                                          "on one core")
    a("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "haltingvt-bench",
      help="where --data, --step, --busy and --sanity write (and reuse) their videos and runs")
    a("--data-video", nargs="+", default=list(DATA_VIDEOS),
      help=f"--data on these videos: paths, or the generated {' and '.join(DATA_VIDEOS)} (default)")
    a("--step", action="store_true", help="instead: the sanity run's training step by part, data included")
    a("--busy", action="store_true", help="instead: the sanity run's step at 1 and 2 threads, quiet and beside two "
                                          "CPU-bound processes (each setting in a fresh process)")
    a("--sanity", action="store_true", help="instead: `python train.py` whole, one --seeds after the other (each "
                                            "writing its demo set), then the first beside two CPU-bound processes")
    a("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--sanity: the seeds (default 0 1 2)")
    a("--clips", type=Path, metavar="DIR", help="instead: write the README's stand-in clips (first real-data run)")
    a("--ablation", action="store_true", help="instead: paper Tables 1 and 2, one train.py run per row "
                                              "(bench.py --ablation --help)")
    a("--repeats", type=int, default=None, help="timed rounds (default: 5 on a CPU, 20 on a GPU, where a run "
                                                "takes milliseconds; quick: 1; --data: samples per video, 10)")
    a("--matmul-size", type=int, default=None,
      help="n of the n x n matmul (default: 2048 on a CPU; 8192 on a GPU, where 2048 is too short)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--tiny", action="store_true", help="the tiny model instead of DeiT-S (for tests)")
    a("--threads", type=int, default=None,
      help="CPU threads (default: PyTorch's, one per core; 1 is steadier on a busy machine)")
    return p.parse_args(argv)


def main(argv=None):
    """The benchmark the flags ask for, printed; returns its result as a dict (--ablation: the table's lines)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ablation" in argv:  # train.py's flags follow, so train.py parses them
        return ablation_main(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    repeats = args.repeats or (1 if args.quick else 20 if gpu else 5)
    args.matmul_size = args.matmul_size or (8192 if gpu else 2048)
    mm, mm_flops = matmul(device, args.matmul_size)
    result = dict(device=device_name(device), matmul_size=args.matmul_size, rows=[])
    print(f"device: {result['device']}", flush=True)
    base = HaltingVTConfig.tiny() if args.tiny else HaltingVTConfig.deit_small()
    if args.data:
        return data_main(args, result)
    if args.clips:
        return clips_main(args, result)
    if args.step or args.busy or args.sanity:
        return (step_main if args.step else busy_main if args.busy else sanity_main)(args, result)
    if args.profile:
        mm_seconds = profile_main(args, result, base, device, repeats, mm, mm_flops)
    elif args.train:
        mm_seconds = train_main(args, result, device, repeats, mm)
    else:
        mm_seconds = inference_main(args, result, base, device, repeats, mm, mm_flops)
    result["matmul_gflops_per_s"] = mm_flops / statistics.median(mm_seconds) / 1e9
    print(f"float32 matmul {args.matmul_size}^2: {result['matmul_gflops_per_s']:.1f} GFLOP/s (2 FLOPs per "
          "multiply-add)" + ("" if args.train or args.profile else
                             ", timed in every round with the rows; `of mm` uses its median at the row's batch size"))
    if args.json:
        print(json.dumps(result))
    return result


def profile_main(args, result, base, device, repeats, mm, mm_flops) -> list:
    """--profile: dense and one drop row by kind of op, then the attention taken apart; the matmul's seconds."""
    result["profile"] = []
    for batch in args.batch or [1]:
        video = bench_video(base, batch, device)
        for row in (Row("dense", "dense", glimpser=False), PROFILED):
            result["profile"].append(profile_row(row, base, video, repeats))
            print_profile(result["profile"][-1])
    result["attention"] = attention_parts(base, device, repeats, mm)
    seconds = result["attention"]["ms"]["matmul"] / 1e3
    print_attention_parts(result["attention"], mm_flops / seconds / 1e9)
    return [seconds]


def train_main(args, result, device, repeats, mm) -> list:
    """--train: one training step per setting and mode; the matmul's seconds, timed after them."""
    result["train"] = list(train_rows(args.quick, device, WARMUP, repeats, deit_batch=args.train_batch,
                                      amp=args.amp))
    for r in result["train"]:
        print(f"train step {r['name']:<20} {r['mode']:<5} batch {r['batch']:>3}: {r['ms_per_step']:.0f} ms")
    return [measure({"matmul": mm}, device, 2, max(repeats, 3))["matmul"]]


def inference_main(args, result, base, device, repeats, mm, mm_flops) -> list:
    """The inference table, batch by batch; the matmul's seconds at each batch size."""
    print(HEADER, flush=True)
    mm_seconds = []
    for batch in args.batch or ([1, 2] if args.quick else [1, 8]):  # rows appear batch by batch
        rows, seconds = inference_rows_at(batch, base, args.quick, device, mm, WARMUP, repeats)
        for r in rows:  # share of the matmul's GFLOP/s timed in the same rounds
            r["of_matmul"] = r["gflops_per_s"] / (mm_flops / seconds / 1e9)
        result["rows"] += rows
        mm_seconds.append(seconds)
        print("\n".join(format_row(r) for r in rows), flush=True)
    print(LEGEND)
    return mm_seconds


if __name__ == "__main__":
    try:
        main()
    except train.NonFiniteLoss as err:
        raise SystemExit(f"error: {err}")
