"""DiT's network against the official layout (facebookresearch/DiT models.py): for all 12 variants,
the state-dict keys, shapes and dtypes the official constructor makes; DiT-XL/2's published
parameter count; the frozen pos_embed; guidance at scale 1."""
import numpy as np
import pytest
import torch

from neon_scale.models.dit import DiT, dit_config, sincos_pos_embed_2d

VARIANTS = [f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]


def official_layout(depth, hidden, patch, in_ch=4, classes=1000, input_size=32):
    """(key, shape) in the official module order, written from the official file's structure."""
    out_ch, tokens = 2 * in_ch, (input_size // patch) ** 2
    keys = [("pos_embed", (1, tokens, hidden)),
            ("x_embedder.proj.weight", (hidden, in_ch, patch, patch)), ("x_embedder.proj.bias", (hidden,)),
            ("t_embedder.mlp.0.weight", (hidden, 256)), ("t_embedder.mlp.0.bias", (hidden,)),
            ("t_embedder.mlp.2.weight", (hidden, hidden)), ("t_embedder.mlp.2.bias", (hidden,)),
            ("y_embedder.embedding_table.weight", (classes + 1, hidden))]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [(b + "attn.qkv.weight", (3 * hidden, hidden)), (b + "attn.qkv.bias", (3 * hidden,)),
                 (b + "attn.proj.weight", (hidden, hidden)), (b + "attn.proj.bias", (hidden,)),
                 (b + "mlp.fc1.weight", (4 * hidden, hidden)), (b + "mlp.fc1.bias", (4 * hidden,)),
                 (b + "mlp.fc2.weight", (hidden, 4 * hidden)), (b + "mlp.fc2.bias", (hidden,)),
                 (b + "adaLN_modulation.1.weight", (6 * hidden, hidden)), (b + "adaLN_modulation.1.bias", (6 * hidden,))]
    keys += [("final_layer.linear.weight", (patch * patch * out_ch, hidden)),
             ("final_layer.linear.bias", (patch * patch * out_ch,)),
             ("final_layer.adaLN_modulation.1.weight", (2 * hidden, hidden)),
             ("final_layer.adaLN_modulation.1.bias", (2 * hidden,))]
    return keys


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_layout_matches_official(variant):
    cfg = dit_config(variant)
    with torch.device("meta"):
        model = DiT(**cfg)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == official_layout(cfg["depth"], cfg["hidden_size"], cfg["patch_size"])
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert not model.pos_embed.requires_grad
    if variant == "XL/2":
        assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_pos_embed_is_the_2d_sincos_table():
    model = DiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=10)
    table = model.pos_embed[0].double().numpy()
    grid, d = 4, 16
    for row in range(grid):
        for col in range(grid):
            omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
            expect = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
            np.testing.assert_allclose(table[row * grid + col], expect, atol=1e-7)
    assert np.array_equal(sincos_pos_embed_2d(d, grid).astype(np.float32), model.pos_embed[0].numpy())


def test_cfg_scale_one_equals_the_conditional_forward():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10).eval()
    for p in model.parameters():  # the zero-initialised layers would make every output 0
        p.data.normal_(0, 0.1)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 100, 999])
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond = model(x, t, y)
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.0,
                                        guided_channels=4)
    torch.testing.assert_close(guided[:3, :4], cond[:, :4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided[:3, 4:], cond[:, 4:], rtol=1e-5, atol=1e-6)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown DiT variant 'XXL/2'"):
        dit_config("XXL/2")


def _reference_forward(sd, x, t, y, heads, patch):
    """DiT's forward written out from the paper/official formulas, in float64, from a state dict."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    ln = lambda h: (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)  # noqa: E731
    silu = lambda h: h * torch.sigmoid(h)  # noqa: E731
    n, _, hh, ww = x.shape
    tok = torch.nn.functional.conv2d(x.double(), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]
    # the official embedding computes the sinusoid in float32 (t up to 999: angle errors ~1e-4)
    freqs = torch.exp(-np.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    tf = torch.cat([torch.cos(t.float()[:, None] * freqs), torch.sin(t.float()[:, None] * freqs)], -1).double()
    c = lin(silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        mod = lin(silu(c), b + "adaLN_modulation.1").chunk(6, -1)
        a = ln(h) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(n, -1, 3, heads, a.shape[-1] // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]), -1) @ v
        h = h + mod[2][:, None] * lin(att.transpose(1, 2).reshape(a.shape), b + "attn.proj")
        m = ln(h) * (1 + mod[4][:, None]) + mod[3][:, None]
        g = lin(m, b + "mlp.fc1")
        g = 0.5 * g * (1 + torch.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
        h = h + mod[5][:, None] * lin(g, b + "mlp.fc2")
        i += 1
    shift, scale = lin(silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    gh, gw, co = hh // patch, ww // patch, out.shape[-1] // patch ** 2
    out = out.reshape(n, gh, gw, patch, patch, co)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, co, gh * patch, gw * patch)


def test_forward_matches_a_float64_reference():
    torch.manual_seed(1)
    model = DiT(input_size=16, patch_size=4, hidden_size=48, depth=3, num_heads=4, num_classes=10).eval()
    for name, p in model.named_parameters():
        if name != "pos_embed":
            p.data.normal_(0, 0.2)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([4, 10])
    ref = _reference_forward(model.state_dict(), x, t, y, heads=4, patch=4)
    with torch.no_grad():
        ours32 = model(x, t, y).double()
        ours64 = model.double()(x.double(), t, y)
    assert ours32.shape == ref.shape == (2, 8, 16, 16)
    rel = lambda a: ((a - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert rel(ours64) < 1e-12, rel(ours64)  # the same formula
    assert rel(ours32) < 1e-4, rel(ours32)  # float32 rounding (weights ~N(0, 0.2): a high-gain net)


def test_patch_embed_takes_fp32_input_into_bf16_weights():
    """A bf16 DeepSpeed engine casts the module, not the batch: the patch embedding casts its input
    (bench/scale.py's first bf16 training step failed here)."""
    from neon_scale.models.dit import PatchEmbed

    import copy

    embed = PatchEmbed(8, 2, 4, 8).to(torch.bfloat16)
    x = torch.randn(2, 4, 8, 8)
    want = copy.deepcopy(embed).float()(x.to(torch.bfloat16).float())  # same weights, fp32 arithmetic
    out = embed(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 8)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
