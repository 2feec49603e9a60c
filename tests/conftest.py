import os
import sys

# Before anything imports numba: CUDA kernels, where any, run in numba's CUDA simulator, which reads the
# variable once, at import.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# Few threads per block, so the kernels' tiny test inputs cross block boundaries (cuda_sample.TPB).
os.environ.setdefault("DPM_CUDA_TPB", "16")
# The simulator runs each GPU thread as a Python thread while its launcher polls them, holding the GIL up to
# the switch interval each time: 1 ms instead of CPython's 5 ms took the simulator's tests in test_bench.py and
# test_cuda_image_train.py from 84–88 s to 52–64 s on the 2-core machine (the tests' results are the same).
sys.setswitchinterval(1e-3)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# JIT compiles blow Hypothesis's 200 ms deadline on first calls; CI is derandomised.
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# ---------------------------------------------------------------- helpers the test modules share
# (import them with `from conftest import ...`)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# T = 40 (the default is 80): these runs test behaviour, not the default model, and T sets the evaluations' cost
FAST = ["--T", "40", "--heldout", "1000", "--draws", "1", "--eval-every", "50"]


def run_train(tmp_path, *args, out="run"):
    """train.py with small evaluations, writing to tmp_path/out; returns the exit status."""
    import cli
    import train
    return cli.cli(train.main, "train.py", ["--out", str(tmp_path / out), *FAST, *args])


def run_sample(*args):
    import cli
    import sample
    return cli.cli(sample.main, "sample.py", [str(a) for a in args])


def one_error_line(capsys):
    """The captured stderr, checked to be one line and no traceback."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 30-step Swiss-roll run (checkpoint and metrics), for the tests that only need some valid run."""
    d = tmp_path_factory.mktemp("tiny")
    assert run_train(d, "--steps", "30") == 0
    return d / "run"
