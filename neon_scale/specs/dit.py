"""DiT in the registry: the official network (models/dit.py) in the SD KL-f8 VAE's latent space,
trained with the diffusion loss and sampled with DDPM (learned variance) or DDIM + CFG
(sampling/diffusion.py).

Official weights load as they are: the released bare state dicts (DiT-XL-2-256x256.pt) and the
training checkpoints {"model", "ema", "opt", "args"} (the EMA unless base.weights_key says
otherwise). Latents are the VAE's x 0.18215; input_size = image_size / 8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NeonError
from ..fields import setting
from ..models.dit import DIT_SIZES, DiT, dit_config
from ..models.layers import balanced_labels
from ..sampling import diffusion
from .latent import LatentImageSpec

DIT_ARCHS = [f"{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8)]
VAE_STRIDE = 8


@dataclass
class DiTArgs:
    arch: str = setting("XL/2", choices=DIT_ARCHS, help="official variant; depth/hidden_size/num_heads override it")
    image_size: int = setting(256, min=2, help="pixels; the latent grid is image_size / 8 (with a VAE)")
    channels: int = setting(3, min=1, help="image channels; the network's input channels in pixel space (vae: none)")
    num_classes: int = setting(1000, min=1, help="class labels 0..num_classes-1; num_classes is the null class")
    learn_sigma: bool = setting(True, help="8 output channels: eps and the variance (official)")
    class_dropout_prob: float = setting(0.1, min=0.0, max=1.0, help="the official constructor's argument (sizes the "
                                                                "null row); dropout in training is train.label_dropout")
    depth: int = setting(0, min=0, help="0 = the arch's")
    hidden_size: int = setting(0, min=0, help="0 = the arch's")
    num_heads: int = setting(0, min=0, help="0 = the arch's")
    vae: str = setting("", help="local SD VAE (diffusers folder of sd-vae-ft-ema/-mse); 'none': pixel space (the "
                           "images in [-1, 1]); 'random' (tests)")
    vae_seed: int = setting(0, help="seed of the random VAE")


@dataclass
class DiTSampler:
    method: str = setting("ddpm", choices=["ddpm", "ddim"], help="ddpm: learned-variance ancestral (official); ddim")
    steps: int = setting(250, min=1, help="respaced steps out of the 1000 trained ones")
    cfg: float = setting(1.5, min=0.0, help="classifier-free guidance scale: > 1 mode-seeking (official); 1: the plain "
                                       "conditional model; < 1 interpolates towards the unconditional model "
                                       "(diversity-seeking; the official code treats cfg <= 1 as 1)")
    guided_channels: int = setting(3, min=1, help="eps channels guided (official: 3; 4 = all)")
    eta: float = setting(0.0, min=0.0, max=1.0, help="DDIM noise")


class DiTSpec(LatentImageSpec):
    name = "dit"
    Args = DiTArgs
    Sampler = DiTSampler
    vae_kind = "sd"

    DATA_ARGS = ("image_size", "channels", "num_classes")

    def stride(self, args: DiTArgs) -> int:
        return 1 if self.pixel_space(args) else VAE_STRIDE

    def constructor_args(self, args: DiTArgs) -> dict:
        kw = dit_config(args.arch)
        for key in ("depth", "hidden_size", "num_heads"):
            if getattr(args, key):
                kw[key] = getattr(args, key)
        in_channels = args.channels if self.pixel_space(args) else 4
        return dict(kw, input_size=args.image_size // self.stride(args), in_channels=in_channels,
                    num_classes=args.num_classes, learn_sigma=args.learn_sigma,
                    class_dropout_prob=args.class_dropout_prob)

    def validate(self, args: DiTArgs, where: str) -> None:
        kw = self.constructor_args(args)
        stride = self.stride(args)
        if args.image_size % (stride * kw["patch_size"]):
            why = f"VAE stride 8 x patch {kw['patch_size']}" if stride > 1 else f"patch {kw['patch_size']}, pixel space"
            raise NeonError(f"{where}: 'model.args.image_size' = {args.image_size} is not a multiple of "
                            f"{stride * kw['patch_size']} ({why})")
        if kw["hidden_size"] % kw["num_heads"]:
            raise NeonError(f"{where}: 'model.args.hidden_size' = {kw['hidden_size']} is not divisible by "
                            f"num_heads = {kw['num_heads']}")
        super().validate(args, where)

    def check_sampler(self, args: DiTArgs, sampler: DiTSampler, where: str, key: str) -> None:
        if sampler.method == "ddpm" and not args.learn_sigma:
                raise NeonError(f"{where}: '{key}.method' = 'ddpm' needs model.args.learn_sigma: true (the official "
                            f"learned-variance sampler); use method: ddim")

    def build(self, args: DiTArgs) -> DiT:
        return DiT(**self.constructor_args(args))

    def loss(self, model: DiT, batch, gen):
        x0, labels = self.batch(model, batch, model.num_classes)
        return diffusion.training_loss(model, x0, labels, gen, learn_sigma=model.out_channels != model.in_channels)

    @torch.no_grad()
    def sample(self, model: DiT, n, gen, sampler: DiTSampler, start: int = 0):
        dev = self.device_of(model)
        grid = model.x_embedder.input_size
        noise = torch.randn(n, model.in_channels, grid, grid, generator=gen, device=gen.device).to(dev)
        labels = balanced_labels(start, n, model.num_classes, dev)
        x = diffusion.sample(model, noise, labels, gen, method=sampler.method, steps=sampler.steps, cfg=sampler.cfg,
                             null_class=model.num_classes, guided_channels=min(sampler.guided_channels,
                                                                               model.in_channels), eta=sampler.eta,
                             guidance=sampler.cfg != 1.0)
        return {"x": x, "cls": labels}
