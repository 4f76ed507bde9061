"""Started by tests/test_ema.py with 2 ranks: a ZeRO engine trains a few steps with the per-rank
EMA; a float64 EMA of the gathered master weights is kept beside it as the reference. Rank 0
saves the exported EMA, the reference, the untrained tensors as built (a partitioned frozen parameter
and a buffer) and the sizes each rank held; the checkpoint goes to CKPT.

usage: torchrun --nproc_per_node 2 tests/ema_worker.py OUT_DIR CKPT STAGE fp32|bf16
"""
import json
import pathlib
import sys

import torch


def main() -> None:
    from neon_scale import dist
    from neon_scale.config import TrainConfig
    from neon_scale.io import save_state_dict
    from neon_scale.specs.registry import get_spec
    from neon_scale.train import train_state as checkpoint
    from neon_scale.train.ema import PartitionEMA
    from neon_scale.train.deepspeed_engine import full_fp32_state_dict, initialize

    out_dir, ckpt, stage, dtype = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    decay = 0.8
    dist.init()
    spec = get_spec("toy2d_diffusion")
    torch.manual_seed(0)
    model = spec.build(spec.parse_args({"hidden": 24, "depth": 2}))
    # what the optimizer does not own: a frozen parameter large enough for ZeRO-3 to partition it
    # (above stage3_param_persistence_threshold, 1e5 elements: as DiT-XL/2's pos_embed) and a buffer,
    # neither of them representable in bf16
    model.frozen_big = torch.nn.Parameter(torch.randn(100_003, dtype=torch.float64).float(), requires_grad=False)
    model.register_buffer("calib", torch.randn(7))
    built = {k: model.state_dict()[k].clone() for k in ("frozen_big", "calib")}
    cfg = TrainConfig(global_batch=64, lr=1e-2, zero_stage=stage, dtype=dtype)
    engine = initialize(spec, model, cfg, dist.world())
    ema = PartitionEMA(engine, decay)
    reference = {k: v.double() for k, v in full_fp32_state_dict(engine).items()}
    for step in range(6):
        gen = torch.Generator().manual_seed(100 * step + dist.rank())
        loss = engine({"x": torch.randn(32, 2, generator=gen)}, gen)
        engine.backward(loss)
        engine.step()
        ema.update()
        reference = {k: decay * reference[k] + (1 - decay) * v.double() for k, v in full_fp32_state_dict(engine).items()}
    weights = full_fp32_state_dict(engine)
    with ema.swapped_in():
        exported = full_fp32_state_dict(engine)
    restored = full_fp32_state_dict(engine)
    checkpoint.save(engine, ckpt, 6, {}, ema)
    held = [int(dist.all_reduce_sum(torch.tensor([float(sum(s.numel() for s in ema.shadow))])).item())]
    if dist.is_main():
        save_state_dict(out_dir / "exported.safetensors", exported)
        save_state_dict(out_dir / "built.safetensors", built)
        save_state_dict(out_dir / "reference.safetensors", {k: v for k, v in reference.items()})
        total = sum(v.numel() for k, v in weights.items() if k not in built)  # what the EMA covers
        same = all(torch.equal(weights[k], restored[k]) for k in weights)
        (out_dir / "result.json").write_text(json.dumps({"held_by_both_ranks": held[0], "model_numel": total,
                                                         "weights_restored": same}))
    dist.finish()


if __name__ == "__main__":
    main()
