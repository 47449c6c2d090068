"""Settings: command-line options, then environment (BQX_*, libpq PG*), then defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# libpq variables that, when set, mean "use that server" instead of the embedded one.
PG_ENV_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


class Settings(BaseSettings):
    """Where bqx keeps its data and which database it talks to."""

    model_config = SettingsConfigDict(env_prefix="BQX_", extra="ignore")

    # A URL carries a password, so it is kept secret: repr() and logs never show it.
    database_url: SecretStr | None = None
    schema_name: str = Field(
        default="bqx", validation_alias=AliasChoices("schema_name", "BQX_SCHEMA")
    )
    home: Path = Path("~/.local/share/bqx")

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    def uses_libpq_env(self) -> bool:
        """True when no URL is given but libpq's own PG* variables name a server."""
        return self.database_url is None and any(os.environ.get(v) for v in PG_ENV_VARS)

    def uses_embedded(self) -> bool:
        return self.database_url is None and not self.uses_libpq_env()


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with explicit (non-None) overrides from the command line."""
    from pydantic import ValidationError

    from bqx.errors import BqxError

    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(values.get("database_url"), str):
        values["database_url"] = SecretStr(values["database_url"])
    try:
        return Settings(**values)
    except ValidationError as exc:  # one line naming the setting, never its value
        err = exc.errors()[0]
        name = "BQX_" + "_".join(str(p) for p in err["loc"]).upper()
        raise BqxError(f"invalid setting {name}: {err['msg']}") from None
