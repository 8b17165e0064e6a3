"""What an S3 answer or exception means, decided here only: transient or permanent, whom it
condemns (the file, its bucket, its profile), its reason code and its kind for reports."""

from __future__ import annotations

import builtins
import re
import ssl
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

import botocore.exceptions
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    SSLError,
)

from flood.states import Reason


class Scope(StrEnum):
    """What an error condemns: this file only, the bucket, or the profile's key."""

    FILE = "file"
    BUCKET = "bucket"
    PROFILE = "profile"


class Kind(StrEnum):
    """The family of a problem, as flood-doctor reports it."""

    AUTH = "auth"
    CLOCK = "clock"
    MISSING_BUCKET = "missing_bucket"
    MISSING_OBJECT = "missing_object"
    PERMISSIONS = "permissions"
    INCOMPATIBLE = "incompatible"
    SERVER = "server"
    NETWORK = "network"
    TLS = "tls"
    CREDENTIALS = "credentials"
    MISMATCH = "mismatch"
    LOCAL = "local"
    REFUSED = "refused"
    INJECTED = "injected"
    ERROR = "error"


@dataclass(frozen=True)
class Verdict:
    """What to do about one error: retry it or not, whom it condemns, a stable reason code,
    and its kind (the family flood-doctor names)."""

    transient: bool
    scope: Scope
    reason: str
    kind: Kind

    @property
    def object_not_readable(self) -> bool:
        """A HEAD the key may not make or the server does not offer (403, 405, 501, 400):
        verification is skipped, not failed."""
        return self.kind in (Kind.PERMISSIONS, Kind.INCOMPATIBLE)


class Injected(Exception):
    """A failure --inject-failures made up before any request was sent (staging only)."""


class Mismatch(Exception):
    """The server holds other bytes than the file (a size or checksum that differs): never a
    completed record; the file is tried again."""


# S3 error codes, what they condemn and their kind. Code first, status second: HEAD answers
# carry no body, so their code is the bare status ("403").
_BY_CODE: dict[str, tuple[bool, Scope, Kind]] = {
    "SlowDown": (True, Scope.FILE, Kind.SERVER),
    "RequestTimeout": (True, Scope.FILE, Kind.SERVER),
    "InternalError": (True, Scope.FILE, Kind.SERVER),
    "ServiceUnavailable": (True, Scope.FILE, Kind.SERVER),
    "Throttling": (True, Scope.FILE, Kind.SERVER),
    "ThrottlingException": (True, Scope.FILE, Kind.SERVER),
    "RequestTimeTooSkewed": (True, Scope.FILE, Kind.CLOCK),
    "BadDigest": (True, Scope.FILE, Kind.MISMATCH),  # the bytes changed on the wire
    "InvalidAccessKeyId": (False, Scope.PROFILE, Kind.AUTH),
    "SignatureDoesNotMatch": (False, Scope.PROFILE, Kind.AUTH),
    "InvalidToken": (False, Scope.PROFILE, Kind.AUTH),
    "ExpiredToken": (False, Scope.PROFILE, Kind.AUTH),
    "AuthorizationHeaderMalformed": (False, Scope.PROFILE, Kind.AUTH),
    "AccessDenied": (False, Scope.FILE, Kind.PERMISSIONS),
    "NoSuchBucket": (False, Scope.BUCKET, Kind.MISSING_BUCKET),
    "NoSuchKey": (False, Scope.FILE, Kind.MISSING_OBJECT),
    "NotImplemented": (False, Scope.FILE, Kind.INCOMPATIBLE),
    "InvalidArgument": (False, Scope.FILE, Kind.INCOMPATIBLE),
    "InvalidRequest": (False, Scope.FILE, Kind.INCOMPATIBLE),
    "InvalidDigest": (False, Scope.FILE, Kind.INCOMPATIBLE),
    "XAmzContentSHA256Mismatch": (False, Scope.FILE, Kind.INCOMPATIBLE),
    "MissingContentLength": (False, Scope.FILE, Kind.INCOMPATIBLE),
    "UnsupportedHeader": (False, Scope.FILE, Kind.INCOMPATIBLE),
    "EntityTooLarge": (False, Scope.FILE, Kind.REFUSED),
    "KeyTooLongError": (False, Scope.FILE, Kind.REFUSED),
}
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_INCOMPATIBLE_STATUS = frozenset({400, 405, 411, 501})


def classify(exc: BaseException, operation: str = "") -> Verdict:
    """The verdict for an exception raised by an S3 call or an upload (wrapped causes walked).
    `operation` names the call where it changes the meaning: a 404 to HeadBucket is a bucket
    that does not exist."""
    if isinstance(exc, Mismatch):
        return Verdict(True, Scope.FILE, Reason.VERIFY_MISMATCH, Kind.MISMATCH)
    if isinstance(exc, Injected):  # never an answer of the endpoint: no outage hold
        return Verdict(True, Scope.FILE, Reason.INJECTED, Kind.INJECTED)
    root = _root(exc)
    if isinstance(root, ClientError):
        verdict = _answer(root)
        if operation == "HeadBucket" and verdict.kind == Kind.MISSING_OBJECT:
            return Verdict(False, Scope.BUCKET, Reason.NO_SUCH_BUCKET, Kind.MISSING_BUCKET)
        return verdict
    if isinstance(root, SSLError) or _tls_failure(root):
        # The environment's fault, not the file's: the profile waits until the certificate
        # (or the CA Flood is given) is right, and its files wait with it.
        return Verdict(True, Scope.PROFILE, "tls", Kind.TLS)
    if isinstance(root, CredentialRetrievalError):
        # The container's or instance's credentials endpoint did not give keys: nothing is
        # wrong with the file, and every request of the profile needs them. It waits.
        return Verdict(True, Scope.PROFILE, Reason.CREDENTIALS, Kind.CREDENTIALS)
    if isinstance(root, ConnectionError | HTTPClientError):
        return Verdict(True, Scope.FILE, type(root).__name__, Kind.NETWORK)
    if isinstance(root, TimeoutError | builtins.ConnectionError):
        return Verdict(True, Scope.FILE, type(root).__name__, Kind.NETWORK)
    if isinstance(root, OSError):  # reading the file itself
        return Verdict(True, Scope.FILE, Reason.READ_ERROR, Kind.LOCAL)
    return Verdict(False, Scope.FILE, type(root).__name__, Kind.ERROR)


