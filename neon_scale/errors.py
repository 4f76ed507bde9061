"""The one exception type the CLI turns into a single line and a non-zero exit, and the helpers
that make such a line."""
import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errnos that mean "no space left" (disk or quota)


class NeonError(Exception):
    """An error the user can fix: bad config, missing or corrupt file, inconsistent run dir."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): a library's multi-line
    error reduced to what fits in our one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def name_keys(keys: list[str]) -> str:
    """"'first'" or "'first' (and N more)": one line however many keys are at fault."""
    return f"'{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


EXIT_STOPPED = 3  # "stopped, resumable": launchers/slurm/neon.sbatch requeues the job on this status


class Stopped(Exception):
    """The run stopped on a signal after saving what it had; rerunning the command resumes it
    (neon_scale/stop.py)."""

    exit_code = EXIT_STOPPED
