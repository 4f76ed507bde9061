"""The one exception type the CLI turns into a single line and a non-zero exit."""


class NeonError(Exception):
    """An error the user can fix: bad config, missing or corrupt file, inconsistent run dir."""
