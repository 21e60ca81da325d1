import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import train

# A model far smaller than tiny() and a demo set of 12 training and 6 validation videos: each run takes seconds.
SMALL = ["--embed-dim", "32", "--depth", "4", "--heads", "2", "--frames", "4", "--batch-size", "4",
         "--log-every", "1", "--eval-every", "1"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo dataset with 2 training and 1 validation video per class, shared by this module's tests."""
    root = tmp_path_factory.mktemp("demo")
    data.make_demo_dataset(root, num_train=2, num_val=1)
    return root


def small_run(demo, out, *extra):
    return ["--demo-root", str(demo), "--demo-videos", "2", "1", "--out", str(out), *SMALL, *extra]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_train_demo_preset_is_the_only_difference():
    demo_args = vars(train.parse_args([]))
    real_args = vars(train.parse_args(["--train", "t.txt", "--val", "v.txt"]))
    differ = {k for k in demo_args if demo_args[k] != real_args[k]}
    assert differ == set(train.DEMO_PRESET) | {"train", "val", "preset"}
    assert real_args["optimizer"] == "adam" and real_args["lr"] == 1e-5 and real_args["weight_decay"] == 1e-5
    assert real_args["epochs"] == 20 and real_args["warmup_epochs"] == 5 and real_args["clip_grad"] == 40
    assert train.parse_args(["--lr", "0.5"]).lr == 0.5  # a flag beats the preset


def test_train_optimizer_groups_and_schedule():
    args = train.parse_args(["--train", "t.txt", "--val", "v.txt", "--epochs", "4", "--warmup-epochs", "1"])
    model = train.HaltingVT(train.HaltingVTConfig.tiny(embed_dim=32, depth=3, num_heads=2))
    optimizer, scheduler = train.build_optimizer(model, args, steps_per_epoch=10)
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "time_embed", "norm.weight", "head.bias"} <= no_decay_names
    assert all(p.ndim > 1 for p in decay["params"]) and "head.weight" not in no_decay_names
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-6)  # warm-up starts at 0.1 x lr
    assert max(lrs) == pytest.approx(1e-5) and lrs.index(max(lrs)) == 10  # peak after the warm-up epoch
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0


def test_train_average_precision():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.6]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    # class 0: positives ranked 1st and 3rd -> (1/1 + 2/3) / 2; class 1: its one positive ranked 1st -> 1
    assert train.average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_train_sanity_run_writes_metrics_and_checkpoints(demo, tmp_path):
    metrics = train.main(small_run(demo, tmp_path, "--epochs", "2"))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1] == json.loads((tmp_path / "final.json").read_text())
    for key in ("epoch", "step", "train_loss", "val_top1", "val_top5", "val_motion_acc", "val_gflops",
                "dense_gflops", "halt_depth_mean", "halt_depth_hist", "tokens_per_layer", "elapsed_s"):
        assert key in metrics, key
    assert len(metrics["halt_depth_hist"]) == 2 and sum(metrics["halt_depth_hist"]) == pytest.approx(1)
    assert len(metrics["tokens_per_layer"]) == 4 and 1 <= metrics["halt_depth_mean"] <= 2
    assert 0 < metrics["val_gflops"] <= metrics["dense_gflops"] and metrics["val_videos"] == 6
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "config", "rng"} <= ckpt.keys()
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and ckpt["config"]["embed_dim"] == 32
    assert (tmp_path / "best.pt").is_file() and not list(tmp_path.glob("*.tmp"))
    # --eval-only on the saved weights gives the same figures
    again = train.main(small_run(demo, tmp_path / "eval", "--eval-only", "--resume", str(tmp_path / "last.pt")))
    assert again["val_top1"] == metrics["val_top1"] and again["val_gflops"] == pytest.approx(metrics["val_gflops"])


def test_train_resume_is_exact(demo, tmp_path):
    train.main(small_run(demo, tmp_path / "straight", "--epochs", "2"))
    train.main(small_run(demo, tmp_path / "split", "--epochs", "2", "--stop-after", "1"))
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=False)["epoch"] == 1
    train.main(small_run(demo, tmp_path / "split", "--epochs", "2", "--resume", str(tmp_path / "split/last.pt")))
    assert_same_weights(weights(tmp_path / "straight/last.pt"), weights(tmp_path / "split/last.pt"))


