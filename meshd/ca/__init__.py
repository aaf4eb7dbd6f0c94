"""The mesh's certificate authority and its client.

``issuer`` (pure signing), ``tokens`` (pure join-token decisions), ``spiffe`` (pure ID syntax),
``identity`` (frozen values), ``files`` and ``store`` (disk), ``server`` (HTTPS API), ``client``
(join from a host), ``command`` (``meshd ca ...``).
"""
