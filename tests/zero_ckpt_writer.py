"""Writes small DeepSpeed ZeRO checkpoints for tests/test_zero_source.py.

Start with `python -m torch.distributed.run --standalone --nproc_per_node 2 zero_ckpt_writer.py OUT`.
Every (stage, precision) case trains a tiny model with odd-sized, tied and frozen parameters for
two steps in one process group and saves it to OUT/<case>/ (a `latest` file and a tag directory).
"""
from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch import nn  # noqa: E402

CASES = [(1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]


def case_name(stage: int, precision: str) -> str:
    return f"zero{stage}_{precision}"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 5)
        self.head = nn.Linear(5, 5, bias=False)
        self.tail = nn.Linear(5, 5, bias=False)
        self.tail.weight = self.head.weight  # tied: DeepSpeed records it in shared_params
        self.scale = nn.Parameter(torch.randn(3))
        self.frozen = nn.Parameter(torch.randn(4, 3), requires_grad=False)
        self.register_buffer("running", torch.linspace(-1.0, 1.0, 5))
        self.register_buffer("count", torch.tensor([3, 1, 4], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tail(self.head(self.b(torch.tanh(self.a(x))) + self.running.to(x.dtype)))
        return h.square().mean() + (self.scale * self.frozen.sum(0)).sum()


def write(out: pathlib.Path, stage: int, precision: str) -> None:
    import deepspeed

    torch.manual_seed(stage)
    model = Tiny()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("weight")]
    zero = {"stage": stage}
    if stage == 3:  # partition every parameter and split the fp32 partition into several sub-groups
        zero.update(stage3_param_persistence_threshold=0, sub_group_size=64)
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": zero, "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
    }
    params = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(100 + int(os.environ.get("RANK", 0)))
    for _ in range(2):
        loss = engine(torch.randn(2, 7, generator=gen).to(dtype))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out / case_name(stage, precision)))


def main() -> None:
    from neon_scale import dist

    dist.init()
    out = pathlib.Path(sys.argv[1])
    for stage, precision in CASES:
        write(out, stage, precision)
    dist.finish()


if __name__ == "__main__":
    main()
