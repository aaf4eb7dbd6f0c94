"""The embedded, Consul-compatible registry (``meshd registry serve``): HTTP API, state,
persistence, checks."""
