"""AWS Signature Version 4 for the lean PUT: the headers botocore's S3SigV4Auth adds, computed
directly (tests/unit/test_s3.py pins them byte for byte)."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Protocol


class Keys(Protocol):
    """What signs a request (botocore's ReadOnlyCredentials has these)."""

    @property
    def access_key(self) -> str: ...

    @property
    def secret_key(self) -> str: ...

    @property
    def token(self) -> str | None: ...


class SigV4:
    """AWS Signature Version 4 of one PUT: the headers botocore's S3SigV4Auth would add,
    computed directly. The signing key is derived once a day instead of four HMACs per
    request, and nothing parses URLs: botocore's signer cost more CPU per small file than
    the rest of the request (tests/benchmarks/hotpath.py). Checked byte for byte against
    S3SigV4Auth in tests/unit/test_s3.py and by every upload against the real server."""

    def __init__(self) -> None:
        # (secret, day, region) -> signing key; a rotation of the keys or a second region
        # adds one, and a day's keys are dropped when the day changes.
        self._keys: dict[tuple[str, str, str], bytes] = {}
        self._day = ""

    def key(self, secret: str, day: str, region: str) -> bytes:
        """The signing key of one secret for one day and region, derived once."""
        if day != self._day:
            self._keys.clear()
            self._day = day
        found = self._keys.get((secret, day, region))
        if found is None:
            found = ("AWS4" + secret).encode("utf-8")
            for part in (day, region, "s3", "aws4_request"):
                found = hmac.new(found, part.encode("utf-8"), hashlib.sha256).digest()
            self._keys[(secret, day, region)] = found
        return found

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        payload_hash: str,
        headers: dict[str, str],
        keys: Keys,
        region: str,
        when: float | None = None,
    ) -> dict[str, str]:
        """The headers to add to the request: X-Amz-Date, X-Amz-Content-SHA256 and
        Authorization, which signs `host`, `path` (already URI-encoded, as sent), `headers`
        (X-Amz-Security-Token among them when the keys carry a token) and the payload's
        SHA-256, with `keys` for `region`. `when`: seconds since the epoch (now if None)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
        day = stamp[:8]
        signing_key = self.key(keys.secret_key, day, region)
        signed = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
        signed.update({"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp})
        names = sorted(signed)
        canonical = "\n".join(
            [
                method,
                path,
                "",
                *(f"{n}:{signed[n]}" for n in names),
                "",
                ";".join(names),
                payload_hash,
            ]
        )
        scope = f"{day}/{region}/s3/aws4_request"
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        signature = hmac.new(
            signing_key,
            f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}".encode(),
            hashlib.sha256,
        ).hexdigest()
        return {
            "X-Amz-Date": stamp,
            "X-Amz-Content-SHA256": payload_hash,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={keys.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}",
        }
