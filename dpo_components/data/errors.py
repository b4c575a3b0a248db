"""The errors of reading preference data: a bad source, or one bad row."""

from __future__ import annotations


class PreferenceDataError(ValueError):
    """A malformed preference row or source; the message names the source and the row."""


class BadRow(Exception):
    """Why one row is unusable (turned into PreferenceDataError or a skip count).

    ``summary`` is the reason without row-specific details, the bucket rows are counted in when skipped.
    """

    def __init__(self, why: str, summary: str | None = None) -> None:
        super().__init__(why)
        self.summary = summary or why
