"""The two latent VAEs of the image generators: MAR's KL-16 (xAR) and Stable Diffusion's KL-f8 (DiT).

Both wrappers share one small interface (`LatentVAE`):

  scale           latent multiplier: 0.2325 (MAR KL-16), 0.18215 (SD KL-f8)
  latent_channels 16 / 4;  stride: 16 / 8 (image side = latent side * stride)
  encode(images, gen=None) -> scaled latents [N, C, H/stride, W/stride], float
      images: uint8 [N, 3, H, W] in 0..255, mapped to [-1, 1] as ToTensor + Normalize(0.5, 0.5) do
      (x / 255, then (x - 0.5) / 0.5); or float [N, 3, H, W], taken to be in [-1, 1] already.
      gen None: the posterior mean; a torch.Generator: a posterior sample mean + std * noise, the
      noise drawn from `gen` on the generator's device (the official training draws a sample).
      The latent is multiplied by `scale`, as the generators see it.
  decode(latents) -> uint8 [N, 3, H, W]: divides by `scale`, decodes to [-1, 1] floats
      (`decode_float`), converts with the conversion the model's official sampling script uses:
        MAR (xAR generate_dataset.py / generate_and_fid_sims.py): ((x + 1) / 2) * 255, clamp to
            [0, 255], cast to uint8: truncation;
        SD  (DiT sample_ddp.py): clamp(127.5 * x + 128, 0, 255), cast to uint8: round half up.
The conversions run in float32. Both wrappers run without gradients (the VAEs are frozen); inputs
move to the VAE's device and dtype, outputs stay there.

MAR KL-16 is our own module (LDM's KL autoencoder as MAR/xAR configure it) with the official
parameter names, so the `"model"` state dict of `kl16.ckpt` loads key for key (keys the network
lacks, e.g. a training loss's, are ignored with a warning, as the official strict=False load does):
  encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2[,nin_shortcut]},
  encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out} (lowest resolution only),
  encoder.down.{i}.downsample.conv (all levels but the last), encoder.mid.{block_1,attn_1,block_2},
  encoder.norm_out, encoder.conv_out (-> 2 x 16: mean and log-variance);
  decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j} (num_res_blocks + 1 per level),
  decoder.up.{i}.upsample.conv (all levels but 0), decoder.norm_out, decoder.conv_out (-> 3);
  quant_conv (1x1, 32 -> 32), post_quant_conv (1x1, 16 -> 16).
GroupNorm(32 groups, eps 1e-6), swish, dropout 0, no timestep embedding. The log-variance is
clamped to [-30, 20]. SD KL-f8 is diffusers' AutoencoderKL, an optional dependency (extra
"sd-vae"), loaded from local files only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import NeonError, first_line
from ..io import check_keys, load_into, torch_load

MAR_SCALE = 0.2325
SD_SCALE = 0.18215
SD_INSTALL = "pip install diffusers (or pip install -e '.[sd-vae]')"


# --------------------------------------------------------------------------------------------
# The common interface


def images_to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float in [-1, 1] (ToTensor then Normalize(0.5, 0.5)); float: unchanged."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div(255).sub(0.5).div(0.5)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float, got {images.dtype}")
    return images


class LatentVAE(nn.Module):
    """encode: images -> scaled latents; decode: scaled latents -> uint8 images (see module doc)."""

    kind: str
    scale: float
    latent_channels: int
    stride: int

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [-1, 1] (on the VAE's device and dtype) -> (mean, std) of the unscaled latent."""
        raise NotImplementedError

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> the decoder's raw output (about [-1, 1])."""
        raise NotImplementedError

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    @torch.no_grad()
    def encode(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        p = self._param()
        x = images_to_model_input(images.to(p.device)).to(p.dtype)
        if x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of the VAE stride {self.stride}")
        mean, std = self.posterior(x)
        if gen is None:
            return mean * self.scale
        noise = torch.randn(mean.shape, generator=gen, device=gen.device, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * self.scale

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> the decoder's raw output (about [-1, 1], not clamped)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [N, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        p = self._param()
        return self.decode_unscaled(latents.to(p.device, p.dtype) / self.scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.to_uint8(self.decode_float(latents).float())


# --------------------------------------------------------------------------------------------
# MAR KL-16: LDM's KL autoencoder, module and parameter names as in the official file


@dataclasses.dataclass(frozen=True)
class KLConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    # Attention after every res block of the encoder's lowest-resolution level: the official
    # attn_resolutions=(16,) at resolution 256 with 5 levels (256 / 2**4 = 16). The decoder has none.
    encoder_attn: bool = True
    norm_groups: int = 32


MAR_KL16 = KLConfig()
MAR_TINY = KLConfig(ch=16, num_res_blocks=1, norm_groups=8)  # same family: stride 16, 16 channels


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))); x through a 1x1 conv when channels change."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(n, c, hh * ww).transpose(1, 2)      # [n, hw, c]
        k = self.k(h).reshape(n, c, hh * ww)                      # [n, c, hw]
        v = self.v(h).reshape(n, c, hh * ww)                      # [n, c, hw]
        weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # [n, query, key]
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(n, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad one column right and one row below, then a 3x3 conv with stride 2."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: res blocks (`block`), their attentions (`attn`, maybe empty), a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: dict[str, nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        for name, module in resample.items():  # "downsample" / "upsample", absent at the end level
            setattr(self, name, module)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: KLConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, width, g))
                c = width
            attns = [AttnBlock(c, g) for _ in blocks] if (cfg.encoder_attn and i == last) else []
            self.down.append(Level(blocks, attns, {"downsample": Downsample(c)} if i != last else {}))
        self.mid = Mid(c, g)
        self.norm_out = nn.GroupNorm(g, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: KLConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c, g)
        levels = []  # built from the lowest resolution up; up[i] is level i (up[0]: full size)
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, widths[i], g))
                c = widths[i]
            levels.insert(0, Level(blocks, [], {"upsample": Upsample(c)} if i != 0 else {}))
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class MarVAE(LatentVAE):
    """MAR's KL-16 VAE (xAR's tokenizer). Its state dict is the official one (see module doc)."""

    kind = "mar"
    scale = MAR_SCALE

    def __init__(self, cfg: KLConfig = MAR_KL16):
        super().__init__()
        self.cfg = cfg
        self.latent_channels = cfg.z_channels
        self.stride = 2 ** (len(cfg.ch_mult) - 1)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def posterior(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode_unscaled(self, z):
        return self.decoder(self.post_quant_conv(z))

    @staticmethod
    def to_uint8(x):
        return ((x + 1) / 2).mul(255).clamp(0, 255).to(torch.uint8)


def load_mar_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> MarVAE:
    """kl16.ckpt ({"model": state dict}) -> MarVAE, eval mode, frozen. The official loader (MAR's
    models/vae.py, AutoencoderKL.init_from_ckpt) reads the same "model" entry with strict=False: here
    a missing key or shape is an error, a key the network lacks a warning (io.check_keys)."""
    path = pathlib.Path(path)
    what = "MAR KL-16 VAE weights (kl16.ckpt)"
    ckpt = torch_load(path, what)  # a missing file is one line naming `what`
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        found = f"keys {sorted(map(str, ckpt))[:5]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise NeonError(f"{path}: not a {what} checkpoint: no 'model' entry (found {found})")
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise NeonError(f"{path}: the 'model' entry of the {what} is not a state dict of tensors")
    with torch.device("meta"):
        vae = MarVAE(MAR_KL16)
    vae = vae.to_empty(device="cpu")
    load_into(vae, state, f"{path} ({what})", official=True)  # extra keys (the training loss's): a warning
    return vae.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Stable Diffusion KL-f8 through diffusers (optional)


def _diffusers_autoencoder():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise NeonError(f"the Stable Diffusion VAE needs the diffusers package, which is not installed: {SD_INSTALL}") from None
    return AutoencoderKL


class SDVAE(LatentVAE):
    """A diffusers AutoencoderKL (`net`) behind the common interface; latents x 0.18215 (DiT)."""

    kind = "sd"
    scale = SD_SCALE

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.latent_channels = net.config.latent_channels
        self.stride = 2 ** (len(net.config.block_out_channels) - 1)

    def posterior(self, x):
        dist = self.net.encode(x).latent_dist
        return dist.mean, dist.std

    def decode_unscaled(self, z):
        return self.net.decode(z).sample

    @staticmethod
    def to_uint8(x):
        return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)


