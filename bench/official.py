"""Speed against the official code on this CPU (issue 18): our DiT and xAR samplers and training
steps beside facebookresearch/DiT's and OliverRensu/xAR's, on the same small random weights.

Cases (the same inputs, settings and weights on both sides; the VAE decode is left out on both):
  dit-sample  DDPM 250 steps + CFG 1.5, learned variance, the [cond; uncond] batch. Ours: the
              DiT spec's `sample` (as `neon synth` / the sweep call it). Official: sample.py's loop,
              `create_diffusion("250").p_sample_loop(model.forward_with_cfg, ...)` on the
              CFG-doubled noise, clip_denoised=False.                          [images/s]
  xar-sample  Euler-Maruyama, 50 steps per cell, CFG 2.3 ramped over the 4 cells (the authors'
              xAR-L evaluation). Ours: the xAR spec's `sample`. Official: `model.sample_tokens`
              (eval.py's call, without its CUDA fp16 autocast: fp32 on both sides). [images/s]
              Ours skips the unconditional rows where the first cell's guidance is 1; a second row
              (--no-xar-official-batches drops it) times ours with the official batch rule,
              [cond; uncond] at every evaluation: the implementation alone.
  dit-train   one optimizer step: DiT's train.py step (t ~ U{0..999}, `training_losses(...)["loss"]
              .mean()`, the model's own label dropout, backward, AdamW lr 1e-4 wd 0) vs ours (the
              trainer's label dropout `drop_labels`, `spec.loss` with the trainer's rng.StepNoise,
              backward, the same AdamW). Plain torch on both sides, no DeepSpeed.  [steps/s]
  xar-train   the same for xAR: the official `model(x, labels)` (label dropout, logit-normal
              times and the flow loss inside it) vs our `spec.loss`; AdamW lr 1e-4, betas
              (0.9, 0.96), wd 0.02 as main_mar.py; no gradient clipping on either side. [steps/s]

Weights: our networks are built with neon_scale at a small size, perturbed with seeded noise (so no
layer is left at its zero initialisation), written to our safetensors and converted by
`neon_scale.merge.export.export_official` to the official .pt/.pth; the official class loads that
file with strict=True. Before timing, each case checks that both sides compute the same thing:
the network outputs on one input, the training loss and every gradient on the same (t, noise),
and whole samplers from the same noise (DiT: the official sampler is fed our step noise; xAR: both
draw from the same seeded generator in the same order). The max |diff| is printed and stored.

Timing: OMP_NUM_THREADS=1 and 1 torch thread by default (--threads). Ours and official alternate
(A B B A A B ...) and each side's rate is its median over --reps calls, so a load that changes
during the run hits both alike; the load average (uptime) before and after each case, and the CPU
share each side got (process CPU time / wall time), are in the JSON. `ratio` = ours / official
rate (> 1: ours faster); `cpu ratio` is the same from process CPU time instead of wall time.

The official code is not part of this project: give checkouts of it, and timm on the path.

  git clone https://github.com/facebookresearch/DiT /path/to/DiT
  git clone https://github.com/OliverRensu/xAR /path/to/xAR
  pip install --no-deps --target /path/to/deps timm      # + einops, scipy if the env lacks them
  OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONPATH=/path/to/deps python bench/official.py \\
      --dit-repo /path/to/DiT --xar-repo /path/to/xAR [--out runs/bench-official.json]
  (or: make bench-official DIT_REPO=/path/to/DiT XAR_REPO=/path/to/xAR OFFICIAL_DEPS=/path/to/deps)

About 7 minutes on 2 loaded cores with the defaults (two 5M-parameter networks); --cases,
--reps, --dit-steps, --xar-steps and the size flags shorten it.

The official xAR code calls .cuda() on fresh tensors and imports flash_attn (unused on this path):
on a CPU-only torch the bench makes .cuda() the identity while an official xAR call runs, and
stands in an empty flash_attn module when none is installed; for the DiT sampler check (not the
timing) torch.randn_like hands the official loop our step noise. Nothing else of theirs is changed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch
from machine import cpu_model  # bench/machine.py (bench/ is on the path of a bench script)

CASES = ("dit-sample", "xar-sample", "dit-train", "xar-train")
NULL_CLASS = 1000  # both official codes: 1000 classes + the null row
CHECK_TOL = 1e-3   # max |diff| allowed between the two sides (fp32, the loops over 250 / 200 steps)

HELP_EPILOG = """\
needs checkouts of the official repositories (not part of this project, never committed to it):
  git clone https://github.com/facebookresearch/DiT DIT_DIR     (for --dit-repo: dit-sample, dit-train)
  git clone https://github.com/OliverRensu/xAR XAR_DIR          (for --xar-repo: xar-sample, xar-train)
