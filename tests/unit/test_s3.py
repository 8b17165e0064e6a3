"""The lean PUT's two hand-written parts: SigV4 signs exactly as botocore's S3SigV4Auth does
(the real server checks the signatures of every upload in the e2e tests; this pins the bytes,
key by key), and read_response reads what servers and proxies answer."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import socket
import threading
import time
import urllib.parse

import pytest
from botocore import auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from flood.lean import MAX_HEAD, Answer, read_response
from flood.sigv4 import SigV4

ACCESS, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
KEYS = [
    "plain.txt",
    "a/b/c.bin",
    "with space/and+plus=eq",
    "ünï/cödé ✓",
    "~tilde/(x)!*'",
    "percent%20literal",
    "semi;colon,comma&amp?q#frag",
]


def botocore_headers(
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    path: str,
    body: bytes,
    md5: str,
    moment: dt.datetime,
    token: str | None = None,
    region: str = "eu-west-1",
) -> dict[str, str]:
    monkeypatch.setattr(auth, "get_current_datetime", lambda: moment)
    request = AWSRequest(
        method="PUT", url=f"http://{host}{path}", data=body, headers={"Content-MD5": md5}
    )
    auth.S3SigV4Auth(Credentials(ACCESS, SECRET, token), "s3", region).add_auth(request)
    names = ["X-Amz-Date", "X-Amz-Content-SHA256", "Authorization"]
    return {k: request.headers[k] for k in names}


def ours(
    signer: SigV4,
    host: str,
    path: str,
    body: bytes,
    md5: str,
    moment: dt.datetime,
    token: str | None = None,
    region: str = "eu-west-1",
) -> dict[str, str]:
    headers = {"Content-MD5": md5}
    if token:
        headers["X-Amz-Security-Token"] = token
    return signer.sign(
        "PUT",
        host,
        path,
        hashlib.sha256(body).hexdigest(),
        headers,
        Credentials(ACCESS, SECRET, token).get_frozen_credentials(),
        region,
        when=moment.replace(tzinfo=dt.UTC).timestamp(),
    )


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("host", ["127.0.0.1:8333", "s3.example.com", "[::1]:8333"])
def test_same_headers_as_botocore(monkeypatch: pytest.MonkeyPatch, key: str, host: str) -> None:
    """Our headers are botocore's, byte for byte, for awkward keys and hosts (IPv6 too)."""
    body = key.encode() * 3
    path = f"/bucket/{urllib.parse.quote(key, safe='/~')}"
    moment = dt.datetime(2026, 11, 21, 13, 45, 7)
    md5 = "bWQ1bWQ1bWQ1bWQ1bWQ1MQ=="
    expected = botocore_headers(monkeypatch, host, path, body, md5, moment)
    assert ours(SigV4(), host, path, body, md5, moment) == expected


def test_a_session_token_is_signed_as_botocore_signs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary keys: X-Amz-Security-Token is among the signed headers, as botocore has it."""
    moment = dt.datetime(2026, 11, 21, 13, 45, 7)
    token = "FQoGZXIvYXdzEXAMPLE//token+with/slashes=="
    expected = botocore_headers(monkeypatch, "h", "/b/k", b"x", "eA==", moment, token=token)
    got = ours(SigV4(), "h", "/b/k", b"x", "eA==", moment, token=token)
    assert got == expected and "x-amz-security-token" in got["Authorization"]


def test_signing_key_follows_the_date_region_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached day key is derived again when the day changes (a daemon runs for months),
    for another region (a bucket followed there) and for rotated keys."""
    signer = SigV4()
    for moment in (dt.datetime(2026, 11, 21, 23, 59, 59), dt.datetime(2026, 11, 22, 0, 0, 1)):
        for region in ("eu-west-1", "ap-south-2"):
            expected = botocore_headers(
                monkeypatch, "h", "/b/k", b"x", "eA==", moment, region=region
            )
            assert ours(signer, "h", "/b/k", b"x", "eA==", moment, region=region) == expected


# -- read_response: the lean PUT's reading of answers -------------------------------------------
def answer_to(*pieces: bytes, close: bool = True) -> Answer:
    """read_response on a socket the pieces arrive on one by one (each its own send)."""
    ours, theirs = socket.socketpair()
    try:

        def feed() -> None:
            for piece in pieces:
                theirs.sendall(piece)
                time.sleep(0.01)
            if close:
                theirs.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=feed)
        sender.start()
        try:
            return read_response(ours)
        finally:
            sender.join()
    finally:
        ours.close()
        theirs.close()


def test_a_put_answer_split_across_reads() -> None:
    got = answer_to(
        b'HTTP/1.1 200 OK\r\nETag: "abc"\r\nContent-', b"Length: 0\r\n", b"\r\n", close=False
    )
    assert got == Answer(200, {"etag": '"abc"', "content-length": "0"}, b"", True, "OK")


def test_an_error_body_by_content_length_and_repeated_headers() -> None:
    body = b"<Error><Code>SlowDown</Code></Error>"
    got = answer_to(
        b"HTTP/1.1 503 Slow Down\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body[:10],
        body[10:],
        close=False,
    )
    assert (got.status, got.headers["x-a"], got.body, got.keep_alive) == (503, "1, 2", body, True)


def test_a_chunked_body_with_trailers_and_interim_100() -> None:
    got = answer_to(
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5;ext=1\r\nhello\r\n",
        b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        close=False,
    )
    assert (got.status, got.body, got.keep_alive) == (500, b"hello world", True)


def test_close_or_no_length_ends_the_connection() -> None:
    assert not answer_to(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    ).keep_alive
    got = answer_to(b"HTTP/1.0 403 Forbidden\r\n\r\n<Error/>", b"tail")
    assert (got.status, got.body, got.keep_alive) == (403, b"<Error/>tail", False)


@pytest.mark.parametrize(
    "pieces",
    [
        (b"",),  # closed before answering
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",),  # body cut short
        (b"SSH-2.0-OpenSSH\r\n\r\n",),  # not HTTP
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * (MAX_HEAD + 10),),
    ],
)
def test_malformed_or_cut_answers_raise(pieces: tuple[bytes, ...]) -> None:
    with pytest.raises(http.client.HTTPException):
        answer_to(*pieces)
