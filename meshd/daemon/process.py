"""What the ``meshd run`` process arranges for itself before the daemon starts.

httpx's transport (httpcore) imports the ``h2`` library at import time whenever it is
installed, for an HTTP/2 client that meshd never asks httpx for (its registry, CA and tracing
clients speak HTTP/1.1). The proxy loads ``h2`` itself with its first HTTP/2 connection
(``meshd.proxy.core.h2.Session``), so a host whose services and peers speak only HTTP/1.1
would carry it for httpcore alone. ``import_httpcore_without_h2`` imports httpcore once with
``h2`` hidden: httpcore then takes its own "h2 is not installed" path (asking it for HTTP/2
would raise), and the library stays out of the process until the proxy needs it.
"""

from __future__ import annotations

import sys


def import_httpcore_without_h2() -> None:
    """Once per process, before any httpx client is made; nothing to do when httpcore or
    ``h2`` is loaded already."""
    if "httpcore" in sys.modules or "h2.config" in sys.modules:
        return
    sys.modules["h2.config"] = None  # type: ignore[assignment]  # an import of it fails
    try:
        import httpcore  # noqa: F401 - loaded now, without its HTTP/2 classes
    finally:
        del sys.modules["h2.config"]
