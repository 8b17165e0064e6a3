"""Flood's exception hierarchy and the exit codes the commands map them to."""

EX_CONFIG = 78  # sysexits.h: systemd's RestartPreventExitStatus= can name it
EX_SOFTWARE = 70
EX_TEMPFAIL = 75


class FloodError(Exception):
    """Root of every error Flood raises on purpose; `exit_code` is what a command exits with."""

    exit_code = 1


class ConfigError(FloodError):
    """The operator's configuration (options, credentials file) cannot be used."""

    exit_code = EX_CONFIG


class DatabaseUnreachable(ConfigError):
    """The PostgreSQL records cannot be reached (refused, down, a lost connection): a
    supervisor waits for them, a command exits 78 naming the cause."""


class LayoutError(FloodError):
    """The server directory cannot be used (another filesystem, not a directory, locked)."""

    exit_code = EX_CONFIG


class AlreadyRunning(FloodError):
    """Another supervisor holds the server directory's lock."""

    exit_code = EX_TEMPFAIL


class InvalidName(FloodError):
    """A profile, bucket or key that S3 or Flood's rules refuse; `reason` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