and timm (plus einops and scipy for xAR) importable, e.g.
  pip install --no-deps --target DEPS timm;  PYTHONPATH=DEPS python bench/official.py ...
A missing or wrong path exits with status 2 and one line naming it."""


# ----------------------------------------------------------------------------- the official code

class Usage(Exception):
    """One line for the user; exit status 2."""


def _check_repo(path: str | None, flag: str, needs: tuple[str, ...], what: str) -> pathlib.Path:
    if not path:
        raise Usage(f"{flag} is required for the selected cases (a checkout of {what})")
    repo = pathlib.Path(path).expanduser().resolve()
    if not repo.is_dir():
        raise Usage(f"{flag} {path}: no such directory (a checkout of {what})")
    for rel in needs:
        if not (repo / rel).is_file():
            raise Usage(f"{flag} {path}: not a checkout of {what} (no {rel})")
    return repo


def _need_module(name: str, why: str) -> None:
    try:
        importlib.import_module(name)
    except ImportError:
        raise Usage(f"{name} is not importable ({why}): pip install --no-deps --target DEPS {name}, "
                    f"then PYTHONPATH=DEPS") from None


@contextlib.contextmanager
def _on_path(repo: pathlib.Path):
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        sys.path.remove(str(repo))


def load_official_dit(repo: pathlib.Path):
    """(DiT's `diffusion` package, its models.py as a module named official_dit_models): xAR has
    a package called `models`, so DiT's models.py is loaded under another name."""
    _need_module("timm", "DiT's models.py imports it")
    with _on_path(repo):
        diffusion = importlib.import_module("diffusion")
    if pathlib.Path(diffusion.__file__).resolve().parent != repo / "diffusion":
        raise Usage(f"--dit-repo {repo}: another module named 'diffusion' was imported first ({diffusion.__file__})")
    spec = importlib.util.spec_from_file_location("official_dit_models", repo / "models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    return diffusion, models


def load_official_xar(repo: pathlib.Path):
    """The official models.xar module (its package `models` from the checkout)."""
    for name in ("timm", "einops", "scipy"):
        _need_module(name, "xAR's models/xar.py imports it")
    try:
        importlib.import_module("flash_attn")
    except ImportError:  # imported by models/xar.py, called nowhere on the paths timed here
        stub = types.ModuleType("flash_attn")
        stub.flash_attn_func = None
        sys.modules["flash_attn"] = stub
    with _on_path(repo):
        xar = importlib.import_module("models.xar")
    if pathlib.Path(xar.__file__).resolve() != repo / "models" / "xar.py":
        raise Usage(f"--xar-repo {repo}: another package named 'models' was imported first ({xar.__file__})")
    return xar


@contextlib.contextmanager
def cpu_cuda_calls():
    """The official xAR code puts fresh tensors on the GPU with .cuda(); without CUDA that is the
    identity while an official call runs."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def scripted_randn_like(draws: list):
    """torch.randn_like returns the next of `draws` doubled along dim 0 (the official DiT sampler
    draws its step noise for the [cond; uncond] batch; None: zeros, the step without noise)."""
    original = torch.randn_like
    it = iter(draws)
    used = [0]

    def fake(x, *args, **kwargs):
        used[0] += 1
        n = next(it)
        return torch.zeros_like(x) if n is None else torch.cat([n, n]).to(x.dtype)

    torch.randn_like = fake
    try:
        yield used
    finally:
        torch.randn_like = original


# ----------------------------------------------------------------------------- the weights

def perturb(model: torch.nn.Module, seed: int, std: float) -> None:
    """Seeded N(0, std) noise on every trainable parameter: no layer stays at its zero init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def official_state(model: torch.nn.Module, kind: str, tmp: pathlib.Path) -> dict[str, torch.Tensor]:
    """Our state dict -> our safetensors -> `export_official` -> the official file, read back."""
    from neon_scale import io
    from neon_scale.merge.export import export_official

    src, out = tmp / f"{kind}.safetensors", tmp / (f"{kind}.pt" if kind == "dit" else f"{kind}.pth")
    io.save_state_dict(src, model.state_dict(), {"model": kind})
    export_official(src, out, kind)
    return torch.load(out, map_location="cpu", weights_only=True)


def build_dit(args, diffusion_mod, models_mod, tmp):
    from neon_scale.specs.dit import DiTArgs, DiTSpec

    spec = DiTSpec()
    dargs = DiTArgs(arch="S/2", image_size=8 * args.dit_input, num_classes=NULL_CLASS, depth=args.dit_depth,
                    hidden_size=args.dit_hidden, num_heads=args.dit_heads, vae="random")
    spec.validate(dargs, "bench")
    torch.manual_seed(args.seed)
    ours = spec.build(dargs)
    perturb(ours, args.seed, args.weight_std)
    kw = spec.constructor_args(dargs)
    theirs = models_mod.DiT(**kw)
    theirs.load_state_dict(official_state(ours, "dit", tmp), strict=True)
    return spec, ours, theirs, kw


def build_xar(args, xar_mod, tmp):
    from neon_scale.specs.xar import XARArgs, XARSpec

    spec = XARSpec()
    xargs = XARArgs(size="B", img_size=256, num_classes=NULL_CLASS, embed_dim=args.xar_dim, depth=args.xar_depth,
                    num_heads=args.xar_heads, vae="random")
    spec.validate(xargs, "bench")
    torch.manual_seed(args.seed)
    ours = spec.build(xargs)
    perturb(ours, args.seed + 1, args.weight_std)
    kw = spec.constructor_args(xargs)
    # eval.py / main_mar.py: xar.__dict__[args.model](img_size, vae_stride, patch_size, vae_embed_dim,
    # label_drop_prob, class_num, attn_dropout, proj_dropout) on top of the size's widths
    theirs = xar_mod.xAR(img_size=kw["img_size"], vae_stride=kw["vae_stride"], patch_size=kw["patch_size"],
                         encoder_embed_dim=kw["encoder_embed_dim"], encoder_depth=kw["encoder_depth"],
                         encoder_num_heads=kw["encoder_num_heads"], decoder_embed_dim=kw["decoder_embed_dim"],
                         decoder_depth=kw["decoder_depth"], decoder_num_heads=kw["decoder_num_heads"],
                         mlp_ratio=kw["mlp_ratio"], vae_embed_dim=kw["vae_embed_dim"],
                         label_drop_prob=kw["label_drop_prob"], class_num=kw["class_num"],
                         attn_dropout=kw["attn_dropout"], proj_dropout=kw["proj_dropout"])
    theirs.load_state_dict(official_state(ours, "xar", tmp), strict=True)
    return spec, ours, theirs, kw


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- timing

def load_now() -> dict:
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        up = ""
    return {"uptime": up, "loadavg": list(os.getloadavg())}


def interleaved(ours, official, reps: int) -> dict[str, list[tuple[float, float]]]:
    """(wall s, process CPU s) of each call, the sides alternating A B B A A B ..."""
    fns = {"ours": ours, "official": official}
    out: dict[str, list[tuple[float, float]]] = {"ours": [], "official": []}
    for r in range(reps):
        for side in (("ours", "official") if r % 2 == 0 else ("official", "ours")):
            w, c = time.perf_counter(), time.process_time()
            fns[side]()
            out[side].append((time.perf_counter() - w, time.process_time() - c))
    return out


def summarise(name: str, unit: str, per_call: float, times: dict, load: list, extra: dict) -> dict:
    rates, cpu_rates, share = {}, {}, {}
    for side, t in times.items():
        wall = statistics.median(w for w, _ in t)
        cpu = statistics.median(c for _, c in t)
        rates[side], cpu_rates[side] = per_call / wall, per_call / cpu
        share[side] = sum(c for _, c in t) / sum(w for w, _ in t)
    return {"case": name, "unit": unit, "ours": rates["ours"], "official": rates["official"],
            "ratio": rates["ours"] / rates["official"], "cpu_ratio": cpu_rates["ours"] / cpu_rates["official"],
            "ours_cpu_rate": cpu_rates["ours"], "official_cpu_rate": cpu_rates["official"],
            "cpu_share": share, "per_call": per_call,
            "calls": {s: [{"wall_s": w, "cpu_s": c} for w, c in t] for s, t in times.items()},
            "load": load, **extra}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def check(result: dict, name: str, diff: float, scale: float) -> None:
    ok = diff <= CHECK_TOL * max(1.0, scale)
    result[name] = {"max_abs_diff": diff, "max_abs": scale, "agree": ok}
    print(f"  check {name}: max |ours - official| = {diff:.3g} (values up to {scale:.3g}) "
          f"{'agree' if ok else 'DIFFER'}", flush=True)


def check_loss_and_grads(checks: dict, name: str, ours, theirs, la: torch.Tensor, lb: torch.Tensor) -> None:
    """`<name>_loss`: the two losses agree; then one backward each, `<name>_grads`: every parameter's
    gradient (by name) agrees."""
    check(checks, f"{name}_loss", abs(float(la.detach()) - float(lb.detach())), abs(float(lb.detach())))
    la.backward()
    lb.backward()
    grads_a = dict(ours.named_parameters())
    gd = max(max_diff(grads_a[k].grad, p.grad) for k, p in theirs.named_parameters() if p.grad is not None)
    gs = max(float(p.grad.abs().max()) for p in theirs.parameters() if p.grad is not None)
    check(checks, f"{name}_grads", gd, gs)


# ----------------------------------------------------------------------------- DiT

def dit_sample_case(args, spec, ours, theirs, diffusion_mod, checks: dict) -> dict:
    from neon_scale.specs.dit import DiTSampler

    sampler = DiTSampler(method="ddpm", steps=args.dit_steps, cfg=args.dit_cfg, guided_channels=3)
    official_diffusion = diffusion_mod.create_diffusion(str(args.dit_steps))  # once, as sample.py
    grid, channels = ours.x_embedder.input_size, ours.in_channels
    ours.eval()
    theirs.eval()

    def official_run(n: int, gen: torch.Generator, draws=None):
        z = torch.randn(n, channels, grid, grid, generator=gen)
        y = torch.arange(n) % NULL_CLASS
        z2, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, NULL_CLASS)])
        with torch.no_grad():
            ctx = scripted_randn_like(draws) if draws is not None else contextlib.nullcontext()
            with ctx:
                out = official_diffusion.p_sample_loop(theirs.forward_with_cfg, z2.shape, z2, clip_denoised=False,
                                                       model_kwargs=dict(y=y2, cfg_scale=args.dit_cfg),
                                                       progress=False, device="cpu")
        return out.chunk(2)[0]

    if args.check:
        n = 2
        with torch.no_grad():
            x = torch.randn(2 * n, channels, grid, grid, generator=torch.Generator().manual_seed(1))
            t = torch.tensor([0, 999, 500, 17])[: 2 * n]
            y = torch.tensor([3, 7, NULL_CLASS, NULL_CLASS])[: 2 * n]
            a, b = ours(x, t, y), theirs(x, t, y)
            check(checks, "dit_forward", max_diff(a, b), float(b.abs().max()))
            a, b = ours.forward_with_cfg(x, t, y, args.dit_cfg), theirs.forward_with_cfg(x, t, y, args.dit_cfg)
            check(checks, "dit_forward_with_cfg", max_diff(a, b), float(b.abs().max()))
        # the whole DDPM loop: ours draws its start noise then one step noise per step but the
        # last from `gen`; the official loop gets the same numbers (doubled) from randn_like
        seed = args.seed + 10
        a = spec.sample(ours, n, torch.Generator().manual_seed(seed), sampler)["x"]
        g = torch.Generator().manual_seed(seed)
        torch.randn(n, channels, grid, grid, generator=g)
        draws = [torch.randn(n, channels, grid, grid, generator=g) for _ in range(args.dit_steps - 1)] + [None]
        b = official_run(n, torch.Generator().manual_seed(seed), draws)
        check(checks, f"dit_ddpm{args.dit_steps}_cfg_sample", max_diff(a, b), float(b.abs().max()))

    n = args.dit_batch
    load = [load_now()]
    times = interleaved(lambda: spec.sample(ours, n, torch.Generator().manual_seed(args.seed), sampler),
                        lambda: official_run(n, torch.Generator().manual_seed(args.seed)), args.reps)
    load.append(load_now())
    return summarise(f"DiT sampling, DDPM {args.dit_steps} + CFG {args.dit_cfg}, batch {n}", "images/s", n, times,
                     load, {"key": "dit-sample"})


