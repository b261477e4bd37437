"""Parametrizing a test over the loading methods of :mod:`scalellm.load`: each case carries its
method marker (fp, int8, nf4, fp4), so ``-m nf4`` selects the NF4 cases."""

from __future__ import annotations

import pytest

from scalellm.load import METHODS

#: Compute dtype of the quantized methods in the real-model tier (suites/model): float32, so each
#: figure measures the weight format alone (bf16 activations would add their own rounding; the bf16
#: method shows that).
COMPUTE_DTYPE = "float32"


def method_params(names=tuple(METHODS)) -> list:
    """``pytest.param(name, marks=<method marker>, id=name)`` for each loading method in ``names``."""
    return [pytest.param(n, marks=getattr(pytest.mark, METHODS[n].marker), id=n) for n in names]


METHOD_PARAMS = method_params()
