#!/usr/bin/env python3
"""The records alone on PostgreSQL: batches of 31 claims and their completions, as an uploader
writes them, through a relay on loopback that counts round trips (an answer of the server
after bytes of the client). Prints, per file: this process's CPU, the CPU of the server's
processes when it runs on this machine, the wall time; and round trips per batch.

Usage: python tests/benchmarks/records_pg.py --db postgresql://USER@127.0.0.1:PORT/DB
[--batches 300]; the password as libpq finds it ($PGPASSFILE keyed by the relay's port too,
or $PGPASSWORD). Write into a database of its own: it adds rows."""

from __future__ import annotations

import argparse
import os
import select
import socket
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

from flood import records
from flood.jobs import FileRef
from flood.records import Claim, Completion

BATCH = 31  # flood.upload.BATCH


class Relay:
    """Loopback TCP relay to the server, counting turns: server bytes that follow client bytes."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.turns = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self.upstream)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        last = None
        with client, server:
            while True:
                for sock in select.select([client, server], [], [])[0]:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is server:
                        if last == "client":
                            self.turns += 1
                        client.sendall(data)
                    else:
                        server.sendall(data)
                    last = "server" if sock is server else "client"


def server_cpu() -> float:
    """CPU seconds of this machine's postgres processes so far."""
    ticks = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if name == "postgres" or name.startswith("postgres:"):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="postgresql:// URL of a scratch database")
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    url = urllib.parse.urlsplit(args.db)
    relay = Relay(url.hostname or "127.0.0.1", url.port or 5432)
    netloc = f"{url.username}@127.0.0.1:{relay.port}" if url.username else f"127.0.0.1:{relay.port}"
    records.open_db(urllib.parse.urlunsplit(url._replace(netloc=netloc)))
    run = uuid.uuid4().hex[:8]

    def batch(number: int) -> None:
        refs = [FileRef("p", "b", f"{run}/{number}/{i}") for i in range(BATCH)]
        ids = records.record_claims([Claim(ref, None, 4096) for ref in refs])
        records.record_completions([Completion(i, 4096, "etag", 0) for i in ids], "p")

    for number in range(5):  # connections made, statements prepared
        batch(-1 - number)
    relay.turns = 0
    cpu, served, wall = time.process_time(), server_cpu(), time.perf_counter()
    for number in range(args.batches):
        batch(number)
    cpu, served = time.process_time() - cpu, server_cpu() - served
    wall = time.perf_counter() - wall
    files = args.batches * BATCH
    print(
        f"{files} files in {args.batches} batches: client CPU {1e3 * cpu / files:.3f} ms a file"
        f" (with the relay's threads), server CPU {1e3 * served / files:.3f} ms a file, wall"
        f" {1e3 * wall / files:.3f} ms a file, {relay.turns / args.batches:.2f} round trips a batch"
    )
    records.close_db()


if __name__ == "__main__":
    main()
