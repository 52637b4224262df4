"""The benchmark scripts run end to end at tiny sizes (their numbers come from real runs, not tests)."""

import argparse
import json

from dla_shared import decode

from helpers import load_script


def test_bench_ops_writes_json_plot_and_table(tmp_path, capsys):
    bench = load_script("bench_ops")
    out = tmp_path / "ops"
    assert bench.main(["--lengths", "32", "70", "--reference-max-length", "32", "--heads", "1", "--dim", "8",
                       "--capacity", "4", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {(r["T"], r["impl"]) for r in rows} == {(32, "reference"), (32, "chunk"), (70, "chunk"),
                                                   (32, "fla-naive"), (70, "fla-naive")}
    assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 for r in rows)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| 70 | - |" in capsys.readouterr().out


def test_bench_prefill_writes_json_and_table(tmp_path, capsys):
    bench = load_script("bench_prefill")
    out = tmp_path / "prefill"
    assert bench.main(["--lengths", "20", "70", "--heads", "1", "--dim", "8", "--capacity", "4", "--repeats", "1",
                       "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["T"] for r in rows] == [20, 70]
    assert all(r[key] > 0 for r in rows for key in ("dla_chunk_s", "dla_scan_s", "gated_delta_ops_s"))
    assert "| 70 |" in capsys.readouterr().out


def test_gpu_check_comparisons_run_on_cpu():
    """The correctness half of gpu_check.py, on the CPU through Triton's interpreter."""
    gpu_check = load_script("gpu_check")
    rows = gpu_check.check(argparse.Namespace(length=40, check_length=20, heads=1, dim=4), "cpu")
    assert len(rows) == 14 and all(r["ok"] for r in rows)
    assert [r.get("impl") for r in rows[-4:]] == ["step"] * 4
    assert {"dq", "dk", "dv", "dg", "dlam", "dbeta"} <= set(rows[9]["errors"])


def test_prepare_tiny_writes_a_split_corpus_and_tokenizer(tmp_path):
    prepare = load_script("prepare_tiny")
    out = tmp_path / "tiny"
    assert prepare.main(["--files", "6", "--valid-fraction", "0.2", "--vocab-size", "400", "--out", str(out)]) == 0
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(line) for line in (out / "valid.jsonl").read_text().splitlines()]
    assert train and valid and not {d["file"] for d in train} & {d["file"] for d in valid}
    tokenizer = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert "<|endoftext|>" in tokenizer["model"]["vocab"]


def test_bench_decode_measures_both_models(tmp_path, capsys):
    bench = load_script("bench_decode")
    out = tmp_path / "decode"
    assert bench.main(["--lengths", "64", "256", "--width", "64", "--heads", "2", "--layers", "1", "--capacity", "4",
                       "--steps", "2", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    size = {(r["T"], r["model"]): r["state_bytes"] for r in rows}
    assert size[(64, "dla")] == size[(256, "dla")]  # DLA's state does not grow with the context
    assert size[(256, "transformer")] > size[(64, "transformer")]
    assert size[(64, "gated_delta")] == size[(256, "gated_delta")]
    assert all(r["latency_s"] > 0 for r in rows) and "DLA latency at 256 / at 64" in capsys.readouterr().out
    # the memory floor: the same weights at every length, plus the cache read (and the states written)
    moved = {(r["T"], r["model"]): r["bytes_per_token"] for r in rows}
    kv_bytes = lambda T: 2 * T * 64 * 4  # keys and values, width 64, float32
    assert moved[(256, "transformer")] - moved[(64, "transformer")] == kv_bytes(256) - kv_bytes(64)
    for name in ("dla", "gated_delta"):
        assert moved[(64, name)] == moved[(256, name)] > 2 * size[(64, name)]
    assert all(r["floor_s"] > 0 for r in rows)
    result = json.loads(out.with_suffix(".json").read_text())
    cpu = {"dla_cpu", "dla_cpu_diagonal"} if decode.available() else set()
    ops, torch_ops = result["one_layer_op_s"], result["torch_one_layer_op_s"]
    assert set(ops) == {"dla_step", "dla_reference", "gated_delta_ops"} | cpu and min(ops.values()) > 0
    assert set(torch_ops) == {"dla_step", "dla_chunk", "dla_reference", "fla_recurrent"} | cpu | {
        name + "_donated" for name in cpu}
    assert min(torch_ops.values()) > 0


def test_check_metal_runs_every_kernel_through_the_harness(capsys):
    """check_metal.py is the Mac's check; --emulate runs the same comparisons through tests/metal_emu."""
    check = load_script("check_metal")
    assert check.main(["--emulate"]) == 0
    out = capsys.readouterr().out
    assert out.count("dla_scan") == 8 and out.count("dla_decode") == 8
    assert "all kernels agree" in out
