"""Argument types of the `numlm` command: a bad number is refused before anything runs. Its own module
so that the subcommand modules (cli.inference, ...) take them without importing the package's main."""
import argparse
import math


def count(minimum=1):
    """An integer >= minimum."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return v
    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(low=0.0, high=math.inf, low_open=True, high_open=True):
    """A finite float in the interval (low, high), ends open or closed."""
    want = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text):
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number in {want}, got {text!r}")
        return v
    parse.__name__ = f"number in {want}"
    return parse


positive = number()


def path(text):
    """A file or folder path: an empty one (an unset variable) is refused, not taken for the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder (. for the current folder)")
    return text
