"""xAR in the registry: the official network (models/xar.py) in the MAR KL-16 VAE's latent space,
trained with the flow loss and sampled cell by cell with Euler-Maruyama + ramped CFG
(models/xar_sampler.py).

The released .pth files are bare state dicts and load as they are (a training checkpoint's
EMA is taken, or base.weights_key). Latents are the VAE's x 0.2325; the token grid is
img_size / 16. The official model applies its own label dropout (label_drop_prob) in the loss:
leave train.label_dropout at 0 for xAR.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fields import setting
from ..errors import NeonError
from ..models.layers import balanced_labels
from .latent import LatentImageSpec
from ..models.xar import XAR, XAR_SIZES, flow_loss, xar_config
from ..models.xar_sampler import sample_xar

VAE_STRIDE = 16


@dataclass
class XARArgs:
    size: str = setting("B", choices=sorted(XAR_SIZES), help="official variant; embed_dim/depth/num_heads override it")
    img_size: int = setting(256, min=16, help="pixels; the token grid is img_size / 16")
    num_classes: int = setting(1000, min=1, help="class labels 0..num_classes-1; num_classes is the null class")
    label_drop_prob: float = setting(0.1, min=0.0, max=1.0, help="label dropout inside the official loss")
    attn_dropout: float = setting(0.1, min=0.0, max=1.0)
    proj_dropout: float = setting(0.1, min=0.0, max=1.0)
    embed_dim: int = setting(0, min=0, help="encoder and decoder width; 0 = the size's")
    depth: int = setting(0, min=0, help="encoder and decoder blocks each; 0 = the size's")
    num_heads: int = setting(0, min=0, help="0 = the size's")
    vae: str = setting("", help="local MAR KL-16 VAE (kl16.ckpt), or 'random' (tests)")
    vae_seed: int = setting(0, help="seed of the random VAE")


@dataclass
class XARSampler:
    num_steps: int = setting(50, min=1, help="Euler-Maruyama steps per cell (the last one is the mean step)")
    cfg: float = setting(2.3, min=0.0, help="guidance of the last cell; cell k of 4 gets 1 + (cfg - 1) k / 3")


class XARSpec(LatentImageSpec):
    name = "xar"
    Args = XARArgs
    Sampler = XARSampler
    vae_kind = "mar"
    DATA_ARGS = ("num_classes",)  # latent only: the image size is the VAE's business

    def constructor_args(self, args: XARArgs) -> dict:
        kw = xar_config(args.size)
        for ours, theirs in (("embed_dim", "embed_dim"), ("depth", "depth"), ("num_heads", "num_heads")):
            value = getattr(args, ours)
            if value:
                kw[f"encoder_{theirs}"] = kw[f"decoder_{theirs}"] = value
        return dict(kw, img_size=args.img_size, class_num=args.num_classes, label_drop_prob=args.label_drop_prob,
                    attn_dropout=args.attn_dropout, proj_dropout=args.proj_dropout)

    def validate(self, args: XARArgs, where: str) -> None:
        kw = self.constructor_args(args)
        side = args.img_size // VAE_STRIDE
        if args.img_size % VAE_STRIDE or side % 2:
            raise NeonError(f"{where}: 'model.args.img_size' = {args.img_size} must be a multiple of 32 (VAE stride 16, "
                            f"a token grid in 2 x 2 cells)")
        if kw["encoder_embed_dim"] % kw["encoder_num_heads"]:
            raise NeonError(f"{where}: 'model.args.embed_dim' = {kw['encoder_embed_dim']} is not divisible by "
                            f"num_heads = {kw['encoder_num_heads']}")
        super().validate(args, where)

    def build(self, args: XARArgs) -> XAR:
        return XAR(**self.constructor_args(args))

    def loss(self, model: XAR, batch, gen):
        latents, labels = self.batch(model, batch, model.num_classes)
        return flow_loss(model, latents, labels, gen)

    @torch.no_grad()
    def sample(self, model: XAR, n, gen, sampler: XARSampler, start: int = 0):
        labels = balanced_labels(start, n, model.num_classes, self.device_of(model))
        x = sample_xar(model, labels, gen, num_steps=sampler.num_steps, cfg=sampler.cfg)
        return {"x": x, "cls": labels}
