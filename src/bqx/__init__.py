"""bqx: backward-looking BQX metrics for forex minute bars, backfilled into PostgreSQL."""

__version__ = "0.1.0"
