"""Spans of proxied requests, exported over OTLP/HTTP: settings (pure), sampling (pure), span
records and their encoding (pure), and the tracer with its exporter task (trio)."""
