import av
import numpy as np
import pytest
import torch

import data
import train
from haltingvt import HaltingVT, HaltingVTConfig

# As test_train.py: a model far smaller than tiny() (4 layers: 2 Glimpser + 2 joint) and 2 + 1 demo videos per class.
MAP_SMALL = ["--embed-dim", "32", "--depth", "4", "--heads", "2", "--frames", "4", "--batch-size", "4",
             "--log-every", "1", "--eval-every", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def map_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data.make_demo_dataset(root, num_train=2, num_val=1)
    return root


def map_small_run(demo, out, *extra):
    return ["--demo-root", str(demo), "--demo-videos", "2", "1", "--out", str(out), *MAP_SMALL, *extra]


def loop_masks(keep_index, halt_depth, S, layers):
    """The obviously-correct reference: token 1 + t*k + j is frame t, patch keep_index[t][j], with depth N."""
    T = len(keep_index) if keep_index is not None else (len(halt_depth) - 1) // S
    kept = [[keep_index[t][j] for j in range(len(keep_index[t]))] if keep_index is not None else list(range(S))
            for t in range(T)]
    masks = torch.zeros(1 + len(layers), T, S, dtype=torch.bool)
    for t in range(T):
        for j, s in enumerate(kept[t]):
            n = int(halt_depth[1 + t * len(kept[t]) + j])
            masks[0, t, s] = True
            for i, layer in enumerate(layers, start=1):
                masks[i, t, s] = n >= layer
    return masks


def test_map_active_token_masks_match_a_loop():
    g = torch.Generator().manual_seed(0)
    T, S, k, L = 3, 16, 6, 4
    keep = torch.stack([torch.randperm(S, generator=g)[:k] for _ in range(T)])  # (T, k)
    depth = torch.randint(1, L + 1, (1 + T * k,), generator=g)
    got = data.active_token_masks(keep, depth, S, [1, 2, 4])
    assert torch.equal(got, loop_masks(keep.tolist(), depth.tolist(), S, [1, 2, 4]))
    assert got[0].sum() == T * k and torch.equal(got[1], got[0])  # every kept token runs joint layer 1
    depth = torch.randint(1, L + 1, (1 + T * S,), generator=g)  # no Glimpser
    assert torch.equal(data.active_token_masks(None, depth, S, [3]), loop_masks(None, depth.tolist(), S, [3]))


def test_map_darkens_exactly_the_pruned_and_halted_tokens():
    torch.manual_seed(0)
    cfg = HaltingVTConfig.tiny(embed_dim=32, depth=6, num_heads=2, num_frames=4, beta=1.0)
    model = HaltingVT(cfg).eval()
    clip = torch.randint(40, 256, (4, 64, 64, 3), dtype=torch.uint8)  # >= 40: darkening changes every pixel
    video = data.eval_transform(clip, 64, 64)  # (C, T, H, W)
    layers = [2, 3, 4]
    with torch.no_grad():
        out = model(video.unsqueeze(0), drop_halted=True)
    p, S = cfg.patch_size, 16
    expected = loop_masks(out.keep_index[0].tolist(), out.halt_depth[0].tolist(), S, layers)
    assert (~expected[0]).any() and (expected[0] & ~expected[-1]).any() and expected[-1].any()  # a real test
    image = data.halting_map(data.display_frames(video), train.token_masks(model, video, layers), p, scale=2)
    tile_h, tile_w = 2 * 64 + data.GAP, 2 * 64 + data.GAP
    assert image.shape == ((1 + len(expected)) * tile_h, 4 * tile_w, 3)

    def patch(row, t, s):
        top, left = row * tile_h + 2 * p * (s // 4), t * tile_w + 2 * p * (s % 4)
        return image[top:top + 2 * p, left:left + 2 * p].astype(np.float64)

    for t in range(4):
        for s in range(S):
            original = patch(0, t, s)
            assert np.array_equal(original, np.repeat(np.repeat(clip[t, 16 * (s // 4):16 * (s // 4 + 1),
                                  16 * (s % 4):16 * (s % 4 + 1)].numpy(), 2, 0), 2, 1))  # the input row
            for r in range(len(expected)):
                shown = patch(1 + r, t, s)
                if expected[r, t, s]:
                    assert np.array_equal(shown, original), (r, t, s)
                else:
                    assert np.array_equal(shown, np.round(original * data.DARKEN)), (r, t, s)


def test_map_png_round_trips_through_pyav(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (70, 130, 3), dtype=np.uint8)
    data.write_png(tmp_path / "x.png", image)
    with av.open(str(tmp_path / "x.png")) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(decoded, image) and not list(tmp_path.glob("*.tmp"))


def test_map_command_from_a_trained_checkpoint(map_demo, tmp_path):
    train.main(map_small_run(map_demo, tmp_path / "run", "--epochs", "1"))
    video = map_demo / "videos/val/move left/0000.mp4"
    result = train.main(["--halting-map", str(video), "--resume", str(tmp_path / "run/last.pt"), "--threads", "1"])
    assert result["path"] == str(tmp_path / "run/halting_map.png")  # default: next to the checkpoint
    assert list(result["active"]) == ["Glimpser", "joint layer 2"]  # 2 joint layers: the default shows layer 2
    assert result["active"]["Glimpser"] == pytest.approx(0.5)  # R = 0.5 of every frame's patches
    with av.open(result["path"]) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert decoded.shape == (3 * (128 + data.GAP), 4 * (128 + data.GAP), 3)  # input, Glimpser, layer 2; 4 frames
    again = train.main(["--halting-map", str(video), "--resume", str(tmp_path / "run/last.pt"), "--threads", "1",
                        "--out", str(tmp_path / "map"), "--map-layers", "1", "2"])
    assert list(again["active"]) == ["Glimpser", "joint layer 1", "joint layer 2"]
    assert again["active"]["joint layer 1"] == pytest.approx(0.5)


def test_ablation_rows_are_tables_1_and_2():
    rows = train.ablation_rows(train.parse_args(["--ablation"]))
    table1 = [(r["glimpser_depth"] == 0, r["keep_ratio"], r["alpha_m"] > 0) for r in rows[:8]]
    assert table1 == [(True, None, True), (True, None, False)] + [
        (False, R, m) for R in (0.3, 0.5, 0.7) for m in (True, False)]
    beta = HaltingVTConfig.tiny().beta
    assert all(r["beta"] == beta for r in rows[:8])
    assert [r["beta"] for r in rows[8:]] == [beta * 0.5, beta * 1.5, beta * 2]
    assert all(r["keep_ratio"] == 0.5 and r["alpha_m"] > 0 for r in rows[8:])


def test_ablation_command_writes_one_line_per_row(map_demo, tmp_path, monkeypatch):
    rows = train.ablation_rows
    monkeypatch.setattr(train, "ablation_rows", lambda args: rows(args)[1:3])  # no Glimpser w/o motion; R=0.3
    lines = train.main(map_small_run(map_demo, tmp_path, "--ablation", "--epochs", "1"))
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert table[0].startswith("Made by `python train.py ") and "--ablation" in table[0]
    assert table[2] == "| " + " | ".join(train.ABLATION_COLUMNS) + " |" and table[4:] == lines
    cells = [line.strip("| ").split(" | ") for line in lines]
    assert [c[:5] for c in cells] == [["no Glimpser", "-", "no", "6", "0"], ["Glimpser", "0.3", "yes", "6", "0"]]
    ratios = [float(c[7]) for c in cells]
    assert all(0 < r <= 1 for r in ratios) and ratios[1] < ratios[0]  # the Glimpser saves compute
    no_motion = torch.load(next(tmp_path.glob("00_*")) / "last.pt", weights_only=False)
    assert no_motion["config"]["motion_head"] is False and no_motion["config"]["glimpser_depth"] == 0


def test_ablation_stale_demo_folder_is_rebuilt(map_demo, monkeypatch):
    assert data.demo_dataset_ready(map_demo, num_train=2, num_val=1)
    assert f"version={data.DEMO_VERSION} " in (map_demo / "DONE").read_text()
    monkeypatch.setattr(data, "DEMO_VERSION", data.DEMO_VERSION + 1)  # the generator changed
    assert not data.demo_dataset_ready(map_demo, num_train=2, num_val=1)
