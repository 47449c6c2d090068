"""Long-running services: ``follow`` keeps the metrics current and serves Prometheus metrics."""
