"""Video data for HaltingVT: decoding, frame sampling, augmentation, the Motion Loss pair, datasets, a demo set.

Axis letters: B batch, C channels (RGB), T frames of a clip, H height, W width, n frames of a whole video.
A decoded clip is uint8 (T, H, W, 3); the model takes float (C, T, H, W) per clip, (B, C, T, H, W) per batch.

One training sample (paper Sec. 4.1 and 3.4):
 1) `sample_indices`: one frame from each of T equal segments (TSN), or the release's T frames I apart;
 2) `read_clip` (`read_frames`: frame folders): decode just those, upright, in the video's colours, scaled down;
 3) `train_transform`: random short-side rescale, one random crop for all frames, RandAugment, to [-1, 1];
 4) `make_motion_pair`: the real clip (motion label 1) and a fake, one of its frames repeated T times (label 0);
 5) `collate`: B pairs -> 2B clips. Evaluation: segment centres, short-side resize, centre crop.
"""
import bisect
import collections
import contextlib
import functools
import logging
import os
import random
import re
import shutil
import signal
import unicodedata
from pathlib import Path
from typing import NamedTuple, Optional

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import Interpolation, VideoReformatter

# The release maps pixels to [-1, 1] with mean = std = 127.5 for every channel (DeiT was trained with ImageNet's).
MEAN, STD = 127.5, 127.5

class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or decoded; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Frame sampling and decoding

def sample_indices(n_frames, num_frames, train, rng=None, frame_interval=None):
    """Which of a video's `n_frames` frames form the clip. TSN's "uniform" sampling (Sec. 4.1): [0, n_frames) cut
    into `num_frames` equal segments, the frame shown at a random time in each (training) or its midpoint (eval).
    `frame_interval` I: the release's clip (mmaction2's SampleFrames), T frames I apart from a random start in
    [0, n - T*I] (training) or the centred one, wrapping around. `rng`: a `random.Random`, seeded to reproduce."""
    if n_frames < 1 or num_frames < 1 or (frame_interval is not None and frame_interval < 1):
        raise ValueError(f"need at least one frame, got n_frames={n_frames}, num_frames={num_frames}, "
                         f"frame_interval={frame_interval}")
    rng = random.Random() if rng is None else rng
    if frame_interval:
        T, I = num_frames, frame_interval
        start = rng.randint(0, max(n_frames - T * I, 0)) if train else max(n_frames - ((T - 1) * I + 1), 0) // 2
        return [(start + t * I) % n_frames for t in range(T)]
    seg = n_frames / num_frames
    offsets = [rng.random() if train else 0.5 for _ in range(num_frames)]
    return [min(int((i + u) * seg), n_frames - 1) for i, u in enumerate(offsets)]  # min: float round-off


@contextlib.contextmanager
def _errors_name(path):
    """Any failure while reading `path` (PyAV's, numpy's, ...) as a VideoDecodeError naming it, for datasets to skip."""
    try:
        yield
    except VideoDecodeError:
        raise
    except Exception as err:  # every failure of a bad file, by design
        raise VideoDecodeError(f"cannot decode video {path}: {type(err).__name__}: {err}") from err


class _Packet(NamedTuple):  # what the demux pass keeps of a non-empty packet (pts in stream.time_base units)
    pts: Optional[int]
    keyframe: bool
    discard: bool  # decoded for reference but never shown: the hidden pre-roll of a cut made by stream copy


def _demux(container, path):
    """(stream, its non-empty packets in decode order) of the recording (not cover art; the most frames, so a
    thumbnail track loses; then FFmpeg's "best"): one demux pass, the probe a threaded decoder needs."""
    candidates = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not candidates:
        raise VideoDecodeError(f"no video stream in {path}")
    packets = {s.index: [] for s in candidates}
    for p in container.demux(candidates):
        if p.size > 0:
            packets[p.stream_index].append(_Packet(p.pts, p.is_keyframe, p.is_discard))
    best = getattr(container.streams.best("video"), "index", None)
    stream = max(candidates, key=lambda s: (_count(packets[s.index]), s.index == best, -s.index))
    return stream, packets[stream.index]


def _count(packets):
    return sum(not p.discard for p in packets)


def count_frames(path):
    """The frames of the video at `path` as a decode shows them, counted from its packets (headers can be wrong)."""
    with _errors_name(path), av.open(str(path)) as container:
        return _count(_demux(container, path)[1])


def _frame_index(packets):
    """(pts, pos, start) lists: frame k (in presentation order) has timestamp pts[k], its packet at decode-order
    position pos[k], and decodes from start[k], the last keyframe before it not shown after it (open GOPs need
    the one before). None when timestamps cannot tell the frames apart or a frame has no keyframe before it."""
    shown = sorted((p.pts, pos) for pos, p in enumerate(packets) if not p.discard and p.pts is not None)
    if len(shown) < _count(packets) or len({pts for pts, _ in shown}) < len(shown):
        return None
    keys = [pos for pos, p in enumerate(packets) if p.keyframe and p.pts is not None]
    start = []
    for pts, pos in shown:  # the last keyframe before the frame's packet that is not shown later than it
        before = (keys[i] for i in range(bisect.bisect_right(keys, pos) - 1, -1, -1))
        start.append(next((k for k in before if packets[k].pts <= pts), None))
    return None if None in start else ([pts for pts, _ in shown], [pos for _, pos in shown], start)


class _SeekMissed(Exception):
    """A seek landed where the index does not say, or the stream ended before a wanted frame: read sequentially."""


