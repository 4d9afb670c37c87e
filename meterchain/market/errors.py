"""Errors of the multi-microgrid market (M1-M6): one family under MeterChainError."""

from __future__ import annotations

from meterchain.errors import MeterChainError


class MarketError(MeterChainError):
    """Base of every error the market contracts raise."""


class InvalidModel(MarketError):
    """A microgrid or market parameter is out of range or inconsistent.

    ``subject`` says whose parameter it is ("microgrid mg2", "market"), ``field``
    is the dotted field path ("storage.e_max_wh"), ``problem`` what is wrong.
    """

    def __init__(self, subject: str | None, field: str, problem: str) -> None:
        self.subject = subject
        self.field = field
        self.problem = problem
        where = f"{subject}: {field}" if subject else field
        super().__init__(f"{where} {problem}")

    def within(self, subject: str) -> InvalidModel:
        """The same error attributed to ``subject`` (for nested records)."""
        if self.subject:
            return InvalidModel(subject, f"{self.subject}.{self.field}", self.problem)
        return InvalidModel(subject, self.field, self.problem)


class InvalidRequest(MarketError):
    """A clearing request (SC1) is malformed: ids, window lengths, deposits."""


class InfeasibleWindow(MarketError):
    """No schedule satisfies a microgrid's constraints over the window.

    ``microgrid`` names the microgrid whose own model is infeasible.
    """

    def __init__(self, microgrid: str, detail: str) -> None:
        self.microgrid = microgrid
        super().__init__(f"microgrid {microgrid}: no feasible schedule for the window ({detail})")


class SolverFailure(MarketError):
    """The QP solver stopped without an optimal solution (numerics, iteration limit)."""


class InvalidResult(MarketError):
    """A clearing result or settlement document does not decode into the expected shape."""


class SettlementError(MarketError):
    """Metered values or a clearing result cannot be settled (missing, negative, mismatched)."""
