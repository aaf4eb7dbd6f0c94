"""The TLS context the daemon's httpx clients share when they verify against the public CA
bundle (the registry's client, the health probes).

httpx builds a new ``SSLContext`` for every client made without ``verify=`` and loads the whole
bundle into it: about 0.9 MB of OpenSSL memory per client, kept as long as the client lives
(a daemon keeps one registry client and one prober per health-checked service). One context,
made on first use, verifies the same way: httpx's own default, with ``trust_env=False`` as those
clients are made (no ``SSL_CERT_FILE`` from the environment).
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def public_bundle_context() -> ssl.SSLContext:
    return httpx.create_ssl_context(trust_env=False)
