"""The embedded registry's pure state: records, catalog, agent, KV, sessions, transactions."""
