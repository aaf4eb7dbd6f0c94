"""``meshd explain``: what a running meshd would do with a request, computed by the proxy's own
pure functions."""
