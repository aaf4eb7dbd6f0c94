"""The host side of identity: certificates and keys, SPIFFE IDs, the CA client, renewal, TLS
contexts."""
