"""pytest-benchmark suite for the systems curve search (`tokprof curve`): the whole configuration search of one
model, system and workload, which `tokprof compare-systems` repeats once per factor subset.

    pytest benchmarks/test_systems_curve.py --benchmark-autosave

Target: a DeepSeek-R1 curve (~3-4k feasible points over GPU count x TP x MTP x serving mode x batch) well under a
second (median ~0.3 s measured on a shared, loaded 2-core CPU); a Shapley decomposition multiplies it by 2^n for
the n factors that differ.
"""

from __future__ import annotations

import pytest

from tokprof.rollup.curve import Workload, serving_curve
from tokprof.rollup.model_shape import deepseek_r1_shape
from tokprof.rollup.systems import hardware, resolve_system


@pytest.mark.parametrize("system,precision", [("hgx-h200", "fp8"), ("gb300-nvl72", "fp4")])
def test_deepseek_r1_curve(benchmark, system, precision):
    shape, hw = deepseek_r1_shape(), hardware(resolve_system(system))
    curve = benchmark(serving_curve, shape, hw, Workload(1024, 1024), precision)
    assert curve.frontier