def test_train_sigint_saves_and_resumes_mid_epoch(demo, tmp_path, monkeypatch):
    train.main(small_run(demo, tmp_path / "straight", "--epochs", "1"))
    calls = []
    forward_loss = train.forward_loss

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the second step
        return forward_loss(*a, **kw)

    monkeypatch.setattr(train, "forward_loss", interrupted)
    train.main(small_run(demo, tmp_path / "split", "--epochs", "1"))
    ckpt = torch.load(tmp_path / "split/last.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (0, 1, 1)  # the second step was not taken
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    monkeypatch.setattr(train, "forward_loss", forward_loss)
    train.main(small_run(demo, tmp_path / "split", "--epochs", "1", "--resume", str(tmp_path / "split/last.pt")))
    assert_same_weights(weights(tmp_path / "straight/last.pt"), weights(tmp_path / "split/last.pt"))


def test_train_nan_loss_stops_and_keeps_last_good_checkpoint(demo, tmp_path, monkeypatch):
    calls = []
    loss_fn = train.haltingvt_loss

    def nan_in_second_epoch(*a, **kw):
        calls.append(1)
        total, parts = loss_fn(*a, **kw)
        if len(calls) > 3:  # 3 steps per epoch: the second epoch goes bad
            total, parts = total * float("nan"), {**parts, "total": float("nan")}
        return total, parts

    monkeypatch.setattr(train, "haltingvt_loss", nan_in_second_epoch)
    with pytest.raises(train.NonFiniteLoss, match="loss is nan"):
        train.main(small_run(demo, tmp_path, "--epochs", "2"))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_train_two_processes_end_with_identical_weights(demo, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(train.__file__)), *small_run(demo, tmp_path, "--epochs", "1", "--batch-size", "2",
                                                 "--threads", "1")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((tmp_path / "final.json").read_text())
    assert len(final["rank_weight_sha"]) == 2 and len(set(final["rank_weight_sha"])) == 1
    assert final["val_videos"] == 6  # each validation video counted once across the two ranks
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 3  # 12 videos / (2 ranks x 2)


def test_train_class_folders_and_multi_label(demo, tmp_path):
    folders = ["--train", str(demo / "videos/train"), "--val", str(demo / "videos/val"), "--preset", "demo"]
    metrics = train.main(folders + small_run(demo, tmp_path / "folders", "--epochs", "1"))
    assert metrics["val_videos"] == 6 and 0 <= metrics["val_top1"] <= 1
    # multi-label list file: each video also carries the label (label + 1) % 6
    lines = []
    for line in (demo / "train.txt").read_text().splitlines():
        path, label = line.rsplit(" ", 1)
        lines.append(f"{path} {label} {(int(label) + 1) % 6}\n")
    (demo / "multi.txt").write_text("".join(lines))
    multi = ["--train", str(demo / "multi.txt"), "--val", str(demo / "multi.txt"), "--multi-label",
             "--preset", "demo"]
    metrics = train.main(multi + small_run(demo, tmp_path / "multi", "--epochs", "1"))
    assert 0 < metrics["val_map"] <= 1 and "val_top1" not in metrics and metrics["val_videos"] == 12


def test_train_skips_a_corrupt_video(demo, tmp_path, caplog):
    lines = (demo / "train.txt").read_text().splitlines()
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    listing = "".join(f"{demo / line}\n" for line in lines) + f"{tmp_path}/broken.mp4 0\n"
    (tmp_path / "with_bad.txt").write_text(listing)
    args = ["--train", str(tmp_path / "with_bad.txt"), "--val", str(demo / "val.txt"), "--preset", "demo"]
    train.main(args + small_run(demo, tmp_path / "out", "--epochs", "1", "--batch-size", "13"))
    assert "1 bad videos skipped" in caplog.text and "broken.mp4" in caplog.text


def test_train_depth_prior_flag(demo, tmp_path):
    if not hasattr(train.losses, "depth_prior"):
        pytest.skip("losses.py has no depth prior yet")
    metrics = train.main(small_run(demo, tmp_path, "--epochs", "1", "--depth", "5", "--alpha-d", "0.1",
                                   "--depth-prior", "2", "1"))
    assert len(metrics["halt_depth_hist"]) == 3
