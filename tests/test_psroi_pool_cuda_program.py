"""tests/cuda: the standalone program that runs the PSRoIPool CUDA launchers and compares
them with the CPU path of the shared header (no TensorFlow). It must build wherever nvcc
is (CI sets RFCN_TF_CUDA=1: nvcc must be there); it passes on a GPU, and without one it
must say so and exit 2 rather than crash."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_listed() -> bool:
    """Whether nvidia-smi lists a GPU (independent of the program under test)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60,
                             check=False)
    return listing.returncode == 0 and "GPU" in listing.stdout


def test_cuda_program_builds_and_runs(tmp_path):
    if shutil.which("nvcc") is None:
        if os.environ.get("RFCN_TF_CUDA") == "1":
            pytest.fail("RFCN_TF_CUDA=1 but nvcc is not on PATH")
        pytest.skip("nvcc not on PATH")
    program = tmp_path / "psroi_pool_cuda_test"
    # One architecture is enough to check that it builds (all five take ~5x longer).
    build = subprocess.run(["make", "-C", os.path.join(REPO, "tests", "cuda"), f"OUT={program}",
                            "CUDA_ARCHS=75"], capture_output=True, text=True, timeout=600,
                           check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=600,
                         check=False)
    last = (run.stdout.strip().splitlines() or [""])[-1]
    if _gpu_listed():
        assert run.returncode == 0 and last == "PASS", run.stdout[-3000:] + run.stderr[-3000:]
    else:
        assert (run.returncode, last) == (2, "FAIL: no usable CUDA device"), (
            run.returncode, run.stdout[-3000:], run.stderr[-3000:])
