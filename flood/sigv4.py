"""AWS Signature Version 4 for the lean PUT: the headers botocore's S3SigV4Auth adds, computed
directly (tests/unit/test_s3.py pins them byte for byte)."""

from __future__ import annotations

import hashlib
import hmac
import time


class SigV4:
    """AWS Signature Version 4 of one PUT: the headers botocore's S3SigV4Auth would add,
    computed directly. The signing key is derived once a day instead of four HMACs per
    request, and nothing parses URLs: botocore's signer cost more CPU per small file than
    the rest of the request (tests/benchmarks/hotpath.py). Checked byte for byte against
    S3SigV4Auth in tests/unit/test_s3.py and by every upload against the real server."""

    def __init__(self, access_key_id: str, secret_access_key: str, region: str) -> None:
        self._access_key_id = access_key_id
        self._secret = secret_access_key
        self._region = region
        self._day = ""
        self._key = b""

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        payload_hash: str,
        headers: dict[str, str],
        when: float | None = None,
    ) -> dict[str, str]:
        """The headers to add to the request: X-Amz-Date, X-Amz-Content-SHA256 and
        Authorization, which signs `host`, `path` (already URI-encoded, as sent), `headers`
        and the payload's SHA-256. `when`: seconds since the epoch (now if None)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
        day = stamp[:8]
        if day != self._day:
            key = ("AWS4" + self._secret).encode("utf-8")
            for part in (day, self._region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
            self._day, self._key = day, key
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
        scope = f"{day}/{self._region}/s3/aws4_request"
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        signature = hmac.new(
            self._key, f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}".encode(), hashlib.sha256
        ).hexdigest()
        return {
            "X-Amz-Date": stamp,
            "X-Amz-Content-SHA256": payload_hash,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={self._access_key_id}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}",
        }
