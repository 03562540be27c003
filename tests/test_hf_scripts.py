"""examples/hf_finetune.py and benchmarks/bench_hf.py run, in-process and tiny, and their stock
and fusedloss variants agree (stock transformers is the oracle)."""

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_trains_like_stock():
    ex = _load("examples/hf_finetune.py", "hf_finetune")
    stock = ex.train("stock", steps=2, batch=1, seq=12)
    fused = ex.train("fusedloss", steps=2, batch=1, seq=12)
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(stock["losses"]))
    assert fused["peak_rss_mib"] > 0


def test_bench_child_variants_agree(capsys):
    bench = _load("benchmarks/bench_hf.py", "bench_hf")
    common = ["--device", "cpu", "--vocab", "300", "--hidden", "32", "--layers", "1",
              "--tokens", "2x16", "--steps", "1", "--warmup", "0"]
    rows = []
    for variant in bench.VARIANTS:
        assert bench.main([*common, "--child", variant]) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    for r in rows[1:]:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(rows[0]["losses"]))
    table = bench.markdown(bench.parse_args(common), rows)
    assert table.count("\n| ") == 1 + len(rows)  # header + one row per variant
