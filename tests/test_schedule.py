import math

import pytest

from compressor.schedule import cubic, dynamic, get_schedule, stability


def test_dynamic_matches_thesis_formula():
    assert dynamic(0.05, 0.3, 0.1, 0.2, 0.7) == 0.0
    assert dynamic(0.1, 0.3, 0.1, 0.2, 0.7) == 0.0
    # Python float64 scalars and libm's exp, no vector sums: ~1e-16 apart on any CPU, far below approx's rel=1e-6.
    assert dynamic(0.3, 0.3, 0.1, 0.2, 0.7) == pytest.approx(0.3 * (1 - math.exp(-1)))
    assert dynamic(0.7, 0.3, 0.1, 0.2, 0.7) == 0.3  # snapped exactly at final
    assert dynamic(0.95, 0.3, 0.1, 0.2, 0.7) == 0.3


def test_cubic_ramp():
    assert cubic(0.1, 0.5, 0.1, 0.2, 0.6) == 0.0
    assert cubic(0.35, 0.5, 0.1, 0.2, 0.6) == pytest.approx(0.5 * (1 - 0.5**3))  # float64: 1e-16 apart, rel=1e-6
    assert cubic(0.6, 0.5, 0.1, 0.2, 0.6) == 0.5


def test_stability_factor():
    assert stability([2.0, 2.0, 2.0], 1.0) == 1.0
    losses = [1.0, 3.0]  # mean 2, population std 1
    assert stability(losses, 1.0) == pytest.approx(1 / (1 + 0.5))  # float64 mean/pstdev of 2 values: ~1e-16, rel=1e-6
    assert stability(losses, 0.0) == 1.0


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match="dynamic, cubic"):
        get_schedule("linear")
