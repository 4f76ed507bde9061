"""Slurm's environment read without Slurm: node-list syntax and the job's rendezvous port.

Foundation module (imports nothing from the package): neon_scale.dist uses it to turn the
variables of an srun task into RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, and launchers/hostfile.py
to write DeepSpeed's hostfile and show the launch command. Malformed input raises ValueError
naming the text; callers turn it into their one-line error.
"""
from __future__ import annotations

import itertools
import re

# MASTER_PORT under Slurm when not set: 20000 + SLURM_JOB_ID % 10000, below Linux's ephemeral
# ports (32768+); two jobs sharing a node collide only if their ids differ by a multiple of 10000.
# Each array task has its own job id, and a requeued job keeps its id (and so its port).
PORT_BASE = 20000
PORT_SPAN = 10000

_NUMBER = re.compile(r"[0-9]+")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets; check that brackets are balanced and not nested."""
    items, start, inside = [], 0, False
    for i, ch in enumerate(text):
        if ch == "[":
            if inside:
                raise ValueError(f"bad node list {text!r}: nested '['")
            inside = True
        elif ch == "]":
            if not inside:
                raise ValueError(f"bad node list {text!r}: ']' without '['")
            inside = False
        elif ch == "," and not inside:
            items.append(text[start:i])
            start = i + 1
    if inside:
        raise ValueError(f"bad node list {text!r}: '[' without ']'")
    items.append(text[start:])
    return items


def _expand_brackets(body: str, text: str) -> list[str]:
    """`01-03,07` -> 01 02 03 07 (a range keeps the width of its first number)."""
    out = []
    for part in body.split(","):
        lo, dash, hi = part.partition("-")
        if not _NUMBER.fullmatch(lo) or (dash and not _NUMBER.fullmatch(hi)):
            raise ValueError(f"bad node list {text!r}: bad range {part!r} in [{body}]")
        if not dash:
            out.append(lo)
        elif int(hi) < int(lo):
            raise ValueError(f"bad node list {text!r}: reversed range {part!r}")
        else:
            out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(text: str) -> list[str]:
    """Expand Slurm node-list syntax like `scontrol show hostnames`, in order.

    `gpu[01-03,07]` -> gpu01 gpu02 gpu03 gpu07; `rack[1-2]-gpu[1-2]` -> rack1-gpu1 rack1-gpu2
    rack2-gpu1 rack2-gpu2; `a,b[1-2]` -> a b1 b2.
    """
    if not text.strip():
        raise ValueError(f"bad node list {text!r}: empty")
    nodes = []
    for item in _split_top_level(text.strip()):
        if not item.strip() or re.search(r"\s", item.strip()):
            raise ValueError(f"bad node list {text!r}: empty or blank-containing name {item!r}")
        # split() with a group alternates literal text and bracket bodies: a, 01-03, b, 1-2, ""
        pieces = re.split(r"\[([^\]]*)\]", item.strip())
        choices = [[p] if i % 2 == 0 else _expand_brackets(p, text) for i, p in enumerate(pieces)]
        nodes += ["".join(combo) for combo in itertools.product(*choices)]
    return nodes


def job_port(job_id: str) -> int:
    """The rendezvous port of a job: PORT_BASE + SLURM_JOB_ID % PORT_SPAN."""
    value = job_id.strip()
    if not _NUMBER.fullmatch(value):
        raise ValueError(f"SLURM_JOB_ID={job_id!r} is not a number")
    return PORT_BASE + int(value) % PORT_SPAN