def dit_train_case(args, spec, ours, theirs, diffusion_mod, checks: dict) -> dict:
    from neon_scale import rng
    from neon_scale.stages.train import drop_labels

    train_diffusion = diffusion_mod.create_diffusion(timestep_respacing="")  # as train.py
    grid, channels = ours.x_embedder.input_size, ours.in_channels
    b = args.train_batch
    data = torch.Generator().manual_seed(args.seed + 20)
    x = torch.randn(b, channels, grid, grid, generator=data)
    y = torch.randint(0, NULL_CLASS, (b,), generator=data)

    if args.check:
        gen = torch.Generator().manual_seed(args.seed + 21)
        ours.train()
        theirs.eval()  # no label dropout inside the official model for the check
        for m in (ours, theirs):
            m.zero_grad(set_to_none=True)
        la = spec.loss(ours, {"x": x, "cls": y}, gen)
        g2 = torch.Generator().manual_seed(args.seed + 21)
        t = torch.randint(0, 1000, (b,), generator=g2)
        noise = torch.randn(x.shape, generator=g2)
        lb = train_diffusion.training_losses(theirs, x, t, dict(y=y), noise=noise)["loss"].mean()
        check_loss_and_grads(checks, "dit_train", ours, theirs, la, lb)

    ours.train()
    theirs.train()
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0)  # train.py's optimizer
    opt_b = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0)
    step = [0]

    def ours_steps():
        for _ in range(args.train_steps):
            step[0] += 1
            batch = drop_labels({"x": x, "cls": y}, 0.1, NULL_CLASS, rng.StepNoise((args.seed, "labels", step[0]), b, 0))
            loss = spec.loss(ours, batch, rng.StepNoise((args.seed, "loss", step[0]), b, 0))
            opt_a.zero_grad()
            loss.backward()
            opt_a.step()

    def official_steps():
        for _ in range(args.train_steps):
            t = torch.randint(0, train_diffusion.num_timesteps, (b,))
            loss = train_diffusion.training_losses(theirs, x, t, dict(y=y))["loss"].mean()
            opt_b.zero_grad()
            loss.backward()
            opt_b.step()

    ours_steps()  # warm-up: AdamW's state
    official_steps()
    load = [load_now()]
    times = interleaved(ours_steps, official_steps, args.train_reps)
    load.append(load_now())
    return summarise(f"DiT training step (loss + backward + AdamW), batch {b}", "steps/s", args.train_steps, times,
                     load, {"key": "dit-train"})


