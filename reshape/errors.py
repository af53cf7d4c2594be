"""One error family for everything a user can get wrong.

Every problem names the field, the value and the fix, on one line, so the CLI can print it as is
and exit with code 2. Validation collects all problems before raising, so a user fixes them at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    field: str
    value: object
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}={self.value}: {self.reason}; {self.fix}"


class ReshapeError(Exception):
    """Bad input: one or more problems, each printable on one line."""

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def fail(field: str, value: object, reason: str, fix: str) -> ReshapeError:
    """Build the error for a single problem: `raise fail(...)`."""
    return ReshapeError(Problem(field, value, reason, fix))
