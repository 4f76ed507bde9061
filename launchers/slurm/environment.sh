# Sourced by the batch scripts in launchers/slurm/ (from the repository root): the Python environment
# the job runs in. Nothing here is hard-coded to a folder:
#   NEON_ENV=/path/to/env sbatch ...   that environment (a venv: its bin/activate is sourced; a conda
#                                      environment or any prefix: its bin/ goes first on PATH);
#   sbatch ...                         the environment active when you ran sbatch (sbatch passes your
#                                      environment to the job unless --export says otherwise).
# The `python` found must import neon_scale (installed there: README "On a GPU cluster"); if not,
# the job stops at once with one line, before any launcher starts.
# (The repository's .venv is the CPU development stack: NEON_ENV=.venv to use it on purpose.)
if [[ -n "${NEON_ENV:-}" ]]; then
    if [[ -f "$NEON_ENV/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$NEON_ENV/bin/activate"
    elif [[ -x "$NEON_ENV/bin/python" ]]; then
        export PATH="$NEON_ENV/bin:$PATH"
    else
        echo "error: NEON_ENV=$NEON_ENV is not a Python environment (no bin/activate, no bin/python)" >&2
        exit 2
    fi
fi
if ! command -v python >/dev/null 2>&1; then
    echo "error: no python on PATH: activate the environment neon_scale is installed in before sbatch, or set NEON_ENV=/path/to/env (README \"On a GPU cluster\")" >&2
    exit 2
fi
if ! (cd / && python -c "import neon_scale") >/dev/null 2>&1; then
    echo "error: $(command -v python) cannot import neon_scale: activate the environment it is installed in before sbatch, or set NEON_ENV=/path/to/env (README \"On a GPU cluster\")" >&2
    exit 2
fi
