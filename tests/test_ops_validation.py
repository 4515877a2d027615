"""The number validators of cdgfast/_validation.py that every op uses: a ValueError naming the argument."""
import math

import numpy as np
import pytest
import torch

from cdgfast._validation import (check_callable, check_generator, check_nonnegative, check_positive,
                                 check_probability, check_real)


def _bad(fn, value, name="arg"):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        fn(name, value)


def test_numbers_are_accepted_as_floats():
    assert check_real("a", -3) == -3.0 and isinstance(check_real("a", 2), float)
    assert check_real("a", np.float32(0.5)) == 0.5
    assert check_real("a", math.inf, finite=False) == math.inf
    assert check_positive("a", 1e-300) == 1e-300 and check_positive("a", math.inf) == math.inf
    assert check_nonnegative("a", 0) == 0.0 and check_nonnegative("a", 2.5) == 2.5
    assert check_probability("a", 0) == 0.0 and check_probability("a", 1) == 1.0


@pytest.mark.parametrize("value", [True, False, np.bool_(True), "1", None, [1.0], torch.tensor(1.0), math.nan, 1j])
def test_non_numbers_bool_and_nan_are_refused_by_every_check(value):
    for fn in (check_real, check_positive, check_nonnegative, check_probability):
        _bad(fn, value)


def test_ranges_and_finiteness():
    for v in (0, -1e-12, -math.inf):
        _bad(check_positive, v)
    _bad(lambda n, v: check_positive(n, v, finite=True), math.inf)
    for v in (-1e-12, math.inf, -math.inf):
        _bad(check_nonnegative, v)
    assert check_nonnegative("a", math.inf, finite=False) == math.inf
    for v in (math.inf, -math.inf):
        _bad(check_real, v)
    for v in (-1e-12, 1.0000001, math.inf):
        _bad(check_probability, v)


def test_callable_and_generator():
    assert check_callable("fn", len) is len
    _bad(check_callable, 3, "fn")
    g = torch.Generator()
    assert check_generator("generator", g) is g and check_generator("generator", None) is None
    _bad(check_generator, 0, "generator")
