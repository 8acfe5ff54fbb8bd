"""Reading a dataset from a local folder, in the layout its authors publish: errors that name the
file, and one policy for a bad file shared by every method's loaders.

Nothing is downloaded. A loader checks the folder it is given (`dataset_dir`), reads each
recording / image / annotation through `load_each`, and raises `DataFileError` (the file and what
is wrong with it) for a file it cannot use. The ``--bad-files`` option (`BAD_FILES`) decides what
happens then:

* ``stop`` (the default): the run stops with ``error: <file>: <problem>`` and a hint to skip it.
  Loaders that cache their preprocessing (rPPG) keep what was already cached, so the rerun does not
  redo it.
* ``skip``: a one-line warning names the file, it is left out, the rest is kept. A run where every
  file is bad still stops.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar

BAD_FILES = ("stop", "skip")
BAD_FILES_HELP = (
    "what a dataset file that cannot be used does (a missing ground truth, a corrupt frame, a label "
    "outside the class list): 'stop' the run naming the file, or 'skip' it with a warning"
)

T = TypeVar("T")
R = TypeVar("R")


class DataFileError(ValueError):
    """A dataset file that cannot be used: ``str(e)`` is ``"<path>: <problem>"``."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def dataset_dir(path, flag: str, name: str, expect: Sequence[str] = (), see: Optional[str] = None) -> Path:
    """`path` as a `Path` after checking it is a folder holding every entry of `expect` (relative
    paths); the error names the flag, the dataset and, with `see`, where its layout is described."""
    hint = f" (the expected layout is in {see})" if see else ""
    if path is None or str(path) == "":
        raise ValueError(f"{flag}: no folder given for {name}{hint}")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p}: no such folder{hint}")
    if not p.is_dir():
        raise NotADirectoryError(f"{flag} {p}: not a folder{hint}")
    missing = [e for e in expect if not (p / e).exists()]
    if missing:
        raise FileNotFoundError(f"{flag} {p} is not a {name} folder: it has no {', '.join(missing)}{hint}")
    return p


def load_each(
    items: Iterable[T],
    load_one: Callable[[T], R],
    *,
    bad_files: str = "stop",
    what: str = "file",
    warn: Optional[Callable[[str], None]] = None,
) -> Tuple[List[Tuple[T, R]], List[DataFileError]]:
    """``load_one`` on every item, in order. Returns ``([(item, result), ...], skipped errors)``.

    A `DataFileError` from ``load_one`` stops the loop (``bad_files='stop'``; the error is raised
    again with a hint to skip it) or is reported through `warn` and skipped (``'skip'``). Any other
    exception is a bug and propagates as is. When every item was skipped, nothing usable is left and
    a ValueError says so.
    """
    if bad_files not in BAD_FILES:
        raise ValueError(f"--bad-files must be one of {', '.join(BAD_FILES)}, got {bad_files!r}")
    warn = warn or (lambda m: print(m, file=sys.stderr))
    good: List[Tuple[T, R]] = []
    skipped: List[DataFileError] = []
    n = 0
    for item in items:
        n += 1
        try:
            good.append((item, load_one(item)))
        except DataFileError as e:
            if bad_files == "stop":
                raise DataFileError(e.path, f"{e.problem} (--bad-files skip leaves this {what} out)") from e
            skipped.append(e)
            warn(f"warning: skipping {what} {e}")
    if n and not good:
        raise ValueError(f"every {what} was skipped as unusable ({n}); the first: {skipped[0]}")
    return good, skipped
