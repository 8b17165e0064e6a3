"""Flood's closed vocabularies: states of a passage, outcomes, Flood's own reasons, next steps."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where a passage of a file is: its directory, or `abandoned` for a copy that never
    reached incoming/ (its producer died, or a newer copy superseded it)."""

    INCOMING_TMP = "incoming_tmp"
    INCOMING = "incoming"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    ABANDONED = "abandoned"


# The five directories of a server dir, in the order producers and uploads pass them.
DIRECTORIES = (State.INCOMING_TMP, State.INCOMING, State.PROCESSING, State.FAILED, State.COMPLETED)
# Passages still on their way: what start-up repair checks against the directories.
OPEN = (State.INCOMING_TMP, State.INCOMING, State.PROCESSING)


class Outcome(StrEnum):
    """How a passage's upload ended (upload_outcome in the records)."""

    SUCCESS = "success"
    FAILURE = "failure"


class Reason(StrEnum):
    """Flood's own reason codes. S3's error codes (AccessDenied, SlowDown, ...) are reasons
    too, spelled as the server spells them; these are the ones Flood gives itself."""

    INVALID_PROFILE = "invalid_profile"
    INVALID_BUCKET = "invalid_bucket"
    INVALID_KEY = "invalid_key"
    INVALID_UTF8 = "invalid_utf8"
    KEY_TOO_LONG = "key_too_long"
    NOT_REGULAR_FILE = "not_regular_file"
    UNREADABLE = "unreadable"
    HARD_LINK = "hard_link"
    VANISHED = "vanished"
    INTERNAL_ERROR = "internal_error"
    VERIFY_MISMATCH = "verify_mismatch"
    READ_ERROR = "read_error"
    INJECTED = "injected"
    INVALID_OPTIONS = "invalid_options"
    UNSUPPORTED_OPTION = "unsupported_option"
    # a copy that never reached incoming/
    WIPED = "wiped"
    SUPERSEDED = "superseded"
    REQUEUE_SKIPPED = "requeue_skipped"
    COPY_FAILED = "copy_failed"
    INTERRUPTED = "interrupted"
    # holds of a profile or bucket
    KEY_REJECTED = "key_rejected"
    UNREACHABLE = "unreachable"
    TLS = "tls"
    CREDENTIALS = "credentials_unavailable"  # a container's or instance's endpoint gave none
    NO_SUCH_BUCKET = "NoSuchBucket"
    # the audit
    UNKNOWN_PROFILE = "unknown_profile"


class Step(StrEnum):
    """What the uploader does with a job after one pass over it."""

    DONE = "done"  # completed/ or failed/: nothing more to do
    SKIPPED = "skipped"  # not there any more (a duplicate event), or left waiting in incoming/
    RETRY = "retry"  # transient failure or a retry not yet due: run again at `due`
    BUSY = "busy"  # the same path is still in processing/: try again shortly, in order
    CHANGED = "changed"  # the file changed while it was read: upload again once it settles


class Finding(StrEnum):
    """What the audit found of a completed passage's object, when it is not what was uploaded."""

    MISSING = "missing"
    DIFFERENT = "different"


class Field(StrEnum):
    """What of an object the audit compares with its record."""

    SIZE = "size"
    ETAG = "etag"
    CHECKSUM = "checksum"
