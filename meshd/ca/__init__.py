"""The mesh's certificate authority (the authority only; a host's side is ``meshd.identity``).

Pure: ``issuer`` (signing, cross-signing), ``tokens`` (join-token decisions), ``ledger`` (nodes,
certificates issued, revocations, what depends on a root), ``requests`` (the API's request
bodies). On disk: ``store`` (the CA directory and its locked transactions), ``journal`` (the
certificates issued), ``audit`` (the audit log), ``operations`` (revoke, rotate, offline
issuance). Network: ``server`` and ``server_tls`` (the HTTPS API). The command is
``meshd.cli.ca``.
"""
