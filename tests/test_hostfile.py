"""launchers/hostfile.py (Slurm allocation -> the srun command, or a DeepSpeed hostfile + command)
and the sbatch scripts. No Slurm, GPU or network: Slurm's environment is faked with --env-file, and
`deepspeed`/`srun` with scripts that print what they were given. The srun path run for real (with
a fake srun that starts the tasks) is in test_slurm_launch.py."""
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from .conftest import ROOT, assert_one_line_error

SCRIPT = ROOT / "launchers" / "hostfile.py"
SBATCH = {name: ROOT / "launchers" / "slurm" / f"{name}.sbatch" for name in ("neon", "eval", "fid")}
FAKE_JOB = "SLURM_JOB_NODELIST=gpu[01-02]\nSLURM_GPUS_ON_NODE=4\nSLURM_JOB_ID=12345\n"
NEON_ARGS = ["--config", "configs/toy2d.yaml", "--set", "train.lr=1e-5"]

_spec = importlib.util.spec_from_file_location("launchers_hostfile", SCRIPT)
hostfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostfile)


def run_cli(*args, cwd, path_prefix=None, env=None):
    env = dict(os.environ if env is None else env)
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def fake_bin(tmp_path, gpu=False):
    """A folder with a `deepspeed` that prints its arguments and the hostfile it was given, an
    `srun` that prints its arguments, and an `nvidia-smi` that finds a GPU or not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"deepspeed": 'echo "DS_ACCELERATOR=${DS_ACCELERATOR:-}"\nprintf "ARG %s\\n" "$@"\n'
                            'if [ "$1" = --hostfile ]; then cat "$2"; fi',
               "srun": 'echo "DS_ACCELERATOR=${DS_ACCELERATOR:-}"\necho LAUNCHER=srun\nprintf "ARG %s\\n" "$@"',
               "nvidia-smi": "exit 0" if gpu else "exit 9"}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    # this interpreter by its own path (a symlink would lose its venv), so `python` imports neon_scale as
    # launchers/slurm/environment.sh checks
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return bin_dir


# --- node lists ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, nodes", [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a,b[1-2]", ["a", "b1", "b2"]),
    ("rack[1-2]-gpu[1-2]", ["rack1-gpu1", "rack1-gpu2", "rack2-gpu1", "rack2-gpu2"]),
    ("n[008-011]", ["n008", "n009", "n010", "n011"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("gpu[01-02],cpu5,big[10-11]", ["gpu01", "gpu02", "cpu5", "big10", "big11"]),
    ("x[3]-ib.cluster", ["x3-ib.cluster"]),
    (" node1,node2 ", ["node1", "node2"]),
])
def test_expand_nodelist(text, nodes):
    assert hostfile.expand_nodelist(text) == nodes


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("   ", "empty"),
    ("gpu[01-03", "'[' without ']'"), ("gpu01]", "']' without '['"), ("gpu[[1-2]]", "nested"),
    ("gpu[5-3]", "reversed range '5-3'"), ("gpu[]", "bad range"), ("gpu[a-b]", "bad range"),
    ("gpu[1-2-3]", "bad range"), ("gpu[-3]", "bad range"), ("gpu[1,]", "bad range"),
    ("a,,b", "empty"), ("a,", "empty"), ("gpu 01", "blank"),
])
def test_expand_nodelist_rejects_malformed(text, why):
    with pytest.raises(ValueError) as err:
        hostfile.expand_nodelist(text)
    assert repr(text) in str(err.value) and why in str(err.value)


# --- GPUs per node and master port -----------------------------------------------------------

@pytest.mark.parametrize("env, gpus", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:2"}, 2),
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, 2),
    ({"CUDA_VISIBLE_DEVICES": ""}, 1),
    ({}, 1),
    # first source wins
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "gpu:8", "CUDA_VISIBLE_DEVICES": "0"}, 2),
    ({"SLURM_GPUS_PER_NODE": "gpu:8", "SLURM_JOB_GPUS": "0"}, 8),
])
def test_gpus_per_node(env, gpus):
    assert hostfile.gpus_per_node(env) == gpus


@pytest.mark.parametrize("env", [{"SLURM_GPUS_ON_NODE": "four"}, {"SLURM_GPUS_PER_NODE": "gpu:"},
                                 {"SLURM_GPUS_ON_NODE": "0"}])
def test_gpus_per_node_rejects_bad_values(env):
    with pytest.raises(ValueError, match=next(iter(env))):
        hostfile.gpus_per_node(env)


def test_master_port():
    assert hostfile.master_port({"MASTER_PORT": "31000", "SLURM_JOB_ID": "12345"}) == 31000
    assert hostfile.master_port({"SLURM_JOB_ID": "12345"}) == 22345
    assert hostfile.master_port({"SLURM_JOB_ID": "12346"}) == 22346  # concurrent jobs differ
    assert hostfile.master_port({}) == 29500
    for bad in ({"MASTER_PORT": "70000"}, {"MASTER_PORT": "x"}):
        with pytest.raises(ValueError, match="MASTER_PORT"):
            hostfile.master_port(bad)


def test_launch_command_one_node_uses_num_gpus_and_no_hostfile():
    env = {"SLURM_JOB_NODELIST": "gpu07", "SLURM_GPUS_PER_NODE": "gpu:2", "SLURM_JOB_ID": "5"}
    assert hostfile.launch_command(env, ["--stage", "sweep"], "unused", port=1234, launcher="deepspeed") == [
        "deepspeed", "--num_gpus", "2", "--master_port", "1234", "launchers/neon.py", "--stage", "sweep"]


def test_launch_command_srun_is_the_same_on_any_number_of_nodes():
    for nodelist in ("gpu07", "gpu[01-16]"):
        env = {"SLURM_JOB_NODELIST": nodelist, "SLURM_GPUS_PER_NODE": "gpu:4", "SLURM_JOB_ID": "5"}
        assert hostfile.launch_command(env, ["--stage", "sweep"], "unused") == [
            "srun", "--kill-on-bad-exit=1", "python", "launchers/neon.py", "--stage", "sweep"]


def test_expand_nodelist_is_the_packages():
    """One implementation: the launcher uses the one neon_scale.dist uses."""
    from neon_scale import slurm

    assert hostfile.expand_nodelist is slurm.expand_nodelist
    assert hostfile.master_port({"SLURM_JOB_ID": "987654"}) == slurm.job_port("987654") == 27654


# --- CLI ------------------------------------------------------------------------------------

def test_dry_run_prints_hostfile_and_exact_command(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text("# a fake two-node allocation\n\n" + FAKE_JOB + "NEON_LAUNCHER=deepspeed\n")
    proc = run_cli("--dry-run", "--env-file", str(env_file), "--", *NEON_ARGS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    command = ("deepspeed --hostfile logs/hostfile-12345 --master_addr gpu01 --master_port 22345 "
               "--launcher pdsh launchers/neon.py --config configs/toy2d.yaml --set train.lr=1e-5")
    assert proc.stdout.splitlines() == ["gpu01 slots=4", "gpu02 slots=4", command]
    assert shlex.split(command)[-5:] == ["launchers/neon.py", *NEON_ARGS]
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("choice", [[], ["--launcher", "srun"]])
def test_dry_run_srun_by_default(tmp_path, choice):
    env_file = tmp_path / "job.env"
    env_file.write_text(FAKE_JOB + "SLURM_NTASKS=8\n")
    proc = run_cli("--dry-run", *choice, "--env-file", str(env_file), "--", *NEON_ARGS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "# each task: RANK=SLURM_PROCID, WORLD_SIZE=SLURM_STEP_NUM_TASKS (8), LOCAL_RANK=SLURM_LOCALID, "
        "MASTER_ADDR=gpu01, MASTER_PORT=22345",
        "srun --kill-on-bad-exit=1 python launchers/neon.py --config configs/toy2d.yaml --set train.lr=1e-5"]
    assert not (tmp_path / "logs").exists()


def test_launcher_flag_wins_over_environment(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text(FAKE_JOB + "NEON_LAUNCHER=srun\n")
    proc = run_cli("--dry-run", "--launcher", "deepspeed", "--env-file", str(env_file), "--", *NEON_ARGS, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].startswith("deepspeed --hostfile"), proc.stderr


def test_unknown_launcher_is_one_line_exit_2(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text(FAKE_JOB + "NEON_LAUNCHER=mpirun\n")
    assert_one_line_error(run_cli("--dry-run", "--env-file", str(env_file), "--", *NEON_ARGS, cwd=tmp_path),
                          "NEON_LAUNCHER='mpirun': choose srun or deepspeed", exit_code=2, warnings_ok=False)


def test_run_execs_srun_without_a_hostfile(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text(FAKE_JOB)
    proc = run_cli("--env-file", str(env_file), "--", *NEON_ARGS, cwd=tmp_path, path_prefix=fake_bin(tmp_path))
    assert proc.returncode == 0, proc.stderr
    args = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ARG ")]
    assert "LAUNCHER=srun" in proc.stdout.splitlines()
    assert args == ["--kill-on-bad-exit=1", "python", "launchers/neon.py", *NEON_ARGS]
    assert not (tmp_path / "logs").exists()


def test_run_writes_hostfile_and_execs_deepspeed(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text(FAKE_JOB)
    path = tmp_path / "hf" / "hostfile"
    proc = run_cli("--launcher", "deepspeed", "--hostfile", str(path), "--env-file", str(env_file), "--", *NEON_ARGS,
                   "--run-dir", "runs/a b", cwd=tmp_path, path_prefix=fake_bin(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert path.read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    args = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ARG ")]
    assert args == ["--hostfile", str(path), "--master_addr", "gpu01", "--master_port", "22345",
                    "--launcher", "pdsh", "launchers/neon.py", *NEON_ARGS, "--run-dir", "runs/a b"]
    assert proc.stdout.splitlines()[-2:] == ["gpu01 slots=4", "gpu02 slots=4"]  # ready before exec
    assert [p.name for p in path.parent.iterdir()] == ["hostfile"]  # no temp file left behind


def test_missing_nodelist_is_one_line_exit_2(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text("SLURM_GPUS_ON_NODE=4\n")
    assert_one_line_error(run_cli("--dry-run", "--env-file", str(env_file), "--", *NEON_ARGS, cwd=tmp_path),
                          "SLURM_JOB_NODELIST is not set", exit_code=2, warnings_ok=False)
    # from the real environment, and not a dry run: stops before writing or launching anything
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = run_cli("--", *NEON_ARGS, cwd=tmp_path, env=env, path_prefix=fake_bin(tmp_path))
    assert_one_line_error(proc, "SLURM_JOB_NODELIST is not set", exit_code=2, warnings_ok=False)
    assert proc.stdout == "" and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("content, needle", [
    ("SLURM_JOB_NODELIST=gpu[01-03\n", "'gpu[01-03'"),
    ("SLURM_JOB_NODELIST=gpu[5-3]\n", "reversed range"),
    ("SLURM_JOB_NODELIST=gpu1\nSLURM_GPUS_PER_NODE=gpu:many\n", "SLURM_GPUS_PER_NODE"),
    ("SLURM_JOB_NODELIST=gpu1\njust words\n", "job.env:2"),
])
def test_bad_environment_is_one_line_exit_2(tmp_path, content, needle):
    env_file = tmp_path / "job.env"
    env_file.write_text(content)
    assert_one_line_error(run_cli("--dry-run", "--env-file", str(env_file), "--", *NEON_ARGS, cwd=tmp_path),
                          needle, exit_code=2, warnings_ok=False)


# --- write_hostfile ---------------------------------------------------------------------------

def test_write_hostfile_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "logs" / "hostfile-1"
    hostfile.write_hostfile(["old1"], 8, path)  # creates the folder
    assert path.read_text() == "old1 slots=8\n"

    seen = []
    real_replace = os.replace

    def spy(src, dst):  # at the moment of the swap: the new text is complete, the old one intact
        seen.append((os.path.dirname(src), open(src).read(), open(dst).read()))
        real_replace(src, dst)

    monkeypatch.setattr(hostfile.os, "replace", spy)
    assert hostfile.write_hostfile(["gpu01", "gpu02"], 4, path) == path
    assert seen == [(str(path.parent), "gpu01 slots=4\ngpu02 slots=4\n", "old1 slots=8\n")]
    assert path.read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["hostfile-1"]


def test_write_hostfile_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "hostfile"
    hostfile.write_hostfile(["old1"], 1, path)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(hostfile.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        hostfile.write_hostfile(["gpu01"], 4, path)
    assert path.read_text() == "old1 slots=1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["hostfile"]


def test_write_hostfile_rejects_empty(tmp_path):
    with pytest.raises(ValueError):
        hostfile.write_hostfile([], 4, tmp_path / "h")
    with pytest.raises(ValueError):
        hostfile.write_hostfile(["a"], 0, tmp_path / "h")


# --- sbatch scripts ---------------------------------------------------------------------------

def sbatch_directives(name):
    return dict(line[len("#SBATCH "):].partition("=")[::2] for line in SBATCH[name].read_text().splitlines()
                if line.startswith("#SBATCH --"))


@pytest.mark.parametrize("name", sorted(SBATCH))
def test_sbatch_syntax(name):
    proc = subprocess.run(["bash", "-n", str(SBATCH[name])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = SBATCH[name].read_text()
    assert "#SBATCH --output=logs/%x-%j.out" in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    launches = [line for line in code if "launchers/hostfile.py --" in line]
    assert len(launches) == 1
    if name == "neon":  # srun by default; the shell stays to requeue on status 3
        assert launches[0].startswith("python launchers/hostfile.py -- ") and launches[0].endswith("|| status=$?")
        assert not any("deepspeed" in line or "ssh" in line for line in code)
    else:  # deepspeed by default: one launcher process per node
        assert "#SBATCH --ntasks-per-node=1" in text
        assert launches[0].startswith("exec python launchers/hostfile.py -- ")
        assert [line for line in code if "deepspeed" in line] == ['export NEON_LAUNCHER="${NEON_LAUNCHER:-deepspeed}"']
        assert not any("srun" in line for line in code)


def test_neon_sbatch_asks_for_one_task_per_gpu_a_signal_to_the_steps_and_requeue():
    directives = sbatch_directives("neon")
    assert directives["--ntasks-per-node"] == directives["--gpus-per-node"]
    assert directives["--signal"] == "USR1@120"  # no "B:": the ranks (step tasks) get it, not the batch shell
    assert "--requeue" in directives and directives["--open-mode"] == "append"


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("name, launcher, nodelist, prefix", [
    ("neon", "", "gpu[01-02]", ["--config", "configs/toy2d.yaml"]),
    ("neon", "deepspeed", "gpu[01-02]", ["--config", "configs/toy2d.yaml"]),
    ("eval", "", "gpu07", ["--config", "configs/toy2d.yaml", "--stage", "sweep"]),
    ("fid", "", "gpu[01-04]", ["fid"]),
])
def test_sbatch_runs_one_launcher_with_forwarded_args(tmp_path, name, launcher, nodelist, prefix, gpu):
    """Run the batch script as Slurm would; only without a GPU does it name the CPU accelerator."""
    submit = tmp_path / "repo"
    submit.mkdir()
    (submit / "launchers").symlink_to(ROOT / "launchers")
    bin_dir = fake_bin(tmp_path, gpu=gpu)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_SUBMIT_DIR": str(submit),
           "SLURM_JOB_NODELIST": nodelist, "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "12345"}
    if launcher:
        env["NEON_LAUNCHER"] = launcher
    proc = subprocess.run(["bash", str(SBATCH[name]), "--set", "train.lr=1e-5"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"DS_ACCELERATOR={'' if gpu else 'cpu'}\n" in proc.stdout
    assert ("LAUNCHER=srun" in proc.stdout.splitlines()) == (name == "neon" and not launcher)
    args = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ARG ")]
    assert args[args.index("launchers/neon.py"):] == ["launchers/neon.py", *prefix, "--set", "train.lr=1e-5"]
