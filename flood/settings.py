"""One frozen Settings, built and validated once by a command and passed down explicitly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flood import dburl
from flood.config import EMPTY, Config
from flood.credentials import Profile

MiB = 1024 * 1024
# Names editors and rsync write before renaming into place; matched against the file name.
DEFAULT_IGNORE = (".*", "*.tmp", "*.swp", "*~")


@dataclass(frozen=True)
class Settings:
    """Everything a Flood process needs to know, in plain values (it crosses process starts)."""

    server_dir: Path
    db_path: str  # a SQLite file, or a postgresql:// URL (which may carry a password)
    credentials_path: str
    profiles: Mapping[str, Profile] = field(repr=False)
    workers: int = 4
    retry_base: float = 30.0
    max_retries: int = 10
    retry_max_delay: float | None = None
    log_file: str | None = None
    log_level: str = "info"
    log_format: str = "json"  # json (ECS) or text; resolved from auto by the supervisor
    log_successes: bool = True  # file_claimed and upload_succeeded written
    multipart_threshold: int = 16 * MiB
    # Parts of 8 MiB, 10 in flight (boto3's and the aws cli's defaults); a profile's part_size
    # and parts_in_flight keys override them. Memory: parts_in_flight x part_size a file.
    part_size: int = 8 * MiB
    parts_in_flight: int = 10
    settle_seconds: float = 1.0
    rescan_interval: float = 300.0
    recheck_interval: float = 30.0
    grace: float = 20.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    # "content-md5": single PUTs are proven by the server's Content-MD5 check and the ETag;
    # multipart uploads and non-MD5 ETags are HEADed. "head": HEAD every object as well.
    verify: str = "content-md5"
    # Single PUTs go on the lean client (flood/lean.py) unless --boto3-put.
    lean_put: bool = True
    # The config file: object options, the spool's lifecycle, hooks (EMPTY: none given).
    config: Config = EMPTY
    inject_failures: float = 0.0  # the share of attempts failed on purpose (staging)
    # Every audit_interval seconds the supervisor HEADs what completed meanwhile (0: never).
    audit_interval: float = 0.0
    # Every janitor_interval seconds (and at start; 0: never) incomplete multipart uploads no
    # record knows are aborted once older than abandon_multipart_after seconds.
    janitor_interval: float = 3600.0
    abandon_multipart_after: float = 86400.0
    node: str = ""  # the node its rows are written as ('': the host name)

    def secrets(self) -> list[str]:
        """What every log line is scrubbed of: keys, tokens, proxy passwords."""
        found = [secret for p in self.profiles.values() for secret in p.secrets()]
        password = dburl.password_of(self.db_path)
        return [*found, password] if password else found
