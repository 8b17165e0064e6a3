"""What is set on an object besides its bytes: Content-Type and the other headers, storage
class, canned ACL, server-side encryption, user metadata and tags; how the levels and rules of
the config file and a file's own options combine; what each provider accepts."""

from __future__ import annotations

import json
import mimetypes
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from flood.errors import ConfigError

# The options, with the words the config file, flood-copy and the records use for them.
HEADER_OPTIONS = (
    "content_type",
    "content_encoding",
    "content_disposition",
    "cache_control",
    "storage_class",
    "acl",
    "sse",
    "sse_kms_key_id",
)
NAMES = (*HEADER_OPTIONS, "metadata", "tags")
STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "OUTPOSTS",
    "GLACIER_IR",
    "SNOW",
    "EXPRESS_ONEZONE",
)
ACLS = (
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
)
SSE = ("AES256", "aws:kms")
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 10, 128, 256
MAX_METADATA_BYTES = 2048  # S3's user-defined metadata, keys and values together
# A file's own options travel with it, through renames, restarts and kill -9, as this
# extended attribute: a JSON object of the options above (flood-copy writes it; a producer
# that renames files into incoming/ itself may too: setfattr -n user.flood.options -v ...).
OPTIONS_XATTR = "user.flood.options"
# What each provider refuses, from its documentation (README, "Object options"): R2 has no
# canned ACLs, storage classes but STANDARD and STANDARD_IA, SSE headers or tagging; B2 has
# only STANDARD, only the bucket's own ACL (private or public-read), SSE-B2 (AES256) but no
# KMS, and no tagging.
PROVIDER_LIMITS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "amazon": {},
    "cloudflare": {
        "acl": (),
        "storage_class": ("STANDARD", "STANDARD_IA"),
        "sse": (),
        "sse_kms_key_id": (),
        "tags": (),
    },
    "backblaze": {
        "acl": ("private", "public-read"),
        "storage_class": ("STANDARD",),
        "sse": ("AES256",),
        "sse_kms_key_id": (),
        "tags": (),
    },
}


@dataclass(frozen=True)
class ObjectOptions:
    """Options of one level (None: not set at that level), or of one object once combined."""

    content_type: str | None = None  # "auto" (guess from the name), "none", or the value
    content_encoding: str | None = None
    content_disposition: str | None = None
    cache_control: str | None = None
    storage_class: str | None = None
    acl: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)

    def over(self, base: ObjectOptions) -> ObjectOptions:
        """These options laid over `base`: each key this level sets wins; metadata and tags
        merge key by key."""
        if self is NONE:  # a level the config file leaves empty, as most are
            return base
        changes: dict[str, Any] = {n: getattr(self, n) for n in HEADER_OPTIONS if getattr(self, n)}
        changes["metadata"] = {**base.metadata, **self.metadata}
        changes["tags"] = {**base.tags, **self.tags}
        return replace(base, **changes)

    def set(self) -> dict[str, Any]:
        """The options that are set, as the records and flood-status show them."""
        found: dict[str, Any] = {n: getattr(self, n) for n in HEADER_OPTIONS if getattr(self, n)}
        if self.metadata:
            found["metadata"] = dict(self.metadata)
        if self.tags:
            found["tags"] = dict(self.tags)
        return found

    def to_json(self) -> str:
        return json.dumps(self.set(), sort_keys=True, separators=(",", ":"))

    def for_key(self, key: str) -> ObjectOptions:
        """The final options of an object: content_type "auto" guessed from the key's name
        with the standard mimetypes tables (nothing when unknown), "none" left out."""
        kind = self.content_type
        if kind in (None, "auto"):
            kind = mimetypes.guess_type(key.rsplit("/", 1)[-1], strict=False)[0]
        elif kind == "none":
            kind = None
        return replace(self, content_type=kind)

    def headers(self) -> dict[str, str]:
        """The request headers that carry these options (on a PUT or CreateMultipartUpload)."""
        found = {_HEADERS[n]: getattr(self, n) for n in HEADER_OPTIONS if getattr(self, n)}
        found.update({f"x-amz-meta-{k}": v for k, v in self.metadata.items()})
        if self.tags:
            found["x-amz-tagging"] = urllib.parse.urlencode(self.tags)
        return found

    def params(self) -> dict[str, Any]:
        """The same as boto3's put_object / create_multipart_upload parameters."""
        found: dict[str, Any] = {
            _PARAMS[n]: getattr(self, n) for n in HEADER_OPTIONS if getattr(self, n)
        }
        if self.metadata:
            found["Metadata"] = dict(self.metadata)
        if self.tags:
            found["Tagging"] = urllib.parse.urlencode(self.tags)
        return found