def _from_keyframe(container, stream, packets, keys, pos, later):
    """Seek to the keyframe at decode-order position `pos` and yield (position, packet) on, None for flush packets.
    Files with an edit list (stream-copy cuts) can land one keyframe early, so the next shown timestamps `later` are
    tried too; failing all, the first (earlier) landing is taken: the same frames come out, only later."""
    tries = [packets[pos].pts, *later]
    for ts in tries + tries[:1]:
        container.seek(ts, stream=stream, backward=True)
        demuxed = container.demux(stream)
        first = next(demuxed, None)
        at = keys.get(first.pts) if first is not None and first.size > 0 and first.is_keyframe else None
        if at == pos:
            break
    if at is None or at > pos:
        raise _SeekMissed(f"a seek for packet {pos} landed elsewhere")
    yield at, first
    for packet in demuxed:
        at += packet.size > 0
        yield (at if packet.size > 0 else None), packet


def _decode_seeking(container, stream, packets, index, clip):
    """Decode the frames `clip` wants into clip.put, seeking to the next missing frame's keyframe when it lies ahead
    (close frames share a pass) and skipping unwanted frames nothing refers to; returns the packets decoded."""
    pts, pos, start = index
    todo = sorted(clip.slots)  # by index, i.e. by timestamp
    number, needed = {t: k for k, t in enumerate(pts)}, {pos[k] for k in todo}
    keys = {p.pts: j for j, p in enumerate(packets) if p.keyframe}
    shown = sorted(p.pts for p in packets if p.pts is not None)  # presentation order, pre-roll included
    landed, decoded, i = {}, 0, 0  # landed: keyframe position -> where its seek landed
    while i < len(todo):
        key = start[todo[i]]
        j = bisect.bisect_right(shown, packets[key].pts)
        for at, packet in _from_keyframe(container, stream, packets, keys, key, shown[j:j + 2]):
            landed.setdefault(key, at)
            decoded += packet.size > 0
            stream.codec_context.skip_frame = "DEFAULT" if at is None or at in needed else "NONREF"
            for frame in _decode_packet(packet, clip):
                clip.put(number.get(frame.pts), frame)
            while i < len(todo) and todo[i] in clip.done:
                i += 1
            if i == len(todo) or (at is not None and landed.get(start[todo[i]], start[todo[i]]) > at + 1):
                break  # all found, or the next missing frame's keyframe lies ahead (a seek gets nearer): go there
        else:
            raise _SeekMissed(f"the stream ended before frame {todo[i]}")
    return decoded


def _decode_packet(packet, clip):
    """The frames of `packet`; none if damaged (counted in clip.damaged): decoding goes on, as FFmpeg's tools do."""
    try:
        return packet.decode()
    except av.error.FFmpegError:
        clip.damaged += 1
        return ()


def _decode(path, stream_index, index, clip):
    """Decode stream `stream_index` of `path` from the start into clip.put (frames numbered by `index`, else in
    output order, a damaged packet one frame) until the clip is complete or the file ends; returns packets decoded."""
    number = None if index is None else {t: k for k, t in enumerate(index[0])}
    seen = decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams[stream_index]
        stream.thread_type = "AUTO"  # frame + slice threads: much faster than the default slice threading
        try:
            for packet in container.demux(stream):
                decoded += packet.size > 0
                for frame in _decode_packet(packet, clip):
                    clip.put(seen + clip.damaged if number is None else number.get(frame.pts), frame)
                    seen += 1
                if len(clip.done) == len(clip.slots):
                    break
        except av.error.FFmpegError as err:  # from the demuxer: packet errors are _decode_packet's
            logging.info("%s: reading stopped after %d packets: %s", path, decoded, err)
    return decoded


def _short_side_size(height, width, short_side):
    """(h, w) with min(h, w) == short_side and the aspect ratio kept."""
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


# Bilinear, colour planes at full resolution: without FULL_CHR, FFmpeg's 4:2:0 shortcuts cost ~4 levels of colour.
_SCALING = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.FULL_CHR_H_INP


class _Clip:
    """Frames as a player shows them, uint8 (T, H, W, 3) for the frame indices `indices`: each passes FFmpeg's
    scaler once (to RGB by its own colour matrix and range, square pixels by the aspect ratio `sar`, down to
    `short_side`), then its display matrix turns it (phones store portrait video landscape). Frames come in order;
    a wanted frame the decoder passed over (damaged) shows its nearest decoded neighbour, the earlier on a tie."""

    def __init__(self, indices, short_side=None, sar=None):
        self.slots = {}  # frame index -> clip positions (a short video repeats frames)
        for t, k in enumerate(indices):
            self.slots.setdefault(k, []).append(t)
        self.T, self.short_side, self.frames, self.size, self.last = len(indices), short_side, None, None, None
        self.sar = sar if sar and 0.25 <= sar <= 4 else 1  # outside that range the tag is taken for damage
        self.pending = collections.deque(sorted(self.slots))  # wanted frames not yet put, by index
        self.done, self.lost, self.damaged = set(), set(), 0  # damaged: packets the decoder refused
        self.scaler = VideoReformatter()  # one scaler for the clip rather than one per frame

    def rgb(self, frame):
        """One decoded frame as uint8 (h, w, 3), scaled and upright (a view: copy it to keep it)."""
        if self.size is None:  # every frame gets the first one's size, so a resolution change cannot break a clip
            h, w = frame.height, round(frame.width * self.sar)
            small = self.short_side is None or min(h, w) <= self.short_side
            self.size = (h, w) if small else _short_side_size(h, w, self.short_side)
        h, w = self.size
        image = self.scaler.reformat(frame, w, h, "rgb24", interpolation=_SCALING, threads=1).to_ndarray()
        return np.rot90(image, k=round(frame.rotation / 90) % 4)  # (h, w, 3) or (w, h, 3): counter-clockwise

    def put(self, k, frame):
        """Take decoded frame k (None: pre-roll). Wanted frames before k still missing were lost: the nearer of the
        previous frame and this one stands in for each."""
        if k is None:
            return
        if k in self.slots and k not in self.done:
            self._store(k, frame)
        while self.pending and (self.pending[0] in self.done or self.pending[0] < k):
            m = self.pending.popleft()
            if m not in self.done:
                before = self.last is not None and abs(m - self.last[0]) <= abs(k - m)
                self._store(m, self.last[1] if before else frame)
                self.lost.add(m)
        self.last = (k, frame)

    def _store(self, k, frame):
        image = self.rgb(frame)
        if self.frames is None:
            self.frames = np.empty((self.T, *image.shape), np.uint8)  # (T, H, W, 3)
        self.frames[self.slots[k]] = image
        self.done.add(k)


