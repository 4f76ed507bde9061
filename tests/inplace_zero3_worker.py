"""Started by tests/test_inplace.py with 2 ranks: a ZeRO-3 engine holding theta_s merges its own
partitions in place for each w; the gathered parameters are saved by rank 0 for comparison.

usage: torchrun --nproc_per_node 2 tests/inplace_zero3_worker.py BASE SYNTH OUT_DIR fp32|bf16 W [W ...]
"""
import pathlib
import sys

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 5)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).sum() * self.scale.sum()


def main() -> None:
    import deepspeed
    from safetensors.torch import load_file

    from neon_scale import dist
    from neon_scale.io import save_state_dict
    from neon_scale.merge.inplace import Extrapolator, zero3_slots

    base_path, synth_path, out_dir, precision, *ws = sys.argv[1:]
    dist.init()
    model = TinyNet()
    model.load_state_dict(load_file(synth_path))
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "steps_per_print": 1 << 30,
              "bf16": {"enabled": precision == "bf16"}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    base = load_file(base_path)
    sizes = {id(p): p.ds_tensor.numel() for p in engine.module.parameters()}
    extrapolator = Extrapolator(zero3_slots(engine, engine.module, lambda name: base[name]))
    assert all(s.base.numel() == sizes[id(p)] for s, p in zip(extrapolator.slots, engine.module.parameters()))
    for w in map(float, ws):
        extrapolator.set_w(w)
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            gathered = {n: p.detach().clone() for n, p in params}
        masters = {n: deepspeed.utils.safe_get_full_fp32_param(p).clone() for n, p in params}
        if dist.is_main():
            save_state_dict(pathlib.Path(out_dir) / f"params-w{w:g}.safetensors", gathered)
            save_state_dict(pathlib.Path(out_dir) / f"masters-w{w:g}.safetensors", masters)
    dist.finish()


if __name__ == "__main__":
    main()
