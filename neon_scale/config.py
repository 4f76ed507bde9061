"""Typed run configuration: one dataclass per stage, loaded from YAML, `--set a.b=c` overrides.

Validation happens once, here, and every error is one line naming the file, the key and the
value at fault. Ranges and choices live in field metadata (`min`, `max`, `choices`); every float
must be finite (no key takes NaN or inf), and the sweep's grid is bounded (MAX_GRID points).
Model- and sampler-specific settings (`model.args`, `synth.samplers`, `eval.sampler`) are
validated against the dataclasses of the model's spec (specs/).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import yaml

from .errors import NeonError
from .data.real import load_real
from .fields import from_dict, setting
from .specs.registry import get_spec
from .tracking import WANDB_MISSING, wandb_available


@dataclass
class ModelConfig:
    name: str = setting("toy2d_diffusion", help="registry name of the model")
    args: dict = setting({}, help="constructor arguments, checked against the model's Args dataclass")
    # `args` parsed into the spec's Args dataclass by validate(), once; a class attribute, so not a
    # config key (to_dict, the saved config and the fingerprints do not see it)
    parsed_args: ClassVar[Any] = None


@dataclass
class TrainConfig:
    save_steps: list = setting([50, 250], help="optimizer steps at which theta_s is exported")
    global_batch: int = setting(1000, min=1, help="samples per optimizer step, whatever the world size")
    grad_accum: int = setting(1, min=1)
    lr: float = setting(1e-5, min=0.0)
    betas: list = setting([0.9, 0.999])
    weight_decay: float = setting(0.0, min=0.0)
    warmup_steps: int = setting(0, min=0)
    grad_clip: float = setting(0.0, min=0.0, help="0 = off")
    zero_stage: int = setting(2, min=0, max=3)
    deepspeed_json: Optional[str] = setting(None, help="your own DeepSpeed JSON, validated and merged (its values win, "
                                                  "batch sizes must agree)")
    dtype: str = setting("fp32", choices=["fp32", "bf16", "fp16"])
    activation_checkpointing: bool = setting(False, help="recompute activations in backward (the model's hook)")
    label_dropout: float = setting(0.0, min=0.0, max=1.0, help="replace class labels by the null class with this "
                                                             "probability (class-conditional models, for CFG)")
    ema_decay: float = setting(0.0, min=0.0, help="EMA of the fine-tuned weights, kept per rank on its partition; "
                                             "0 = off. When on, theta_s is the EMA (the authors: 0.9999)")
    workers: int = setting(0, min=0, help="DataLoader workers per rank reading the shards (the data order depends on it)")
    skip_bad: bool = setting(False, help="skip and count bad records instead of stopping at a corrupt shard")
    ckpt_every_images: int = setting(0, min=0, help="DeepSpeed checkpoint for resume every N images seen (global "
                                               "count); checkpoints are also written at save_steps and at the end")
    keep_last: int = setting(2, min=1, help="DeepSpeed checkpoints kept (the newest)")
    log_every: int = setting(10, min=1)
    seed: int = setting(2)


@dataclass
class DataConfig:
    source: Optional[str] = setting(None, help="real labelled images: a built-in name (digits), a folder of class "
                                          "sub-folders, or webdataset shards (.png + .cls); trains the base of "
                                          "image models and gives the metric its reference")
    holdout: float = setting(0.2, min=0.0, max=0.9, help="fraction of each class held out (fixed split)")
    seed: int = setting(0, help="seed of the held-out split")


@dataclass
class BaseConfig:
    weights: Optional[str] = setting(None, help="pretrained weights; None trains the base from the model's real data")
    n_real: int = setting(1000, min=1, help="toys: real samples for training the base from scratch")
    steps: int = setting(10000, min=1, help="toys: optimizer steps for the base")
    lr: float = setting(1e-4, min=0.0, help="toys: learning rate of the base")
    batch_size: int = setting(0, min=0, help="toys: 0 = full batch")
    train: Optional[TrainConfig] = setting(None, help="image models from scratch on data.source: the DeepSpeed trainer's "
                                                  "settings (as the train section; the last save step is theta_r)")
    seed: int = setting(0)
    weights_key: Optional[str] = setting(None, help="entry of a training checkpoint holding the weights; None: 'ema' "
                                               "if present, else 'model_ema', 'model', 'state_dict', 'module'")
    random_init: bool = setting(False, help="no weights: the model's own random initialisation (seed base.seed); "
                                       "smoke tests and tiny configs")


@dataclass
class SynthConfig:
    n: int = setting(1000, min=1, help="synthetic samples per sampler setting")
    samplers: list = setting([{}], help="one dict of sampler settings per synthetic set")
    shard_size: int = setting(1000, min=1, help="samples per webdataset shard")
    batch_size: int = setting(100000, min=1, help="samples drawn per sampler call")
    seed: int = setting(1)
    save_images: bool = setting(False, help="image models: also write the decoded images (.png) beside the latents")


@dataclass
class EvalConfig:
    n: int = setting(100000, min=2, help="samples per evaluated point (a covariance needs at least 2)")
    sampler: dict = setting({}, help="sampler settings used to evaluate every merged model")
    chunk: int = setting(25000, min=1, help="samples per noise chunk (chunk i always gets the same noise)")
    seed: int = setting(1234)
    inception_weights: Optional[str] = setting(None, help="image models: torch-fidelity's InceptionV3 weights (local)")
    ref_stats: Optional[str] = setting(None, help="image models: reference statistics .npz (mu, sigma)")
    batch_size: int = setting(64, min=1, help="image models: feature-backbone batch size")
    features: str = setting("inception", choices=["inception", "dinov2", "classifier"],
                       help="image models: feature backbone of the Frechet distance (FID, FD_DINOv2, FD of a "
                            "classifier trained on data.source)")
    dinov2_weights: Optional[str] = setting(None, help="features=dinov2: dinov2_vitl14_pretrain.pth (local)")
    classifier_weights: Optional[str] = setting(None, help="features=classifier: a saved classifier; None: trained on "
                                                      "data.source's training split once per run")
    ref_split: str = setting("train", choices=["train", "holdout", "all"],
                        help="without eval.ref_stats: the data.source images the reference statistics come from")


MAX_GRID = 10_000  # points of sweep.w_grid and of sweep.guidance: beyond it a config is a typo


@dataclass
class RaceConfig:
    """sweep.mode = race: every (w, guidance) of the grid starts at n0 samples; points worse than the
    round's best by more than z standard errors of the difference drop out; survivors double n."""
    n0: int = setting(1000, min=2, help="samples per point in the first round (a multiple of eval.chunk, so that "
                                        "larger rounds reuse its chunks)")
    z: float = setting(2.0, min=0.0, help="drop a point when its difference to the best exceeds z standard errors")
    futility: bool = setting(True, help="stop once n >= eval.n / 4 when no survivor could be told apart from the "
                                        "best even at eval.n (difference <= z se sqrt(n / eval.n))")


