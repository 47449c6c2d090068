"""Settings: command-line options, then environment (BQX_*, libpq PG*), then defaults.

Which database, in this order (docs/configuration.md): ``BQX_DATABASE_URL`` (or a URL given
by the caller), ``BQX_DATABASE_URL_FILE``, ``BQX_DATABASE_SECRET`` (with ``BQX_DATABASE_IAM``
for RDS IAM tokens), libpq's ``PG*`` variables, the embedded server. Two of the first three
at once is an error, never a silent choice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# libpq variables that, when set, mean "use that server" instead of the embedded one.
PG_ENV_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")
# the settings that name a database with its credentials, by precedence: at most one is given
CREDENTIAL_SETTINGS = {
    "database_url": "BQX_DATABASE_URL",
    "database_url_file": "BQX_DATABASE_URL_FILE",
    "database_secret": "BQX_DATABASE_SECRET",
}


class Settings(BaseSettings):
    """Where bqx keeps its data and which database it talks to."""

    model_config = SettingsConfigDict(env_prefix="BQX_", extra="ignore")

    # A URL carries a password, so it is kept secret: repr() and logs never show it.
    database_url: SecretStr | None = None
    schema_name: str = Field(
        default="bqx", validation_alias=AliasChoices("schema_name", "BQX_SCHEMA")
    )
    home: Path = Path("~/.local/share/bqx")
    # a file holding the URL (a mounted container secret), read at each connection
    database_url_file: Path | None = None
    # an AWS Secrets Manager secret (name or ARN) holding the RDS JSON or a URL
    database_secret: str | None = None
    # authenticate with a fresh RDS IAM token per connection instead of a password
    database_iam: bool = False

    @field_validator("database_url_file", "database_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    def credential_settings(self) -> list[str]:
        """The environment names of the credential settings given (at most one is valid)."""
        return [env for key, env in CREDENTIAL_SETTINGS.items() if getattr(self, key) is not None]

    def check_credentials(self) -> None:
        """One BqxError when the credential settings contradict each other."""
        from bqx.errors import BqxError

        given = self.credential_settings()
        if len(given) > 1:
            both = f"{given[0]} and {given[1]} are both" if len(given) == 2 else (
                f"{', '.join(given[:-1])} and {given[-1]} are all"
            )  # fmt: skip
            raise BqxError(
                f"{both} set: give only one of them (the order in which bqx looks for"
                " credentials is in docs/configuration.md)"
            )
        if self.database_iam and not given:
            raise BqxError(
                "BQX_DATABASE_IAM is set but no database is named: set BQX_DATABASE_URL,"
                " BQX_DATABASE_URL_FILE or BQX_DATABASE_SECRET to one that names host, port,"
                " user and database, without a password"
            )

    def uses_libpq_env(self) -> bool:
        """True when no URL is given but libpq's own PG* variables name a server."""
        return not self.credential_settings() and any(os.environ.get(v) for v in PG_ENV_VARS)

    def uses_embedded(self) -> bool:
        return not self.credential_settings() and not self.uses_libpq_env()


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with explicit (non-None) overrides from the command line
    or a Python caller; a database given so (a URL, a URL file or a secret) replaces the
    environment's, two given at once are an error."""
    from pydantic import ValidationError

    from bqx.errors import BqxError

    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(values.get("database_url"), str):
        values["database_url"] = SecretStr(values["database_url"])
    if values.keys() & CREDENTIAL_SETTINGS:  # what the caller gives wins over the environment
        for name in CREDENTIAL_SETTINGS:
            values.setdefault(name, None)
    try:
        settings = Settings(**values)
    except ValidationError as exc:  # one line naming the setting, never its value
        err = exc.errors()[0]
        name = "BQX_" + "_".join(str(p) for p in err["loc"]).upper()
        raise BqxError(f"invalid setting {name}: {err['msg']}") from None
    settings.check_credentials()
    return settings
