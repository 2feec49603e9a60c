"""What the scripts share on the command line: one-line errors, bounded flags, atomic output files, an
output stream that survives a closed pipe, and Ctrl-C / SIGTERM as a clean stop."""
import argparse
import errno
import json
import math
import os
import signal
import sys

import ckpt


class UsageError(Exception):
    """Bad input: one line on stderr and exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):              # one line, exit 2, instead of usage + message
        raise UsageError(message)


def positive(kind, most=None):
    """An argparse type: a finite number > 0 of the given kind, at most `most` (sizes that cannot fit in
    memory are refused before any work starts)."""
    def check(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        if most is not None and v > most:
            raise argparse.ArgumentTypeError(f"at most {most:,} is accepted, got {text}")
        return v
    return check


def seed(text):
    """An argparse type: a seed for NumPy's generators, an integer in [0, 2⁶⁴)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^64), got {text}")
    return v


def write_text(path, text):
    """path's content becomes text (or bytes), atomically (ckpt.write_atomic)."""
    ckpt.write_atomic(path, lambda f: f.write(text if isinstance(text, bytes) else text.encode("utf-8")))


def strict_json(value):
    """value as strict JSON: every non-finite float becomes null (json.dumps would write NaN or Infinity)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), indent=1, allow_nan=False)


class _Stdout:
    """sys.stdout, except that a closed reader (`| head -1`) costs nothing: the first failed write sends the
    rest of the output to /dev/null instead of raising, so a run never dies of its progress lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EINVAL, errno.EBADF):
                raise
            self._detach()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError:
            self._detach()

    def _detach(self):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self.stream.fileno())
        except (OSError, ValueError):
            pass
        os.close(null)
        self.stream = open(os.devnull, "w")

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Stop(Exception):
    """Ctrl-C (SIGINT) or SIGTERM arrived; .code is the exit status they ask for (130, 143)."""

    def __init__(self, code):
        super().__init__("interrupted")
        self.code = code


def raise_on_signals():
    """From here on Ctrl-C and SIGTERM raise Stop (at the next Python bytecode)."""
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        signal.signal(sig, lambda *_, code=code: (_ for _ in ()).throw(Stop(code)))


def cli(main, name, argv=None):
    """Run main; bad input becomes one line on stderr and exit status 2, never a traceback; Ctrl-C or
    SIGTERM outside the places that handle them stop with one line and status 130 or 143."""
    stdout, handlers = sys.stdout, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.stdout = _Stdout(stdout)
    try:
        raise_on_signals()
        return main(argv)
    except (UsageError, ckpt.CheckpointError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except (Stop, KeyboardInterrupt) as e:
        print(f"{name}: interrupted", file=sys.stderr)
        return getattr(e, "code", 130)
    finally:
        sys.stdout = stdout
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
