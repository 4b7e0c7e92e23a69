"""Client API keys: the keys file (TOML, digests only, no secrets) and bearer-token authentication.

A key is stored as the hex SHA-256 of its bearer token. Authentication hashes the presented token once and compares
it with every stored digest using `hmac.compare_digest`, so the time taken does not depend on how many leading
characters matched. With authentication off (an explicit `GATEWAY_AUTH=off`), every caller is the anonymous key,
allowed every route and allowed to force variants (the demo and local load tests rely on that).

A route a key may not use is answered exactly as a route that does not exist (`route_not_found`: 404
`model_not_found`, the same message), as OpenAI answers for a model the caller cannot access, so a key holder
cannot learn which other routes exist.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import AuthenticationError, ConfigError, UnknownRoute


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    tenant: str
    routes: frozenset[str]
    can_force_variant: bool = False

    def may_use(self, route: str) -> bool:
        return "*" in self.routes or route in self.routes

    def check_route(self, route: str) -> None:
        if not self.may_use(route):
            raise route_not_found(route)


def route_not_found(route: str) -> UnknownRoute:
    """The one answer for a route that does not exist and for one the caller may not use."""
    return UnknownRoute(f"The model `{route}` does not exist or you do not have access to it.", param="model")


ANONYMOUS = ApiKey(name="anonymous", tenant="anonymous", routes=frozenset({"*"}), can_force_variant=True)


class _KeyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
    tenant: Annotated[str, Field(min_length=1)]
    routes: list[str] = Field(min_length=1)
    can_force_variant: bool = False


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    keys: dict[str, _KeyModel]


class KeyRing:
    def __init__(self, entries: list[tuple[bytes, ApiKey]]) -> None:
        self._entries = entries

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            parsed = _KeysFile.model_validate(tomllib.loads(path.read_text()))
        except OSError as exc:
            raise ConfigError(f"keys file {str(path)!r}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ConfigError(f"keys file {str(path)!r}: {exc}") from None
        entries = [
            (bytes.fromhex(k.sha256), ApiKey(name, k.tenant, frozenset(k.routes), k.can_force_variant))
            for name, k in parsed.keys.items()
        ]
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: str | None) -> ApiKey:
        if not authorization:
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("Malformed Authorization header: expected 'Bearer <key>'.")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found: ApiKey | None = None
        for stored, key in self._entries:
            if hmac.compare_digest(stored, digest):  # no early exit: every digest is compared
                found = key
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found


def digest_of(token: str) -> str:
    """The hex digest to put in a keys file for `token` (used by `gateway keys hash`)."""
    return hashlib.sha256(token.encode()).hexdigest()
