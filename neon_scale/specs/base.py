"""ModelSpec: the one interface between a model and the stages.

A spec knows how to build its network, compute its training loss on a batch, sample with a
sampler setting, map samples to metric features and (for toys) draw real data. It knows nothing
of DeepSpeed, shards or sweeps.
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

from ..errors import NeonError
from ..fields import from_dict


class ModelSpec(abc.ABC):
    name: ClassVar[str]
    Args: ClassVar[type]        # dataclass of constructor arguments (config: model.args)
    Sampler: ClassVar[type]     # dataclass of sampler settings (config: synth.samplers, eval.sampler)
    has_real_data: ClassVar[bool] = False

    # -- configuration
    def parse_args(self, raw: dict, where: str = "<config>", key: str = "model.args"):
        return from_dict(self.Args, raw or {}, where, prefix=key)

    def parse_sampler(self, raw: dict, where: str = "<config>", key: str = "sampler"):
        return from_dict(self.Sampler, raw or {}, where, prefix=key)

    def validate(self, args, where: str) -> None:
        """Cross-checks of parsed model args (one line, at config time)."""

    def files(self, args) -> list[tuple[str, str, str]]:
        """(config key, path, what it is) of each file the args name: config.validate reports every
        missing one at once."""
        return []

    def check_sampler(self, args, sampler, where: str, key: str) -> None:
        """Cross-checks of a parsed sampler setting against the parsed model args (config time)."""

    # -- the model
    @abc.abstractmethod
    def build(self, args) -> torch.nn.Module:
        raise NotImplementedError

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def null_class(self, args) -> int | None:
        """The label meaning "no class" (the unconditional input of CFG); None: not class-conditional."""
        return None

    def enable_activation_checkpointing(self, model: torch.nn.Module) -> None:
        """Make `model` recompute its activations in backward (train.activation_checkpointing)."""
        raise NeonError(f"model {self.name!r} has no activation-checkpointing hook (train.activation_checkpointing)")

    @abc.abstractmethod
    @torch.no_grad()
    def sample(self, model: torch.nn.Module, n: int, gen: torch.Generator, sampler,
               start: int = 0) -> dict[str, torch.Tensor]:
        """Draw n samples; returns named tensors with a leading batch dimension. `start` is the
        index of the first sample in its set (class-conditional models derive labels from it)."""
        raise NotImplementedError

    # -- data and metric
    def real_data(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NeonError(f"model {self.name!r} has no built-in real data: set base.weights")

    def features(self, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        """Metric features of samples, float64 [n, d] (models that are not image models)."""
        raise NotImplementedError

    def images(self, samples: dict[str, torch.Tensor], args) -> torch.Tensor:
        """Image models: samples as uint8 [n, 3, H, W]; their metric is FID with Inception features
        (eval.inception_weights) against eval.ref_stats."""
        raise NotImplementedError

    def reference_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of the real distribution in feature space, float64."""
        raise NotImplementedError

    metric_name: ClassVar[str] = "fid"
    makes_images: ClassVar[bool] = False  # True: `images()` + Inception FID instead of `features()`
