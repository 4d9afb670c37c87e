"""`meterchain site up|down`: the whole site as real processes, kept running like systemd would.

`up` starts the supervisor, which runs the site's processes with their own
configurations:
Mosquitto (when the site runs its own broker), the aggregator and one edge
agent per microgrid (`meterchain aggregator|agent run --config ...`); once
the genesis block is on the ledger (the members signed it), it starts the
market clock (`meterchain.site.clock`: the anchor file, `settle_s` ahead, so
every service begins the day together; a site started again keeps its clock)
and the lab of an `--emulated` site (`python -m hil.lab`: emulated SDM630s and
boards). A
process that dies is started again after `RESTART_S`, as systemd's
`Restart=on-failure` does, unless it exited with status 2 (a configuration
error). Logs go to `run/<name>.log`; `run/status.json` holds every process's
pid, restarts and the ledger height.

`down` stops the site in order: the lab first (boards power off, the lab
writes how many readings its boards sent to the broker), then it waits until
the aggregator has put every one of them on the ledger (`drain_s` at
most), then the agents and the aggregator (SIGTERM: each finishes what it
holds), then the broker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterchain.site import layout
from meterchain.site.clock import start_clock
from meterchain.site.layout import Site, SiteError

RESTART_S = 1.0
POLL_S = 0.2
STOP_TIMEOUT_S = 30.0


def find_mosquitto() -> str:
    """The mosquitto binary (installed by `make setup`)."""
    known = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
    for candidate in (shutil.which("mosquitto"), *known):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SiteError("mosquitto not found; run `make setup` (installs it via apt)")


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    failed: str = ""
    exited_at: float = 0.0
    history: list[int] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            out.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def tail(self, lines: int = 3) -> str:
        """The last lines of the process's log (what it said before it stopped)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        return None if self.process is None else terminate(self.process, timeout)


