"""Output directories: refused before any work when they cannot be one, and files replaced
atomically inside them.

Every command that writes files (``report``, ``export``, ``features``, ``baseline``) checks its
directory first, so a bad ``out`` writes nothing; each file is written under a name of its own
beside its final name and renamed into place, so a reader never sees half a file and two
writers into one directory never share a temporary file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bqx.errors import InvalidOption


def check_out_dir(out_dir: Path | str, what: str, *, home: Path | None = None) -> None:
    """Refuse, before any work, an output directory that cannot be one or cannot be written.

    ``what`` names what goes there (for the message); ``home``, when given, is the embedded
    server's ``BQX_HOME``: nothing is written inside it."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise InvalidOption("out", str(out_dir), f"is a file: give a directory for {what}")
    parent = path
    while not parent.exists():  # the nearest existing ancestor must be a writable directory
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidOption("out", str(out_dir), f"{str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidOption("out", str(out_dir), f"{str(parent)!r} is not writable")
    if home is not None and _inside(path, home):
        raise InvalidOption(
            "out", str(out_dir),
            f"is inside BQX_HOME ({home}), the embedded database's own directory: choose"
            " another directory",
        )  # fmt: skip


def _inside(path: Path, home: Path) -> bool:
    real = Path(os.path.realpath(path.expanduser()))
    root = Path(os.path.realpath(Path(home).expanduser()))
    return real == root or root in real.parents


@contextmanager
def replacing(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final``, unique to this writer, renamed onto ``final`` when
    the block ends without an error (and removed when it fails)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # a name no other writer uses (not mkstemp: its 0600 would stay on the final file)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(final: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename onto ``final`` (see ``replacing``)."""
    with replacing(final) as tmp:
        write(tmp)


def write_text_atomic(final: Path, text: str) -> None:
    write_atomic(final, lambda tmp: tmp.write_text(text))
