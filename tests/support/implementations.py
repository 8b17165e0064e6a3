"""The suite's two S3 implementations behind one face: SeaweedFS (signatures and Content-MD5
checked) and moto's standalone server (neither checked), for tests that run on both."""

from __future__ import annotations

import uuid
from typing import Any

from motoserver import MotoServer

from flood.testing.localserver import Identity, LocalS3

KINDS = ("seaweedfs", "moto")


class S3Implementation:
    """One S3 server under test, by name: the same calls whichever it is.

    `checks_signatures` is False for moto: it takes any key pair and any signature
    (tests/integration/test_motoserver.py shows each difference side by side).
    """

    def __init__(self, kind: str, backend: LocalS3 | MotoServer) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown S3 implementation {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.backend = backend
        self.checks_signatures = kind == "seaweedfs"
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3Implementation({self.kind!r}, {self.endpoint!r})"

    @property
    def endpoint(self) -> str:
        """The server's plain-HTTP S3 endpoint."""
        return self.backend.endpoint

    @property
    def port(self) -> int:
        """The port of that endpoint, for a relay in front of it."""
        return self.backend.port

    @property
    def admin(self) -> Identity:
        """The key pair every bucket is made with."""
        return self.backend.admin

    def client(self) -> Any:
        """The admin's boto3 client (path-style), made once: a new one costs 0.1-0.2 s."""
        if self._client is None:
            self._client = self.backend.client()
        return self._client

    def create_bucket(self, name: str) -> None:
        """Create a bucket as the admin."""
        self.client().create_bucket(Bucket=name)

    def new_bucket(self) -> str:
        """A fresh bucket with a unique name."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.create_bucket(name)
        return name

    def credentials_ini(
        self,
        profile: str,
        identity: Identity | None = None,
        provider: str = "amazon",
        endpoint: str | None = None,
    ) -> str:
        """One INI section of Flood's credentials file pointing at this server (or at
        `endpoint`, a relay in front of it)."""
        return self.backend.credentials_ini(profile, identity, provider=provider, endpoint=endpoint)
