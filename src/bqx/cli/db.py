"""``bqx db start|stop|status|url``: the embedded PostgreSQL server."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from bqx.cli.app import (
    DatabaseOpt,
    JsonOpt,
    app,
    confirm,
    err_console,
    print_json,
    say,
    store_from,
)

db_app = typer.Typer(help="Manage the embedded PostgreSQL server.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("start")
def db_start(database_url: DatabaseOpt = None) -> None:
    """Start the embedded PostgreSQL (initialising it on first use)."""
    say(store_from(database_url, None).db.start())


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL (read-only commands won't start it again)."""
    say("stopped" if store_from(None, None).db.stop() else "not running")


@db_app.command("status")
def db_status(json_out: JsonOpt = False, database_url: DatabaseOpt = None) -> None:
    """Say which database bqx uses and whether it answers; exit 1 if it doesn't."""
    doc = store_from(database_url, None).db.status()
    if json_out:
        print_json(doc.as_dict())
    else:
        say(doc.text())
        if not doc.reachable:
            err_console.print(f"[bold red]unreachable:[/] {doc.error}", highlight=False,
                              soft_wrap=True)  # fmt: skip
    if not doc.reachable:
        raise typer.Exit(1)


@db_app.command("url")
def db_url(
    show_password: Annotated[
        bool, typer.Option("--show-password", help="Print the password too (for scripts).")
    ] = False,
    database_url: DatabaseOpt = None,
) -> None:
    """Print the database URL in use (password masked unless --show-password).

    The embedded server's URL names its password file instead of carrying the password.
    """
    sys.stdout.write(store_from(database_url, None).db.url(show_password=show_password) + "\n")


@db_app.command("destroy")
def db_destroy(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Destroy without asking.")] = False,
    database_url: DatabaseOpt = None,
) -> None:
    """Stop the embedded PostgreSQL and delete it: every schema, bar, metric and ledger in it.

    Says what it will delete and asks (or give --yes). Refused when a database URL or PG*
    variables name another database: bqx never deletes one it did not create.
    """
    db = store_from(database_url, None).db
    root = db.to_destroy()
    if root is None:
        say("no embedded database under BQX_HOME: nothing to destroy")
        return
    err_console.print(
        f"will stop the embedded PostgreSQL and delete {root} (every schema, bar, metric and"
        " ledger in it)", highlight=False, soft_wrap=True,
    )  # fmt: skip
    confirm(yes, "Destroy it?", "not destroying")
    say(f"destroyed the embedded database: {db.destroy()} deleted")
