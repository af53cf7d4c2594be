"""One progress line per long step of a conversion (rich), on stderr; silent when disabled."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextmanager
def steps(enabled: bool):
    """Yields `step(text)`, a context manager that shows `text` with a spinner until the step ends."""
    columns = (SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        @contextmanager
        def step(text: str):
            task = bar.add_task(text, total=1)
            yield
            bar.update(task, completed=1)

        yield step