# ----------------------------------------------------------------------------- xAR

def _dropouts(model: torch.nn.Module, p: float | None, saved: list | None = None) -> list:
    """Set every dropout probability to p (None: restore `saved`); returns what was there."""
    out, k = [], 0
    for m in model.modules():
        for attr in ("p", "attn_drop"):
            if isinstance(getattr(m, attr, None), float) and (attr == "attn_drop" or isinstance(m, torch.nn.Dropout)):
                out.append(getattr(m, attr))
                setattr(m, attr, saved[k] if p is None else p)
                k += 1
    return out


def xar_sample_case(args, spec, ours, theirs, checks: dict) -> dict:
    from neon_scale.specs.xar import XARSampler

    sampler = XARSampler(num_steps=args.xar_steps, cfg=args.xar_cfg)
    ours.eval()
    theirs.eval()

    def official_run(n: int):
        with torch.no_grad(), cpu_cuda_calls():
            return theirs.sample_tokens(num_steps=args.xar_steps, cfg=args.xar_cfg, label=torch.arange(n) % NULL_CLASS)

    if args.check:
        # both draw the start noise of a cell, then a float64 noise per step but the last, from
        # the same (global) generator in the same order: the same samples
        n, seed = 2, args.seed + 30
        torch.manual_seed(seed)
        a = spec.sample(ours, n, torch.default_generator, sampler)["x"]
        torch.manual_seed(seed)
        b = official_run(n)
        check(checks, f"xar_sample_{args.xar_steps}steps_cfg", max_diff(a, b), float(b.abs().max()))

    n = args.xar_batch
    load = [load_now()]
    times = interleaved(lambda: spec.sample(ours, n, torch.Generator().manual_seed(args.seed), sampler),
                        lambda: official_run(n), args.reps)
    load.append(load_now())
    extra = {"key": "xar-sample"}
    if args.xar_official_batches:
        # our sampler with the official batch rule ([cond; uncond] rows at every evaluation): the
        # implementation alone, without the saved unconditional rows of the first cell
        from neon_scale.models.xar_sampler import _generate

        labels = torch.arange(n) % NULL_CLASS
        t2 = interleaved(lambda: _generate(ours, labels, torch.Generator().manual_seed(args.seed),
                                           num_steps=args.xar_steps, cfg=args.xar_cfg, official_batches=True),
                         lambda: official_run(n), args.reps)
        rate = n / statistics.median(w for w, _ in t2["ours"])
        off = n / statistics.median(w for w, _ in t2["official"])
        extra["ours_official_batches"] = {"ours": rate, "official": off, "ratio": rate / off,
                                          "calls": {s: [{"wall_s": w, "cpu_s": c} for w, c in t]
                                                    for s, t in t2.items()}}
        load.append(load_now())
    return summarise(f"xAR sampling, {args.xar_steps} steps/cell + CFG {args.xar_cfg}, batch {n}", "images/s", n,
                     times, load, extra)


