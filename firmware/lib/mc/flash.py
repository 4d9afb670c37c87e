"""The board's flash filesystem as one small object: every store opens, renames and removes through it.

The spool, the sequence reservations, persisted counters, the key and the config all
take a `Flash`, so a test can hand them a flash that loses power after any byte
(`mcfakes.CutFlash`) and check what survives a reboot.  On the board and in the
emulated board it is the real filesystem (LittleFS on ESP32, a host folder otherwise).
"""

import os


class Flash:
    """Files under `root` ("" or "." is the current directory, i.e. the board's /flash)."""

    def __init__(self, root: str = "") -> None:
        self.root = root.rstrip("/") if root not in ("", ".") else ""

    def path(self, name: str) -> str:
        return self.root + "/" + name if self.root else name

    def open(self, name: str, mode: str):
        return open(self.path(name), mode)

    def exists(self, name: str) -> bool:
        try:
            os.stat(self.path(name))
            return True
        except OSError:
            return False

    def size(self, name: str) -> int:
        """Size in bytes, or -1 when the file does not exist."""
        try:
            return os.stat(self.path(name))[6]
        except OSError:
            return -1

    def remove(self, name: str) -> None:
        try:
            os.remove(self.path(name))
        except OSError:
            pass

    def mkdir(self, name: str) -> None:
        try:
            os.mkdir(self.path(name))
        except OSError:
            pass

    def replace(self, src: str, dst: str) -> None:
        """Atomically make `src` the new `dst` (LittleFS and POSIX rename over a file)."""
        try:
            os.rename(self.path(src), self.path(dst))
        except OSError:
            # A filesystem whose rename refuses an existing target (FAT): the caller's
            # recovery (see Spool.open) finds the complete `src` if power fails here.
            self.remove(dst)
            os.rename(self.path(src), self.path(dst))

    def durable(self, f) -> None:
        """Push what was written to `f` down to the medium before the caller relies on it."""
        f.flush()
        fsync = getattr(os, "fsync", None)  # CPython; LittleFS commits on flush
        if fsync is not None:
            fsync(f.fileno())

    def read(self, name: str):
        """The whole file as bytes, or None when it does not exist."""
        try:
            with self.open(name, "rb") as f:
                return f.read()
        except OSError:
            return None

    def write_atomic(self, name: str, data) -> None:
        """Replace `name` with `data` so a power cut leaves either the old or the new file."""
        tmp = name + ".tmp"
        with self.open(tmp, "wb") as f:
            f.write(data)
            self.durable(f)
        self.replace(tmp, name)