def _answer(error: ClientError) -> Verdict:
    """The verdict for the server's own answer: its code, else its HTTP status."""
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = status_of(error)
    if code in _BY_CODE:
        transient, scope, kind = _BY_CODE[code]
        return Verdict(transient, scope, code, kind)
    if not status and code.isdigit():
        status = int(code)
    named = code if code and not code.isdigit() else ""
    if status in _TRANSIENT_STATUS:
        return Verdict(True, Scope.FILE, named or f"http_{status}", Kind.SERVER)
    if status == 403:
        return Verdict(False, Scope.FILE, "AccessDenied", Kind.PERMISSIONS)
    if status == 404:
        return Verdict(False, Scope.FILE, named or "NotFound", Kind.MISSING_OBJECT)
    if status in _INCOMPATIBLE_STATUS:
        return Verdict(False, Scope.FILE, named or f"http_{status}", Kind.INCOMPATIBLE)
    if status >= 500:
        return Verdict(False, Scope.FILE, named or f"http_{status}", Kind.SERVER)
    return Verdict(False, Scope.FILE, named or f"http_{status}", Kind.ERROR)


def _network_names() -> set[str]:
    """The names classify() gives network failures: botocore's connection errors and
    Python's own."""
    found = {TimeoutError.__name__}
    for value in vars(botocore.exceptions).values():
        if isinstance(value, type) and issubclass(value, ConnectionError | HTTPClientError):
            found.add(value.__name__)
    kinds: list[type] = [builtins.ConnectionError, *builtins.ConnectionError.__subclasses__()]
    found.update(kind.__name__ for kind in kinds)
    return found


_TRANSIENT_NAMES = frozenset(
    [code for code, (transient, _, _) in _BY_CODE.items() if transient]
    + [Reason.VERIFY_MISMATCH, Reason.READ_ERROR, Reason.INJECTED, "tls", Reason.CREDENTIALS]
    + list(_network_names())
)


def transient_reason(reason: str | None) -> bool:
    """Whether a failure's recorded reason was a transient one (its retries ran out), so that
    the lifecycle may requeue it: S3's transient codes, an HTTP 5xx or 429, a network error,
    a mismatch or a read error."""
    if not reason:
        return False
    if reason.startswith("http_") and reason[5:].isdigit():
        return int(reason[5:]) in _TRANSIENT_STATUS
    return reason in _TRANSIENT_NAMES


def status_of(error: ClientError) -> int:
    """The HTTP status of a server's answer (0 when botocore did not record one)."""
    meta = error.response.get("ResponseMetadata", {})
    return int(meta.get("HTTPStatusCode", 0) or 0)


def _root(exc: BaseException) -> BaseException:
    """The S3 or connection error behind a wrapper such as boto3's S3UploadFailedError."""
    seen: BaseException = exc
    for _ in range(8):
        if isinstance(seen, ClientError | ConnectionError | HTTPClientError):
            return cast(BaseException, seen)  # botocore's classes are untyped (Any)
        following = seen.__cause__ or seen.__context__
        if following is None:
            break
        seen = following
    return exc


def _tls_failure(exc: BaseException) -> bool:
    """A certificate that did not verify, anywhere in the chain of causes."""
    return any(
        isinstance(e, ssl.SSLCertVerificationError) or type(e).__name__ == "CertificateError"
        for e in causes(exc)
    )


def causes(exc: BaseException) -> list[BaseException]:
    """An exception and what lies behind it: its __cause__/__context__ chain and the error
    botocore keeps in its `error` keyword."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 8:
        chain.append(seen)
        kept = getattr(seen, "kwargs", {}).get("error") if hasattr(seen, "kwargs") else None
        if not isinstance(kept, BaseException):  # urllib3 wraps the error in its args
            kept = next((a for a in seen.args if isinstance(a, BaseException)), None)
        seen = kept if kept is not None else (seen.__cause__ or seen.__context__)
    return chain


def describe(exc: BaseException) -> str:
    """An error's text for logs and records, with its cause where one lies behind it
    (`connection refused`, `certificate verify failed: ...`, `proxy refused CONNECT: 403`).
    botocore's messages name the endpoint, never a credential."""
    text = f"{type(exc).__name__}: {exc}"
    for cause in causes(exc)[1:]:
        why = _reason(cause)
        if why and why not in text:
            return f"{text} ({why})"
    return text


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) or type(exc).__name__ == "CertificateError":
        # urllib3 checks host names itself, with a CertificateError of its own
        return f"certificate verify failed: {getattr(exc, 'verify_message', None) or exc}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    tunnel = _TUNNEL_RE.search(text)
    if tunnel:  # urllib3's words for a proxy's answer to CONNECT
        return f"proxy refused CONNECT: {tunnel.group(1)}"
    return text if len(text) < 300 else text[:297] + "..."


_TUNNEL_RE = re.compile(r"Tunnel connection failed: ([^')\"]+)")
