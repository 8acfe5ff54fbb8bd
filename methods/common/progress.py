"""Progress bars: tqdm when installed and enabled, else a plain iterator (same interface)."""

import os
import sys


class _Quiet:
    """Stand-in for a tqdm bar when bars are off: accepts the calls the methods make."""

    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, *a, **k):
        pass

    def set_description(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar over `iterable` (to stderr). Off when `enabled` is False, when PYOPS_NO_PROGRESS
    is set, or when tqdm is missing; then an object with the same methods that prints nothing."""
    if not enabled or os.environ.get("PYOPS_NO_PROGRESS"):
        return _Quiet(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Quiet(iterable)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