def read_clip(path, num_frames, train=False, rng=None, *, short_side=None, stats=None, frame_interval=None):
    """`num_frames` frames of the video at `path` (`sample_indices`), uint8 (T, H, W, 3), as a player shows them
    (`_Clip`), min(H, W) scaled down to `short_side`; only those decoded (seeking), as a full decode gives them.
    `stats` (a dict) gets "frames", "decoded" (packets), "minimum" (for seeking) and "lost". VideoDecodeError naming
    the path for any failure. A damaged packet costs its own frame; a truncated file ends at its last good frame
    (either logged once)."""
    return _read(path, lambda n: sample_indices(n, num_frames, train, rng, frame_interval), short_side, stats)


def read_all_frames(path, *, short_side=None):
    """Every frame of a (short) video, uint8 (n, H, W, 3), as `read_clip` shows them: VideoDataset's cache."""
    return _read(path, range, short_side)


_WARNED = set()  # the files already named in a warning: one line per file and process, not one per epoch


def _warn_once(path, message, *args):
    """logging.warning(message, *args) the first time this process warns about `path` (a video or frame folder)."""
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        logging.warning(message, *args)


def _read(path, choose, short_side, stats=None):
    """The frames choose(n) of the video at `path`, n its number of frames, as read_clip describes."""
    with _errors_name(path):
        with av.open(str(path)) as container:
            stream, packets = _demux(container, path)
            n, index, stream_index = _count(packets), _frame_index(packets), stream.index
            if n == 0:
                raise VideoDecodeError(f"no video frames in {path}")
            make = functools.partial(_Clip, short_side=short_side, sar=stream.sample_aspect_ratio)
            indices = choose(n)
            clip, decoded, good = make(indices), None, n
            if index is not None:
                stream.thread_type = "AUTO"  # as in _decode
                try:
                    decoded = _decode_seeking(container, stream, packets, index, clip)
                except (_SeekMissed, av.error.FFmpegError) as err:  # damage seeking cannot pass: read it all
                    logging.info("%s: reading from the start after: %s", path, err)
        if decoded is None:
            clip = make(indices)
            decoded = _decode(path, stream_index, index, clip)
            if len(clip.done) < len(clip.slots):  # nothing decodes after clip.last: the video ends there
                if clip.last is None:
                    raise VideoDecodeError(f"no decodable frame in {path}")
                good = clip.last[0] + 1
                clip = make(choose(good))
                decoded += _decode(path, stream_index, index, clip)
        notes = [f"{len(clip.lost)} of the {len(clip.slots)} frames read could not be decoded and show their "
                 f"nearest decodable neighbour ({clip.damaged} damaged packets skipped)"] if clip.lost else []
        notes += [f"nothing decodes after frame {good - 1} of {n}, so the video ends there"] if good < n else []
        if notes:
            _warn_once(path, "%s: %s", path, "; ".join(notes))
        if stats is not None:  # minimum: the packets any seeking reader decodes, from each frame's keyframe to it
            minimum = index and len(set().union(*(range(index[2][k], index[1][k] + 1) for k in set(indices))))
            stats.update(frames=n, decoded=decoded, minimum=minimum, lost=sum(len(clip.slots[k]) for k in clip.lost))
        return torch.from_numpy(clip.frames)  # (T, H, W, 3)


FRAME_TEMPLATE = "img_{:05}.jpg"  # mmaction2's frame folders (RawframeDataset): frame_dir/img_00001.jpg, ...


def count_frame_files(folder, template=FRAME_TEMPLATE, start_index=1, listed=None):
    """The frames `folder` holds from `start_index` on (a gap ends them), at most `listed`, a list file's count,
    which is logged once when wrong."""
    present = lambda k: (folder / template.format(start_index + k)).is_file()  # frame k, counted from 0
    if listed and present(listed - 1):
        n = listed
    else:  # the first missing frame
        hi = listed or 1
        while not listed and present(hi - 1):
            hi *= 2  # no count given: double until a frame is missing
        n = bisect.bisect_left(range(hi - 1), True, key=lambda k: not present(k))  # binary search below frame hi - 1
    if listed and (n < listed or present(listed)):
        _warn_once(folder, "%s: the list says %d frames, the folder holds %s; sampling from the first %d", folder,
                   listed, n if n < listed else "more", n)
    return n


