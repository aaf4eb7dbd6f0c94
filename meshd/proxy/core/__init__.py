"""The pure cores of the data plane: HTTP/1 framing, routing, balancing, resilience, authorization,
tracing. No trio, no I/O."""
