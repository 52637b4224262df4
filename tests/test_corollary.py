"""The paper's Corollary 3.2 on piecewise-constant sequences, and the first main job (dla-demo)."""

import json

import numpy as np
import pytest

from dla_shared import DLAConfig, demo
from dla_shared.demo import run_policy as partition
from dla_shared.synthetic import as_batch, deviation_bound, needle_recall, needle_stream, piecewise_stream

SEEDS = range(4)
DECAYS = [pytest.param(0.0, id="no-decay"), pytest.param(-0.5, id="decay")]


def bound(stream, config, g=0.0):
    return deviation_bound(stream.k, stream.v, partition(stream, config, g)[0])


@pytest.mark.parametrize("g", DECAYS)
@pytest.mark.parametrize("seed", SEEDS)
def test_token_drift_opens_states_exactly_at_change_points(seed, g):
    stream = piecewise_stream(seed=seed)
    _, _, trace = partition(stream, DLAConfig(policy="dla"), g)
    np.testing.assert_array_equal(trace.boundaries(), stream.change_points)


@pytest.mark.parametrize("g", DECAYS)
def test_state_drift_misses_the_change_points(g):
    """The other reading of Eq. 13 (DESIGN: why token_drift is the default)."""
    stream = piecewise_stream(seed=0)
    _, _, trace = partition(stream, DLAConfig(policy="dla", score="state_drift"), g)
    assert len(trace.boundaries()) <= 2 < len(stream.change_points)


@pytest.mark.parametrize("seed", SEEDS)
def test_dla_bound_below_fixed_and_fenwick_at_equal_states(seed):
    stream = piecewise_stream(seed=seed)
    T, segments = len(stream.k), len(stream.change_points)
    dla = bound(stream, DLAConfig(policy="dla", capacity=segments))
    fixed = bound(stream, demo.policy_config("fixed", segments, T, 0.6))
    assert len(partition(stream, demo.policy_config("fixed", segments, T, 0.6))[0]) == segments
    assert dla < fixed
    fenwick_spans = partition(stream, demo.policy_config("fenwick", segments, T, 0.6))[0]
    m = len(fenwick_spans)
    dla_m = bound(stream, DLAConfig(policy="dla", capacity=m))
    assert dla_m < deviation_bound(stream.k, stream.v, fenwick_spans)


@pytest.mark.parametrize("capacity", [3, 4, 6])
@pytest.mark.parametrize("seed", SEEDS)
def test_dla_bound_below_fixed_when_segments_outnumber_capacity(seed, capacity):
    stream = piecewise_stream(segments=8, seed=seed)
    config = DLAConfig(policy="dla", capacity=capacity)
    spans, _, trace = partition(stream, config)
    assert len(spans) == capacity and (trace.merge_slot >= 0).any(), "merging must be active"
    fixed = demo.policy_config("fixed", capacity, len(stream.k), 0.6)
    assert len(partition(stream, fixed)[0]) == capacity
    assert bound(stream, config) < bound(stream, fixed)


def test_deviation_bound_is_zero_exactly_on_constant_blocks():
    stream = piecewise_stream(noise=0.0, seed=1)
    cps = list(stream.change_points) + [len(stream.k)]
    aligned = list(zip(cps[:-1], cps[1:]))
    assert deviation_bound(stream.k, stream.v, aligned) < 1e-12
    shifted = [(max(0, s - 1), e - 1) for s, e in aligned[:-1]] + [(aligned[-1][0] - 1, aligned[-1][1])]
    assert deviation_bound(stream.k, stream.v, shifted) > 0.5


def test_needle_kept_in_its_own_state():
    stream, at = needle_stream(seed=0)
    spans, S, _ = partition(stream, DLAConfig(policy="dla", capacity=12))
    assert (at, at + 1) in spans
    assert needle_recall(S, stream.k[at], stream.v[at]) > 0.999
    _, S_fixed, _ = partition(stream, demo.policy_config("fixed", 12, len(stream.k), 0.6))
    assert needle_recall(S_fixed, stream.k[at], stream.v[at]) < 0.9


def test_demo_prints_table_and_writes_plot(tmp_path, capsys):
    png, js = tmp_path / "b.png", tmp_path / "t.json"
    assert demo.main(["--seeds", "2", "--budgets", "8", "4", "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "B(pi)" in out and "needle recall" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(js.read_text())["rows"]
    assert demo.format_table(rows) in out
    assert {(r["budget"], r["policy"]) for r in rows} == {(b, p) for b in (8, 4) for p in demo.POLICIES}
