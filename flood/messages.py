"""What each log event says to a person: a short sentence per event.action (the action stays
the stable name machines match on; the sentence is for the one reading the log)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# event.action -> a sentence; {field} is the event's own keyword (missing ones show as ?).
MESSAGES = {
    "audit_crashed": "the periodic audit crashed",
    "audit_finished": (
        "audit: {checked} objects checked, {missing} missing, {different} different, "
        "{errors} not checked"
    ),
    "audit_unchecked": (
        "audit: {count} objects of {profile}/{bucket} not checked ({reason}): {error}"
    ),
    "bucket_paused": "bucket {profile}/{bucket} paused: {error}",
    "bucket_resumed": "bucket {profile}/{bucket} resumed",
    "child_boot_failed": "{child} failed at start (exit code {exit_code})",
    "child_died": "{child} died (exit code {exit_code}); restarting the children",
    "child_killed": "{child} killed: {reason}",
    "children_started": "started {count} child processes",
    "config_loaded": "config file {path} read",
    "credentials_file_exposed": "the credentials file can be read by others: {reason}",
    "credentials_file_skipped": "skipped a credentials file that is not Flood's: {reason}",
    "credentials_loaded": "credentials read from {path} ({reason})",
    "credentials_reloaded": "credentials read again from {path}",
    "db_recorded": "records in {path}, as the server dir now says",
    "node_recorded": "rows written as node {node}, as the server dir now says",
    "database_unreachable": "the records database is unreachable, nothing is uploaded until "
    "it is back: {error}",
    "database_reachable": "the records database is back after {seconds} s",
    "database_waiting": "waiting for the records database: {error}",
    "database_back": "the records database is back after {seconds} s; going on",
    "directories_ready": "the server dir's directories are ready",
    "failure_injection_on": "failure injection is on: {reason}",
    "file_claimed": "claimed {key} for {profile}/{bucket}",
    "file_ignored": "left in incoming/: {reason}",
    "file_misplaced": "left in incoming/: {reason}",
    "file_removed": "removed {key} of {profile}/{bucket} from completed/ ({reason})",
    "file_requeued": (
        "{key} of {profile}/{bucket} back in incoming/ after {reason} (requeue {requeues})"
    ),
    "file_vanished": "{key} vanished from processing/ before its move",
    "give_up_failed": "could not move {key} to failed/",
    "hold_check_crashed": "the check of a paused profile or bucket crashed",
    "hook_crashed": "running a hook crashed",
    "hook_failed": "the {hook} hook for {key} failed for good after {attempt} tries: {error}",
    "hook_ran": "the {hook} hook for {key} ran",
    "hook_retry_scheduled": "the {hook} hook for {key} failed, again in {delay} s: {error}",
    "hooks_crashed": "the hook runner crashed",
    "incoming_tmp_wiped": "incoming_tmp/ wiped ({entries} entries left by producers)",
    "inotify_overflow": "the inotify queue overflowed: rescanning",
    "inotify_read_failed": "reading inotify events failed: {error}",
    "janitor_crashed": "the orphan janitor crashed",
    "janitor_finished": (
        "janitor: {orphans} orphan uploads, {aborted} aborted, {failing} failing, "
        "{left_young} left young"
    ),
    "job_skipped": "skipped {key}: already handled",
    "library_log": "{logger}: {text}",
    "metrics_failed": "metrics not served: {error}",
    "metrics_serving": "metrics served on {address}:{port}",
    "move_failed": "could not move {key} after its upload: {error}",
    "multipart_abort_failed": "could not abort the multipart upload of {key}: {error}",
    "multipart_aborted": "aborted the multipart upload of {key}: {reason}",
    "multipart_restarted": "multipart upload of {key} started over: {reason}",
    "multipart_resumed": "multipart upload of {key} resumed ({parts_done} of {parts} parts done)",
    "object_different": "audit: {key} of {profile}/{bucket} differs from its record: {differs}",
    "object_missing": "audit: {key} of {profile}/{bucket} is missing from the bucket",
    "orphan_abort_failed": "could not abort the orphan upload of {key}: {error}",
    "orphan_aborted": "aborted the orphan upload {upload_id} of {key} ({age_seconds} s old)",
    "orphan_list_failed": "could not list the incomplete uploads of {profile}: {error}",
    "path_escapes": "refused {key}: {reason}",
    "profile_checked": "profile {profile} checked",
    "profile_paused": "profile {profile} paused: {error}",
    "profile_resumed": "profile {profile} resumed",
    "profile_unknown": "profile directory {profile} has no profile in the credentials file",
    "record_repaired": "record of {key} repaired: {was} -> {now}",
    "reload_failed": "reload failed: {error}",
    "rescan_finished": "rescan of {profile} finished ({files} files)",
    "rescan_started": "rescan of {profile} started: {reason}",
    "restart_backoff": "restarting the children in {delay} s",
    "signal_received": "{signal} received: {reason}",
    "source_modified": "{key} changed while it was read: uploading it again once it settles",
    "startup_drain_dispatched": "start-up drain dispatched {files} files",
    "startup_drain_queued": "start-up drain queued {files} files; watching for new ones",
    "startup_failed": "start-up failed: {error}",
    "supervisor_crashed": "the supervisor crashed",
    "supervisor_stopped": "stopped (exit status {exit_code})",
    "sweep_crashed": "the lifecycle's sweep crashed",
    "sweep_finished": "sweep: {removed} removed from completed/, {requeued} requeued",
    "tls_verification_off": "TLS is not verified for profile {profile}: {reason}",
    "upload_crashed": "handling {key} crashed",
    "upload_failed": "{key} failed for {profile}/{bucket}: {error}",
    "upload_held": "{key} waits for {profile}'s hold: {error}",
    "upload_retry_scheduled": (
        "{key} failed for {profile}/{bucket}, retry {next_attempt} later: {error}"
    ),
    "upload_succeeded": "uploaded {key} to {profile}/{bucket}",
    "uploader_started": "uploader {slot} of {profile} started",
    "uploader_stopped": "uploader {slot} of {profile} stopped",
    "verify_skipped": "{key} not verified by HEAD: {reason}",
    "watch_failed": "could not watch {path}: {error}",
    "watchdog_resumed": "every child reports progress again",
    "watchdog_withheld": "watchdog withheld: {children} silent ({reason})",
    "watcher_stopped": "watcher stopped",
}


class _Fields(dict[str, Any]):
    def __missing__(self, name: str) -> str:
        return "?"


def message(action: str, fields: Mapping[str, Any]) -> str:
    """The sentence for one event; an action without one reads as its words."""
    template = MESSAGES.get(action)
    if template is None:
        return action.replace("_", " ")
    shown = _Fields(
        (k, ", ".join(map(str, v)) if isinstance(v, list | tuple) else v) for k, v in fields.items()
    )
    try:
        return template.format_map(shown)
    except (ValueError, AttributeError, IndexError, KeyError):
        return action.replace("_", " ")
