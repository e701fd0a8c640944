"""Bearer tokens for the HTTP side: created with a role, kept as a SHA-256 of the secret, listed
and revoked by name. A secret is 32 random bytes, so a plain hash is enough (nothing to brute
force); it is shown once, when it is made."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import ApiToken, TokenRole, aware, utcnow

PREFIX = "sn_"  # recognisable in a leaked-secret scan
LAST_USED_STEP = timedelta(minutes=1)


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who is asking: the token's name and role."""

    name: str
    role: TokenRole

    @property
    def may_operate(self) -> bool:
        return self.role == TokenRole.OPERATOR


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(sessions: sessionmaker[Session], name: str, role: str) -> str:
    """A new token's secret (the only time it is seen)."""
    if role not in tuple(TokenRole):
        raise TokenError(f"role {role!r}: use {' or '.join(TokenRole)}")
    if not name or len(name) > 64:
        raise TokenError("a token name of 1 to 64 characters")
    secret = PREFIX + secrets.token_urlsafe(32)
    try:
        with sessions.begin() as session:
            session.add(ApiToken(name=name, role=role, secret_sha256=_digest(secret)))
    except IntegrityError:
        raise TokenError(f"a token named {name!r} exists (revoke it first)") from None
    return secret


def revoke_token(sessions: sessionmaker[Session], name: str) -> None:
    """Revoked tokens stay in the table (the audit log names them), renamed out of the way."""
    with sessions.begin() as session:
        token = session.scalar(select(ApiToken).where(ApiToken.name == name,
                                                      ApiToken.revoked_at.is_(None)))
        if token is None:
            raise TokenError(f"no active token named {name!r}")
        token.revoked_at = utcnow()
        token.name = f"{name}~revoked-{token.id}"[:64]


def list_tokens(sessions: sessionmaker[Session]) -> list[dict]:
    with sessions() as session:
        return [{"name": t.name, "role": t.role,
                 "created_at": t.created_at.isoformat(timespec="seconds"),
                 "last_used_at": t.last_used_at.isoformat(timespec="seconds")
                 if t.last_used_at else None,
                 "revoked": t.revoked_at is not None}
                for t in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def authenticate(sessions: sessionmaker[Session], secret: str) -> Principal | None:
    """The token's holder, or None for an unknown or revoked secret."""
    if not secret.startswith(PREFIX):
        return None
    with sessions.begin() as session:
        token = session.scalar(select(ApiToken).where(ApiToken.secret_sha256 == _digest(secret),
                                                      ApiToken.revoked_at.is_(None)))
        if token is None:
            return None
        now = utcnow()
        # "Last used" to the minute: not a write (and a commit) on every request.
        if token.last_used_at is None or now - aware(token.last_used_at) > LAST_USED_STEP:
            token.last_used_at = now
        return Principal(token.name, TokenRole(token.role))
