"""flood.s3.SigV4 signs exactly as botocore's S3SigV4Auth does (the real server checks the
signatures of every upload in the e2e tests; this pins the bytes, key by key)."""

from __future__ import annotations

import datetime as dt
import hashlib
import urllib.parse

import pytest
from botocore import auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from flood.s3 import SigV4

ACCESS, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
KEYS = ["plain.txt", "a/b/c.bin", "with space/and+plus=eq", "ünï/cödé ✓", "~tilde/(x)!*'",
        "percent%20literal", "semi;colon,comma&amp?q#frag"]


def botocore_headers(monkeypatch: pytest.MonkeyPatch, host: str, path: str, body: bytes,
                     md5: str, moment: dt.datetime) -> dict[str, str]:
    monkeypatch.setattr(auth, "get_current_datetime", lambda: moment)
    request = AWSRequest(method="PUT", url=f"http://{host}{path}", data=body,
                         headers={"Content-MD5": md5})
    auth.S3SigV4Auth(Credentials(ACCESS, SECRET), "s3", "eu-west-1").add_auth(request)
    return {k: request.headers[k] for k in ("X-Amz-Date", "X-Amz-Content-SHA256",
                                            "Authorization")}


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("host", ["127.0.0.1:8333", "s3.example.com"])
def test_same_headers_as_botocore(monkeypatch: pytest.MonkeyPatch, key: str, host: str) -> None:
    body = key.encode() * 3
    path = f"/bucket/{urllib.parse.quote(key, safe='/~')}"
    moment = dt.datetime(2026, 11, 21, 13, 45, 7)
    expected = botocore_headers(monkeypatch, host, path, body, "bWQ1bWQ1bWQ1bWQ1bWQ1MQ==", moment)
    ours = SigV4(ACCESS, SECRET, "eu-west-1").sign(
        "PUT", host, path, hashlib.sha256(body).hexdigest(),
        {"Content-MD5": "bWQ1bWQ1bWQ1bWQ1bWQ1MQ=="},
        when=moment.replace(tzinfo=dt.UTC).timestamp())
    assert ours == expected


def test_signing_key_follows_the_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached day key is derived again when the day changes (a daemon runs for months)."""
    signer = SigV4(ACCESS, SECRET, "eu-west-1")
    payload = hashlib.sha256(b"x").hexdigest()
    for moment in (dt.datetime(2026, 11, 21, 23, 59, 59), dt.datetime(2026, 11, 22, 0, 0, 1)):
        expected = botocore_headers(monkeypatch, "h", "/b/k", b"x", "eA==", moment)
        assert signer.sign("PUT", "h", "/b/k", payload, {"Content-MD5": "eA=="},
                           when=moment.replace(tzinfo=dt.UTC).timestamp()) == expected
