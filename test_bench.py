"""Tests for bench.py and for the row chunking of the drop path (to be pasted into test_haltingvt.py).

No wall-clock thresholds: timings are figures for the README, not tests."""
import json

import torch

import bench
from haltingvt import HaltingVT, HaltingVTConfig, row_groups


def test_bench_row_groups_keep_order_and_bound_the_rows():
    lengths = [5, 3, 9, 1, 1, 4, 12]
    groups = row_groups(lengths, rows=8)
    assert [n for g in groups for n in g] == lengths  # consecutive samples, none lost or moved
    assert all(sum(g) <= 8 or len(g) == 1 for g in groups)  # a longer sample stands alone
    assert row_groups([], rows=8) == []


def test_bench_row_chunks_do_not_change_outputs():
    """Running Attention and Mlp over small chunks of rows gives what one pass over all rows gives."""
    torch.manual_seed(0)
    cfg = HaltingVTConfig.tiny(beta=0.0, gamma=5.0, drop_path=0.0)
    model = HaltingVT(cfg).eval()
    with torch.no_grad():
        model.cls_token[0, 0, 0] = 0.0
        for blk in model.joint.blocks:  # let halting follow the input, so samples keep different counts
            blk.attn.proj.weight[0] *= 30
            blk.mlp.fc2.weight[0] *= 10
    video = torch.randn(4, 3, cfg.num_frames, cfg.img_size, cfg.img_size) * torch.linspace(0.2, 3, 4).view(
        4, 1, 1, 1, 1)
    chunked = [m for m in model.modules() if hasattr(m, "rows")]
    assert chunked
    with torch.no_grad():
        whole = [model(video, drop_halted=d) for d in (True, False)]
        for m in chunked:
            m.rows = 40  # fewer rows than one sample: chunks of single samples, and of 40 MLP rows
        parts = [model(video, drop_halted=d) for d in (True, False)]
    assert len(set(whole[0].halt_depth[:, 0].tolist())) > 1  # class tokens halt at different layers
    for a, b in zip(whole, parts):
        assert torch.allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.tokens_per_layer, b.tokens_per_layer)


def test_bench_json_last_line_has_the_required_keys(capsys):
    bench.main(["--json", "--quick", "--tiny", "--batch", "1", "--repeats", "1", "--matmul-size", "128"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"device", "matmul_gflops_per_s", "rows"} <= set(result)
    assert result["matmul_gflops_per_s"] > 0
    names = {r["name"] for r in result["rows"]}
    assert "dense" in names and len(names) >= 4
    assert {r["mode"] for r in result["rows"]} == {"dense", "drop", "mask"}
    for r in result["rows"]:
        assert {"name", "mode", "batch", "gflops_per_video", "ms_per_video", "speedup", "gflops_ratio"} <= set(r)
        assert r["gflops_per_video"] > 0 and r["ms_per_video"] > 0
    dense = next(r for r in result["rows"] if r["name"] == "dense")
    assert dense["mode"] == "dense" and dense["speedup"] == 1.0
    assert all(r["gflops_ratio"] < 1 for r in result["rows"] if r["mode"] != "dense")


def test_bench_train_step_rows():
    rows = list(bench.train_rows(quick=True, device=torch.device("cpu"), warmup=0, repeats=1, batch=2))
    assert [(r["name"], r["mode"]) for r in rows] == [("tiny", "mask"), ("tiny", "drop")]
    assert all(r["ms_per_step"] > 0 for r in rows)
