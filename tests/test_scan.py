"""The compiled decision scan (`shared/_scan.c`) vs the numpy loop it compiles (`dla_shared.scan.scan_numpy`,
itself checked against the oracle through every chunk path): identical decisions and boundary counts,
the bookkeeping within rounding, with merges active, padding, a continued cache and per-head thresholds."""

import os
import shutil
import sysconfig

import numpy as np
import pytest

from dla_shared import scan

from helpers import POLICIES, TRANSITIONS, config_for, head_thresholds, make_inputs, prefix_state

CASES = [pytest.param(np.float64, "state_drift", id="f64-state_drift"),
         pytest.param(np.float64, "token_drift", id="f64-token_drift"),
         # float32 state_drift loses digits to cancellation, so its near-threshold decisions depend on the
         # summation order (test_triton says the same of its kernel): token_drift only.
         pytest.param(np.float32, "token_drift", id="f32-token_drift")]

needs_compiled = pytest.mark.skipif(scan._scan is None, reason="the compiled scan is not built (no C compiler)")


def scans(config, x, state, active, dtype, chunk_size=16, impls=(scan.scan_numpy, scan._compiled)):
    c = lambda a: None if a is None else a.astype(dtype)
    args = (config, c(x["k"]), c(x["v"]), c(x["g"]), c(x["beta"]), active, state.S[:, :, 0].astype(dtype),
            state.n, state.ibar.astype(dtype), state.pos, state.opened, chunk_size)
    return [impl(*args) for impl in impls]


def test_compiled_scan_is_built():
    """Where a C compiler is (always in CI), the install builds the extension, so the tests below do not skip."""
    if shutil.which(sysconfig.get_config_var("CC").split()[0]) is None and not os.environ.get("CI"):
        pytest.skip("no C compiler on this machine: the numpy scan runs, which the other tests cover")
    assert scan._scan is not None


@needs_compiled
@pytest.mark.parametrize("dtype,score", CASES)
@pytest.mark.parametrize("delta", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_compiled_scan_equals_numpy_scan(policy, delta, dtype, score):
    overrides = {"score": score}
    if policy == "dla":
        overrides["threshold"] = head_thresholds(3, delta) if score == "state_drift" else (0.8, 1.2, 1.5)
    config = config_for(policy, **overrides)
    x = make_inputs(config, 2, 90, 3, 5, 7, delta=delta, seed=3)
    state, tail = prefix_state(config, x, 20)  # continue from a cache that already holds states
    active = np.ones((2, 70), bool)
    active[0, 10:14] = False
    active[1, :3] = False
    (sigma, book), (sigma2, book2) = scans(config, tail, state, active, dtype)
    assert sigma2.dtype == np.int16
    np.testing.assert_array_equal(sigma2, sigma)
    n, ibar, pos, opened = book
    n2, ibar2, pos2, opened2 = book2
    np.testing.assert_array_equal(n2, n)
    np.testing.assert_array_equal(pos2, pos)
    np.testing.assert_array_equal(opened2, opened)
    assert ibar2.dtype == ibar.dtype
    np.testing.assert_allclose(ibar2, ibar, rtol=1e-5 if dtype == np.float32 else 1e-12)
    if policy == "dla":  # merges happened, and heads differ
        assert (n.sum(-1) == pos[:, None]).all() and len(set(opened[0].tolist())) > 1


UNSCORED = {"single": {"policy": "single"}, "fenwick": {"policy": "fenwick"},
            "fixed-oldest": {"policy": "fixed", "merge": "oldest"}}


@pytest.mark.parametrize("impl", [scan.scan_numpy, pytest.param(scan._compiled, marks=needs_compiled)],
                         ids=["numpy", "compiled"])
@pytest.mark.parametrize("overrides", UNSCORED.values(), ids=UNSCORED.keys())
def test_a_scan_that_reads_no_score_decides_without_the_data(overrides, impl):
    """Where no decision reads a score (`DLAConfig.scored`), no score enters ibar, which stays 0 even for keys,
    values and decays of NaN (a carried state would make every score NaN); the decisions are those of finite
    data, and of no data at all (None, which the chunk paths pass so as not to copy it to the host)."""
    config = config_for(**overrides)
    assert not config.scored and config_for("dla").scored and config_for("fixed", merge="density").scored
    x = make_inputs(config, 2, 40, 3, 5, 7, seed=3)
    state, tail = prefix_state(config, x, 10)
    active = np.ones((2, 30), bool)
    active[1, 4:9] = False
    nan = {name: None if a is None else np.full_like(a, np.nan) for name, a in tail.items()}
    (sigma, book), = scans(config, tail, state, active, np.float64, impls=(impl,))
    (sigma2, book2), = scans(config, nan, state, active, np.float64, impls=(impl,))
    (sigma3, book3), = scans(config, dict.fromkeys(tail), state, active, np.float64, impls=(impl,))
    for other, other_book in ((sigma2, book2), (sigma3, book3)):
        np.testing.assert_array_equal(other, sigma)
        for a, b in zip(book, other_book):
            np.testing.assert_array_equal(a, b)
    assert not book[1].any()  # ibar


@needs_compiled
def test_compiled_scan_refuses_a_full_fenwick_cache():
    config = config_for("fenwick", capacity=3)
    x = make_inputs(config, 1, 9, 2, 4, 4, seed=0)
    state, tail = prefix_state(config, x, 1)
    for impl in (scan.scan_numpy, scan._compiled):
        with pytest.raises(ValueError, match="capacity=3 levels holds at most 4 tokens; position 4 needs"):
            scans(config, tail, state, np.ones((1, 8), bool), np.float64, impls=[impl])