def read_frames(folder, num_frames, train=False, rng=None, *, total_frames=None, template=FRAME_TEMPLATE,
                start_index=1, short_side=None, frame_interval=None):
    """`read_clip` for a folder of frame images, frame k in folder / template.format(start_index + k), sampled
    among those present (`count_frame_files`). VideoDecodeError naming the folder or the unreadable frame."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoDecodeError(f"no frame folder {folder}")
    n = count_frame_files(folder, template, start_index, total_frames)
    if n == 0:
        raise VideoDecodeError(f"no frame {template.format(start_index)} in {folder}")
    clip = _Clip(sample_indices(n, num_frames, train, rng, frame_interval), short_side)
    for k in sorted(clip.slots):  # in order, as put expects
        path = folder / template.format(start_index + k)
        with _errors_name(path), open(path, "rb") as f, av.open(f) as container:  # a file object: no image2 pattern
            clip.put(k, next(container.decode(video=0)))
    return torch.from_numpy(clip.frames)  # (T, H, W, 3)


# ----------------------------------------------------------------------------------------------------------------
# Transforms: uint8 (T, H, W, 3) -> float (C, T, H, W). No horizontal flip: it would swap left and right classes.

def resize_short_side(x, short_side):
    """Frames (T, C, H, W), uint8 or float, bilinear-resized so that min(H, W) == short_side (`x` if it is)."""
    size = _short_side_size(*x.shape[-2:], short_side)
    if size == tuple(x.shape[-2:]):
        return x
    # antialias (as PIL, which torchvision and mmaction resize with): plain bilinear aliases fine texture when shrinking
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)  # (T, C, H', W')


def _resized_crop(clip, short_side, top, left, size):
    """uint8 (T, H, W, 3) -> uint8 (T, 3, size, size): short side to `short_side`, then the window at (top, left).
    All frames in one call (per-frame calls cost twice as much on small frames), in uint8 (no float copy)."""
    frames = clip.permute(0, 3, 1, 2)  # (T, 3, H, W), a view: channels last in memory
    return resize_short_side(frames, short_side)[:, :, top:top + size, left:left + size].contiguous()


def _normalise(x):
    """uint8 (T, C, H, W) -> float (C, T, H, W) in [-1, 1], converted straight into its final layout."""
    out = torch.empty(x.shape[1], x.shape[0], *x.shape[2:])  # (C, T, H, W)
    return out.copy_(x.transpose(0, 1)).sub_(MEAN).div_(STD)


def rand_augment_class():
    """torchvision's RandAugment (torchvision is optional), or an ImportError in one line giving the pip command
    for the build that goes with this torch (also when one is installed but does not import)."""
    try:
        from torchvision.transforms.v2 import RandAugment
    except Exception as err:  # a broken build raises RuntimeError, AttributeError, OSError, ... on import
        why = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ImportError(f"RandAugment needs torchvision, which does not import here ({type(err).__name__}: "
                          f"{why}): install the build for torch {torch.__version__} with "
                          f"`{torchvision_install_command()}`, or pass --no-randaugment to train.py") from None
    return RandAugment


def torchvision_install_command(version=None) -> str:
    """The pip command for the torchvision of torch `version` (default: the installed one): 0.(m+15).p for 2.m.p;
    a +cpu or +cuXXX build from PyTorch's index, so that pip neither replaces torch nor pulls in CUDA."""
    release, _, build = (version or torch.__version__).partition("+")
    major, minor, patch = (release.split(".") + ["0", "0"])[:3]
    command = f"pip install torchvision==0.{int(minor) + (15 if major == '2' else 1)}.{patch}"
    return command + (f" --index-url https://download.pytorch.org/whl/{build}" if build else "")


def train_transform(clip, size, scale, rng=None, randaugment=False):
    """Training augmentation (paper Sec. 4.1), uint8 (T, H, W, 3) -> float (C, T, size, size): short side to a
    random length in [scale[0], scale[1]], one random size x size crop for all frames, RandAugment, normalised."""
    rng = random.Random() if rng is None else rng
    short_side = rng.randint(scale[0], scale[1])
    h, w = _short_side_size(*clip.shape[1:3], short_side)  # the size after the rescale
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    x = _resized_crop(clip, short_side, top, left, size)  # (T, C, size, size) uint8
    if randaugment:  # one draw of ops and magnitudes for every frame, from torch's generator seeded from `rng`
        ra = rand_augment_class()()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            x = ra(x)
    return _normalise(x)


