"""Entry point of a local worker process: ``python -m bqx._worker`` with its arguments pickled
on stdin by ``bqx.pipeline.executors.local.LocalExecutor``.

Signals are set up before anything heavy is imported: Ctrl-C is the parent's to handle (a
worker still importing numpy must not print a ``KeyboardInterrupt`` traceback), and the
worker dies with its parent, whenever that happens.
"""

import os
import signal
import sys

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before we asked to die with it
        sys.exit(1)

    import logging
    import pickle

    # a database lost mid-COPY makes psycopg log "error ignored terminating Copy" on its way
    # out; the parent reports the lost database in one line, so the worker stays quiet
    logging.getLogger("psycopg").addHandler(logging.NullHandler())

    from bqx.pipeline.executors.local import worker_main

    worker_main(*pickle.loads(sys.stdin.buffer.read()))
