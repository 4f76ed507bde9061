"""What the latent image models (DiT, xAR) share: class labels, the VAE, and images for FID.

Samples are {"x": latents [n, C, h, w] float32 already multiplied by the VAE's latent scale, as
the networks see them; "cls": int64 labels}. Labels are balanced per class, as the authors
generate their synthetic sets: sample i of a set (or of an eval run) gets class i mod num_classes.
`images()` decodes latents with the configured VAE to uint8 [n, 3, H, W], the FID module's input.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import NeonError
from ..models.layers import check_labels
from ..models.vae import build_vae
from .base import ModelSpec

RANDOM_VAE = "random"  # model.args.vae: a small randomly initialised VAE (tests, tiny configs)
NO_VAE = "none"        # model.args.vae: pixel space, the network sees the images in [-1, 1]


class LatentImageSpec(ModelSpec):
    makes_images = True
    vae_kind: ClassVar[str]  # "sd" (KL-f8, DiT) or "mar" (KL-16, xAR)

    def __init__(self):
        self._vaes: dict = {}

    # Model args filled from data.source (image_size and channels in pixel space only; num_classes always).
    DATA_ARGS: ClassVar[tuple[str, ...]] = ()

    def fit_data(self, raw: dict, shape: tuple[int, int, int], num_classes: int, where: str) -> dict:
        """model.args completed from the real data (channels, size, classes): a value the config
        gives must agree with the data."""
        c, h, w = shape
        if h != w:
            raise NeonError(f"{where}: data.source has {h}x{w} images; the image models need square images")
        found = {"channels": c, "image_size": h, "num_classes": num_classes}
        for key in self.DATA_ARGS:
            if raw.get("vae", "") != NO_VAE and key != "num_classes":
                continue  # latent models: the image size is the VAE's business
            if key in raw and raw[key] != found[key]:
                raise NeonError(f"{where}: 'model.args.{key}' = {raw[key]!r} but data.source has {found[key]} "
                                f"({key.replace('_', ' ')})")
            raw[key] = found[key]
        return raw

    def pixel_space(self, args) -> bool:
        return args.vae == NO_VAE

    def from_images(self, images: torch.Tensor, args) -> dict[str, torch.Tensor]:
        """Real uint8 images [n, C, H, W] -> the network's training input {"x"} (pixel space only)."""
        if not self.pixel_space(args):
            raise NeonError(f"model {self.name!r}: training from scratch on data.source needs pixel space "
                            f"(model.args.vae: {NO_VAE}); latent training data is not supported")
        return {"x": images.float() / 127.5 - 1.0}

    def validate(self, args, where: str) -> None:
        if args.vae == NO_VAE and "channels" not in self.DATA_ARGS:
            raise NeonError(f"{where}: 'model.args.vae' = {NO_VAE!r}: model {self.name!r} has no pixel-space form")

    def files(self, args) -> list[tuple[str, str, str]]:
        if args.vae in (NO_VAE, RANDOM_VAE):
            return []
        what = "Stable Diffusion VAE (sd-vae-ft-ema/-mse folder)" if self.vae_kind == "sd" else "MAR KL-16 VAE (kl16.ckpt)"
        return [("model.args.vae", args.vae or "", f"{what}; '{NO_VAE}' for pixel space, or '{RANDOM_VAE}' for a small "
                                                   f"random VAE")]

    def vae(self, args, device: torch.device):
        """The configured VAE on `device`, built once per (file, device)."""
        key = (args.vae, str(device))
        if key not in self._vaes:
            path = None if args.vae == RANDOM_VAE else args.vae
            self._vaes[key] = build_vae(self.vae_kind, path, device, tiny=path is None, seed=args.vae_seed)
        return self._vaes[key]

    def images(self, samples: dict[str, torch.Tensor], args) -> torch.Tensor:
        """uint8 [n, C, H, W]: decoded latents, or (pixel space) x in [-1, 1] rounded to 0..255."""
        x = samples["x"]
        if self.pixel_space(args):
            return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return self.vae(args, x.device).decode(x)

    def null_class(self, args) -> int:
        return args.num_classes

    def enable_activation_checkpointing(self, model: torch.nn.Module) -> None:
        model.checkpointing = True

    @staticmethod
    def device_of(model: torch.nn.Module) -> torch.device:
        return next(model.parameters()).device

    def batch(self, model, batch: dict[str, torch.Tensor], num_classes: int):
        """Latents and labels of a training batch on the model's device (labels checked: the null
        class is allowed, label dropout puts it there)."""
        dev = self.device_of(model)
        labels = batch["cls"].long()
        check_labels(labels, num_classes, allow_null=True, where="train batch")
        return batch["x"].to(dev, torch.float32), labels.to(dev)
