"""What names the records: a SQLite path or a postgresql:// URL, and that URL shown without its
password (in logs, messages and the server dir's record of it)."""

from __future__ import annotations

import urllib.parse

SCHEMES = ("postgresql://", "postgres://")
MASK = "***"


def is_url(target: str) -> bool:
    """Whether the records are PostgreSQL's (a URL), not a SQLite file."""
    return target.startswith(SCHEMES)


def password_of(target: str) -> str | None:
    """The password a URL carries, in its user part or its query (libpq's password=)."""
    if not is_url(target):
        return None
    parts = urllib.parse.urlsplit(target)
    if parts.password:
        return urllib.parse.unquote(parts.password)
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name == "password" and value:
            return value
    return None


def _replace(target: str, password: str | None) -> str:
    """The URL with its password replaced (None: removed), everything else as given."""
    parts = urllib.parse.urlsplit(target)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{password}@{hostport}" if password is not None else f"{user}@{hostport}"
    query = parts.query
    if "password=" in query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        kept = [(n, password if n == "password" else v) for n, v in pairs]
        query = urllib.parse.urlencode([(n, v) for n, v in kept if v is not None], safe="*")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def shown(target: str) -> str:
    """The records as shown to a person: a path as it is, a URL with its password masked."""
    if password_of(target) is None:
        return target
    return _replace(target, MASK)


def without_password(target: str) -> str:
    """A URL without its password (what the server dir records: commands read that file,
    and find the password where libpq does, in ~/.pgpass, $PGPASSFILE or $PGPASSWORD)."""
    if password_of(target) is None:
        return target
    return _replace(target, None)


def scrub(message: str, target: str) -> str:
    """A message with the URL's password, wherever it appears, masked."""
    password = password_of(target)
    if not password:
        return message
    return message.replace(password, MASK).replace(urllib.parse.quote(password), MASK)
