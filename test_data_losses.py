import math
import random
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

import data
import losses

# ------------------------------------------------------------------------------------------------- losses


def _out(logits, motion_logits=None, ponder=None):
    ponder = torch.zeros(logits.shape[0]) if ponder is None else ponder
    return SimpleNamespace(logits=logits, motion_logits=motion_logits, ponder=ponder)


def _hand_ce(rows, targets):
    """Mean over rows of -log softmax(row)[target], written out."""
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(rows, targets)) / len(rows)


def test_loss_task_is_cross_entropy_by_hand():
    rows = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    got = losses.task_loss(torch.tensor(rows), torch.tensor([2, 0]))
    assert got.item() == pytest.approx(_hand_ce(rows, [2, 0]), rel=1e-6)


def test_loss_multi_label_is_bce_by_hand():
    rows, targets = [[2.0, -1.0, 0.0]], [[1.0, 0.0, 1.0]]
    sig = [1 / (1 + math.exp(-v)) for v in rows[0]]
    hand = -sum(y * math.log(s) + (1 - y) * math.log(1 - s) for s, y in zip(sig, targets[0])) / 3
    got = losses.task_loss(torch.tensor(rows), torch.tensor(targets), multi_label=True)
    assert got.item() == pytest.approx(hand, rel=1e-6)


def test_loss_total_is_eq9_by_hand():
    rows, motion_rows = [[0.2, 0.1, -0.3], [1.0, 0.0, 0.0]], [[0.5, -0.5], [2.0, 1.0]]
    out = _out(torch.tensor(rows), torch.tensor(motion_rows), torch.tensor([6.0, 8.0]))
    total, parts = losses.haltingvt_loss(out, torch.tensor([1, 0]), torch.tensor([1, 0]))
    task, motion = _hand_ce(rows, [1, 0]), _hand_ce(motion_rows, [1, 0])
    assert parts["task"] == pytest.approx(task, rel=1e-6)
    assert parts["motion"] == pytest.approx(motion, rel=1e-6)
    assert parts["ponder"] == pytest.approx(7.0)
    assert total.item() == pytest.approx(task + 5e-4 * 7.0 + 0.01 * motion, rel=1e-6)
    assert parts["total"] == pytest.approx(total.item())
    assert all(type(v) is float for v in parts.values())


def test_loss_alpha_m_zero_drops_motion_exactly():
    logits, motion_logits = torch.randn(2, 4), torch.randn(2, 2, requires_grad=True)
    ponder = torch.tensor([3.0, 5.0])
    expected = losses.task_loss(logits, torch.tensor([3, 1])) + 5e-4 * 4.0
    # the invalid motion label 7 would raise if the motion term were computed at all
    total, parts = losses.haltingvt_loss(_out(logits, motion_logits, ponder), torch.tensor([3, 1]),
                                         torch.tensor([7, 0]), alpha_m=0.0)
    assert total.item() == expected.item() and parts["motion"] == 0.0
    total2, parts2 = losses.haltingvt_loss(_out(logits, None, ponder), torch.tensor([3, 1]), torch.tensor([1, 0]))
    assert total2.item() == expected.item() and parts2["motion"] == 0.0


def test_loss_ponder_gradient_raises_halting_score():
    # One token, 2 layers: h1 = sigmoid(s) < 1 - eps at layer 1, so it halts at the last layer (h2 := 1):
    # N = 2, r = 1 - h1 (Eq. 4), ponder = N + r = 3 - h1 (Eq. 5). d loss / d s = -alpha_p * h1 * (1 - h1) < 0,
    # so gradient descent raises the score: the ponder loss pushes towards halting earlier.
    s = torch.tensor(0.3, requires_grad=True)
    h1 = torch.sigmoid(s)
    ponder = (2 + (1 - h1)).reshape(1)  # (B=1,)
    total, _ = losses.haltingvt_loss(_out(torch.zeros(1, 3), ponder=ponder), torch.tensor([0]))
    total.backward()
    h = torch.sigmoid(torch.tensor(0.3)).item()
    assert s.grad.item() < 0
    assert s.grad.item() == pytest.approx(-5e-4 * h * (1 - h), rel=1e-5)