@dataclass
class SweepConfig:
    mode: str = setting("early_stop", choices=["early_stop", "grid", "race"],
                        help="early_stop: the authors' rule; grid: every point; race: every point at a small n, "
                             "the clearly worse dropped, survivors at doubled n (sweep.race)")
    w_min: float = setting(-2.0)
    w_max: float = setting(2.0)
    w_step: float = setting(0.25)
    guidance_key: Optional[str] = setting(None, help="eval-sampler key swept in the inner loop (e.g. cfg)")
    guidance: list = setting([], help="inner-loop values for guidance_key")
    tol: float = setting(0.02, min=0.0, help="the difference in the metric not worth samples: early_stop stops a walk "
                                             "once a point is more than tol worse; race drops a point once it is not "
                                             "better than the best by more than tol / 2 (at z standard errors) and "
                                             "stops when every survivor is within tol with confidence")
    refine_w: float = setting(0.1, min=0.0, help="half-width of the refine grid in w (0 = no refine)")
    refine_guidance: float = setting(0.1, min=0.0)
    final_n: Optional[int] = setting(None, min=2, help="re-evaluate each best point with this many samples")
    race: RaceConfig = field(default_factory=RaceConfig)
    repeats: int = setting(0, min=0, help="re-evaluate w = 0 and the best w (each at its best guidance) with this many "
                                     "fresh evaluation seeds: mean and standard error of both and of the difference")
    samples_png: bool = setting(True, help="image models: samples.png, w = 0 and each checkpoint's best w, 8 samples of "
                                           "each of the first 10 classes (80 per panel: on a CPU at full size, more "
                                           "than a small sweep itself; false skips it)")

    def w_grid(self) -> list[float]:
        if not (self.w_step > 0 and math.isfinite(self.w_step)) or self.w_min > self.w_max:
            raise NeonError(f"sweep: empty w grid (w_min={self.w_min}, w_max={self.w_max}, w_step={self.w_step})")
        n = int(math.floor((self.w_max - self.w_min) / self.w_step + 1e-9)) + 1
        if n > MAX_GRID:  # checked before the list is built: a tiny w_step would hang validation
            raise NeonError(f"sweep: w grid of {n} points (w_min={self.w_min}, w_max={self.w_max}, "
                            f"w_step={self.w_step}) exceeds the bound of {MAX_GRID} points")
        grid = {round(self.w_min + i * self.w_step, 6) for i in range(n)} | {0.0}
        return sorted(grid)


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT", "SIGXCPU")


