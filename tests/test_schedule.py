import math

import pytest

from adapterkit import ConfigError
from adapterkit.train import lr_factor

CASES = [
    # step, total, warmup, schedule, min_factor, expected
    (0, 10, 2, "cosine", 0.0, 0.5),
    (1, 10, 2, "cosine", 0.0, 1.0),
    (2, 10, 2, "cosine", 0.0, 1.0),             # first decay step: still the peak
    (9, 10, 2, "cosine", 0.0, 0.0),             # last step reaches min_factor
    (9, 10, 2, "cosine", 0.1, 0.1),
    (5, 10, 0, "linear", 0.0, 1 - 5 / 9),
    (5, 11, 1, "cosine", 0.0, 0.5 * (1 + math.cos(math.pi * 4 / 9))),
    (7, 10, 3, "constant", 0.0, 1.0),
    (0, 1, 0, "cosine", 0.0, 0.0),              # a single step decays at once: progress 1
    (50, 10, 2, "linear", 0.0, 0.0),            # past the end: clamped
]


@pytest.mark.parametrize("step,total,warmup,schedule,min_factor,expected", CASES)
def test_lr_factor(step, total, warmup, schedule, min_factor, expected):
    assert lr_factor(step, total, warmup, schedule, min_factor) == pytest.approx(expected)


def test_cosine_is_monotone_after_warmup():
    values = [lr_factor(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[0] == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="step"), "unknown schedule 'step'"),
    (dict(total_steps=0), "need total_steps >= 1"),
    (dict(warmup_steps=20), "0 <= warmup_steps <= total_steps, got 10 and 20"),
    (dict(min_factor=2.0), r"min_factor must be in \[0, 1\], got 2.0"),
])
def test_bad_schedules(kwargs, match):
    args = dict(step=0, total_steps=10, warmup_steps=0, schedule="cosine", min_factor=0.0) | kwargs
    with pytest.raises(ConfigError, match=match):
        lr_factor(**args)
