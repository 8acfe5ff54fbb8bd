"""Optional dependencies of the methods (see `pyops._optional`): a missing package is reported
with the pip extra that installs it (``methods``, ``hf`` or ``fl``)."""

from pyops._optional import MissingOptionalDependency, requires

__all__ = ["MissingOptionalDependency", "requires"]
