"""What the scripts share on the command line: one-line errors, flag checks and atomic output files."""
import argparse
import math
import os
import sys
import tempfile

import ckpt


class UsageError(Exception):
    """Bad input: one line on stderr and exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):              # one line, exit 2, instead of usage + message
        raise UsageError(message)


def positive(kind):
    """An argparse type: a finite number > 0 of the given kind."""
    def check(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return v
    return check


def write_atomic(path, write):
    """Call write(tmp) on a new, uniquely named file beside path, then rename it over path: readers see the
    old file or the whole new one, and a failed write leaves no temporary file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + "-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text):
    def write(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def cli(main, name, argv=None):
    """Run main; bad input becomes one line on stderr and exit status 2, never a traceback."""
    try:
        return main(argv)
    except (UsageError, ckpt.CheckpointError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
