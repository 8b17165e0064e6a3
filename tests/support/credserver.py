"""A test credentials server on 127.0.0.1, in a thread: the container endpoint (ECS's
$AWS_CONTAINER_CREDENTIALS_FULL_URI) and an IMDSv2-like instance metadata service, both
serving keys from a rotation schedule the test controls, with a record of what was served."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

HOST = "127.0.0.1"
CONTAINER_PATH = "/v2/credentials/flood-task"
TOKEN_PATH = "/latest/api/token"
ROLES_PATH = "/latest/meta-data/iam/security-credentials/"
TOKEN_TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"
JOIN_TIMEOUT = 5.0


@dataclass(frozen=True, repr=False)
class Keys:
    """One set of temporary keys; an empty token is left out of the requests signed with it
    (botocore and the lean client send X-Amz-Security-Token only when it is non-empty)."""

    access_key: str
    secret_key: str
    token: str = ""

    def __repr__(self) -> str:
        return f"Keys(access_key={self.access_key!r})"


@dataclass(frozen=True)
class Served:
    """One answer with keys: which endpoint gave it, which keys, when, and their expiry."""

    endpoint: str  # "container" or "imds"
    keys: Keys
    at: float  # epoch seconds
    expires: float  # epoch seconds, as the Expiration field said


@dataclass
class Rotation:
    """Which keys are current: keys[i % len(keys)] during period i (`period` seconds each,
    counted from `start`); what period i hands out expires `lifetime` seconds after the
    period began, so a lifetime longer than the period leaves an overlap, as AWS does."""

    keys: Sequence[Keys]
    period: float
    lifetime: float
    start: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.keys or self.period <= 0 or self.lifetime <= 0:
            raise ValueError("a rotation needs keys, a period and a lifetime")

    def current(self, now: float) -> tuple[Keys, float]:
        """The keys to hand out at `now` and when they expire (epoch seconds)."""
        index = int((now - self.start) // self.period)
        begun = self.start + index * self.period
        return self.keys[index % len(self.keys)], begun + self.lifetime


def expiration(epoch: float) -> str:
    """An Expiration string as AWS writes them, with fractional seconds:
    2026-12-02T01:10:06.200307Z."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CredentialsServer:
    """The container endpoint at `container_uri` and the instance metadata service at
    `endpoint` (role `role`; IMDSv2 only: a GET without a token from PUT /latest/api/token is
    refused 401). With `authorization`, the container endpoint wants that Authorization
    header ($AWS_CONTAINER_AUTHORIZATION_TOKEN)."""

    def __init__(
        self,
        rotation: Rotation,
        *,
        role: str = "flood-instance-role",
        authorization: str | None = None,
    ) -> None:
        self.rotation = rotation
        self.role = role
        self.authorization = authorization
        self._lock = threading.Lock()
        self._served: list[Served] = []
        self._tokens: set[str] = set()
        self._refused: list[str] = []
        self.available = True  # False: every request is answered 503, as in an outage
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- what happened -------------------------------------------------------------------------

    @property
    def served(self) -> list[Served]:
        """Every answer that carried keys, oldest first."""
        with self._lock:
            return list(self._served)

    @property
    def tokens_issued(self) -> int:
        """How many IMDSv2 session tokens were handed out."""
        with self._lock:
            return len(self._tokens)

    @property
    def refused(self) -> list[str]:
        """The requests refused (401, 404, or 503 while not `available`), as
        'METHOD path: why'."""
        with self._lock:
            return list(self._refused)

    # -- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("CredentialsServer has not been started")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The instance metadata service's base URL ($AWS_EC2_METADATA_SERVICE_ENDPOINT)."""
        return f"http://{HOST}:{self.port}/"

    @property
    def container_uri(self) -> str:
        """The container endpoint's URL ($AWS_CONTAINER_CREDENTIALS_FULL_URI)."""
        return f"http://{HOST}:{self.port}{CONTAINER_PATH}"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        server = http.server.ThreadingHTTPServer((HOST, 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)

    def __enter__(self) -> CredentialsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- answers (called from the handler threads) ---------------------------------------------

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens.add(token)
        return token

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and token in self._tokens

    def refuse(self, what: str) -> None:
        with self._lock:
            self._refused.append(what)

    def keys_document(self, endpoint: str) -> dict[str, str]:
        """The current keys as the endpoint's JSON document, recorded as served."""
        now = time.time()
        keys, expires = self.rotation.current(now)
        with self._lock:
            self._served.append(Served(endpoint, keys, now, expires))
        document = {
            "AccessKeyId": keys.access_key,
            "SecretAccessKey": keys.secret_key,
            "Token": keys.token,
            "Expiration": expiration(expires),
        }
        if endpoint == "imds":
            document.update(
                Code="Success",
                LastUpdated=expiration(now),
                Type="AWS-HMAC",
            )
        return document


def _handler(owner: CredentialsServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "flood-credserver"

        def do_PUT(self) -> None:
            self._drain()
            if not owner.available:
                return self._refuse(503, "down")
            if self.path != TOKEN_PATH:
                return self._refuse(404, "no such path")
            if not self.headers.get(TOKEN_TTL_HEADER, "").isdigit():
                return self._refuse(400, f"no {TOKEN_TTL_HEADER}")
            self._send(200, owner.issue_token(), "text/plain")

        def do_GET(self) -> None:
            if not owner.available:
                return self._refuse(503, "down")
            if self.path == CONTAINER_PATH:
                wanted = owner.authorization
                if wanted is not None and self.headers.get("Authorization") != wanted:
                    return self._refuse(401, "container: wrong or no Authorization")
                return self._json(owner.keys_document("container"))
            if not self.path.startswith(ROLES_PATH):
                return self._refuse(404, "no such path")
            if not owner.token_valid(self.headers.get(TOKEN_HEADER)):
                return self._refuse(401, "imds: no valid IMDSv2 token")
            name = self.path[len(ROLES_PATH) :]
            if not name:
                return self._send(200, owner.role, "text/plain")
            if name != owner.role:
                return self._refuse(404, f"imds: no role {name!r}")
            self._json(owner.keys_document("imds"))

        def _drain(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)

        def _json(self, document: dict[str, str]) -> None:
            self._send(200, json.dumps(document), "application/json")

        def _refuse(self, status: int, why: str) -> None:
            owner.refuse(f"{self.command} {self.path}: {why}")
            self._send(status, why, "text/plain")

        def _send(self, status: int, body: str, content_type: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the record above is the log; stderr stays quiet

    return Handler
