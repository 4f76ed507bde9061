"""The one exception type the CLI turns into a single line and a non-zero exit."""


class NeonError(Exception):
    """An error the user can fix: bad config, missing or corrupt file, inconsistent run dir."""


def name_keys(keys: list[str]) -> str:
    """"'first'" or "'first' (and N more)": one line however many keys are at fault."""
    return f"'{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
