"""Calm console logging for the board: one line per event, errors once until they recover.

A board on a pole may fail to reach its broker for days; logging the same error every
15 seconds would drown the serial console.  `failing(key, msg)` prints the first
failure of a kind and counts the rest; `recovered(key, msg)` prints when it clears.
"""


class Log:
    def __init__(self, board) -> None:
        self._board = board
        self._failing = {}  # key -> repeated failures since the first was printed

    def info(self, msg: str) -> None:
        self._board.console("MC I " + msg)

    def error(self, msg: str) -> None:
        self._board.console("MC E " + msg)

    def failing(self, key: str, msg: str) -> None:
        count = self._failing.get(key)
        if count is None:
            self._failing[key] = 0
            self.error(msg)
        else:
            self._failing[key] = count + 1

    def recovered(self, key: str, msg: str) -> None:
        count = self._failing.pop(key, None)
        if count is None:
            self.info(msg)
        else:
            self.info("%s (after %d more failures)" % (msg, count))

    def is_failing(self, key: str) -> bool:
        return key in self._failing