def eval_transform(clip, size, short_side):
    """Evaluation (Sec. 4.1), uint8 (T, H, W, 3) -> float (C, T, size, size): short side `short_side`, centre crop."""
    h, w = _short_side_size(*clip.shape[1:3], short_side)  # the size after the resize
    return _normalise(_resized_crop(clip, short_side, (h - size) // 2, (w - size) // 2, size))


def eval_clip(path, num_frames, img_size, short_side=None, *, frame_interval=None, template=FRAME_TEMPLATE,
              start_index=1):
    """The video at `path` (a file or a frame folder) as evaluation feeds it to the model, the same pixels as a
    VideoDataset(train=False) item: float (C, T, H, W). `short_side` (before the centre crop): default img_size *
    8/7, scaled in the decoder as the dataset does. Raises VideoDecodeError."""
    short_side = short_side or round(img_size * 8 / 7)
    if Path(path).is_dir():
        clip = read_frames(path, num_frames, template=template, start_index=start_index, short_side=short_side,
                           frame_interval=frame_interval)
    else:  # (T, H, W, 3)
        clip = read_clip(path, num_frames, train=False, short_side=short_side, frame_interval=frame_interval)
    return eval_transform(clip, img_size, short_side)


def make_motion_pair(clip, transform, rng):
    """The Motion Loss pair (Sec. 3.4), motion labels 1 and 0: transform(clip) and one random frame of it transformed
    on its own, repeated T times. `transform`: uint8 (T, H, W, 3) -> float (C, T, h, w), one draw for all frames."""
    real = transform(clip)
    j = rng.randrange(clip.shape[0])
    fake = transform(clip[j:j + 1])  # (C, 1, h, w): 1/T of the work of transforming T copies
    return real, fake.expand_as(real)  # (C, T, h, w), a view: collate's stack makes the copies


# ----------------------------------------------------------------------------------------------------------------
# Datasets

def parse_list_line(line, multi_label, rawframes=False):
    """One list-file line (`path label`; multi-label `path l1 l2 ...`, the longest run of integers ending the line;
    `rawframes`: `frame_dir total_frames label ...`) -> (path, labels[, total_frames]), None if blank. A path may
    hold spaces: `clip 2.mp4 5 7` -> `clip 2.mp4`, [5, 7]."""
    line = line.strip()
    if not line:
        return None
    pattern = (r"(.+?)" if multi_label else r"(.+)") + (r"\s+(\d+)" if rawframes else "()") + \
        (r"((?:\s+-?\d+)+)" if multi_label else r"\s+(-?\d+)")
    match = re.fullmatch(pattern, line)
    if match is None:
        raise ValueError(f"expected '{'frame_dir total_frames' if rawframes else 'path'} label"
                         f"{' label ...' if multi_label else ''}', got {line!r}")
    path, labels = match.group(1), [int(tok) for tok in match.group(3).split()]
    return (path, labels, int(match.group(2))) if rawframes else (path, labels)


def read_list_file(list_file, root=None, multi_label=False, num_classes=None, rawframes=False):
    """[(path, labels)] (`rawframes`: [(path, labels, total_frames)]) from a list file, paths under `root` (default:
    the file's folder). A label outside [0, num_classes) is a ValueError naming the line, not a failure in the loss."""
    list_file = Path(list_file)
    root = list_file.parent if root is None else Path(root)
    samples = []
    # utf-8-sig drops the byte-order mark Windows editors put first (else it joins the first path)
    for lineno, line in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        try:
            parsed = parse_list_line(line, multi_label, rawframes)
        except ValueError as err:
            raise ValueError(f"{list_file}, line {lineno}: {err}") from None
        if parsed is None:
            continue
        path, labels, *total = parsed
        for label in labels:
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise ValueError(f"{list_file}, line {lineno}: label {label} is outside [0, {num_classes})")
        samples.append((root / path, labels, *total))
    return samples


def read_class_folders(root, classes=None):
    """([(path, [label])], class names) from `root/<class name>/<video>` (every file not starting with "."): the
    sorted folder names, or `classes` (the training set's) labelling folders by name (ValueError for others)."""
    root = Path(root)
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = folders if classes is None else list(classes)
    unknown = [name for name in folders if name not in classes]
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the {len(classes)} training classes "
                         f"(first ones: {classes[:5]})")
    samples = [(f, [label]) for label, name in enumerate(classes) if name in folders
               for f in sorted((root / name).iterdir()) if f.is_file() and not f.name.startswith(".")]
    counts = collections.Counter(classes[labels[0]] for _, labels in samples)
    logging.info("%s: %d files in %d classes: %s", root, len(samples), len(classes),
                 ", ".join(f"{name} {counts[name]}" for name in classes))
    empty = [name for name in classes if not counts[name]]
    if empty and samples:  # (no video at all is an error of load_samples)
        logging.warning("%s: no videos of %d of the %d classes: %s", root, len(empty), len(classes), empty[:10])
    return samples, classes


def find_listed_files(source, samples, on_error="skip"):
    """The `samples` of the list file `source` whose files exist, as spelled on disk (`_respelled`); the missing
    named in one warning, or a FileNotFoundError with on_error="raise" or none left (a wrong --root stops a run)."""
    listings = {}
    on_disk = [path if path.exists() else _respelled(path, listings) for path, *_ in samples]
    found = [(disk, *rest) for disk, (_, *rest) in zip(on_disk, samples) if disk is not None]  # rest: labels, ...
    missing = [path for disk, (path, *_) in zip(on_disk, samples) if disk is None]
    if missing:
        message = (f"{source}: {len(missing)} of the {len(samples)} listed files do not exist, e.g. "
                   f"{[str(path) for path in missing[:5]]}")
        if on_error == "raise" or not found:
            raise FileNotFoundError(message)
        logging.warning("%s; left out", message)
    return found


def _respelled(path, listings):
    """The file `path` names, as a list written on another system spells it (backslashes; each missing part matched
    to the one name equal in NFC form, as macOS writes NFD, or else ignoring case), or None."""
    path = Path(str(path).replace("\\", "/"))
    at, nfc = Path(path.anchor), functools.partial(unicodedata.normalize, "NFC")
    for part in path.parts[1 if path.anchor else 0:]:
        if not (at / part).exists():
            if at not in listings:
                listings[at] = os.listdir(at) if at.is_dir() else []
            hits = [[n for n in listings[at] if key(n) == key(part)] for key in (nfc, lambda x: nfc(x).casefold())]
            part = next((h[0] for h in hits if len(h) == 1), None)
            if part is None:
                return None  # none, or several that differ only in case
        at = at / part
    return at


def load_samples(source, root=None, multi_label=False, num_classes=None, classes=None, rawframes=False):
    """(samples, class names or None, num_classes) from a list file or class folders (named by `classes`, the
    training set's, if given); num_classes: by default the classes' count or the largest label + 1. ValueError for
    no videos, multi-label or uncounted folders (a missing folder would shift every later label), too many classes."""
    source = Path(source)
    if classes is not None and num_classes is None:
        num_classes = len(classes)  # every label must name a class
    if source.is_dir():
        if rawframes or multi_label:
            raise ValueError(f"{source} is a folder (class folders, one label a video): list "
                             f"{'frame folders' if rawframes else 'multi-label videos'} in a list file instead")
        samples, found = read_class_folders(source, classes)
        if classes is None and num_classes is not None and len(found) != num_classes:
            raise ValueError(f"{source}: {len(found)} class folders but num_classes is {num_classes}; pass the "
                             f"training set's class names (classes=...) to label the folders by name")
        classes, num_classes = found, len(found) if num_classes is None else num_classes
    else:
        samples = read_list_file(source, root, multi_label, num_classes, rawframes)
    if classes is not None and len(classes) > num_classes:
        raise ValueError(f"{source}: {len(classes)} classes but num_classes is {num_classes}")
    if not samples:
        raise ValueError(f"no videos found in {source}")
    if num_classes is None:
        num_classes = 1 + max(label for _, labels, *_ in samples for label in labels)
    return samples, classes, num_classes


def class_names(dataset, source) -> Optional[list]:
    """The training set's class names: its folders', or those of a classes.txt beside its list file (one a line,
    as the demo set has) if it names every class; else None. ValueError naming the line of a label beyond them."""
    if dataset.classes is not None:
        return list(dataset.classes)
    path = Path(source).parent / "classes.txt"
    if not (Path(source).is_file() and path.is_file()):
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(names) < dataset.num_classes:
        try:
            read_list_file(source, multi_label=dataset.multi_label, num_classes=len(names))
        except ValueError as err:
            raise ValueError(f"{err}, beyond the {len(names)} classes {path} names") from None
    if len(names) != dataset.num_classes:
        logging.warning("%s names %d classes, the training set has %d: no class names saved", path, len(names),
                        dataset.num_classes)
        return None
    return names


def log_labels_by_index(train_source, val_source, train, val):
    """Log it when one of the training and validation sets is a list file, the other class folders: labels by index."""
    if train.classes is None and val.classes is not None:
        logging.warning("labels by index: the training list file %s names no classes, so the class folders of %s "
                        "are numbered in sorted order (%r is 0)", train_source, val_source, val.classes[0])
    elif train.classes is not None and not Path(val_source).is_dir():
        logging.info("labels by index: label i of the validation list file %s means the i-th class folder of %s "
                     "in sorted order (0 is %r)", val_source, train_source, train.classes[0])


class VideoDataset(torch.utils.data.Dataset):
    """Clips from a list file (`rawframes`: of frame folders) or class folders `root/<class>/<video>` (load_samples).
    A sample: "video" float (C, T, H, W), "label" (int, or multi-hot float (num_classes,)), "skipped" (bad videos
    passed over) and, for Motion Loss pairs (training by default), "fake". A bad video: on_error="raise" lets the
    VideoDecodeError through; "skip" logs it once, training takes the next video, evaluation leaves it out so none
    counts twice (each DataLoader worker keeps its own `bad_files`: count the batches' "skipped" lists instead).
    Randomness is seeded by (seed, epoch, index), whatever the workers: call `set_epoch` each epoch.
    cache=True keeps every decoded frame, for the short demo videos. Defaults: the paper's 256-320 / 224, 256 / 224."""

    def __init__(self, source, root=None, *, num_frames, img_size, train, short_side=None, scale=None,
                 multi_label=False, num_classes=None, on_error="skip", randaugment=False, seed=0, cache=False,
                 motion_pairs=None, classes=None, frame_interval=None, rawframes=False,
                 frame_template=FRAME_TEMPLATE, start_index=1):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        samples, self.classes, num_classes = load_samples(source, root, multi_label, num_classes, classes, rawframes)
        if not Path(source).is_dir():  # a list file: its files may be missing
            samples = find_listed_files(source, samples, on_error)
        self.samples = [sample[:2] for sample in samples]  # (path, labels)
        self.frame_counts = {sample[0]: sample[2] for sample in samples} if rawframes else None  # listed counts
        try:
            frame_template.format(start_index)
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"frame_template {frame_template!r} does not format a frame number: {err}") from None
        if randaugment:
            rand_augment_class()  # fail now, not in a worker an epoch later
        self.short_side = round(img_size * 8 / 7) if short_side is None else short_side
        self.scale = (round(img_size * 8 / 7), round(img_size * 10 / 7)) if scale is None else tuple(scale)
        if min(self.short_side, *self.scale) < img_size:
            raise ValueError(f"short_side={self.short_side} and scale={self.scale} must be >= img_size={img_size}"
                             f" (the crop is taken after the resize)")
        self.frame_interval, self.frame_template, self.start_index = frame_interval, frame_template, start_index
        self.num_frames, self.img_size, self.train, self.multi_label = num_frames, img_size, train, multi_label
        self.num_classes, self.on_error, self.randaugment, self.seed = num_classes, on_error, randaugment, seed
        self.motion_pairs = train if motion_pairs is None else motion_pairs
        self.epoch, self.cache, self.bad_files = 0, {} if cache else None, set()

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):  # new random sampling and augmentation each epoch (as DistributedSampler's)
        self.epoch = epoch

    def _clip(self, path, rng):
        """uint8 (T, H, W, 3), decoded or from the cache, at the largest short side the transform asks for."""
        short_side = self.scale[1] if self.train else self.short_side
        if self.frame_counts is not None:
            return read_frames(path, self.num_frames, self.train, rng, total_frames=self.frame_counts[path],
                               template=self.frame_template, start_index=self.start_index, short_side=short_side,
                               frame_interval=self.frame_interval)
        if self.cache is None:
            return read_clip(path, self.num_frames, self.train, rng, short_side=short_side,
                             frame_interval=self.frame_interval)
        if path not in self.cache:
            self.cache[path] = read_all_frames(path, short_side=short_side)  # (n, H, W, 3)
        frames = self.cache[path]
        return frames[sample_indices(len(frames), self.num_frames, self.train, rng, self.frame_interval)]

    def _transform(self, clip, rng):  # uint8 (T, H, W, 3) -> float (C, T, H, W)
        if self.train:
            return train_transform(clip, self.img_size, self.scale, rng, self.randaugment)
        return eval_transform(clip, self.img_size, self.short_side)

    def _label(self, labels):
        if not self.multi_label:
            return labels[0]
        target = torch.zeros(self.num_classes)  # (num_classes,) multi-hot
        target[labels] = 1.0
        return target

    def __getitem__(self, index):
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")  # str seeds hash the same in every process
        skipped = []
        for step in range(len(self.samples) if self.train else 1):  # training moves on to the next video
            path, labels = self.samples[(index + step) % len(self.samples)]
            try:
                clip = None if path in self.bad_files else self._clip(path, rng)  # (T, H, W, 3)
            except VideoDecodeError as err:
                if self.on_error == "raise":
                    raise
                logging.warning("skipping a bad video: %s", err)  # once: then it is in bad_files
                self.bad_files.add(path)
                clip = None
            if clip is None:
                skipped.append(str(path))
                continue
            sample = {"label": self._label(labels), "skipped": skipped}
            if self.motion_pairs:
                sample["video"], sample["fake"] = make_motion_pair(clip, lambda c: self._transform(c, rng), rng)
            else:
                sample["video"] = self._transform(clip, rng)  # (C, T, H, W)
            return sample
        if not self.train:
            return {"skipped": skipped}  # left out of the evaluation
        raise VideoDecodeError(f"none of the {len(self.samples)} videos could be decoded; bad files: "
                               f"{sorted(map(str, self.bad_files))[:5]} ...")