def xar_train_case(args, spec, ours, theirs, checks: dict) -> dict:
    import scipy.stats
    from neon_scale import rng
    from neon_scale.models.xar import flow_loss_at

    b = args.train_batch
    data = torch.Generator().manual_seed(args.seed + 40)
    x = torch.randn(b, ours.vae_embed_dim, ours.seq_h, ours.seq_w, generator=data)
    y = torch.randint(0, NULL_CLASS, (b,), generator=data)
    ours.train()
    theirs.train()

    if args.check:
        # train mode without dropout and label dropout: the official forward's draws (torch.rand
        # for the labels, scipy's logit-normal times, 4 randn_like cells) replayed into ours
        saved_a, saved_b = _dropouts(ours, 0.0), _dropouts(theirs, 0.0)
        drop_b, theirs.label_drop_prob = theirs.label_drop_prob, 0.0
        for m in (ours, theirs):
            m.zero_grad(set_to_none=True)
        seed = args.seed + 41
        torch.manual_seed(seed)
        np.random.seed(seed)
        with cpu_cuda_calls():
            lb = theirs(x, y)
        torch.manual_seed(seed)
        np.random.seed(seed)
        torch.rand(b)
        z = scipy.stats.norm.rvs(loc=0, scale=1, size=b * ours.clusters)
        t = torch.tensor(1 / (1 + np.exp(-z)), dtype=torch.float32).view(ours.clusters, b).T
        cells = [torch.randn(b, ours.cell_len, ours.vae_embed_dim) for _ in range(ours.clusters)]
        noise = torch.stack(cells, dim=1).reshape(b, ours.seq_len, ours.vae_embed_dim)
        la = flow_loss_at(ours, x, y, t, noise)
        check_loss_and_grads(checks, "xar_train", ours, theirs, la, lb)
        _dropouts(ours, None, saved_a)
        _dropouts(theirs, None, saved_b)
        theirs.label_drop_prob = drop_b

    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.02)  # main_mar.py
    opt_b = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.02)
    step = [0]

    def ours_steps():
        for _ in range(args.train_steps):
            step[0] += 1
            loss = spec.loss(ours, {"x": x, "cls": y}, rng.StepNoise((args.seed, "loss", step[0]), b, 0))
            opt_a.zero_grad()
            loss.backward()
            opt_a.step()

    def official_steps():
        with cpu_cuda_calls():
            for _ in range(args.train_steps):
                loss = theirs(x, y)
                opt_b.zero_grad()
                loss.backward()
                opt_b.step()

    ours_steps()
    official_steps()
    load = [load_now()]
    times = interleaved(ours_steps, official_steps, args.train_reps)
    load.append(load_now())
    return summarise(f"xAR training step (loss + backward + AdamW), batch {b}", "steps/s", args.train_steps, times,
                     load, {"key": "xar-train"})


