"""A real Mosquitto broker with TLS, per-client passwords and ACLs, run in a folder.

Tests, benchmarks and HIL rigs start one with `MosquittoBroker(workdir, users=..., acl=...)`.
It generates a throw-away CA and a server certificate for localhost/127.0.0.1,
writes the password and ACL files, and can be stopped, killed and restarted
on the same port so clients can test reconnection.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from meterchain.mqtt_auth import password_line
from meterchain.site.pki import make_pki
from meterchain.site.supervisor import find_mosquitto


class BrokerError(RuntimeError):
    """Mosquitto is missing or did not start; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_test_pki(directory: Path, hostnames: tuple[str, ...] = ("localhost",)) -> dict[str, Path]:
    """A CA and a server certificate (P-256) valid for `hostnames` and 127.0.0.1."""
    make_pki(directory, directory, hostnames)
    return {
        "ca": directory / "ca.crt",
        "cert": directory / "server.crt",
        "key": directory / "server.key",
    }


class MosquittoBroker:
    """One Mosquitto process listening with TLS on 127.0.0.1 (and optionally plain TCP).

    `users` maps usernames to passwords; `acl` is the text of a Mosquitto ACL
    file (see meterchain.mqtt_auth for the blocks MeterChain uses). With
    `acl=None` every authenticated user may read and write everything.
    `bind_client_ids` sets `use_username_as_clientid` as the deployed
    configuration does (no client can take over another's session); it is off
    by default because several test clients share one username.
    `autosave_interval_s` is how often Mosquitto saves its in-memory state
    (queued messages, retained messages, sessions) to disk: what a kill -9 loses.
    `max_inflight_messages` is how many QoS 1 messages Mosquitto sends a
    client before waiting for its PUBACKs; `max_queued_messages` how many it
    queues per client beyond that window; it drops the rest silently (tests of
    overload make both small).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        plain_port: bool = False,
        bind_client_ids: bool = False,
        autosave_interval_s: int = 1,
        max_inflight_messages: int = 1000,
        max_queued_messages: int = 100_000,
    ) -> None:
        self.workdir = Path(workdir)
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.bind_client_ids = bind_client_ids
        self.autosave_interval_s = autosave_interval_s
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.acl = acl
        self.port = free_port()
        self.plain_port = free_port() if plain_port else None
        self.pki = make_test_pki(self.workdir / "pki")
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"
        self._write_files()

    @property
    def ca_file(self) -> Path:
        return self.pki["ca"]

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def set_users(self, users: dict[str, str]) -> None:
        self.users = dict(users)
        self._write_files()

    def set_acl(self, acl: str | None) -> None:
        self.acl = acl
        self._write_files()

    def _write_files(self) -> None:
        passwd = self.workdir / "passwd"
        passwd.write_text("".join(password_line(u, p) + "\n" for u, p in self.users.items()))
        passwd.chmod(0o600)
        acl_path = self.workdir / "acl"
        acl_path.write_text(self.acl if self.acl is not None else "pattern readwrite #\n")
        acl_path.chmod(0o600)
        persistence = self.workdir / "persistence"
        persistence.mkdir(exist_ok=True)
        lines = [
            "per_listener_settings false",
            # As root Mosquitto would switch to the `mosquitto` user, which cannot
            # read the files in this folder; stay who we are instead.
            *(["user root"] if os.geteuid() == 0 else []),
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {acl_path}",
            "persistence true",
            f"persistence_location {persistence}/",
            f"autosave_interval {self.autosave_interval_s}",
            f"max_inflight_messages {self.max_inflight_messages}",
            # Consensus messages are small and latency-bound: without this Mosquitto's
            # writes wait for the previous segment's delayed ACK (Nagle, ~40 ms).
            "set_tcp_nodelay true",
            f"max_queued_messages {self.max_queued_messages}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"log_dest file {self.log_path}",
            f"listener {self.port} {self.host}",
            # A listener option: it binds client ids only where it follows `listener`.
            *(["use_username_as_clientid true"] if self.bind_client_ids else []),
            f"cafile {self.pki['ca']}",
            f"certfile {self.pki['cert']}",
            f"keyfile {self.pki['key']}",
            "tls_version tlsv1.2",
        ]
        if self.plain_port is not None:
            lines.append(f"listener {self.plain_port} {self.host}")
            if self.bind_client_ids:
                lines.append("use_username_as_clientid true")
        (self.workdir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.workdir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise BrokerError(f"mosquitto exited {self.process.returncode}: {err}{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.port} in {timeout}s\n{self.log()}")

    def stop(self) -> None:
        """Graceful stop: Mosquitto writes its persistence file before exiting."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def kill(self) -> None:
        """Hard stop (SIGKILL): what a power cut does to the broker."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def restart(self) -> MosquittoBroker:
        self.stop()
        return self.start()

    def reload(self) -> None:
        """Re-read password and ACL files (SIGHUP) without dropping clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def _close(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
