"""Worker processes: one meshd host's data plane spread over several processes (``workers``)."""
