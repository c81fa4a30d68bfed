"""The ``recsys`` command line and the demo: the only code that imports every layer.

Layers, bottom to top: the core (``recsys`` outside this package) <- ``pipelines`` <- ``models``
<- ``bentos`` <- ``recsys.cli``. Nothing below imports this package (an import-linter contract).
"""

from recsys.cli.main import app

__all__ = ["app"]
