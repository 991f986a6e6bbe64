"""The tolerance policy itself (tests/numerics.py, docs/numerics.md): its helpers reject what they
should, and the engine comparisons that rely on it hold under other CPU kernels than the native
ones (torch's ATen dispatch, oneDNN and MKL each held to AVX2 or to their portable code)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from numerics import TOL64, U32, assert_close64, assert_within_rounding, fixed_point_bound


def test_float64_rule_rejects_float32_and_gaps_above_the_tolerance():
    a = torch.ones(3, dtype=torch.float64)
    assert_close64(a, a + TOL64 / 2)
    with pytest.raises(AssertionError, match="max"):
        assert_close64(a, a + 2 * TOL64)
    with pytest.raises(AssertionError, match="float64"):
        assert_close64(a.float(), a.float())
    assert_close64(a, a + 2e-8, extra=fixed_point_bound(100))  # a fixed point's rounding is added on top
    with pytest.raises(AssertionError):
        assert_close64(a, a + 2e-8)
    assert_close64(1e3 * a, 1e3 * a + 1e3 * TOL64 / 2)  # relative to the values' size


def test_rounding_rule_scales_with_the_references_own_error():
    ref64 = np.linspace(-1, 1, 11)
    ref32 = ref64 + 1e-5  # the fp32 run's error against float64
    assert_within_rounding(ref32 + 7e-5, ref32, ref64)  # within 8x of it
    with pytest.raises(AssertionError, match="rounding error"):
        assert_within_rounding(ref32 + 9e-5, ref32, ref64)
    with pytest.raises(AssertionError):  # an exact reference: floored at one unit roundoff, not zero
        assert_within_rounding(ref64 + 1e-4, ref64, ref64)
    assert_within_rounding(ref64 + 4 * U32, ref64, ref64)


# what must hold whatever kernels torch runs: float64 engine equality (rule 1), split == unsplit,
# and an fp32 comparison scaled by its own rounding (rule 2)
_UNDER_OTHER_KERNELS = [
    "tests/test_cluster_bodies.py::test_batched_engine_runs_each_clients_cluster_body_as_the_loop",
    "tests/test_cluster_bodies.py::test_the_engine_comparison_catches_a_client_run_through_another_body",
    "tests/test_cluster_bodies.py::test_training_with_secure_per_cluster_bodies_matches_the_plain_ones",
    "tests/test_split.py::test_split_equals_unsplit_forward_and_backward",
]
# (what torch reports, the environment that asks for it): ATen's vector width, and oneDNN's and
# MKL's instruction sets held to the same level
_KERNELS = {
    "DEFAULT": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


@pytest.mark.slow
@pytest.mark.parametrize("kernels", sorted(_KERNELS))
def test_engine_comparisons_hold_under_other_kernels(kernels, tmp_path):
    env = {**os.environ, **_KERNELS[kernels]}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True)
    if probe.stdout.strip() != kernels:
        pytest.skip(f"this CPU does not run torch's {kernels} kernels (got {probe.stdout.strip()})")
    if kernels == torch.backends.cpu.get_cpu_capability():
        pytest.skip(f"{kernels} is what torch runs in this process already: the rest of the suite covers it")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO_ROOT),
                          *_UNDER_OTHER_KERNELS], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
