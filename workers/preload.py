"""What the forkserver holds for every child it forks: the heavy imports, botocore's S3 model
parsed once, and its objects kept out of the children's garbage collections."""

from __future__ import annotations

import ctypes
import gc
import mimetypes
import sys

from flood import drivers

drivers.keep_out_unused()  # before peewee is imported below

# Imported for what they load: here once, in pages every child shares.
import encodings.idna  # noqa: E402, F401 - host names, on the first connection
import multiprocessing.popen_forkserver  # noqa: E402 - to unpickle a child: its process,
import multiprocessing.queues  # noqa: E402 - its queues and locks
import multiprocessing.synchronize  # noqa: E402, F401
import pkgutil  # noqa: E402, F401 - with runpy: multiprocessing runs the main script there
import runpy  # noqa: E402, F401

# botocore imports awscrt whenever it is installed (the crt extra) to offer what Flood never
# asks of it (SigV4a, computing a body's CRC32C: Flood sends its checksums' values itself);
# resident, the library holds 4 MiB of the forkserver. Hidden while botocore loads, awscrt is
# still there for flood.checksums, which imports it for a profile that wants CRC32C.
_hidden = "awscrt" not in sys.modules
if _hidden:
    sys.modules["awscrt"] = None  # type: ignore[assignment]  # None: "not importable"
import boto3  # noqa: E402, F401
import botocore.client  # noqa: E402, F401

if _hidden:
    del sys.modules["awscrt"]
import pyinotify  # noqa: E402, F401
import structlog  # noqa: E402, F401

from flood import logs, records, upload  # noqa: E402, F401 - records: peewee
from flood.connection import Connection  # noqa: E402
from flood.credentials import Profile  # noqa: E402
from flood.s3 import client_for  # noqa: E402
from flood.workers import checker, uploader, watcher  # noqa: E402, F401


def fill_loader() -> None:
    """Make one S3 client (never used: no request, no socket) so that the process's data
    loader holds the parsed model, endpoint rules and defaults every child's clients need."""
    profile = Profile(
        name="preload",
        provider="amazon",
        access_key_id="preload",
        secret_access_key="preload",  # a placeholder: this client sends nothing
        region="us-east-1",
        endpoint="http://127.0.0.1:9",
    )
    client_for(Connection(profile))


fill_loader()
# The type table content_type = "auto" reads (/etc/mime.types and the like, ~2,000 entries),
# read here once: read in each uploader at its first guess, it cost 1.9 MiB apiece.
mimetypes.init()
records.initialise_sqlite()  # once here, not 0.5 MiB in every child that opens the records
logs.quiet_libraries()  # the level every child's logs.configure sets, unless told otherwise
# Everything made so far lives as long as the forkserver: a child's collections need not
# visit it, and visiting would write to (and so copy) the shared pages that hold it.
gc.collect()
gc.freeze()
# And what the imports and that client left free goes back to the system, not into every
# child's copy of the heap.
ctypes.CDLL(None).malloc_trim(0)
