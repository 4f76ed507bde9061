"""What every stage shares: the run context, config fingerprints and stage directories.

A stage directory holds a FINGERPRINT of the config it was produced with (its own section and
those of the stages before it). Outputs from another config are cleared before the stage runs;
`done.json` marks a finished stage, which is then skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import shutil
from dataclasses import dataclass

import torch

from .. import dist
from ..config import Config
from ..console import log
from ..io import read_json, write_json, write_text
from ..merge.sources import load_file_into
from ..specs.base import ModelSpec
from ..specs.registry import get_spec

# Settings that change how a stage runs but not what it produces. (Sampling batch sizes and eval
# chunks are not among them: they decide which random numbers each sample gets.)
_OPERATIONAL = {"log_every", "ckpt_every_images", "keep_last", "skip_bad"}


def _section(obj) -> dict:
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _OPERATIONAL}

    return strip(dataclasses.asdict(obj))


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


_TAG_SAFE = re.compile(r"[A-Za-z0-9.+-]")


def sampler_tag(settings: dict) -> str:
    """A sampler setting's folder name, usable unquoted in any shell: `key_value` pairs joined by
    `__` (`{cfg: 2.3, num_steps: 4}` -> `cfg_2.3__num_steps_4`; `{}` -> `default`). A value's
    characters outside [A-Za-z0-9.+-] (`_` included) are written %XX, so a name splits back at the
    `__` and then at its last `_`."""
    def value(v) -> str:
        return "".join(c if _TAG_SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in str(v))

    return "__".join(f"{k}_{value(v)}" for k, v in settings.items()) or "default"


def legacy_sampler_tag(settings: dict) -> str:
    """The name version 0.1.0 gave (`cfg=2.3,num_steps=4`): its run directories are still read, and
    synth keeps it as the key of S's random stream, so S does not change with the folder name."""
    return ",".join(f"{k}={v}" for k, v in settings.items()) or "default"


@dataclass
class RunContext:
    cfg: Config
    spec: ModelSpec
    run_dir: pathlib.Path

    @classmethod
    def from_config(cls, cfg: Config) -> "RunContext":
        return cls(cfg, get_spec(cfg.model.name), pathlib.Path(cfg.run_dir))

    def fingerprint(self, stage: str) -> str:
        c = self.cfg
        if stage == "metric":  # the metric's backbone and reference: data and eval settings only
            ev = c.eval
            return _hash(_section(c.data), ev.features, ev.inception_weights, ev.dinov2_weights, ev.classifier_weights,
                         ev.ref_stats, ev.ref_split)
        base = _hash(_section(c.model), _section(c.base) if c.base.weights is None else {"weights": c.base.weights, "key": c.base.weights_key},
                     _section(c.data))
        if stage == "base":
            return base
        synth = _hash(base, _section(c.synth))
        if stage == "synth":
            return synth
        train = _hash(synth, _section(c.train))
        if stage == "train":
            return train
        if stage == "sweep":
            return _hash(train, _section(c.eval), _section(c.sweep))
        raise KeyError(stage)

    def points_fingerprint(self) -> str:
        """What an evaluated sweep point depends on (the stages before the sweep and the eval
        settings, not the selection rule): the key of the sweep's point cache, sweep/FINGERPRINT.
        Its value is stored in run directories: it must not change."""
        return _hash(self.fingerprint("train"), _section(self.cfg.eval))

    def model_args(self):
        """The spec's typed Args, parsed once when the config was loaded."""
        return self.cfg.model.parsed_args

    def load_model(self, weights: pathlib.Path) -> torch.nn.Module:
        """The configured model with `weights` loaded strictly, in eval mode, on this rank's
        device (its GPU when there is one)."""
        model = self.spec.build(self.model_args())
        load_file_into(model, weights)  # one tensor at a time: never the model twice in memory
        return model.to(dist.device()).eval()

    def base_weights(self) -> pathlib.Path:
        return self.run_dir / "base" / "model.safetensors"

    def synth_dir(self, settings: dict) -> pathlib.Path:
        return self._sampler_dir("synth", settings)

    def train_dir(self, settings: dict) -> pathlib.Path:
        return self._sampler_dir("train", settings)

    def _sampler_dir(self, stage: str, settings: dict) -> pathlib.Path:
        """`<run>/<stage>/<sampler_tag>`; a run directory made by version 0.1.0 keeps its folder
        (`legacy_sampler_tag`) when the new one is not there, so it resumes where it stopped."""
        new = self.run_dir / stage / sampler_tag(settings)
        old = self.run_dir / stage / legacy_sampler_tag(settings)
        return old if old.is_dir() and not new.exists() else new

    def checkpoints(self) -> list[dict]:
        """Every fine-tuned theta_s the sweep evaluates: one per (sampler setting, save step)."""
        out = []
        for settings in self.cfg.synth.samplers:
            for step in sorted(self.cfg.train.save_steps):
                folder = self.train_dir(settings)  # its name: an older run's cached sweep points keep theirs
                out.append({"name": f"{folder.name}/step-{step}", "sampler": dict(settings), "steps": step,
                            "path": folder / f"theta_s-step{step:06d}.safetensors"})
        return out


class StageDir:
    def __init__(self, path: pathlib.Path, fingerprint: str, stage: str):
        self.path, self.fp, self.stage = path, fingerprint, stage

    def is_done(self) -> bool:
        done = self.path / "done.json"
        return done.is_file() and read_json(done).get("fingerprint") == self.fp

    def prepare(self, keep_fingerprint: str | None = None) -> None:
        """Clear outputs made with another config (rank 0), then record ours. Collective."""
        own = keep_fingerprint or self.fp
        if dist.is_main():
            fp_file = self.path / "FINGERPRINT"
            if self.path.exists() and (not fp_file.is_file() or fp_file.read_text().strip() != own):
                log(f"[yellow]{self.stage}: {self.path} was made with another config: clearing it[/]")
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            if not fp_file.is_file():
                write_text(fp_file, own + "\n")
            (self.path / "done.json").unlink(missing_ok=True)
        dist.barrier()

    def mark_done(self, **info) -> None:
        if dist.is_main():
            write_json(self.path / "done.json", {"fingerprint": self.fp, **info})
        dist.barrier()
