"""The config file and object options as pure logic: how levels and rules combine, what the
globs match, the headers and boto3 parameters they become, what each provider refuses, and
that deploy/flood.toml is a valid config."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from flood import config, options
from flood.credentials import Profile
from flood.errors import ConfigError
from flood.options import Levels, ObjectOptions, Rule
from flood.supervisor import cli

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROFILES = {
    "p1": Profile("p1", "amazon", "AK", "SK", "us-east-1", "http://127.0.0.1:1"),
    "r2": Profile("r2", "cloudflare", "AK", "SK", "auto", "http://127.0.0.1:1"),
}


def rule(match: str, **upload: object) -> Rule:
    return Rule(match, options.glob(match), options.parse(upload, "test"))


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("p/b/**/*.log", "p/b/x.log", True),  # ** spans zero directories
        ("p/b/**/*.log", "p/b/a/b/c/x.log", True),
        ("p/b/**/*.log", "p/b/a/x.txt", False),
        ("p/b/*.log", "p/b/a/x.log", False),  # * stays within a name
        ("p/b/logs/**", "p/b/logs/a/b", True),
        ("p/b/day-?.csv", "p/b/day-1.csv", True),
        ("p/b/day-?.csv", "p/b/day-10.csv", False),
        ("p/b/[!x]*.txt", "p/b/a.txt", True),
        ("p/b/[!x]*.txt", "p/b/x.txt", False),
        ("*/b/k", "p/b/k", True),
        ("p/b/a.b", "p/b/aXb", False),  # . is literal
    ],
)
def test_rule_globs(pattern: str, path: str, matches: bool) -> None:
    assert bool(options.glob(pattern).match(path)) is matches


def test_levels_override_key_by_key_and_merge_tables() -> None:
    levels = Levels(
        everywhere=options.parse(
            {"cache_control": "a", "metadata": {"x": "1", "y": "1"}, "tags": {"t": "1"}}, "u"
        ),
        profiles={
            "p1": options.parse({"storage_class": "GLACIER_IR", "metadata": {"y": "2"}}, "p")
        },
        buckets={("p1", "b"): options.parse({"cache_control": "b", "tags": {"u": "2"}}, "b")},
        rules=(
            rule("p1/b/**/*.gz", content_encoding="gzip", cache_control="r1"),
            rule("p1/b/special/*", cache_control="r2"),
        ),
    )
    own = options.parse({"metadata": {"x": "own"}}, "own")
    found = levels.resolve("p1", "b", "special/f.json.gz", own)
    assert found.set() == {
        "cache_control": "r2",  # the later rule wins
        "content_encoding": "gzip",
        "content_type": "application/json",  # "auto": mimetypes reads .json.gz as JSON, gzipped
        "storage_class": "GLACIER_IR",
        "metadata": {"x": "own", "y": "2"},
        "tags": {"t": "1", "u": "2"},
    }
    other = levels.resolve("p2", "c", "f.unknown-ext")
    assert other.set() == {
        "cache_control": "a",
        "metadata": {"x": "1", "y": "1"},
        "tags": {"t": "1"},
    }


@pytest.mark.parametrize(
    ("setting", "key", "sent"),
    [
        (None, "index.html", "text/html"),
        ("auto", "a/b/report.pdf", "application/pdf"),
        ("auto", "noext", None),
        ("none", "index.html", None),
        ("text/x-mine", "index.html", "text/x-mine"),
    ],
)
def test_content_type(setting: str | None, key: str, sent: str | None) -> None:
    chosen = ObjectOptions(content_type=setting).for_key(key)
    assert chosen.headers().get("Content-Type") == sent
    assert chosen.params().get("ContentType") == sent


def test_headers_and_params_carry_every_option() -> None:
    chosen = options.parse(
        {
            "content_type": "text/plain",
            "content_encoding": "gzip",
            "content_disposition": "inline",
            "cache_control": "no-cache",
            "storage_class": "DEEP_ARCHIVE",
            "acl": "bucket-owner-full-control",
            "sse": "aws:kms",
            "sse_kms_key_id": "alias/k",
            "metadata": {"Owner": "ops"},
            "tags": {"a b": "c&d", "e": "f"},
        },
        "t",
    )
    assert chosen.headers() == {
        "Content-Type": "text/plain",
        "Content-Encoding": "gzip",
        "Content-Disposition": "inline",
        "Cache-Control": "no-cache",
        "x-amz-storage-class": "DEEP_ARCHIVE",
        "x-amz-acl": "bucket-owner-full-control",
        "x-amz-server-side-encryption": "aws:kms",
        "x-amz-server-side-encryption-aws-kms-key-id": "alias/k",
        "x-amz-meta-Owner": "ops",
        "x-amz-tagging": "a+b=c%26d&e=f",
    }
    params = chosen.params()
    assert params["StorageClass"] == "DEEP_ARCHIVE" and params["SSEKMSKeyId"] == "alias/k"
    assert params["Metadata"] == {"Owner": "ops"} and params["Tagging"] == "a+b=c%26d&e=f"
    assert options.from_json(chosen.to_json()) == chosen


@pytest.mark.parametrize(
    ("provider", "chosen", "refused"),
    [
        ("amazon", {"acl": "public-read", "sse": "aws:kms", "tags": {"a": "b"}}, []),
        ("cloudflare", {"storage_class": "STANDARD_IA"}, []),
        ("cloudflare", {"storage_class": "GLACIER"}, ["storage_class 'GLACIER'"]),
        ("cloudflare", {"acl": "private", "tags": {"a": "b"}}, ["acl 'private'", "tags (tags)"]),
        ("backblaze", {"acl": "public-read", "sse": "AES256"}, []),
        ("backblaze", {"sse": "aws:kms"}, ["sse 'aws:kms'"]),
        ("backblaze", {"acl": "authenticated-read"}, ["acl 'authenticated-read'"]),
    ],
)
def test_what_each_provider_refuses(
    provider: str, chosen: dict[str, object], refused: list[str]
) -> None:
    assert options.refused_by(provider, options.parse(chosen, "t")) == refused


def test_the_deploy_example_is_a_valid_config(tmp_path: Path) -> None:
    """deploy/flood.toml: its tables check, and its [supervisor] keys are real flags."""
    path = DEPLOY / "flood.toml"
    data = config.read(path)
    conf = config.build(path, data, PROFILES)
    assert conf.lifecycle.keep_completed == 7 * 86400
    assert conf.levels.everywhere.content_type == "auto"
    parser = cli.parser()
    cli.from_file(parser, data["supervisor"], path)
    args = parser.parse_args([])
    assert (args.server_dir, args.workers, args.metrics_port) == ("/srv/flood", 4, 9464)


def test_a_flag_wins_over_the_file(tmp_path: Path) -> None:
    parser = cli.parser()
    cli.from_file(parser, {"workers": 2, "retry-base": "5", "boto3_put": True}, tmp_path)
    args = parser.parse_args(["--workers", "7", "srv"])
    assert (args.workers, args.retry_base, args.boto3_put, args.server_dir) == (7, 5.0, True, "srv")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"boto3_put": "yes"}, "must be true or false"),
        ({"verify": "sha"}, "'sha' is not one of content-md5, head"),
        ({"workers": 0}, "[supervisor] workers"),
        ({"config": "x"}, "unknown key 'config'"),
    ],
)
def test_bad_supervisor_tables(tmp_path: Path, table: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        cli.from_file(cli.parser(), table, tmp_path / "f.toml")
    assert expected in str(caught.value)


def test_a_bucket_lifecycle_inherits_what_it_does_not_set(tmp_path: Path) -> None:
    data = {
        "lifecycle": {"keep_completed": "12h", "requeue_failed_after": "30m"},
        "buckets": {"p1/b": {"lifecycle": {"on_success": "delete"}}},
    }
    conf = config.build(tmp_path / "f.toml", data, PROFILES)
    mine = conf.lifecycle_of("p1", "b")
    assert (mine.on_success, mine.keep_completed, mine.requeue_failed_after) == (
        "delete",
        43200,
        1800,
    )
    assert conf.lifecycle_of("p1", "other").on_success == "keep"


def test_parsers_refuse_without_echoing_values_they_cannot_use() -> None:
    with pytest.raises(ConfigError, match="must be one line"):
        options.parse({"cache_control": "a\r\nx-amz-acl: public-read"}, "t")
    with pytest.raises(ConfigError, match="not an ASCII header name"):
        options.parse({"metadata": {"bad key": "v"}}, "t")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.share("1.5")