_HEADERS = {
    "content_type": "Content-Type",
    "content_encoding": "Content-Encoding",
    "content_disposition": "Content-Disposition",
    "cache_control": "Cache-Control",
    "storage_class": "x-amz-storage-class",
    "acl": "x-amz-acl",
    "sse": "x-amz-server-side-encryption",
    "sse_kms_key_id": "x-amz-server-side-encryption-aws-kms-key-id",
}
_PARAMS = {
    "content_type": "ContentType",
    "content_encoding": "ContentEncoding",
    "content_disposition": "ContentDisposition",
    "cache_control": "CacheControl",
    "storage_class": "StorageClass",
    "acl": "ACL",
    "sse": "ServerSideEncryption",
    "sse_kms_key_id": "SSEKMSKeyId",
}
NONE = ObjectOptions()


def parse(table: Mapping[str, Any], where: str) -> ObjectOptions:
    """An `upload` table (or a file's own options) as ObjectOptions; ConfigError naming
    `where` and the key for anything that S3 would refuse or Flood cannot send."""
    unknown = sorted(set(table) - set(NAMES))
    if unknown:
        raise ConfigError(
            f"{where}: unknown option {', '.join(unknown)} (known: {', '.join(NAMES)})"
        )
    values: dict[str, Any] = {}
    for name in HEADER_OPTIONS:
        if name in table:
            values[name] = _text(table[name], f"{where}: {name}")
    values["metadata"] = _strings(table.get("metadata", {}), f"{where}: metadata")
    values["tags"] = _strings(table.get("tags", {}), f"{where}: tags")
    options = ObjectOptions(**values)
    check(options, where)
    return options


def check(options: ObjectOptions, where: str) -> None:
    """The values S3 accepts: storage classes, canned ACLs, SSE, the limits of tags and
    metadata; a KMS key only with sse = "aws:kms"."""
    if options.storage_class and options.storage_class not in STORAGE_CLASSES:
        raise ConfigError(
            f"{where}: storage_class {options.storage_class!r} is not one of "
            f"{', '.join(STORAGE_CLASSES)}"
        )
    if options.acl and options.acl not in ACLS:
        raise ConfigError(f"{where}: acl {options.acl!r} is not a canned ACL ({', '.join(ACLS)})")
    if options.sse and options.sse not in SSE:
        raise ConfigError(f"{where}: sse {options.sse!r} is not AES256 or aws:kms")
    if options.sse_kms_key_id and options.sse != "aws:kms":
        raise ConfigError(f'{where}: sse_kms_key_id needs sse = "aws:kms"')
    if len(options.tags) > MAX_TAGS:
        raise ConfigError(f"{where}: tags: {len(options.tags)} tags, S3 allows {MAX_TAGS}")
    for key, value in options.tags.items():
        if not key or len(key) > MAX_TAG_KEY or len(value) > MAX_TAG_VALUE:
            raise ConfigError(
                f"{where}: tags: {key!r} is outside S3's limits (a key of 1-{MAX_TAG_KEY}, a "
                f"value of at most {MAX_TAG_VALUE} characters)"
            )
    size = 0
    for key, value in options.metadata.items():
        if not key or not key.isascii() or not re.fullmatch(r"[A-Za-z0-9!#$&'*+.^_`|~-]+", key):
            raise ConfigError(f"{where}: metadata: key {key!r} is not an ASCII header name")
        if not value.isascii() or any(c in value for c in "\r\n"):
            raise ConfigError(f"{where}: metadata: the value of {key!r} is not one line of ASCII")
        size += len(key) + len(value)
    if size > MAX_METADATA_BYTES:
        raise ConfigError(f"{where}: metadata: {size} bytes, S3 allows {MAX_METADATA_BYTES}")