@dataclass
class RunConfig:
    """How the run behaves on a cluster; nothing here changes what a stage produces."""
    stop_signals: list = setting(["SIGTERM", "SIGUSR1"], help="signals that stop the run resumably: every rank agrees, "
                                                        "the stage saves what it has, exit status 3 (Slurm sends "
                                                        "SIGTERM at the time limit; neon.sbatch asks for SIGUSR1 "
                                                        "ahead of it); [] = die as usual")
    tensorboard: bool = setting(True, help="TensorBoard event files in <run>/tb/ (rank 0): training curves, sweep curves")
    wandb: bool = setting(False, help="also log to Weights & Biases (the wandb package must be installed)")
    wandb_project: str = setting("neon", help="W&B project")
    wandb_mode: str = setting("offline", choices=["offline", "online"], help="offline needs no network (wandb sync later)")


@dataclass
class Config:
    name: str = setting("", help="run name; default: the config file's stem")
    run_dir: str = setting("", help="default: runs/<name>")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    run: RunConfig = field(default_factory=RunConfig)
    trust_pickles: bool = setting(False, help="let torch.load unpickle any class in files we read (checkpoints on resume "
                                         "included); only for files you made yourself")
    strict_keys: bool = setting(False, help="official files read (base.weights, the VAE, Inception / DINOv2 weights): "
                                       "a key the model does not have is an error, not a warning (missing keys "
                                       "and wrong shapes always are)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------- loading

def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the raw config dict."""
    if "=" not in assignment:
        raise NeonError(f"--set {assignment!r}: expected key=value")
    dotted, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise NeonError(f"--set {dotted}: cannot parse value {text!r} ({e})") from None
    node = raw
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise NeonError(f"--set {dotted}: '{part}' is not a mapping")
    node[parts[-1]] = value


def load_config(path: str | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """The validated config of `path` (None: the defaults) with dotted `overrides`; every missing
    file it names in one line (check_files=False: not checked, as `neon plan` does: missing_files)."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        p = pathlib.Path(path)
        where = str(p)
        if not p.is_file():
            raise NeonError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise NeonError(f"{p}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise NeonError(f"{p}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(raw, assignment)
    if overrides:
        where += " (with --set)"
    cfg = from_dict(Config, raw, where)
    if not cfg.name:
        cfg.name = pathlib.Path(path).stem if path else "default"
    if not cfg.run_dir:
        cfg.run_dir = str(pathlib.Path("runs") / cfg.name)
    validate(cfg, where)
    missing = missing_files(cfg) if check_files else []
    if missing:
        raise NeonError(f"{where}: " + "; ".join(missing))
    return cfg


def validate(cfg: Config, where: str) -> None:
    """Cross-field checks and model-specific sections (via the model registry); `model.args` is
    parsed here, once, into the spec's Args (cfg.model.parsed_args)."""
    spec = get_spec(cfg.model.name, where)
    for name in cfg.run.stop_signals:
        if name not in STOP_SIGNALS:
            raise NeonError(f"{where}: 'run.stop_signals' has {name!r}; choose from {', '.join(STOP_SIGNALS)}")
    if cfg.run.wandb:  # now, not when the first tracker opens after the base stage
        if not wandb_available():
            raise NeonError(f"{where}: {WANDB_MISSING}")
    if cfg.data.source is not None:
        if not spec.makes_images:
            raise NeonError(f"{where}: 'data.source' is set but model {cfg.model.name!r} is not an image model")
        real = load_real(cfg.data.source)
        cfg.model.args = spec.fit_data(dict(cfg.model.args), real.shape, real.num_classes, where)
    model_args = cfg.model.parsed_args = spec.parse_args(cfg.model.args, where, "model.args")
    spec.validate(model_args, where)
    if not cfg.synth.samplers:
        raise NeonError(f"{where}: 'synth.samplers' is empty: give at least one sampler setting")
    for i, s in enumerate(cfg.synth.samplers):
        if not isinstance(s, dict):
            raise NeonError(f"{where}: 'synth.samplers[{i}]' must be a mapping, got {s!r}")
        spec.check_sampler(model_args, spec.parse_sampler(s, where, f"synth.samplers[{i}]"), where, f"synth.samplers[{i}]")
    spec.check_sampler(model_args, spec.parse_sampler(cfg.eval.sampler, where, "eval.sampler"), where, "eval.sampler")
    trainers = [("train", cfg.train)] + ([("base.train", cfg.base.train)] if cfg.base.train is not None else [])
    for prefix, t in trainers:
        _validate_trainer(t, prefix, spec, model_args, cfg.model.name, where)
    trains_on_data = spec.makes_images and cfg.data.source is not None and not cfg.base.weights \
        and not cfg.base.random_init
    if trains_on_data and not spec.pixel_space(model_args):
        raise NeonError(f"{where}: model {cfg.model.name!r}: training from scratch on data.source needs pixel space "
                        f"(model.args.vae: none), got model.args.vae = {cfg.model.args.get('vae')!r}")
    if cfg.base.train is not None and not trains_on_data:
        why = "base.weights is given" if cfg.base.weights else "base.random_init is true" if cfg.base.random_init \
            else "the toys train their base with base.steps/base.lr" if not spec.makes_images else "data.source is not set"
        raise NeonError(f"{where}: 'base.train' is set but no base is trained by the DeepSpeed trainer ({why})")
    if trains_on_data and cfg.base.train is None:
        raise NeonError(f"{where}: 'base.train' is required: model {cfg.model.name!r} is trained from scratch on "
                        f"data.source = {cfg.data.source!r} by the DeepSpeed trainer (its settings, as the train section)")
    if cfg.sweep.guidance_key is not None:
        if not cfg.sweep.guidance:
            raise NeonError(f"{where}: 'sweep.guidance' is empty but sweep.guidance_key = {cfg.sweep.guidance_key!r}")
        if len(cfg.sweep.guidance) > MAX_GRID:
            raise NeonError(f"{where}: 'sweep.guidance' has {len(cfg.sweep.guidance)} values, beyond the bound of {MAX_GRID}")
        for i, value in enumerate(cfg.sweep.guidance):  # each value as the sampler takes it (type, range, finite)
            spec.parse_sampler({cfg.sweep.guidance_key: value}, where, f"sweep.guidance[{i}]")
    elif cfg.sweep.guidance:
        raise NeonError(f"{where}: 'sweep.guidance' is set but 'sweep.guidance_key' is not")
    cfg.sweep.w_grid()  # raises on an empty grid, or one too large
    if cfg.sweep.mode == "race":
        race = cfg.sweep.race
        if race.n0 % cfg.eval.chunk or race.n0 > cfg.eval.n:
            raise NeonError(f"{where}: 'sweep.race.n0' = {race.n0} must be a multiple of eval.chunk = {cfg.eval.chunk} "
                            f"(a larger round reuses its chunks) and at most eval.n = {cfg.eval.n}")
    if cfg.sweep.repeats == 1:
        raise NeonError(f"{where}: 'sweep.repeats' = 1 gives no standard error: 0 (off) or at least 2")
    if cfg.base.weights is not None:
        if cfg.base.random_init:
            raise NeonError(f"{where}: 'base.random_init' is true but 'base.weights' = {cfg.base.weights!r} is set too")
    elif not spec.has_real_data and not cfg.base.random_init and cfg.data.source is None:
        raise NeonError(f"{where}: 'base.weights' is required for model {cfg.model.name!r} (or data.source to train "
                        f"it from scratch; base.random_init: true gives random weights, for smoke tests)")


def _validate_trainer(t: TrainConfig, prefix: str, spec, model_args, model_name: str, where: str) -> None:
    steps = t.save_steps
    if not steps or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in steps):
        raise NeonError(f"{where}: '{prefix}.save_steps' must be a non-empty list of positive integers, got {steps!r}")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas):
        raise NeonError(f"{where}: '{prefix}.betas' must be two numbers in [0, 1), got {t.betas!r}")
    if t.ema_decay >= 1.0:
        raise NeonError(f"{where}: '{prefix}.ema_decay' = {t.ema_decay} must be below 1 (0 = off)")
    if t.label_dropout > 0 and spec.null_class(model_args) is None:
        raise NeonError(f"{where}: '{prefix}.label_dropout' = {t.label_dropout} but model {model_name!r} "
                        f"is not class-conditional")


