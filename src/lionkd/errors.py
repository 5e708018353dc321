"""Errors a user can fix (the CLI prints one line, exit code 2), and the budget's stop (one line, exit code 3)."""


class UserError(Exception):
    """Bad input: a config key, a data file line, a missing path. The message names the place."""


class BudgetExceeded(Exception):
    """The run's budget (`budget`, `<role>.budget`) does not allow the next call. Finished calls are stored;
    the CLI prints one line and exits with code 3, and a rerun with a larger budget goes on."""

    def __init__(self, message: str, *, role: str = "", calls_left: int = 0, cost_left: float = 0.0) -> None:
        super().__init__(message)
        self.role, self.calls_left, self.cost_left = role, calls_left, cost_left