def refused_by(provider: str, options: ObjectOptions) -> list[str]:
    """The options of `options` that `provider` does not support, as 'name value'."""
    refused = []
    for name, allowed in PROVIDER_LIMITS.get(provider, {}).items():
        value = getattr(options, name)
        if not value or allowed is None:
            continue
        if name == "tags" or not allowed or value not in allowed:
            shown = "(tags)" if name == "tags" else repr(value)
            refused.append(f"{name} {shown}")
    return refused


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, not {value!r}")
    if any(c in value for c in "\r\n"):
        raise ConfigError(f"{where} must be one line")
    return value.strip()


def _strings(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table of strings, not {type(value).__name__}")
    found = {}
    for key, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(f"{where}: {key!r} must be a string, not {item!r}")
        found[str(key)] = item
    return found


# -- rules -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """`[[rules]]`: options for the files whose PROFILE/BUCKET/key the pattern matches."""

    match: str
    pattern: re.Pattern[str]
    upload: ObjectOptions


def glob(pattern: str) -> re.Pattern[str]:
    """PROFILE/BUCKET/GLOB as a regular expression: `*` and `?` within a name, `[...]`, and
    `**` for zero or more whole directories."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append(f"[{'^' + body[1:] if body.startswith('!') else body}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Levels:
    """Every level of options from the config file, in the order they are laid on."""

    everywhere: ObjectOptions = NONE
    profiles: Mapping[str, ObjectOptions] = field(default_factory=dict)
    buckets: Mapping[tuple[str, str], ObjectOptions] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    # [upload], the profile's and the bucket's levels laid on, per (profile, bucket): the same
    # for every file of a bucket (a reload makes new Levels, so nothing stale is kept).
    _merged: dict[tuple[str, str], ObjectOptions] = field(
        default_factory=dict, compare=False, repr=False
    )

    def resolve(
        self, profile: str, bucket: str, key: str, own: ObjectOptions | None = None
    ) -> ObjectOptions:
        """The options of one object: [upload], its profile's, its bucket's, every matching
        rule in file order, then the file's own (flood-copy's), and content_type settled."""
        found = self._merged.get((profile, bucket))
        if found is None:
            found = self.everywhere
            found = self.profiles.get(profile, NONE).over(found)
            found = self.buckets.get((profile, bucket), NONE).over(found)
            self._merged[(profile, bucket)] = found
        if self.rules:
            path = f"{profile}/{bucket}/{key}"
            for rule in self.rules:
                if rule.pattern.match(path):
                    found = rule.upload.over(found)
        if own is not None:
            found = own.over(found)
        return found.for_key(key)

    def of_profile(self, profile: str) -> Iterable[tuple[str, ObjectOptions]]:
        """Every level that may apply to a profile's files (for the provider check)."""
        yield "[upload]", self.everywhere
        if profile in self.profiles:
            yield f"[profiles.{profile}.upload]", self.profiles[profile]
        for (p, b), options in self.buckets.items():
            if p == profile:
                yield f'[buckets."{p}/{b}".upload]', options
        for n, rule in enumerate(self.rules, 1):
            head = rule.match.split("/", 1)[0]
            if glob(head).match(profile):
                yield f"rule {n} ({rule.match})", rule.upload


def from_json(text: str | bytes | None) -> ObjectOptions | None:
    """A file's own options as flood-copy (or a producer) wrote them."""
    if not text:
        return None
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError("a file's options must be a JSON object")
    return parse(data, "the file's options")


def known_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ObjectOptions))
