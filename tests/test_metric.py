"""Tests of the pure epsilon metric against a slow, loop-based oracle.

The oracle follows the definition step by step. It flattens each run's output to
float64, min-max normalises it and turns exact zeros into NaN. Epsilon is then the mean
absolute difference over the indices defined in both runs, divided by the mean of every
defined value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxeps import epsilon


def oracle_epsilon(output_1, output_2) -> float | None:
    """Return epsilon computed with plain Python loops, or None when it is undefined."""
    runs = []
    for output in (output_1, output_2):
        values = [float(x) for x in np.asarray(output).flat]
        runs.append(values)
    if len(runs[0]) != len(runs[1]):
        raise ValueError("sizes differ")

    normalised_runs = []
    for values in runs:
        if not values:
            return None
        for x in values:
            if not math.isfinite(x):
                return None
        low = values[0]
        high = values[0]
        for x in values:
            low = min(low, x)
            high = max(high, x)
        if high == low:
            return None
        span = high - low
        # A span beyond the float64 range cannot normalise, so the score is undefined.
        if not math.isfinite(span):
            return None
        normalised = []
        for x in values:
            p = (x - low) / span
            normalised.append(None if p == 0.0 else p)
        normalised_runs.append(normalised)

    p_1, p_2 = normalised_runs
    difference_total = 0.0
    pair_count = 0
    for a, b in zip(p_1, p_2):
        if a is not None and b is not None:
            difference_total += abs(a - b)
            pair_count += 1
    if pair_count == 0:
        return None
    value_total = 0.0
    value_count = 0
    for p in p_1 + p_2:
        if p is not None:
            value_total += p
            value_count += 1
    return (difference_total / pair_count) / (value_total / value_count)


def assert_matches_oracle(output_1, output_2) -> None:
    expected = oracle_epsilon(output_1, output_2)
    result = epsilon(output_1, output_2)
    if expected is None:
        assert math.isnan(result.value)
        assert result.reason is not None
        assert not result.defined
    else:
        assert result.reason is None
        assert result.defined
        assert math.isclose(result.value, expected, rel_tol=1e-9, abs_tol=1e-12)


def _pair_of_arrays(dtype, elements):
    """Two arrays of one dtype with the same number of elements, shapes may differ."""
    return st.integers(min_value=1, max_value=64).flatmap(
        lambda size: st.tuples(
            hnp.arrays(dtype, size, elements=elements),
            hnp.arrays(dtype, size, elements=elements),
        )
    )


_FINITE_64 = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)
# Every finite float32 value, subnormals included. A float32 range cannot overflow
# float64.
_FINITE_32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
# A small set of values makes ties, shared minima and constant runs common.
_FEW_VALUES = st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
_ANY_64 = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=150, deadline=None)
@given(_pair_of_arrays(np.float64, _FINITE_64))
def test_epsilon_matches_oracle_float64(pair):
    assert_matches_oracle(*pair)


@settings(max_examples=150, deadline=None)
@given(_pair_of_arrays(np.float32, _FINITE_32))
def test_epsilon_matches_oracle_float32(pair):
    assert_matches_oracle(*pair)


@settings(max_examples=100, deadline=None)
@given(_pair_of_arrays(np.float64, _FEW_VALUES))
def test_epsilon_matches_oracle_with_ties(pair):
    assert_matches_oracle(*pair)


@settings(max_examples=60, deadline=None)
@given(_pair_of_arrays(np.float64, _ANY_64))
def test_epsilon_matches_oracle_special_values(pair):
    assert_matches_oracle(*pair)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
        elements=_FINITE_32,
    ),
    st.randoms(use_true_random=False),
)
def test_epsilon_flattens_any_shape(output_1, random):
    output_2 = np.array(
        [random.uniform(-1.0, 1.0) for _ in range(output_1.size)], dtype=np.float32
    )
    reshaped = output_2.reshape(output_1.shape)
    flat = epsilon(output_1.ravel(), output_2)
    shaped = epsilon(output_1, reshaped)
    assert flat.reason == shaped.reason
    assert flat.value == shaped.value or (
        math.isnan(flat.value) and math.isnan(shaped.value)
    )
    assert_matches_oracle(output_1, reshaped)


def test_epsilon_known_value():
    # p_1 = [nan, 0.5, 1], p_2 = [nan, 1, 0.5]: MAE = 0.5, mean = 0.75.
    result = epsilon(np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 1.0]))
    assert result.defined
    assert result.value == pytest.approx(0.5 / 0.75, rel=1e-15)


def test_epsilon_identical_runs_zero():
    output = np.linspace(-3.0, 5.0, 17)
    result = epsilon(output, output)
    assert result.defined
    assert result.value == 0.0


def test_epsilon_scale_and_shift_invariant():
    rng = np.random.default_rng(3)
    output_1 = rng.standard_normal(50)
    output_2 = rng.standard_normal(50)
    base = epsilon(output_1, output_2).value
    moved = epsilon(output_1 * 1e-6 + 7.0, output_2 * 42.0 - 3.0).value
    assert moved == pytest.approx(base, rel=1e-9)


def test_epsilon_constant_first_run():
    result = epsilon(np.full(8, 1.5), np.arange(8.0))
    assert math.isnan(result.value)
    assert not result.defined
    assert result.reason == "run 1 output is constant (1.5)"


def test_epsilon_constant_second_run():
    result = epsilon(np.arange(8.0), np.zeros(8, dtype=np.float32))
    assert math.isnan(result.value)
    assert result.reason == "run 2 output is constant (0.0)"


def test_epsilon_constant_reason_plain_number():
    # numpy 2 scalars print as np.float64(...), but the reason must show the number.
    result = epsilon(np.full(4, 1.6e-6, dtype=np.float32), np.arange(4.0))
    assert "np." not in result.reason
    assert result.reason.startswith("run 1 output is constant (1.6")


def test_epsilon_exact_zeros_dropped():
    # Run 1's minimum sits at index 0 and run 2's at index 3, so only 1 and 2 remain:
    # p_1 = [nan, 1/3, 2/3, 1], p_2 = [1, 2/3, 1/3, nan].
    result = epsilon(np.array([0.0, 1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0, 0.0]))
    mae = (abs(1 / 3 - 2 / 3) + abs(2 / 3 - 1 / 3)) / 2
    mean = (1 / 3 + 2 / 3 + 1 + 1 + 2 / 3 + 1 / 3) / 6
    assert result.defined
    assert result.value == pytest.approx(mae / mean, rel=1e-12)


def test_epsilon_zero_in_input_not_dropped():
    # An output value of 0 is not an exact zero after normalisation unless it is the
    # minimum: p_1 = [nan, 0.5, 1] keeps the middle element.
    result = epsilon(np.array([-1.0, 0.0, 1.0]), np.array([-1.0, 0.0, 1.0]))
    assert result.defined
    assert result.value == 0.0


def test_epsilon_tied_minima_all_dropped():
    # Both runs have two minima, so every index is NaN in one run or the other.
    result = epsilon(np.array([0.0, 0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0, 0.0]))
    assert math.isnan(result.value)
    assert result.reason == "no output element is defined in both normalised runs"


def test_epsilon_tied_maxima_defined():
    output_1 = np.array([0.0, 2.0, 2.0, 1.0])
    output_2 = np.array([0.0, 2.0, 2.0, 2.0])
    assert epsilon(output_1, output_2).defined
    assert_matches_oracle(output_1, output_2)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_epsilon_non_finite_first_run(bad):
    output = np.array([0.0, 1.0, bad, 2.0])
    result = epsilon(output, np.arange(4.0))
    assert math.isnan(result.value)
    assert result.reason == "run 1 output has 1 non-finite values"


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_epsilon_non_finite_second_run(bad):
    output = np.array([bad, 1.0, bad, 2.0], dtype=np.float32)
    result = epsilon(np.arange(4.0), output)
    assert math.isnan(result.value)
    assert result.reason == "run 2 output has 2 non-finite values"


def test_epsilon_range_overflow_undefined():
    result = epsilon(np.array([-1e308, 1e308, 0.0]), np.arange(3.0))
    assert math.isnan(result.value)
    assert result.reason == "run 1 output range overflows float64"


def test_epsilon_single_sample_undefined():
    result = epsilon(np.array([0.25]), np.array([4.0]))
    assert math.isnan(result.value)
    assert result.reason == "run 1 output is constant (0.25)"


def test_epsilon_two_samples_same_order():
    result = epsilon(np.array([1.0, 2.0]), np.array([-5.0, 5.0]))
    assert result.defined
    assert result.value == 0.0


def test_epsilon_two_samples_opposite_order():
    result = epsilon(np.array([1.0, 2.0]), np.array([5.0, -5.0]))
    assert math.isnan(result.value)
    assert result.reason == "no output element is defined in both normalised runs"


def test_epsilon_empty_undefined():
    result = epsilon(np.array([], dtype=np.float32), np.array([], dtype=np.float32))
    assert math.isnan(result.value)
    assert result.reason == "run 1 output is empty"


def test_epsilon_size_mismatch_raises():
    with pytest.raises(ValueError, match=r"differ in size \(3 and 4 elements\)"):
        epsilon(np.arange(3.0), np.arange(4.0))


def test_epsilon_size_mismatch_empty_raises():
    with pytest.raises(ValueError, match=r"\(0 and 2 elements\)"):
        epsilon(np.array([]), np.arange(2.0))


def test_epsilon_inputs_not_modified():
    output_1 = np.array([0.0, 3.0, 1.0])
    output_2 = np.array([2.0, 0.0, 1.0])
    epsilon(output_1, output_2)
    assert output_1.tolist() == [0.0, 3.0, 1.0]
    assert output_2.tolist() == [2.0, 0.0, 1.0]


def test_epsilon_accumulates_in_float64():
    # In float32, 1 + 1e-8 rounds to 1, but float64 keeps the two values apart.
    output_1 = np.array([1.0, 1.0 + 1e-8, 1.0 + 2e-8])
    result = epsilon(output_1, np.array([0.0, 1.0, 2.0]))
    assert result.defined
    assert result.value == pytest.approx(0.0, abs=1e-6)