# ----------------------------------------------------------------------------- main

def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/official.py", allow_abbrev=False,
        description="Speed of our DiT / xAR samplers and training steps against the official code "
                    "(facebookresearch/DiT, OliverRensu/xAR) on the same small random weights, on this CPU. "
                    "Needs user checkouts of the official repositories (--dit-repo PATH, --xar-repo PATH) "
                    "and timm on the Python path; see the module docstring for the details.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit-repo", metavar="PATH", help="checkout of github.com/facebookresearch/DiT")
    p.add_argument("--xar-repo", metavar="PATH", help="checkout of github.com/OliverRensu/xAR")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--out", default="runs/bench-official.json", help="JSON results (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=4, help="timed sampler calls per side (default: %(default)s)")
    p.add_argument("--train-reps", type=int, default=8, help="timed rounds of --train-steps per side (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=5, help="optimizer steps per timed round (default: %(default)s)")
    p.add_argument("--train-batch", type=int, default=8, help="training batch, DiT and xAR (default: %(default)s)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the ours == official checks")
    p.add_argument("--weight-std", type=float, default=0.02, help="std of the seeded weight perturbation")
    g = p.add_argument_group("DiT (latent 4 channels, learned sigma, 1000 classes)")
    g.add_argument("--dit-depth", type=int, default=4)
    g.add_argument("--dit-hidden", type=int, default=256)
    g.add_argument("--dit-heads", type=int, default=4)
    g.add_argument("--dit-input", type=int, default=16, help="latent side (image side / 8), patch 2 (default: %(default)s)")
    g.add_argument("--dit-batch", type=int, default=4, help="images per sampler call (default: %(default)s)")
    g.add_argument("--dit-steps", type=int, default=250)
    g.add_argument("--dit-cfg", type=float, default=1.5, help="sample_ddp.py's default (default: %(default)s)")
    g = p.add_argument_group("xAR (256 px: 16 x 16 tokens of 16 channels in 4 cells, 1000 classes: fixed by the official code)")
    g.add_argument("--xar-depth", type=int, default=2, help="encoder and decoder blocks each (default: %(default)s)")
    g.add_argument("--xar-dim", type=int, default=256)
    g.add_argument("--xar-heads", type=int, default=4)
    g.add_argument("--xar-batch", type=int, default=4, help="images per sampler call (default: %(default)s)")
    g.add_argument("--xar-steps", type=int, default=50, help="flow steps per cell, xAR-L's evaluation (default: %(default)s)")
    g.add_argument("--xar-cfg", type=float, default=2.3, help="xAR-L's evaluation (default: %(default)s)")
    g.add_argument("--xar-official-batches", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our sampler with the official batch rule ([cond; uncond] rows at every "
                        "evaluation): our implementation alone, without the unconditional rows it saves in the "
                        "first cell (default: on)")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in CASES]
    if bad or not args.cases:
        raise Usage(f"--cases: {bad[0]!r} is not one of {', '.join(CASES)}" if bad else "--cases: none given")
    for flag in ("threads", "reps", "train_reps", "train_steps", "train_batch", "dit_batch", "dit_steps",
                 "xar_batch", "xar_steps"):
        if getattr(args, flag) < 1:
            raise Usage(f"--{flag.replace('_', '-')}: {getattr(args, flag)} (at least 1)")
    if args.train_batch < 2:
        raise Usage(f"--train-batch: {args.train_batch} (at least 2: the official xAR forward squeezes the batch dim)")
    return args


def print_table(rows: list[dict]) -> None:
    print()
    head = f"{'case':<62} {'ours':>9} {'official':>9} {'unit':<9} {'ratio':>6} {'cpu ratio':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['case']:<62} {r['ours']:>9.3f} {r['official']:>9.3f} {r['unit']:<9} {r['ratio']:>6.2f} "
              f"{r['cpu_ratio']:>9.2f}")
        if "ours_official_batches" in r:
            o = r["ours_official_batches"]
            print(f"{'  (ours with the official batch rule)':<62} {o['ours']:>9.3f} {o['official']:>9.3f} "
                  f"{r['unit']:<9} {o['ratio']:>6.2f}")
    print("ratio = ours / official (> 1: ours faster), medians of interleaved calls; cpu ratio: from process CPU time")