def terminate(process: subprocess.Popen[Any], timeout: float) -> int | None:
    """SIGTERM `process`, SIGKILL it if it has not exited within `timeout` s; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


class Supervisor:
    """Starts, watches and stops the processes of one site."""

    def __init__(self, site: Site, *, settle_s: float = 2.0, drain_s: float = 60.0) -> None:
        self.site = site
        self.settle_s = settle_s
        self.drain_s = drain_s
        site.run_dir.mkdir(exist_ok=True)
        self.children: dict[str, Child] = {}
        self.state = "starting"
        self.note = ""
        self.published: int | None = None
        self.stop_event = threading.Event()

    def _child(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.site.run_dir / f"{name}.log")
        self.children[name] = child
        return child

    def _services(self) -> list[Child]:
        site = self.site
        out = []
        if site.site.run_broker:
            out.append(self._child("mosquitto", [find_mosquitto(), "-c", str(site.broker_config)]))
        out.append(
            self._child(
                "aggregator",
                _python("-m", "meterchain.cli", "aggregator", "run", "--config",
                        str(site.aggregator_config)),
            )
        )  # fmt: skip
        for mg in site.microgrids:
            out.append(
                self._child(
                    f"agent-{mg}",
                    _python("-m", "meterchain.cli", "agent", "run", "--config",
                            str(site.agent_config(mg))),
                )
            )  # fmt: skip
        return out

    # --- status ---------------------------------------------------------------------
    def ledger_height(self) -> int:
        if not self.site.ledger.exists():
            return -1
        from meterchain.ledger.store import open_store

        try:
            with open_store(str(self.site.ledger), create=False) as store:
                head = store.head()
        except Exception:  # noqa: BLE001 - being written right now: ask again later
            return -1
        return head[0] if head else -1

    def ledger_readings(self) -> int:
        from meterchain.ledger.store import open_store

        with open_store(str(self.site.ledger), create=False) as store:
            return int(store.reading_count())

    def write_status(self) -> None:
        status: dict[str, Any] = {
            "state": self.state,
            "note": self.note,
            "supervisor": os.getpid(),
            "ledger_height": self.ledger_height(),
            "published": self.published,
            "processes": {
                c.name: {"pid": c.pid, "alive": c.alive(), "restarts": c.restarts,
                         "failed": c.failed, "exits": c.history}
                for c in self.children.values()
            },
        }  # fmt: skip
        path = self.site.run_dir / "status.json"
        tmp = path.with_name("status.json.tmp")
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, path)

    # --- running --------------------------------------------------------------------
    def _wait_broker(self, timeout: float = 15.0) -> None:
        import socket
        from urllib.parse import urlsplit

        url = urlsplit(self.site.site.broker_url)
        host, port = url.hostname or "127.0.0.1", url.port or 8883
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                if "mosquitto" in self.children and not self.children["mosquitto"].alive():
                    log = self.children["mosquitto"].log
                    raise SiteError(f"mosquitto exited; see {log}") from None
                time.sleep(0.05)
        raise SiteError(f"the broker at {host}:{port} did not answer in {timeout:.0f} s")

    def _watch(self) -> None:
        """Restart what died (Restart=on-failure; exit status 2 is a config error: not)."""
        now = time.monotonic()
        for child in self.children.values():
            proc = child.process
            if proc is None or proc.poll() is None or child.failed:
                continue
            if not child.exited_at:
                child.exited_at = now
                child.history.append(proc.returncode)
                if proc.returncode == 2:
                    child.failed = f"exited 2 (configuration error), see {child.log}"
                    continue
            if now - child.exited_at >= RESTART_S:
                child.exited_at = 0.0
                child.restarts += 1
                child.start()

    def run(self, ready: threading.Event | None = None) -> int:
        """Start everything, supervise until `stop_event`, then stop in order; exit status."""
        try:
            services = self._services()
            for child in services:
                child.start()
                if child.name == "mosquitto":
                    self._wait_broker()
            self.write_status()
            deadline = time.monotonic() + 120
            while self.ledger_height() < 0 and not self.stop_event.is_set():
                self._watch()
                self.write_status()
                failed = [c for c in self.children.values() if c.failed]
                if failed:  # a configuration error: no restart can fix it
                    raise SiteError(f"{failed[0].name} {failed[0].failed}: {failed[0].tail()}")
                if time.monotonic() > deadline:
                    raise SiteError("no genesis block after 120 s: see run/aggregator.log")
                time.sleep(POLL_S)
            if not self.site.clock.real_time:
                start_clock(self.site.clock_anchor, time.time() + self.settle_s)
            if self.site.site.emulated:
                lab = self._child("lab", _python("-m", "hil.lab", str(self.site.lab_config)))
                lab.start()
            self.state = "up"
            self.write_status()
            if ready is not None:
                ready.set()
            while not self.stop_event.wait(POLL_S):
                self._watch()
                self.write_status()
        except SiteError as exc:
            self.note = str(exc)
            self.state = "failed"
        finally:
            self._shutdown()
        return 1 if self.state == "failed" else 0

    def _shutdown(self) -> None:
        state = self.state
        self.state = "stopping"
        self.write_status()
        lab = self.children.get("lab")
        if lab is not None:
            lab.stop()
            self._drain()
        for child in reversed(list(self.children.values())):
            if child.name not in ("lab", "mosquitto"):
                threading.Thread(target=child.stop, daemon=True).start()
        for child in self.children.values():
            if child.name not in ("lab", "mosquitto") and child.process is not None:
                try:
                    child.process.wait(STOP_TIMEOUT_S + 5)
                except subprocess.TimeoutExpired:
                    child.process.kill()
        if "mosquitto" in self.children:
            self.children["mosquitto"].stop()
        self.state = "failed" if state == "failed" else "down"
        self.write_status()

    def _drain(self) -> None:
        """Wait until every reading the boards sent is on the ledger."""
        try:
            status = json.loads(self.site.lab_status.read_text())
        except (OSError, ValueError):
            return
        self.published = int(status.get("published", 0))
        deadline = time.monotonic() + self.drain_s
        while time.monotonic() < deadline:
            self._watch()
            try:
                if self.ledger_readings() >= self.published:
                    return
            except Exception:  # noqa: BLE001 - the ledger is being written: ask again
                pass
            time.sleep(POLL_S)
        self.note = f"drain: not every published reading reached the ledger in {self.drain_s} s"


def settled_hours(ledger: Path) -> set[int]:
    """The hours (Unix s // 3600) the aggregator has settled on `ledger` so far."""
    from meterchain.errors import MeterChainError
    from meterchain.ledger.store import open_store
    from meterchain.ledger.transactions import Tx

    if not ledger.exists():
        return set()
    try:
        with open_store(str(ledger), create=False) as store:
            return {
                Tx.decode(raw).body["hour"]
                for stored in store.stored_blocks()
                for kind, _, raw in stored.txs
                if kind == "settlement"
            }
    except (MeterChainError, OSError):
        return set()  # being written right now: look again


def wait_settled(site: Site, hours: int, timeout: float, note: Any = None) -> int:
    """Until `hours` hours are settled on the site's ledger (SiteError after `timeout` s or
    when the site stops); returns how many are."""
    deadline = time.monotonic() + timeout
    done = -1
    while True:
        count = len(settled_hours(site.ledger))
        if count != done and note is not None:
            note(count)
        done = count
        if done >= hours:
            return done
        state = status(site).get("state")
        if state not in ("up", "starting"):
            raise SiteError(f"the site is {state}: {status(site).get('note') or 'see run/'}")
        if time.monotonic() > deadline:
            raise SiteError(f"{done} of {hours} hours settled after {timeout:.0f} s; see the "
                            f"logs in {site.run_dir}")  # fmt: skip
        time.sleep(0.2)


def _running(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def supervisor_pid(site: Site) -> int | None:
    """The pid of the site's running supervisor, if any."""
    try:
        pid = int((site.run_dir / "supervisor.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _running(pid) else None


def status(site: Site) -> dict[str, Any]:
    try:
        return dict(json.loads((site.run_dir / "status.json").read_text()))
    except (OSError, ValueError):
        return {"state": "down"}


def up(root: Path, *, settle_s: float = 2.0, timeout: float = 180.0) -> Site:
    """Start the supervisor in the background; return once the site is up (see the module doc)."""
    site = layout.load(root)
    if supervisor_pid(site) is not None:
        raise SiteError(f"{site.root} is already up (supervisor {supervisor_pid(site)})")
    site.run_dir.mkdir(exist_ok=True)
    (site.run_dir / "status.json").unlink(missing_ok=True)
    with open(site.run_dir / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(
            _python("-m", "meterchain.site.supervisor", str(site.root), str(settle_s)),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    (site.run_dir / "supervisor.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status(site).get("state")
        if state == "up":
            return site
        if state == "failed" or proc.poll() is not None:
            raise SiteError(f"the site did not come up: {status(site).get('note')} "
                            f"(see {site.run_dir})")  # fmt: skip
        time.sleep(0.1)
    raise SiteError(f"the site did not come up in {timeout:.0f} s (see {site.run_dir})")


def down(root: Path, *, timeout: float = 180.0) -> dict[str, Any]:
    """Stop a running site in order (see the module doc); returns its final status."""
    site = layout.load(root)
    pid = supervisor_pid(site)
    if pid is None:
        return status(site)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            break
        time.sleep(0.1)
    else:
        raise SiteError(f"the supervisor {pid} did not stop in {timeout:.0f} s")
    (site.run_dir / "supervisor.pid").unlink(missing_ok=True)
    return status(site)


def main(argv: list[str] | None = None) -> int:
    """`python -m meterchain.site.supervisor DIR [SETTLE_S]`: run the site until SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    site = layout.load(Path(args[0]))
    supervisor = Supervisor(site, settle_s=float(args[1]) if len(args) > 1 else 2.0)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.stop_event.set())
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
