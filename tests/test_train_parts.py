"""Trainer parts on their own: label dropout for CFG and the activation-checkpointing hook."""
import torch

from neon_scale.specs.registry import get_spec
from neon_scale.stages.train import drop_labels


def test_label_dropout_is_seeded_and_drops_the_asked_share():
    labels = torch.arange(20000) % 1000
    batch = {"cls": labels, "x": torch.zeros(20000, 2)}
    a = drop_labels(batch, 0.1, 1000, torch.Generator().manual_seed(3))
    b = drop_labels(batch, 0.1, 1000, torch.Generator().manual_seed(3))
    assert torch.equal(a["cls"], b["cls"]) and a["x"] is batch["x"]
    dropped = a["cls"] == 1000
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(a["cls"][~dropped], labels[~dropped])
    assert torch.equal(batch["cls"], labels)  # the input batch is left alone


def test_activation_checkpointing_gives_the_same_gradients():
    spec = get_spec("toy2d_diffusion")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = spec.build(spec.parse_args({"hidden": 16, "depth": 3}))
        if checkpointing:
            spec.enable_activation_checkpointing(model)
        loss = spec.loss(model, {"x": torch.randn(64, 2, generator=torch.Generator().manual_seed(1))},
                         torch.Generator().manual_seed(2))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_ema_exchange_swaps_in_place_a_chunk_at_a_time(monkeypatch):
    """PartitionEMA.swapped_in's exchange: exact both ways, whatever the chunking (chunks of 3 here
    over tensors of 10 and 3 elements: whole, partial and exact last chunks)."""
    from neon_scale.train import ema

    monkeypatch.setattr(ema, "SWAP_CHUNK", 3)
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(10, generator=gen), torch.randn(3, generator=gen)]
    b = [torch.randn(10, generator=gen), torch.randn(3, generator=gen)]
    a0, b0 = [t.clone() for t in a], [t.clone() for t in b]
    ptrs = [t.data_ptr() for t in a + b]
    ema._exchange(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a + b, b0 + a0))
    assert [t.data_ptr() for t in a + b] == ptrs  # in place: DeepSpeed's views of the masters stay valid
    ema._exchange(a, b)
    assert all(torch.equal(x, y) for x, y in zip(a + b, a0 + b0))
