import os
import sys

# Before anything imports numba (numba reads these at import): CUDA kernels, where any, run in the simulator.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# Few threads per block, so the kernels' tiny test inputs cross block boundaries (cuda_sample.TPB).
os.environ.setdefault("DPM_CUDA_TPB", "16")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import HealthCheck, settings  # noqa: E402

# JIT compiles blow Hypothesis's 200 ms deadline on first calls; CI is derandomised.
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# ---------------------------------------------------------------- helpers that several test modules use

def run_sample(*args):
    """sample.py's main through train.cli, as on the command line; returns the exit status."""
    import sample
    import train
    return train.cli(sample.main, "sample.py", [str(a) for a in args])


def one_error_line(capsys):
    """The captured stderr, checked to be one line and no traceback."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err