def main(argv=None) -> int:
    try:
        args = parse(argv)
        dit_repo = xar_repo = None
        if any(c.startswith("dit") for c in args.cases):
            dit_repo = _check_repo(args.dit_repo, "--dit-repo", ("models.py", "diffusion/__init__.py"),
                                   "github.com/facebookresearch/DiT")
        if any(c.startswith("xar") for c in args.cases):
            xar_repo = _check_repo(args.xar_repo, "--xar-repo", ("models/xar.py", "models/sampler.py"),
                                   "github.com/OliverRensu/xAR")
        dit_mods = load_official_dit(dit_repo) if dit_repo else None
        xar_mod = load_official_xar(xar_repo) if xar_repo else None
    except Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, checks = [], {}
    record = {"argv": sys.argv[1:], "args": {k: v for k, v in vars(args).items()}, "python": platform.python_version(),
              "torch": torch.__version__, "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "cpu": cpu_model(), "cores": os.cpu_count(), "load_start": load_now(),
              "official": {"dit": _git_head(dit_repo), "xar": _git_head(xar_repo)}}
    print(f"load at start: {record['load_start']['uptime']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if dit_mods:
            spec, ours, theirs, kw = build_dit(args, *dit_mods, tmp)
            record["dit_model"] = {**kw, "params": n_params(ours)}
            print(f"DiT: {kw} ({n_params(ours) / 1e6:.2f}M parameters), official copy loaded strictly", flush=True)
            for case, fn in (("dit-sample", dit_sample_case), ("dit-train", dit_train_case)):
                if case in args.cases:
                    print(f"{case} ...", flush=True)
                    rows.append(fn(args, spec, ours, theirs, dit_mods[0], checks))
                    print(f"  ours {rows[-1]['ours']:.3f} official {rows[-1]['official']:.3f} {rows[-1]['unit']} "
                          f"ratio {rows[-1]['ratio']:.2f}", flush=True)
        if xar_mod:
            spec, ours, theirs, kw = build_xar(args, xar_mod, tmp)
            record["xar_model"] = {**kw, "params": n_params(ours)}
            print(f"xAR: {kw} ({n_params(ours) / 1e6:.2f}M parameters), official copy loaded strictly", flush=True)
            for case, fn in (("xar-sample", xar_sample_case), ("xar-train", xar_train_case)):
                if case in args.cases:
                    print(f"{case} ...", flush=True)
                    rows.append(fn(args, spec, ours, theirs, checks))
                    print(f"  ours {rows[-1]['ours']:.3f} official {rows[-1]['official']:.3f} {rows[-1]['unit']} "
                          f"ratio {rows[-1]['ratio']:.2f}", flush=True)
    record.update(rows=rows, checks=checks, load_end=load_now(), wall_s=time.perf_counter() - start)
    print_table(rows)
    print(f"load at end: {record['load_end']['uptime']}; wall {record['wall_s']:.0f} s")
    if any(not c["agree"] for c in checks.values()):
        print("WARNING: some checks differ (above): those cases do not compute the same thing")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    print(f"wrote {out}")
    return 0


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def _git_head(repo: pathlib.Path | None) -> str | None:
    if repo is None:
        return None
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
