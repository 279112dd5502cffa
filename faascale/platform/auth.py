"""Bearer tokens: an admin token (deploy, delete, scale) and an invoke token (requests).

Created at ``faascale up`` and stored in the state directory with mode 0600. The admin token may
also invoke. An optional metrics token (``$FAASCALE_METRICS_TOKEN``, set by the operator) guards
``/metrics``. Comparisons are constant-time.
"""

from __future__ import annotations

import enum
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


class Role(enum.Enum):
    ADMIN = "admin"
    INVOKE = "invoke"


@dataclass(frozen=True)
class Tokens:
    admin: str
    invoke: str

    def role_of(self, token: str | None) -> Role | None:
        """The role a presented token grants, or None for a missing or unknown token."""
        if not token:
            return None
        if same_token(token, self.admin):
            return Role.ADMIN
        if same_token(token, self.invoke):
            return Role.INVOKE
        return None


def same_token(presented: str, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    # as bytes: compare_digest refuses str with non-ASCII characters (a header byte >= 0x80
    # arrives as one), which must be an unknown token (401), not a crash
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected.encode())


METRICS_TOKEN_ENV = "FAASCALE_METRICS_TOKEN"


def metrics_token_from_env() -> str | None:
    """``$FAASCALE_METRICS_TOKEN``: the bearer token ``/metrics`` then needs (unset or empty:
    ``/metrics`` is open). Raises ValueError naming the variable for a token no header can carry."""
    token = os.environ.get(METRICS_TOKEN_ENV, "")
    if not token:
        return None
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise ValueError(f"{METRICS_TOKEN_ENV}: the token must be printable ASCII without spaces")
    return token


def load_or_create_tokens(path: Path) -> Tokens:
    """Read the token file, creating it (mode 0600, never world-readable) if absent."""
    if path.exists():
        data = json.loads(path.read_text())
        return Tokens(admin=data["admin"], invoke=data["invoke"])
    tokens = Tokens(admin="fs-admin-" + secrets.token_urlsafe(24),
                    invoke="fs-invoke-" + secrets.token_urlsafe(24))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"admin": tokens.admin, "invoke": tokens.invoke}, f)
    return tokens


def bearer(header: str | None) -> str | None:
    """The token from an ``Authorization: Bearer ...`` header value."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
