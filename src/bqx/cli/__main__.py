"""``python -m bqx.cli``: the same as the ``bqx`` command."""

from bqx.cli import main

if __name__ == "__main__":
    main()
