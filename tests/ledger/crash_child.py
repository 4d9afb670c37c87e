"""Child process for the crash tests: commit blocks and die by SIGKILL at a chosen point.

Usage: crash_child.py LEDGER STEP COUNT. STEP is a commit step name from
`LedgerStore.append` ("begin", "block", "txs", "readings", "inbox", "committed") at
which the process kills itself during the first block, or "none" to commit COUNT
blocks until the parent kills it from outside.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ledger_world import H0, hour_readings  # noqa: E402

from meterchain.ledger.chain import verify_store  # noqa: E402
from meterchain.ledger.sandbox import Chain, Sandbox  # noqa: E402
from meterchain.ledger.store import open_store  # noqa: E402


def main() -> None:
    url, step, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = open_store(url)
    state, _ = verify_store(store, signatures=False)
    chain = Chain(Sandbox(market="m1", members=3), store, state)

    def hook(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    store.on_commit_step = hook
    for i in range(count):
        hour = H0 + 3 + i  # after the last block of the world
        readings = hour_readings(chain.sandbox, hour, 13 + 6 * i)
        store.ingest_readings(readings)
        chain.commit_readings(store.inbox_readings(), (hour + 1) * 3600 + 5, signatures=False)
        print(f"committed {hour}", flush=True)


if __name__ == "__main__":
    main()
