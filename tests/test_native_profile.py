"""hw="native": the fit and the profile it produces."""

import numpy as np
import pytest

import lpvit_compiler as lpvit
from lpvit_compiler.costmodel.native import _fit


def test_fit_recovers_intercept_and_slope():
    flops = [1e6, 5e7, 2e8, 9e8]
    seconds = [12e-6 + f / 40e9 for f in flops]
    intercept, slope = _fit(flops, seconds)
    assert intercept == pytest.approx(12e-6, rel=1e-6) and 1 / slope == pytest.approx(40e9, rel=1e-6)


def test_fit_never_returns_a_negative_overhead():
    flops = np.array([1e6, 5e7, 2e8])
    intercept, slope = _fit(list(flops), list(flops / 40e9 - 5e-6))
    assert intercept == 0.0 and slope > 0


def test_native_profile_is_measured_and_usable(model, calib):
    profile = lpvit.get_profile("native")
    assert profile.name == "native" and "measured on this machine" in profile.calibration
    assert 1e8 < profile.peak_flops < 1e13 and 0.05 <= profile.sparse_efficiency <= 2.0
    assert lpvit.get_profile("native") is profile  # measured once per process
    compiled = lpvit.compile(model, hw="native", flops_keep=0.5, calib=calib, progress=False)
    assert compiled.report.hw == "native" and "measured" in compiled.report.hw_profile["calibration"]