def collate(batch):
    """B samples -> "video" (B, C, T, H, W), "label" (B,) or (B, num_classes), "motion" ones (B,); Motion Loss pairs:
    2B clips, the B real then their fakes, labels twice, "motion" [1]*B + [0]*B. "skipped": the bad videos passed
    over (samples left out of an evaluation add only these; when all were, the batch is {"skipped": [...]})."""
    skipped = [p for s in batch for p in s["skipped"]]
    batch = [s for s in batch if "video" in s]
    if not batch:
        return {"skipped": skipped}
    videos, labels, motion = [s["video"] for s in batch], [s["label"] for s in batch], [1] * len(batch)
    if "fake" in batch[0]:
        videos += [s["fake"] for s in batch]
        labels += labels  # the fake keeps the video's action label (task loss on both clips)
        motion += [0] * len(batch)
    label = torch.stack(labels) if torch.is_tensor(labels[0]) else torch.tensor(labels)
    return {"video": torch.stack(videos), "label": label, "motion": torch.tensor(motion), "skipped": skipped}


def epoch_loader(dataset, batch_size, epoch, rank=0, world=1, *, seed=0, workers=0, skip_samples=0, train=True):
    """The DataLoader of one epoch, `batch_size` videos a batch (collate). Training: train_order, so an epoch's
    samples are the same however often the run resumed, on any number of processes. Evaluation: every world-th."""
    dataset.set_epoch(epoch)
    order = train_order(len(dataset), batch_size, epoch, rank, world, seed=seed, skip_samples=skip_samples) if train \
        else list(range(rank, len(dataset), world))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=train,
                                       num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=_leave_signals_to_main)


