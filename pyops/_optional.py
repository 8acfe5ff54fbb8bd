"""Optional dependencies: a missing one is reported with the extra that installs it.

``pyops`` itself needs only torch and numpy. The Hugging Face integration needs the ``hf`` extra,
the research methods of a checkout (``methods/``) the ``methods`` extra, the Flower deployment of
FedGH the ``fl`` extra. Imports of those packages sit in ``with requires(extra):`` blocks, so that
a user without them reads which extra to install instead of a bare ``ModuleNotFoundError``::

    with requires("methods", "fedgh's data sets"):
        from sklearn.datasets import load_digits
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

EXTRAS = {
    "hf": "the Hugging Face integration (transformers, tokenizers, accelerate)",
    "methods": "the research methods' data, training and plots",
    "fl": "the Flower deployment of FedGH",
    "triton": "the Triton kernels",
    "bench": "the benchmarks' anchors",
}


class MissingOptionalDependency(ImportError):
    """An optional package is not installed; the message names the pip extra that installs it."""


@contextlib.contextmanager
def requires(extra: str, feature: Optional[str] = None) -> Iterator[None]:
    """Turns a ``ModuleNotFoundError`` raised inside the block into a `MissingOptionalDependency`
    that names the missing module and the extra ``pip install 'pyops[<extra>]'``."""
    if extra not in EXTRAS:
        raise ValueError(f"requires: unknown extra {extra!r}; one of {sorted(EXTRAS)}")
    try:
        yield
    except ModuleNotFoundError as e:
        what = feature or EXTRAS[extra]
        package = (e.name or "").split(".")[0] or str(e)  # the distribution to install, not a submodule
        raise MissingOptionalDependency(
            f"{what}: the optional package {package!r} is not installed; install the extra with "
            f"pip install 'pyops[{extra}]' (in a checkout: pip install --no-build-isolation -e '.[{extra}]')",
            name=package,
        ) from e