def _ldm_state(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors of an LDM-format SD VAE file, without the `first_stage_model.` / `vae.` prefix of
    a whole Stable Diffusion checkpoint (its other networks left out)."""
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        sd = torch_load(path, "SD VAE weights")
        while isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise NeonError(f"{path}: not a state dict (a {type(sd).__name__})")
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix + "encoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _ldm_config(path: pathlib.Path, shapes: dict[str, tuple]) -> dict:
    """The original (CompVis) config diffusers' from_single_file converts with, inferred from the
    weight shapes: so no config has to come from the Hub."""
    needed = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv2.weight", "decoder.conv_in.weight")
    if not all(k in shapes for k in needed):
        raise NeonError(f"{path}: not a Stable Diffusion VAE in the original (LDM) layout: no {needed[1]} "
                        "(a diffusers-format VAE goes in a folder with its config.json)")
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
    ch_mult = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels)]
    ddconfig = {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": blocks, "in_channels": in_channels,
                "out_ch": shapes.get("decoder.conv_out.weight", (3,))[0], "z_channels": shapes["decoder.conv_in.weight"][1]}
    return {"model": {"params": {"scale_factor": SD_SCALE, "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


def _check_ldm_keys(state: dict[str, torch.Tensor], config: dict, source: str) -> dict[str, torch.Tensor]:
    """The LDM file's keys against those of the KL autoencoder its shapes describe (our MarVAE
    module with SD's configuration, no encoder attention: the same names), as io.check_keys does
    for an official file: a missing key or shape is an error, a key the network lacks is a warning
    (an error with --strict). Returns `state` without the ignored keys. diffusers' conversion would
    drop such keys silently and leave missing ones randomly initialised."""
    dd = config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    cfg = KLConfig(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                   z_channels=dd["z_channels"], encoder_attn=False, norm_groups=1)
    with torch.device("meta"):
        layout = {k: tuple(v.shape) for k, v in MarVAE(cfg).state_dict().items()}
    # RGB in and out is what the network is built for; other channel counts are left to diffusers
    layout["encoder.conv_in.weight"] = (dd["ch"], dd["in_channels"], 3, 3)
    layout["decoder.conv_out.weight"] = (dd["out_ch"], *layout["decoder.conv_out.weight"][1:])
    layout["decoder.conv_out.bias"] = (dd["out_ch"],)
    extra = set(check_keys(list(layout), list(state), source, official=True))
    for k, shape in layout.items():
        if tuple(state[k].shape) != shape:
            raise NeonError(f"{source}: key '{k}' has shape {tuple(state[k].shape)}, the model expects {shape}")
    return {k: v for k, v in state.items() if k not in extra}


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' own warnings off (its "not used" / "newly initialized" lists): our checks say it in one line."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _check_loading_info(net: nn.Module, info: dict, source: str) -> None:
    """diffusers' from_pretrained report (missing / unexpected / mismatched keys) as io.check_keys
    judges an official file: a missing key or shape is an error, an unused key a warning."""
    order = list(net.state_dict())
    missing = set(info.get("missing_keys") or ())
    found = [k for k in order if k not in missing] + sorted(info.get("unexpected_keys") or ())
    check_keys(order, found, source, official=True)
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: order.index(m[0]) if m[0] in order else 0)
    if mismatched:
        key, theirs, ours = mismatched[0]
        raise NeonError(f"{source}: key '{key}' has shape {tuple(theirs)}, the model expects {tuple(ours)}")


def load_sd_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SDVAE:
    """A local SD VAE: a diffusers folder (config.json + diffusion_pytorch_model.safetensors/.bin,
    e.g. stabilityai/sd-vae-ft-ema), or one original-layout .safetensors/.ckpt/.pt file (e.g.
    vae-ft-mse-840000-ema-pruned), whose config is inferred from its shapes. Never downloads.
    Keys as for every official file (io.check_keys): a missing key or a wrong shape is an error, a
    key the network does not have (a training loss's, an EMA copy's) a warning, an error with
    --strict / strict_keys: true."""
    path = pathlib.Path(path)
    AutoencoderKL = _diffusers_autoencoder()
    what = "Stable Diffusion VAE (a diffusers folder or an original .safetensors/.ckpt file)"
    source = f"{path} (Stable Diffusion VAE)"
    if not path.exists():
        raise NeonError(f"{path}: {what} not found")
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise NeonError(f"{path}: no config.json: not a diffusers AutoencoderKL folder")
            with _quiet_diffusers():
                net, info = AutoencoderKL.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                          low_cpu_mem_usage=False, ignore_mismatched_sizes=True)
            _check_loading_info(net, info, source)
        elif path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            state = _ldm_state(path)
            config = _ldm_config(path, {k: tuple(v.shape) for k, v in state.items()})
            state = _check_ldm_keys(state, config, source)
            with _quiet_diffusers():
                net = AutoencoderKL.from_single_file(state, original_config=config, local_files_only=True)
        else:
            raise NeonError(f"{path}: {what}: unknown file type {path.suffix!r}")
    except NeonError:
        raise
    except Exception as e:  # diffusers raises OSError/ValueError/RuntimeError/KeyError for bad files
        raise NeonError(f"{path}: cannot load the {what}: {first_line(e)}") from None
    return SDVAE(net).to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Building, and small random VAEs for tests and tiny pipelines


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic random weights, whatever the device: matrices and kernels N(0, 1/fan_in),
    other parameters (biases, norm affines) N(0, 0.02) (+1 for norm weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                value = torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5
            else:
                value = 0.02 * torch.randn(p.shape, generator=gen)
                if name.endswith("weight"):  # 1-d weights are GroupNorm scales
                    value += 1
            p.copy_(value)
    return module


def random_mar_vae(seed: int = 0, cfg: KLConfig = MAR_TINY, device: str | torch.device = "cpu") -> MarVAE:
    """A random MAR-architecture VAE (default: tiny, ch 16, stride 16, 16 latent channels)."""
    return randomize_(MarVAE(cfg), seed).to(device).eval().requires_grad_(False)


def random_sd_vae(seed: int = 0, device: str | torch.device = "cpu") -> SDVAE:
    """A tiny random diffusers AutoencoderKL: 4 levels (stride 8), 4 latent channels, widths
    16-32-32-32, one res block per level, GroupNorm(8). Needs diffusers."""
    AutoencoderKL = _diffusers_autoencoder()
    net = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=64)
    return SDVAE(randomize_(net, seed)).to(device).eval().requires_grad_(False)


def build_vae(kind: str, path: str | os.PathLike | None, device: str | torch.device = "cpu",
              tiny: bool = False, seed: int = 0) -> LatentVAE:
    """kind "mar" (xAR, kl16.ckpt) or "sd" (DiT, sd-vae-ft-ema/-mse). tiny=True: a small random
    VAE of the same family (no path), deterministic in `seed`."""
    if kind not in ("mar", "sd"):
        raise NeonError(f"unknown VAE kind {kind!r}: 'mar' (MAR KL-16) or 'sd' (Stable Diffusion KL-f8)")
    if tiny:
        if path is not None:
            raise NeonError(f"a tiny VAE has random weights: give no path (got {path})")
        return random_mar_vae(seed, device=device) if kind == "mar" else random_sd_vae(seed, device=device)
    if path is None:
        raise NeonError(f"the {kind!r} VAE needs a weights path ({'kl16.ckpt' if kind == 'mar' else 'a diffusers folder'})")
    return load_mar_vae(path, device) if kind == "mar" else load_sd_vae(path, device)
