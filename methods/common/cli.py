"""What every method's command line shares beyond its options: one-line errors with a non-zero
exit, and optional plots that never cost a run its results.

``main = cli_main(_main)`` turns the errors a user can cause (a bad value, a missing file or
optional package, a CUDA device this machine lacks, a run folder of another configuration) into
``error: <message>`` on stderr and exit status 2; a bug still shows its traceback. ``Ctrl-C``
ends with status 130 and a note that the run resumes from its last checkpoint.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from .config import ConfigError

# the errors a user's input causes (MissingOptionalDependency is an ImportError), and a run whose
# loss stopped being finite (FloatingPointError: the trainers' divergence check)
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    ImportError,
    ConfigError,
    FloatingPointError,
)


def cli_main(fn: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI's ``main(argv) -> int`` (see the module docstring)."""

    @functools.wraps(fn)
    def main(argv=None) -> int:
        try:
            return fn(argv)
        except USER_ERRORS as e:
            msg = str(e).strip().splitlines()
            print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
            for line in msg[1:]:
                print(f"  {line}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted (a training run resumes from its last checkpoint)", file=sys.stderr)
            return 130

    return main


@contextmanager
def optional_plots(warn: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Plots after the results are written: without matplotlib (or with a broken one) they are
    skipped with a one-line warning instead of failing the command."""
    try:
        yield
    except ImportError as e:
        (warn or (lambda m: print(m, file=sys.stderr)))(f"warning: plots skipped ({e})")


__all__ = ["USER_ERRORS", "cli_main", "optional_plots"]
