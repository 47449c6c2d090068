"""Entry point of a local worker process: ``python -m bqx._worker`` with its arguments pickled
on stdin by ``bqx.backfill.executors.local.LocalExecutor``."""

import pickle
import sys

from bqx.backfill.executors.local import worker_main

if __name__ == "__main__":
    worker_main(*pickle.loads(sys.stdin.buffer.read()))
