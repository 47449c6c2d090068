"""Optional parts of bqx and the extras that install them.

``pip install bqx-metrics`` holds what backfill, update, status, verify, report, export, ingest,
generate and the embedded server need. Four features need more, each through an extra of
pyproject.toml: the Dask executor (``dask``), the ML baseline (``ml``), the Prometheus
server of ``bqx update --follow --metrics-port`` (``service``) and Delta Lake tables for
``--sink``/``--source`` (``lake``); ``all`` is the four.

Those packages are imported through :func:`require` only, so that a missing one is one line
naming the extra and the command that installs it, never a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from bqx.errors import MissingExtra

DISTRIBUTION = "bqx-metrics"  # the name on PyPI (``bqx`` there is another project)


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``, quoted for a shell."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def require(extra: str, module: str, feature: str) -> ModuleType:
    """Import and return ``module``, a package of the extra ``extra`` that ``feature`` needs.

    When it cannot be imported: :class:`~bqx.errors.MissingExtra` (a ``BqxError``, so the CLI
    prints it as one ``error:`` line and exits 1), e.g. ``the Dask executor needs the "dask"
    extra: pip install 'bqx-metrics[dask]'``. The ImportError is kept as its cause.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f'{feature} needs the "{extra}" extra: {install_command(extra)}',
            extra=extra,
            module=module,
        ) from exc
