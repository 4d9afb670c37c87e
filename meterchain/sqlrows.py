"""Write many rows with few SQLite statements: the batch writers' replacement for executemany.

`executemany` steps SQLite once per row and gives the GIL back around every
step. A writer whose process also verifies and receives on other threads
then waits to take the GIL back once per row (up to the switch interval
each time) while it holds the database's write lock, which the other
writers queue on. `execute_rows` sends the same rows as multi-row
`VALUES` statements: one step per 128 rows. Row by row semantics are kept
(SQLite applies a statement's rows in order, so a later row's ON CONFLICT
sees the earlier ones). Statement sizes are powers of two, so a table
needs at most 8 distinct statements in the connection's statement cache.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

MAX_ROWS = 128  # rows per statement: 128 x 7 columns is under SQLite's oldest 999-parameter cap


def execute_rows(
    db: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]], tail: str = ""
) -> None:
    """Run `head VALUES (?, ...), ... tail` over `rows` (all of one width), in order."""
    if not rows:
        return
    one = "(" + ", ".join("?" * len(rows[0])) + ")"
    at, n = 0, len(rows)
    while at < n:
        size = min(MAX_ROWS, 1 << ((n - at).bit_length() - 1))
        values = ", ".join([one] * size)
        db.execute(
            f"{head} VALUES {values} {tail}", [v for row in rows[at : at + size] for v in row]
        )
        at += size