_BACKBONE_WEIGHTS = {"inception": "inception_weights", "dinov2": "dinov2_weights", "classifier": "classifier_weights"}


def needed_files(cfg: Config) -> list[tuple[str, Any, str]]:
    """(config key, value, what it is) of every local file the config names and a run reads:
    theta_r, the model's own files (a VAE), and for image models the backbone's weights and the
    reference statistics unless data.source provides them (the classifier is trained on it; the
    reference comes from its images)."""
    spec = get_spec(cfg.model.name, "<config>")
    out = [("base.weights", cfg.base.weights, "theta_r")] if cfg.base.weights is not None else []
    out += spec.files(cfg.model.parsed_args)
    if spec.makes_images:
        ev = cfg.eval
        key = _BACKBONE_WEIGHTS[ev.features]
        value = getattr(ev, key)
        if value is not None or not (ev.features == "classifier" and cfg.data.source is not None):
            hint = " (or data.source to train one)" if ev.features == "classifier" else ""
            out.append((f"eval.{key}", value, f"eval.features = {ev.features!r} reads its weights from this local "
                                               f"file{hint}"))
        if ev.ref_stats is not None or cfg.data.source is None:
            out.append(("eval.ref_stats", ev.ref_stats, "image models are evaluated against these reference "
                                                        "statistics, or against data.source's images"))
    return out


def missing_files(cfg: Config) -> list[str]:
    """"'key' = value: file not found (what)" for each needed file that does not exist."""
    return [f"'{key}' = {value!r}: file not found ({what})" for key, value, what in needed_files(cfg)
            if not value or not os.path.exists(value)]
