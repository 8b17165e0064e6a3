"""What a check of a profile's server answers: plain values, so that the child that asked the
server (boto3 lives there) hands them to a supervisor that never imports botocore."""

from __future__ import annotations

from dataclasses import dataclass, field

# Bucket verdicts of a check.
OK = "ok"
MISSING = "missing"
# Profile verdicts of a check.
REJECTED = "rejected"
UNREACHABLE = "unreachable"
TLS = "tls"
CREDENTIALS = "credentials"


@dataclass
class ProfileCheck:
    """The outcome of checking a profile: its own verdict, and one per bucket when it is OK."""

    status: str
    detail: str = ""
    buckets: dict[str, str] = field(default_factory=dict)
