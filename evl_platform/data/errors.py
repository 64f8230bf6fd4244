"""Data errors a user can fix, kept import-light for the command line."""


class DataSourceError(ValueError):
    """The data section does not lead to usable annotation files (one line)."""