def train_order(n, batch_size, epoch, rank=0, world=1, *, seed=0, skip_samples=0) -> list:
    """This process's indices of a training epoch, whole batches: one shuffle seeded by (seed, epoch) dealt round-robin,
    so the samples taken are a prefix of it and `skip_samples` (from a checkpoint) resumes on any number of
    processes or batch size, repeating nothing."""
    g = torch.Generator().manual_seed(seed + epoch)
    rest = torch.randperm(n, generator=g).tolist()[skip_samples:]
    return rest[rank::world][:len(rest) // world // batch_size * batch_size]


def _leave_signals_to_main(worker_id):
    """DataLoader workers ignore Ctrl-C and SIGTERM: the main process saves last.pt after the step under way."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def single_threaded(loader):
    """The loader's batches, built with one torch thread (workers=0): the small resizes gain nothing from threads,
    whose hand-offs on a busy CPU made a demo batch 30x slower."""
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


# ----------------------------------------------------------------------------------------------------------------
# The demo dataset: synthetic motion classes that a tiny model learns on 2 CPU cores in minutes.

DEMO_CLASSES = ["move down", "move left", "move right", "move up"]
DEMO_SIZE = 72  # frames are written 72 x 72 ...
DEMO_FRAMES = 16  # ... and 16 frames long (2 s at 8 fps), from which the model samples 8
DEMO_TRAIN_SCALE = (48, 54)  # random short side, then a random 48 x 48 crop (the sanity run's img_size) ...
DEMO_EVAL_SHORT_SIDE = 48  # ... eval: the whole frame at 48 x 48
DEMO_FPS = 8
_SAFE = (8.0, 64.0)  # pixels of a 72 x 72 frame inside every training crop (scale 54, crop offset 0..6)
_SHAPE_SIZE = (10.0, 14.0)  # 7-9 px at 48 x 48: inside one 16 x 16 patch, or on the edge of two
_PATH = (34.0, 42.0)  # how far the mover goes: 23-28 px at 48 x 48, from one patch across the next
_SHAPES = ("disc", "square", "diamond")
_MARKER = "DONE"
_DIRECTIONS = {"move down": (0, 1), "move left": (-1, 0), "move right": (1, 0), "move up": (0, -1)}
DEMO_VERSION = 4  # of the generator: bump it whenever render_demo_video changes, so old demo folders are rebuilt

DEMO_DOC = """Demo dataset: 4 classes of 16-frame 72 x 72 H.264 videos, DEMO_CLASSES, that differ only in how one
bright object moves: 34-42 px in a straight line, down, left, right or up. Everything else is drawn from the
same distributions in every class: a faint static blocky texture, 2-4 static shapes in muted colours (clutter:
redundant tokens for the Glimpser and halting to drop) and the mover, a disc, square or diamond of 10-14 px in
a random bright colour, kept inside the central region that every training crop keeps in view. Opposite
classes (left/right, up/down) are the same random draw played backwards in time, so the mover visits the same
positions with the same probability: one frame, or the frames without their order, cannot tell them apart, and
across the two pairs a single frame keeps only a weak cue (a trace's spread along x or y). The class is in the
motion across ordered frames, which is what joint space-time attention and the Motion Loss are for.
(Version 3 had two diagonal classes besides, down-right and up-left, and a bigger mover going 28-38 px: moving
about one patch, 45 degrees from its neighbours, a diagonal was confused with them, and the tiny model's top-1
depended on its seed, 0.85-0.95; version 2 had circling classes, which took twice the training steps.)"""


def _colour(rng):
    """A random bright, saturated RGB colour (a random hue), float (3,) in [0, 255]."""
    hue = rng.uniform(0.0, 6.0)
    ramp = np.clip(np.abs((hue + np.array([0.0, 4.0, 2.0])) % 6.0 - 3.0) - 1.0, 0.0, 1.0)  # hue -> RGB
    return 255.0 * (0.25 + 0.75 * ramp)


def _shape_mask(kind, cx, cy, size, grid):
    """Boolean (H, W) mask of a shape of width `size` centred at (cx, cy) on pixel centres `grid` = (ys, xs)."""
    dy, dx = grid[0] - cy, grid[1] - cx
    if kind == "disc":
        return dx ** 2 + dy ** 2 <= (size / 2) ** 2
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= size / 2
    return np.abs(dx) + np.abs(dy) <= size / 1.6  # diamond, about the area of the disc


def _random_shape(rng, bright):
    """A disc, square or diamond: bright for the mover, muted (mixed with grey) for the clutter.

    Clutter that looked exactly like the mover made the tiny model's search for the motion too slow for a
    minutes-long CPU run (it stayed at chance for 250 steps); muted clutter still gives tokens to drop.
    """
    colour = _colour(rng) if bright else 0.3 * _colour(rng) + 0.7 * rng.uniform(110, 150)
    return {"kind": _SHAPES[rng.integers(len(_SHAPES))], "size": rng.uniform(*_SHAPE_SIZE), "colour": colour}


def _trajectory(label, rng):
    """Mover centres (DEMO_FRAMES, 2) as (x, y) for class DEMO_CLASSES[label], inside the safe region."""
    lo, hi = _SAFE[0] + _SHAPE_SIZE[1] / 2, _SAFE[1] - _SHAPE_SIZE[1] / 2  # the whole shape stays in view
    t = np.arange(DEMO_FRAMES) / (DEMO_FRAMES - 1)  # 0 .. 1 over the clip
    step = np.array(_DIRECTIONS[DEMO_CLASSES[label]])  # unit vector, y pointing down
    dist = rng.uniform(*_PATH)
    half = np.abs(step) * dist / 2
    mid = np.array([rng.uniform(lo + h, hi - h) for h in half])  # the path's centre, so the ends stay in view
    return mid + np.outer(t - 0.5, step * dist)  # (DEMO_FRAMES, 2)


def render_demo_video(label, rng):
    """uint8 (DEMO_FRAMES, DEMO_SIZE, DEMO_SIZE, 3) frames of one demo video of class `label`."""
    grid = np.mgrid[0:DEMO_SIZE, 0:DEMO_SIZE] + 0.5  # (2, H, W) pixel centres
    texture = rng.uniform(-12, 12, size=(DEMO_SIZE // 8, DEMO_SIZE // 8, 1)).repeat(8, 0).repeat(8, 1)
    still = rng.uniform(40, 90, size=3) + texture  # (H, W, 3) faint blocky background
    for _ in range(rng.integers(2, 5)):  # 2-4 static shapes of the mover's kinds and sizes
        shape = _random_shape(rng, bright=False)
        centre = rng.uniform(_SAFE[0] + _SHAPE_SIZE[1] / 2, _SAFE[1] - _SHAPE_SIZE[1] / 2, size=2)
        still[_shape_mask(shape["kind"], *centre, shape["size"], grid)] = shape["colour"]
    mover, path = _random_shape(rng, bright=True), _trajectory(label, rng)
    frames = np.repeat(still[None], DEMO_FRAMES, axis=0)  # (T, H, W, 3)
    for frame, (x, y) in zip(frames, path):
        frame[_shape_mask(mover["kind"], x, y, mover["size"], grid)] = mover["colour"]  # drawn on top
    return frames.clip(0, 255).round().astype(np.uint8)


def write_video(path, frames, fps=DEMO_FPS):
    """Write uint8 (n, H, W, 3) frames (H, W even) as an H.264 yuv420p .mp4 with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # one encoder thread: deterministic output and no thread start-up cost for tiny frames
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def _demo_params(seed, num_train, num_val):
    return (f"version={DEMO_VERSION} seed={seed} num_train={num_train} num_val={num_val} size={DEMO_SIZE} "
            f"frames={DEMO_FRAMES}\n")


def demo_dataset_ready(root, *, seed=0, num_train=60, num_val=20):
    """True when `root` holds a complete demo dataset made with these arguments by this DEMO_VERSION of the
    generator (its marker file is written last)."""
    marker = Path(root) / _MARKER
    return marker.is_file() and marker.read_text() == _demo_params(seed, num_train, num_val)


def make_demo_dataset(root, *, seed=0, num_train=60, num_val=20):
    """Write the demo dataset (see DEMO_DOC) under `root`; skip if it is already there and complete.

    num_train and num_val are videos *per class*. Layout: root/videos/<split>/<class name>/<i>.mp4, list files
    root/train.txt and root/val.txt (`videos/train/move left/0000.mp4 3`), root/classes.txt (one name a line, in
    label order; the class folders sort in the same order, so root/videos/train also works as a folder dataset).
    Each video is drawn from its own generator seeded by (seed, split, class, i): the same seed gives the same
    list files and the same frames. Returns the paths and the class names.
    """
    root = Path(root)
    info = {"train": root / "train.txt", "val": root / "val.txt", "classes_file": root / "classes.txt",
            "classes": list(DEMO_CLASSES), "num_classes": len(DEMO_CLASSES)}
    if demo_dataset_ready(root, seed=seed, num_train=num_train, num_val=num_val):
        return info
    if (root / _MARKER).exists():  # ours, made with other arguments: start again so no stale video remains
        (root / _MARKER).unlink()
        shutil.rmtree(root / "videos", ignore_errors=True)
    for split_id, (split, count) in enumerate([("train", num_train), ("val", num_val)]):
        lines = []
        for label, name in enumerate(DEMO_CLASSES):
            (root / "videos" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rel = f"videos/{split}/{name}/{i:04d}.mp4"
                rng = np.random.default_rng([seed, split_id, label, i])
                write_video(root / rel, render_demo_video(label, rng))
                lines.append(f"{rel} {label}\n")
        info[split].write_text("".join(lines))
    info["classes_file"].write_text("".join(f"{name}\n" for name in DEMO_CLASSES))
    (root / _MARKER).write_text(_demo_params(seed, num_train, num_val))
    return info

