# (mc lives in lib/, which is on the board's sys.path)
"""Board entry point: run the meter app; an interrupt (Ctrl-C, mpremote) opens a maintenance window.

The watchdog cannot be disarmed once the app has armed it, so after an interrupt a
timer keeps feeding it for ten minutes (enough for `meterchain board deploy`), after
which the board resets back into the app unless something reset it earlier.
"""

import gc

from mc import p256

try:
    # First, while the heap is empty: the signer's 16 KB table is one contiguous block,
    # and the temporary objects of its build are reclaimed before any code is loaded.
    p256.precompute()
except MemoryError:
    pass  # app.boot tries again and says so; the first signature builds it otherwise
gc.collect()

from mc import app, hal  # noqa: E402

_MAINTENANCE_MS = 600000

board = hal.Board()
try:
    app.main(board)
except KeyboardInterrupt:
    board.maintenance_window(_MAINTENANCE_MS)
    print("MC interrupted: maintenance window of %d s, then the board resets" % (_MAINTENANCE_MS // 1000))
except Exception as exc:  # noqa: BLE001 - a board on a pole must come back by itself
    import sys

    sys.print_exception(exc)  # type: ignore[attr-defined]
    print("MC crashed; resetting in 10 s")
    board.sleep_ms(10000)
    board.reset()
