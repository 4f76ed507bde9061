"""The one exception type the CLI turns into a single line and a non-zero exit."""


class NeonError(Exception):
    """An error the user can fix: bad config, missing or corrupt file, inconsistent run dir."""


def name_keys(keys: list[str]) -> str:
    """"'first'" or "'first' (and N more)": one line however many keys are at fault."""
    return f"'{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


EXIT_STOPPED = 3  # "stopped, resumable": launchers/slurm/neon.sbatch requeues the job on this status


class Stopped(Exception):
    """The run stopped on a signal after saving what it had; rerunning the command resumes it
    (neon_scale/stop.py)."""

    exit_code = EXIT_STOPPED
