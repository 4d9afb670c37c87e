"""Durable, crash-safe log of a consensus node's `Persist` records (append, fsync, replay).

Each record is framed as 4-byte big-endian length, 4-byte CRC-32, payload.
`append` writes a batch and fsyncs before returning, so the transport can
publish a vote right after: the vote is on disk first. After a crash
mid-write, `load` stops at the first torn or corrupt frame (nothing after it
was acknowledged) and truncates the tail. The log is compacted (latest record
per round, written to a new file, fsynced, renamed over) when it grows.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError

_HEADER = struct.Struct(">II")
COMPACT_BYTES = 4 * 1024 * 1024


class StoreError(MeterChainError):
    """The consensus log cannot be read or written; the message names the file."""


def _round_key(record: bytes) -> bytes:
    try:
        return codec.encode(codec.decode(record)["round"])
    except (CodecError, KeyError, TypeError) as exc:
        raise StoreError(f"record without a round: {exc}") from exc


class RoundLog:
    """Append-only record log in `directory/consensus.log`."""

    def __init__(self, directory: str | Path, *, compact_bytes: int = COMPACT_BYTES) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "consensus.log"
        self.compact_bytes = compact_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open: {exc.strerror}") from exc
        self.writes = 0

    def load(self) -> list[bytes]:
        """Every intact record in order; a torn tail (crash during a write) is cut off."""
        data = self.path.read_bytes()
        records = []
        pos = 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            payload = data[pos + _HEADER.size : end]
            if end > len(data) or zlib.crc32(payload) != crc:
                break
            records.append(payload)
            pos = end
        if pos != len(data):
            os.ftruncate(self._fd, pos)
            os.fsync(self._fd)
        return records

    def append(self, records: Iterable[bytes]) -> None:
        frames = b"".join(_HEADER.pack(len(r), zlib.crc32(r)) + r for r in records)
        if not frames:
            return
        try:
            os.write(self._fd, frames)
            os.fdatasync(self._fd)  # the data and the file size; timestamps may lag
        except OSError as exc:
            raise StoreError(f"{self.path}: write failed: {exc.strerror}") from exc
        self.writes += 1
        if os.fstat(self._fd).st_size > self.compact_bytes:
            self.compact()

    def compact(self) -> None:
        """Keep only the latest record of each round."""
        latest: dict[bytes, bytes] = {}
        for record in self.load():
            latest[_round_key(record)] = record
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            out.write(b"".join(_HEADER.pack(len(r), zlib.crc32(r)) + r for r in latest.values()))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)

    def close(self) -> None:
        os.close(self._fd)
