"""Inspection: the Trace's derived views and its plot."""

import dataclasses

import numpy as np
import pytest

from dla_shared import inspect, plot_trace

from helpers import config_for, make_inputs


def test_slot_map_spans_and_padding():
    config = config_for("dla")
    x = make_inputs(config, 1, 30, 2, 4, 4, seed=2)
    cu = np.array([0, 12, 30])
    trace = inspect(x["q"], x["k"], x["v"], x["g"], config=config, cu_seqlens=cu)
    slots = trace.slot_map(0, 1)
    assert (np.diag(slots) == 0).all()
    assert (slots[12:, :12] == -1).all(), "tokens of another sequence have no slot"
    for t in (11, 29):
        for slot, (start, end) in enumerate(trace.spans(0, t, 1)):
            first = 0 if t == 11 else 12
            assert (slots[t, first + start : first + end] == slot).all()
    mask = np.ones((1, 30), bool)
    mask[0, 5:9] = False
    masked = inspect(x["q"], x["k"], x["v"], x["g"], config=config, mask=mask)
    assert masked.slot_map(0, 0).shape == (26, 26)
    assert np.isnan(masked.score[0, 5:9]).all() and (masked.pos[0, 5:9] == -1).all()


@pytest.mark.parametrize("threshold", [0.3, (0.2, 0.4)], ids=["one", "per-head"])
def test_plot_trace_writes_a_png(tmp_path, threshold):
    config = dataclasses.replace(config_for("dla"), threshold=threshold)
    x = make_inputs(config, 1, 40, 2, 4, 4, seed=3)
    trace = inspect(x["q"], x["k"], x["v"], x["g"], config=config)
    path = tmp_path / "trace.png"
    plot_trace(trace, path, h=1, threshold=config.threshold)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