def test_loss_depth_prior_is_kl_by_hand_and_zero_at_the_target():
    target = losses.depth_prior(4, mean=2.0, std=1.0)
    g = [math.exp(-0.5 * (l - 2.0) ** 2) for l in (1, 2, 3, 4)]
    assert target.tolist() == pytest.approx([v / sum(g) for v in g], rel=1e-6)
    scores = torch.tensor([[0.2, 0.4], [0.1, 0.3], [0.0, 0.0], [1.0, 1.0]]).view(4, 1, 2)  # (L, B, K)
    p = [0.3, 0.2, 0.0, 1.0]
    p = [v / sum(p) for v in p]
    hand = sum(t * (math.log(t) - math.log(max(q, 1e-8))) for t, q in zip(target.tolist(), p))
    assert losses.depth_prior_loss(scores, target).item() == pytest.approx(hand, rel=1e-5)
    at_target = (target * 3).view(4, 1, 1).expand(4, 2, 3)
    assert losses.depth_prior_loss(at_target, target).item() == pytest.approx(0.0, abs=1e-6)
    # too much halting at layer 1: the gradient lowers the first layer's scores
    scores = torch.tensor([0.9, 0.05, 0.05, 1.0]).view(4, 1, 1).requires_grad_()
    losses.depth_prior_loss(scores, target).backward()
    assert scores.grad[0] > 0 and scores.grad[1] < 0


def test_loss_bad_labels_raise_with_value():
    out = _out(torch.zeros(2, 6), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="label 7 "):
        losses.haltingvt_loss(out, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="label -1 "):
        losses.haltingvt_loss(out, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="label 5 "):  # num_classes given: checked against it
        losses.haltingvt_loss(_out(torch.zeros(1, 5)), torch.tensor([5]), num_classes=5)
    with pytest.raises(ValueError, match="motion label 2"):
        losses.haltingvt_loss(out, torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0 or 1, got 2"):
        losses.task_loss(torch.zeros(1, 3), torch.tensor([[0.0, 2.0, 1.0]]), multi_label=True)
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        losses.task_loss(torch.zeros(1, 3), torch.tensor([[0.0, 1.0]]), multi_label=True)


# ------------------------------------------------------------------------------------------------- data

GREY_STEP = 12  # frame k of a test video is grey level 12 * k, so a decoded frame tells its index


def _grey_video(path, n, height=32, width=48, faststart=False):
    frames = np.stack([np.full((height, width, 3), GREY_STEP * k, np.uint8) for k in range(n)])
    if not faststart:
        data.write_video(path, frames)
        return path
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:  # index before the data
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def _frame_ids(clip):
    return [round(f.float().mean().item() / GREY_STEP) for f in clip]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"v20": _grey_video(d / "v20.mp4", 20), "v5": _grey_video(d / "v5.mp4", 5),
            "fast20": _grey_video(d / "fast20.mp4", 20, faststart=True), "dir": d}


def test_data_sample_indices_by_hand():
    # n = 20, T = 8: segments of 2.5 frames, midpoints 1.25, 3.75, 6.25, ... -> frames 1, 3, 6, ...
    assert data.sample_indices(20, 8, train=False) == [1, 3, 6, 8, 11, 13, 16, 18]
    # fewer frames than T: midpoints (i + 0.5) * 5 / 8 -> frames repeat
    assert data.sample_indices(5, 8, train=False) == [0, 0, 1, 2, 2, 3, 4, 4]
    assert data.sample_indices(7, 2, train=False) == [1, 5]  # midpoints 1.75 and 5.25
    assert data.sample_indices(4, 1, train=False) == [2]
    for seed in range(20):
        idx = data.sample_indices(20, 8, train=True, rng=random.Random(seed))
        assert idx == data.sample_indices(20, 8, train=True, rng=random.Random(seed))  # reproducible
        assert all(math.floor(i * 2.5) <= k <= math.ceil((i + 1) * 2.5) - 1 for i, k in enumerate(idx))
    draws = {tuple(data.sample_indices(20, 8, True, random.Random(s))) for s in range(20)}
    assert len(draws) > 5  # training really is random


def test_data_read_clip_eval_takes_segment_centres(videos):
    clip = data.read_clip(videos["v20"], 8)
    assert clip.dtype == torch.uint8 and clip.shape == (8, 32, 48, 3)
    assert _frame_ids(clip) == [1, 3, 6, 8, 11, 13, 16, 18]


def test_data_read_clip_train_stays_in_segments(videos):
    for seed in range(4):
        ids = _frame_ids(data.read_clip(videos["v20"], 8, train=True, rng=random.Random(seed)))
        assert ids == data.sample_indices(20, 8, True, random.Random(seed))
        assert all(math.floor(i * 2.5) <= k <= math.ceil((i + 1) * 2.5) - 1 for i, k in enumerate(ids))


def test_data_short_video_repeats_frames(videos):
    clip = data.read_clip(videos["v5"], 8)
    assert clip.shape[0] == 8 and _frame_ids(clip) == [0, 0, 1, 2, 2, 3, 4, 4]


