"""What the latent image models (DiT, xAR) share: class labels, the VAE, and images for FID.

Samples are {"x": latents [n, C, h, w] float32 already multiplied by the VAE's latent scale, as
the networks see them; "cls": int64 labels}. Labels are balanced per class, as the authors
generate their synthetic sets: sample i of a set (or of an eval run) gets class i mod num_classes.
`images()` decodes latents with the configured VAE to uint8 [n, 3, H, W], the FID module's input.
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch

from ..errors import NeonError
from .registry import ModelSpec

RANDOM_VAE = "random"  # model.args.vae: a small randomly initialised VAE (tests, tiny configs)


def balanced_labels(start: int, n: int, num_classes: int, device=None) -> torch.Tensor:
    return (torch.arange(start, start + n, device=device) % num_classes).long()


def check_labels(labels: torch.Tensor, num_classes: int, allow_null: bool, where: str) -> None:
    """One line naming the first label outside [0, num_classes) ([0, num_classes] with the null class)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise NeonError(f"{where}: class labels must be integers, got {labels.dtype}")
    top = num_classes + 1 if allow_null else num_classes
    bad = (labels < 0) | (labels >= top)
    if bool(bad.any()):
        first = int(labels[bad.nonzero()[0, 0]])
        allowed = f"[0, {num_classes}]" if allow_null else f"[0, {num_classes - 1}]"
        raise NeonError(f"{where}: class label {first} is out of range {allowed} (model.args.num_classes = "
                        f"{num_classes})")


class LatentImageSpec(ModelSpec):
    makes_images = True
    vae_kind: ClassVar[str]  # "sd" (KL-f8, DiT) or "mar" (KL-16, xAR)

    def __init__(self):
        self._vaes: dict = {}

    def validate(self, args, where: str) -> None:
        if args.vae != RANDOM_VAE and not os.path.exists(args.vae or ""):
            what = "Stable Diffusion VAE (sd-vae-ft-ema/-mse folder)" if self.vae_kind == "sd" else \
                "MAR KL-16 VAE (kl16.ckpt)"
            raise NeonError(f"{where}: 'model.args.vae' = {args.vae!r}: file not found ({what}; or "
                            f"'{RANDOM_VAE}' for a small random VAE)")

    def vae(self, args, device: torch.device):
        """The configured VAE on `device`, built once per (file, device)."""
        from .vae import build_vae

        key = (args.vae, str(device))
        if key not in self._vaes:
            path = None if args.vae == RANDOM_VAE else args.vae
            self._vaes[key] = build_vae(self.vae_kind, path, device, tiny=path is None, seed=args.vae_seed)
        return self._vaes[key]

    def images(self, samples: dict[str, torch.Tensor], args) -> torch.Tensor:
        latents = samples["x"]
        return self.vae(args, latents.device).decode(latents)

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
