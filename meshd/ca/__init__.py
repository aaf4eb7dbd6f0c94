"""The mesh's certificate authority and its client.

Pure: ``issuer`` (signing, cross-signing), ``tokens`` (join-token decisions), ``ledger`` (nodes,
certificates issued, revocations, what depends on a root), ``schedule`` (when a host renews,
retries, warns), ``requests`` (the API's request bodies), ``spiffe`` (ID syntax), ``identity``
(frozen values). On disk: ``files`` (a host's identity directory), ``store`` (the CA directory
and its locked transactions), ``journal`` (the certificates issued), ``audit`` (the audit log),
``operations`` (revoke, rotate, offline issuance). Network: ``server`` and ``server_tls`` (the
HTTPS API), ``client`` and ``access`` (a host's side). ``command``: ``meshd ca ...``.
"""
