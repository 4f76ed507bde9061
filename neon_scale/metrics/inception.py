"""The FID InceptionV3 (torch-fidelity's `FeatureExtractorInceptionV3`) from a local weights file.

The network is assembled from torch-fidelity's own blocks under the same attribute names, so its
weights file (`weights-inception-2015-12-05-6726825d.pth`, the TF-ported FID network) loads key
for key (io.load_into: keys the network lacks are a warning, an error with --strict), and the numerics are those of the reference. Differences, all for speed:
- input is already resized and normalised (`metrics.preprocess`, the csrc op);
- every conv + batch-norm pair is folded into one conv (computed in float64, stored float32);
- activations run channels-last on CPU (oneDNN's fast path).
The file is read by `io.torch_load` (weights_only=True, allow-listed) or as safetensors: never a pickle.
Outputs: the 2048-d pool features (FID/KID/PR) and 1008 `logits_unbiased` (IS), float32.
"""
from __future__ import annotations

import contextlib
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    BasicConv2d,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE_1,
    InceptionE_2,
)

from .. import io
from ..errors import NeonError
from .backbone_base import load_weights

FEATURE_DIM = 2048
LOGITS_DIM = 1008


class InceptionV3(nn.Module):
    """Input: float32 [N, 3, 299, 299] in [-1, 1]. Output: (pool [N, 2048], logits_unbiased [N, 1008])."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.fc = nn.Linear(FEATURE_DIM, LOGITS_DIM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.MaxPool_1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.MaxPool_2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool.float(), (pool @ self.fc.weight.T).float()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each BasicConv2d's eval-mode batch norm into its conv (float64 arithmetic), in place."""
    for block in model.modules():
        if isinstance(block, BasicConv2d) and isinstance(block.bn, nn.BatchNorm2d):
            conv, bn = block.conv, block.bn
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              bias=True).to(conv.weight.device)
            fused.weight.data = (conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype)
            fused.bias.data = (bn.bias.double() - bn.running_mean.double() * scale).to(conv.weight.dtype)
            block.conv, block.bn = fused, nn.Identity()
    return model


def read_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise NeonError(f"{path}: Inception weights not found; download torch-fidelity's FID InceptionV3 "
                        f"({URL_INCEPTION_V3}) and pass its local path with --weights")
    if path.suffix == ".safetensors":
        return io.load_state_dict(path)
    state = io.torch_load(path, "Inception weights file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NeonError(f"{path}: expected a state dict of tensors (torch-fidelity's InceptionV3 weights)")
    return state


@contextlib.contextmanager
def no_tf32():
    """FID features are float32 with TF32 off, as the reference computes them."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def load_inception(path: str | pathlib.Path, device: torch.device | str = "cpu", fold: bool = True) -> InceptionV3:
    model = InceptionV3()
    load_weights(model, read_state_dict(path), f"{path} (torch-fidelity's InceptionV3 weights)", official=True)
    model = model.float().requires_grad_(False).eval()
    if fold:
        fold_batchnorm(model)
    return model.to(device)


def random_inception_weights(path: str | pathlib.Path, seed: int = 0, calib_batches: int = 4) -> None:
    """Random InceptionV3 weights with calibrated batch-norm statistics (tests and tiny configs only).

    Batch-norm running statistics are averaged over a few batches of random smooth images (low-res
    noise, upsampled) in train mode, so activations on image-like inputs are neither degenerate nor
    huge and features (hence FID/IS) vary with the input.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InceptionV3()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(calib_batches):
            for res in (4, 16, 64):
                low = torch.rand(4, 3, res, res, generator=g) * 2 - 1
                model(F.interpolate(low, size=(299, 299), mode="bilinear", align_corners=False))
        model.fc.weight.mul_(20.0)  # spread the logits, so the Inception Score is well above 1
    with io.atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