def _bad_file(kind, d, v20):
    path = d / f"bad_{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "truncated":  # first half of a real mp4 whose index (moov) is at the end
        content = v20.read_bytes()
        path.write_bytes(content[: len(content) // 2])
    elif kind == "audio_only":
        with av.open(str(path), "w") as container:
            stream = container.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "truncated", "audio_only"])
def test_data_bad_files_raise_naming_the_path(videos, kind):
    path = _bad_file(kind, videos["dir"], videos["v20"])
    with pytest.raises(data.VideoDecodeError, match=str(path)):
        data.read_clip(path, 8)


def test_data_truncated_after_index_decodes_the_frames_it_has(videos):
    # With the index first (faststart) a cut file still opens: the header says 20 frames, the last packets are
    # gone or cut short, and the decoder fails inside the damaged tail. The frames before it are the video.
    content = videos["fast20"].read_bytes()
    path = videos["dir"] / "cut_fast.mp4"
    path.write_bytes(content[: len(content) - 150])
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 20  # the header lies
    decodable = len(data.read_all_frames(path))
    assert 1 < decodable < data.count_frames(path) < 20  # fewer good frames than packets: read_clip resamples
    assert _frame_ids(data.read_clip(path, 8)) == data.sample_indices(decodable, 8, train=False)
    # garbage in the middle of the frame data: the decoder raises after some good frames, which are the video
    damaged = bytearray(content)
    at = int(0.83 * len(content))
    damaged[at:at + 40] = np.random.default_rng(0).integers(0, 256, 40, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(damaged))
    decodable = len(data.read_all_frames(path))
    assert 1 < decodable < 20
    assert _frame_ids(data.read_clip(path, 8)) == data.sample_indices(decodable, 8, train=False)
    path.write_bytes(content[: len(content) // 2])  # only a broken first frame left: nothing decodes
    with pytest.raises(data.VideoDecodeError, match=str(path)):
        data.read_clip(path, 8)


def _write(path, text):
    path.write_text(text)
    return path


def test_data_list_file_labels(tmp_path):
    assert data.parse_list_line("my clips/a b.mp4 3", multi_label=False) == ("my clips/a b.mp4", [3])
    assert data.parse_list_line("clip 2.mp4 5 7", multi_label=True) == ("clip 2.mp4", [5, 7])
    assert data.parse_list_line("   ", multi_label=False) is None
    single = _write(tmp_path / "single.txt", "a b.mp4 2\n\nsub/c.mp4 0\n")
    ds = data.VideoDataset(single, num_frames=8, img_size=32, train=False)
    assert [(p, l) for p, l in ds.samples] == [(tmp_path / "a b.mp4", [2]), (tmp_path / "sub/c.mp4", [0])]
    assert ds.num_classes == 3 and ds.classes is None
    ds = data.VideoDataset(single, root="/videos", num_frames=8, img_size=32, train=False)
    assert ds.samples[0][0] == data.Path("/videos/a b.mp4")
    multi = _write(tmp_path / "multi.txt", "x 1.mp4 0 3\ny.mp4 2\n")
    ds = data.VideoDataset(multi, num_frames=8, img_size=32, train=False, multi_label=True, num_classes=5)
    assert ds.samples[0] == (tmp_path / "x 1.mp4", [0, 3])
    assert ds._label([0, 3]).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="must be >= img_size"):  # the crop would not fit after the resize
        data.VideoDataset(single, num_frames=8, img_size=32, train=True, scale=(30, 40))


def test_data_out_of_range_labels_raise(tmp_path):
    bad = _write(tmp_path / "bad.txt", "a.mp4 1\nb.mp4 3\n")
    with pytest.raises(ValueError, match="line 2: label 3 "):
        data.VideoDataset(bad, num_frames=8, img_size=32, train=False, num_classes=3)
    neg = _write(tmp_path / "neg.txt", "a.mp4 -1\n")
    with pytest.raises(ValueError, match="line 1: label -1 "):
        data.VideoDataset(neg, num_frames=8, img_size=32, train=False)
    nolabel = _write(tmp_path / "nolabel.txt", "a.mp4\n")
    with pytest.raises(ValueError, match="line 1"):
        data.VideoDataset(nolabel, num_frames=8, img_size=32, train=False)


def test_data_class_folders_sorted_with_spaces(tmp_path, videos):
    for name in ["walk the dog", "ride a bike"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "v 1.mp4").write_bytes(videos["v5"].read_bytes())
    (tmp_path / "ride a bike" / "notes.txt").write_text("not a video")
    ds = data.VideoDataset(tmp_path, num_frames=4, img_size=32, train=False, short_side=32)
    assert ds.classes == ["ride a bike", "walk the dog"]
    assert [(p.parent.name, l) for p, l in ds.samples] == [("ride a bike", [0]), ("walk the dog", [1])]
    assert ds[1]["label"] == 1 and ds[1]["video"].shape == (3, 4, 32, 32)


def test_data_on_error_skip_counts_and_raise_raises(tmp_path, videos):
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    lst = _write(tmp_path / "l.txt", f"{videos['v20']} 0\nbad.mp4 1\n{videos['v5']} 2\n")
    ds = data.VideoDataset(lst, num_frames=4, img_size=32, train=False, short_side=32)
    sample = ds[1]  # bad.mp4 -> falls back to the next video, deterministically
    assert sample["label"] == 2 and sample["skipped"] == [str(tmp_path / "bad.mp4")]
    assert ds.bad_files == {tmp_path / "bad.mp4"}
    assert ds[1]["skipped"] == []  # a known bad file is not decoded (nor reported) again
    strict = data.VideoDataset(lst, num_frames=4, img_size=32, train=False, on_error="raise")
    with pytest.raises(data.VideoDecodeError, match="bad.mp4"):
        strict[1]
    all_bad = data.VideoDataset(_write(tmp_path / "b.txt", "bad.mp4 0\n"), num_frames=4, img_size=32, train=False)
    with pytest.raises(RuntimeError, match="none of the 1 videos"):
        all_bad[0]


def test_data_transforms_by_hand():
    # frame pixel (y, x) = 10 * y + x on all channels, 8 x 12: short side 8 -> no resize; centre 4 x 4 crop
    # takes rows 2..5, columns 4..7; normalisation maps v to (v - 127.5) / 127.5.
    grid = torch.arange(8)[:, None] * 10 + torch.arange(12)[None, :]  # (H, W)
    clip = grid[None, :, :, None].expand(3, 8, 12, 3).to(torch.uint8)  # (T, H, W, 3)
    out = data.eval_transform(clip, size=4, short_side=8)
    assert out.shape == (3, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out[0, 0], (grid[2:6, 4:8].float() - 127.5) / 127.5)
    # training with the scale pinned to the original size: a 4 x 4 window of the original, not flipped
    out = data.train_transform(clip, size=4, scale=(8, 8), rng=random.Random(3))
    pix = (out[1, 2] * 127.5 + 127.5).round()
    top, left = divmod(int(pix[0, 0]), 10)
    assert torch.equal(pix, grid[top:top + 4, left:left + 4].float())
    assert torch.equal(out[:, 0], out[:, 2])  # the same crop for every frame
    assert data.resize_short_side(torch.zeros(1, 3, 30, 60), 20).shape == (1, 3, 20, 40)


def test_data_motion_pair_and_collate(videos):
    clip = data.read_clip(videos["v20"], 8)
    rng = random.Random(0)
    real, fake = data.make_motion_pair(clip, lambda c: data.train_transform(c, 24, (28, 36), rng), rng)
    assert real.shape == fake.shape == (3, 8, 24, 24) and real.dtype == fake.dtype == torch.float32
    assert -1 <= fake.min() and fake.max() <= 1 and -1 <= real.min() and real.max() <= 1
    assert all(torch.equal(fake[:, t], fake[:, 0]) for t in range(8))  # static: every frame the same
    assert not torch.equal(real[:, 0], real[:, 7])  # the real clip moves (grey level changes)
    batch = data.collate([{"video": real, "fake": fake, "label": 4, "skipped": []},
                          {"video": real + 1, "fake": fake + 1, "label": 2, "skipped": ["x.mp4"]}])
    assert batch["video"].shape == (4, 3, 8, 24, 24)
    assert torch.equal(batch["video"][1], real + 1) and torch.equal(batch["video"][2], fake)
    assert batch["label"].tolist() == [4, 2, 4, 2] and batch["motion"].tolist() == [1, 1, 0, 0]
    assert batch["skipped"] == ["x.mp4"]
    single = data.collate([{"video": real, "label": torch.tensor([1.0, 0.0]), "skipped": []}] * 3)
    assert single["video"].shape == (3, 3, 8, 24, 24) and single["label"].shape == (3, 2)
    assert single["motion"].tolist() == [1, 1, 1]


def test_data_dataset_reproducible_and_cache_identical(videos, tmp_path):
    lst = _write(tmp_path / "l.txt", f"{videos['v20']} 0\n{videos['v5']} 1\n")
    kw = dict(num_frames=8, img_size=24, train=True, scale=(28, 36), seed=5)
    ds, cached = data.VideoDataset(lst, **kw), data.VideoDataset(lst, cache=True, **kw)
    a, b, c = ds[0], ds[0], cached[0]
    assert set(a) == {"video", "fake", "label", "skipped"}
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["video"], c["video"])
    assert torch.equal(a["fake"], c["fake"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["video"], a["video"])


def test_data_randaugment_without_torchvision_says_what_to_install(videos):
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed")
    except ImportError:
        pass
    clip = data.read_clip(videos["v5"], 4)
    with pytest.raises(ImportError, match="pip install torchvision"):
        data.train_transform(clip, 24, (28, 32), random.Random(0), randaugment=True)
    lst = videos["dir"] / "one.txt"
    lst.write_text(f"{videos['v5']} 0\n")
    with pytest.raises(ImportError, match="pip install torchvision"):
        data.VideoDataset(lst, num_frames=4, img_size=24, train=True, randaugment=True)


def test_data_demo_dataset_is_deterministic(tmp_path):
    a = data.make_demo_dataset(tmp_path / "a", seed=3, num_train=2, num_val=1)
    b = data.make_demo_dataset(tmp_path / "b", seed=3, num_train=2, num_val=1)
    other = data.make_demo_dataset(tmp_path / "c", seed=4, num_train=2, num_val=1)
    for key in ("train", "val", "classes_file"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert a["classes_file"].read_text().splitlines() == data.DEMO_CLASSES
    lines = a["train"].read_text().splitlines()
    assert len(lines) == 2 * len(data.DEMO_CLASSES) and lines[0] == "videos/train/circle clockwise/0000.mp4 0"
    first = tmp_path / "a" / "videos/train/move left/0001.mp4"
    clip_a = data.read_clip(first, 8)
    assert clip_a.shape == (8, data.DEMO_SIZE, data.DEMO_SIZE, 3)
    assert torch.equal(clip_a, data.read_clip(tmp_path / "b" / "videos/train/move left/0001.mp4", 8))
    assert not torch.equal(clip_a, data.read_clip(tmp_path / "c" / "videos/train/move left/0001.mp4", 8))
    assert data.read_all_frames(first).shape[0] == data.DEMO_FRAMES
    # complete: a second call rewrites nothing; the class folders read as a folder dataset with the same labels
    mtime = first.stat().st_mtime_ns
    data.make_demo_dataset(tmp_path / "a", seed=3, num_train=2, num_val=1)
    assert first.stat().st_mtime_ns == mtime and data.demo_dataset_ready(tmp_path / "a", seed=3, num_train=2,
                                                                          num_val=1)
    folders = data.VideoDataset(tmp_path / "a" / "videos" / "train", num_frames=8, img_size=64, train=False)
    listed = data.VideoDataset(a["train"], num_frames=8, img_size=64, train=False)
    assert folders.classes == data.DEMO_CLASSES
    assert [(p, l) for p, l in folders.samples] == [(p, l) for p, l in listed.samples]
    assert other["train"].read_bytes() == a["train"].read_bytes()  # same names, different videos


def test_data_demo_mover_stays_in_view_and_paired_classes_share_positions():
    # Every training crop keeps the region _SAFE in view: the whole mover must stay inside it.
    lo, hi = data._SAFE
    half = data._SHAPE_SIZE[1] / 2
    for label, name in enumerate(data.DEMO_CLASSES):
        rng = np.random.default_rng([7, label])
        paths = np.stack([data._trajectory(label, rng) for _ in range(300)])  # (videos, frames, 2) as (x, y)
        assert paths.min() >= lo + half and paths.max() <= hi - half, name
        if name.startswith("move"):  # a visible, roughly 2-patch displacement
            span = np.abs(paths[:, -1] - paths[:, 0]).max(-1)
            assert span.min() >= 28 and span.max() <= 38
    # Opposite classes are the same random draw played backwards in time, so over a clip the mover visits the
    # same positions with the same probability: one frame cannot tell "move left" from "move right".
    def path(name, seed):
        return data._trajectory(data.DEMO_CLASSES.index(name), np.random.default_rng(seed))
    for seed in range(5):
        assert np.allclose(path("move left", seed), path("move right", seed)[::-1])
        assert np.allclose(path("move up", seed), path("move down", seed)[::-1])
        # counter-clockwise backwards = clockwise from one frame's angle later (the start angle is uniform)
        assert np.allclose(path("circle counter-clockwise", seed)[::-1][:-1], path("circle clockwise", seed)[1:])
