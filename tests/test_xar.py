"""xAR against the authors' code (SinaAlemohammad/Neon: xAR/models/xar.py, rope.py, sampler.py,
flow.py), which cannot be imported here (CUDA, flash-attn, timm). The expected layout, buffers,
forward, loss and sampler below are written from the official definitions and formulas, not
from our implementation: for B/L/H the state-dict keys/shapes/dtypes and the published parameter
counts; the -inf mask and the RoPE tables; the forward, the flow loss and the whole sampler
against float64 references; the KV cache against recomputation; any num_steps >= 1."""
import math

import pytest
import torch

from neon_scale.errors import NeonError
from neon_scale.models import xar as xar_mod
from neon_scale.models.xar import XAR, flow_loss, flow_loss_at, xar_config
from neon_scale.models.xar_sampler import _generate, sample_xar


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster and immune to a loaded machine's oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# size -> (width, encoder depth = decoder depth, heads, parameters without buffers (published))
OFFICIAL = {"B": (768, 8, 12, 172_638_224), "L": (1024, 16, 16, 608_397_968), "H": (1280, 20, 16, 1_186_024_096)}
# the gated MLP's hidden width int(dim * 4 * 2 / 3.), worked out by hand
MLP_HIDDEN = {768: 2048, 1024: 2730, 1280: 3413}


def official_layout(dim, depth, heads, tokens=256):
    """(key, shape, is_buffer) in the official state-dict order: the module's own parameters,
    its buffer, then the children in the order xAR.__init__ registers them (Block: norm1 (no
    weight), attn (qkv, proj, rope buffers freqs/freqs_cos/freqs_sin), norm2, timm SwiGLU
    (fc1_g, fc1_x, fc2), ada_lin = Sequential(SiLU, Linear))."""
    head, hidden = dim // heads, MLP_HIDDEN[dim]
    keys = [("encoder_pos_embed_learned", (1, tokens, dim), False),
            ("decoder_pos_embed_learned", (1, tokens, dim), False),
            ("mask", (1, 1, tokens, tokens), True),
            ("class_emb.weight", (1001, dim), False),
            ("time_embed.mlp.0.weight", (dim, 256), False), ("time_embed.mlp.0.bias", (dim,), False),
            ("time_embed.mlp.2.weight", (dim, dim), False), ("time_embed.mlp.2.bias", (dim,), False),
            ("z_proj.weight", (dim, 16), False), ("z_proj.bias", (dim,), False),
            ("z_proj_ln.weight", (dim,), False)]

    def blocks(name):
        out = []
        for i in range(depth):
            b = f"{name}.{i}."
            out += [(b + "attn.qkv.weight", (3 * dim, dim), False), (b + "attn.qkv.bias", (3 * dim,), False),
                    (b + "attn.proj.weight", (dim, dim), False), (b + "attn.proj.bias", (dim,), False),
                    (b + "attn.rope.freqs", (head // 4,), True), (b + "attn.rope.freqs_cos", (tokens, head), True),
                    (b + "attn.rope.freqs_sin", (tokens, head), True),
                    (b + "mlp.fc1_g.weight", (hidden, dim), False), (b + "mlp.fc1_g.bias", (hidden,), False),
                    (b + "mlp.fc1_x.weight", (hidden, dim), False), (b + "mlp.fc1_x.bias", (hidden,), False),
                    (b + "mlp.fc2.weight", (dim, hidden), False), (b + "mlp.fc2.bias", (dim,), False),
                    (b + "ada_lin.1.weight", (6 * dim, dim), False), (b + "ada_lin.1.bias", (6 * dim,), False)]
        return out

    keys += blocks("encoder_blocks") + [("encoder_norm.weight", (dim,), False),
                                        ("decoder_embed.weight", (dim, dim), False),
                                        ("decoder_embed.bias", (dim,), False)]
    keys += blocks("decoder_blocks") + [("decoder_norm.weight", (dim,), False), ("pred.weight", (16, dim), False),
                                        ("pred.bias", (16,), False)]
    return keys


@pytest.mark.parametrize("size", ["B", "L", "H"])
def test_state_dict_layout_matches_official(size):
    dim, depth, heads, n_params = OFFICIAL[size]
    with torch.device("meta"):
        model = XAR(**xar_config(size))
    expected = official_layout(dim, depth, heads)
    assert sum(math.prod(s) for _, s, buf in expected if not buf) == n_params  # the table itself
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, s) for k, s, _ in expected]
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert {k for k, _ in model.named_buffers()} == {k for k, _, buf in expected if buf}  # all persistent
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert all(p.requires_grad for p in model.parameters())


def test_xar_config_is_the_official_constructor_call():
    cfg = xar_config("L")
    assert cfg == {"img_size": 256, "vae_stride": 16, "patch_size": 1, "encoder_embed_dim": 1024, "encoder_depth": 16,
                   "encoder_num_heads": 16, "decoder_embed_dim": 1024, "decoder_depth": 16, "decoder_num_heads": 16,
                   "mlp_ratio": 4, "vae_embed_dim": 16, "label_drop_prob": 0.1, "class_num": 1000,
                   "attn_dropout": 0.1, "proj_dropout": 0.1, "clusters": 4}
    with pytest.raises(ValueError, match="unknown xAR size 'XL'"):
        xar_config("XL")


def token_position(n, side=16, cell_side=8):
    """(row, col) of token n: cells in raster order, raster order inside a cell."""
    cell, j = divmod(n, cell_side * cell_side)
    cr, cc = divmod(cell, side // cell_side)
    return cr * cell_side + j // cell_side, cc * cell_side + j % cell_side


@pytest.mark.parametrize("width,heads", [(128, 2), (160, 2)])  # head dims 64 (B, L) and 80 (H)
def test_mask_and_rope_buffers_follow_the_official_formulas(width, heads):
    model = XAR(encoder_embed_dim=width, encoder_depth=1, encoder_num_heads=heads, decoder_embed_dim=width,
                decoder_depth=1, decoder_num_heads=heads)
    # mask: row block i (64 tokens) sees the columns of blocks 0..i
    i, j = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    expect = torch.where(j < (i // 64 + 1) * 64, 0.0, float("-inf"))
    assert torch.equal(model.mask, expect[None, None])
    # RoPE (EVA-02's VisionRotaryEmbeddingFast, dim = head_dim / 2, pt_seq_len 16, cell-major rows)
    head = width // heads
    half = head // 2
    pos = torch.tensor([token_position(n) for n in range(256)], dtype=torch.float64)  # [256, 2]
    m = torch.arange(head)
    axis = (m >= half).long()
    freq = 10000.0 ** (-2.0 * ((m % half) // 2).double() / half)
    angle = pos[:, axis] * freq
    for blk in [*model.encoder_blocks, *model.decoder_blocks]:
        rope = blk.attn.rope
        torch.testing.assert_close(rope.freqs.double(), 10000.0 ** (-torch.arange(0, half, 2).double() / half),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(rope.freqs_cos.double(), angle.cos(), rtol=0, atol=5e-6)
        torch.testing.assert_close(rope.freqs_sin.double(), angle.sin(), rtol=0, atol=5e-6)


# ----------------------------------------------------------------------------- a tiny model

TINY = dict(img_size=64, vae_stride=16, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, class_num=10, label_drop_prob=0.0)


def tiny_model(seed=0, **over):
    """4x4 tokens in four 2x2 cells; weights perturbed so that every term matters."""
    torch.manual_seed(seed)
    model = XAR(**{**TINY, **over})
    for name, p in model.named_parameters():
        base = 1.0 if name.endswith("norm.weight") or name.endswith("ln.weight") else 0.0
        p.data.normal_(base, 0.2)
    return model


def reference_forward(sd, tokens, labels, t, enc_heads=2, dec_heads=4):
    """xAR's forward from the official formulas in float64, for tokens of cells 0..n-1 (all
    attention block-causal over cells). tokens [B, n*T, C], t [B, n] per-cell flow time."""
    sd = {k: v.double() for k, v in sd.items()}
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    rms = lambda h: h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    silu = lambda h: h * torch.sigmoid(h)  # noqa: E731
    gelu = lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # noqa: E731
    rot = lambda z: torch.stack([-z[..., 1::2], z[..., 0::2]], -1).flatten(-2)  # noqa: E731
    b, n_tok, _ = tokens.shape
    per = n_tok // t.shape[1]
    steps = (t.float() * 1000).long()  # the official integer timestep (float32 arithmetic)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)  # float32, as official
    ang = steps.float()[..., None] * freqs
    tf = torch.cat([torch.cos(ang), torch.sin(ang)], -1).double()
    c = lin(silu(lin(tf, "time_embed.mlp.0")), "time_embed.mlp.2") + sd["class_emb.weight"][labels][:, None]
    cell = torch.arange(n_tok) // per
    bias = torch.zeros(n_tok, n_tok, dtype=torch.float64).masked_fill(cell[None, :] > cell[:, None], float("-inf"))

    def blocks(h, name, heads):
        i = 0
        while f"{name}.{i}.ada_lin.1.weight" in sd:
            p = f"{name}.{i}."
            g1, g2, s1, s2, b1, b2 = [m.repeat_interleave(per, 1) for m in lin(silu(c), p + "ada_lin.1").chunk(6, -1)]
            a = rms(h) * (1 + s1) + b1
            q, k, v = lin(a, p + "attn.qkv").reshape(b, n_tok, 3, heads, -1).permute(2, 0, 3, 1, 4)
            cos, sin = sd[p + "attn.rope.freqs_cos"][:n_tok], sd[p + "attn.rope.freqs_sin"][:n_tok]
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, -1) @ v
            h = h + g1 * lin(att.transpose(1, 2).reshape(b, n_tok, -1), p + "attn.proj")
            m = rms(h) * (1 + s2) + b2
            h = h + g2 * lin(gelu(lin(m, p + "mlp.fc1_g")) * lin(m, p + "mlp.fc1_x"), p + "mlp.fc2")
            i += 1
        return h

    h = lin(tokens.double(), "z_proj") + sd["encoder_pos_embed_learned"][:, :n_tok]
    h = blocks(rms(h) * sd["z_proj_ln.weight"], "encoder_blocks", enc_heads)
    h = lin(rms(h) * sd["encoder_norm.weight"], "decoder_embed") + sd["decoder_pos_embed_learned"][:, :n_tok]
    h = blocks(h, "decoder_blocks", dec_heads)
    return lin(rms(h) * sd["decoder_norm.weight"], "pred")


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def test_forward_matches_a_float64_reference():
    model = tiny_model().eval()
    x, y = torch.randn(3, 16, 16), torch.tensor([0, 7, 10])  # 10: the null class
    t = torch.tensor([[0.9, 0.3, 0.5555, 0.0], [0.12345, 0.9999, 0.5, 0.25], [0.7071, 0.7, 0.04, 1.0]])
    ref = reference_forward(model.state_dict(), x, y, t)
    with torch.no_grad():
        ours32 = model(x, y, t)
        ours64 = model.double()(x.double(), y, t)
    assert ours64.shape == ref.shape == (3, 16, 16)
    assert rel(ours64, ref) < 1e-12, rel(ours64, ref)
    assert rel(ours32, ref) < 1e-4, rel(ours32, ref)


def test_kv_cache_forward_equals_the_full_forward():
    model = tiny_model(1).double().eval()
    x, y, t = torch.randn(4, 16, 16, dtype=torch.float64), torch.tensor([1, 2, 3, 10]), torch.rand(4, 4)
    with torch.no_grad():
        full = model(x, y, t)
        cache = model.new_cache()
        a = model(x[:, :4], y, t[:, :1], cache=cache, keep_cells=1)
        b = model(x[:, 4:12], y, t[:, 1:3], start_cell=1, cache=cache, keep_cells=2)
        c = model(x[:2, 12:], y[:2], t[:2, 3:], start_cell=3, cache=cache)  # fewer rows read the first ones
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, :12], rtol=0, atol=1e-12)
    torch.testing.assert_close(c, full[:2, 12:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs a cache"):
        model(x[:, 4:8], y, t[:, :1], start_cell=1)


def clusterify_by_hand(latents, side=4, cell_side=2):
    """[B, C, side, side] -> [B, L, C] tokens in the official cell-major order."""
    return torch.stack([latents[:, :, r, c] for r, c in (token_position(n, side, cell_side)
                                                           for n in range(side * side))], dim=1)


def test_flow_loss_matches_a_float64_hand_computation():
    model = tiny_model(2).double()
    lat, y = torch.randn(3, 16, 4, 4, dtype=torch.float64), torch.tensor([4, 0, 9])
    t = torch.tensor([[0.2, 0.5, 0.9876, 0.05], [0.6, 0.6321, 0.1, 0.3], [0.99, 0.0123, 0.4, 0.7]]).float()
    noise = torch.randn(3, 16, 16, dtype=torch.float64)
    x = clusterify_by_hand(lat)
    tt = t.double().repeat_interleave(4, 1)[..., None]
    xt = (1 - tt) * x + tt * noise
    ref = ((reference_forward(model.state_dict(), xt, y, t) - (noise - x)) ** 2).mean()
    ours = flow_loss_at(model, lat, y, t, noise)
    assert abs(ours.item() - ref.item()) < 1e-12 * ref.item()
    assert torch.equal(model.unclusterify(model.clusterify(lat)), lat)


def test_flow_loss_draws_from_the_generator_and_drops_labels():
    model = tiny_model(3, label_drop_prob=0.5).double()
    lat, y = torch.randn(8, 16, 4, 4, dtype=torch.float64), torch.arange(8)
    gen = torch.Generator().manual_seed(11)
    drop = torch.rand(8, generator=gen) < 0.5
    t = torch.sigmoid(torch.randn(8, 4, generator=gen, dtype=torch.float64)).float()
    noise = torch.randn(8, 16, 16, generator=gen)
    expect = flow_loss_at(model, lat, torch.where(drop, 10, y), t, noise)
    assert 0 < drop.sum() < 8
    loss = flow_loss(model, lat, y, torch.Generator().manual_seed(11))
    assert loss.item() == expect.item()
    assert flow_loss(model, lat, y, torch.Generator().manual_seed(12)).item() != expect.item()
    with pytest.raises(NeonError, match=r"class label 11 is out of range \[0, 10\]"):  # 10: the null class
        flow_loss(model, lat, torch.full((8,), 11), gen)


def test_flow_loss_gradients_and_activation_checkpointing(monkeypatch):
    model = tiny_model(4).train()
    lat, y = torch.randn(2, 16, 4, 4), torch.tensor([3, 5])
    loss = flow_loss(model, lat, y, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for g in grads.values())  # every parameter is trained
    calls = []
    real = xar_mod.checkpoint
    monkeypatch.setattr(xar_mod, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    model.zero_grad()
    model.checkpointing = True
    flow_loss(model, lat, y, torch.Generator().manual_seed(0)).backward()
    assert len(calls) == 4 and all(k == {"use_reentrant": False} for k in calls)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        flow_loss(model, lat, y, torch.Generator().manual_seed(0))
    assert len(calls) == 4  # no checkpointing without grad


# ----------------------------------------------------------------------------- the sampler

def reference_sampler(model, labels, gen, num_steps, cfg):
    """The official sample_tokens + euler_maruyama_sampler in float64 without a cache: every
    evaluation recomputes the previous (clean, t = 0) cells with reference_forward. The noise is
    drawn in sample_xar's documented order."""
    sd, b, null = model.state_dict(), labels.shape[0], torch.full_like(labels, 10)
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    done = []
    for k in range(4):
        scale = (cfg - 1) * k / 3.0 + 1
        x = torch.randn(b, 4, 16, generator=gen).double()
        for i in range(num_steps):
            t_cur, t_next = t_steps[i], t_steps[i + 1]
            dt = t_next - t_cur
            eps = torch.randn(b, 4, 16, generator=gen, dtype=torch.float64) if i < num_steps - 1 else None
            tokens = torch.cat(done + [x], 1)
            tc = torch.tensor([[0.0] * k + [t_cur]] * b, dtype=torch.float64)

            def drift(y):
                v = reference_forward(sd, tokens, y, tc)[:, -4:]
                alpha_ratio = (1 - t_cur) / -1.0
                score = (alpha_ratio * v - x) / (t_cur ** 2 - alpha_ratio * t_cur)
                return v - 0.5 * (2 * t_cur) * score

            d = drift(labels)
            if scale > 1:
                d_u = drift(null)
                d = d_u + scale * (d - d_u)
            x = x + dt * d if eps is None else x + d * dt + math.sqrt(2 * t_cur) * (eps * math.sqrt(abs(dt)))
        done.append(x)
    tokens = torch.cat(done, 1)  # unclusterify by hand
    out = torch.zeros(b, 16, 4, 4, dtype=torch.float64)
    for n in range(16):
        r, c = token_position(n, 4, 2)
        out[:, :, r, c] = tokens[:, n]
    return out


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_sampler_matches_the_official_algorithm_in_float64(num_steps):
    model = tiny_model(5).double()
    labels = torch.tensor([0, 3, 9])
    ref = reference_sampler(model, labels, torch.Generator().manual_seed(7), num_steps, cfg=2.5)
    ours = _generate(model, labels, torch.Generator().manual_seed(7), num_steps=num_steps, cfg=2.5)
    assert ours.shape == (3, 16, 4, 4) and ours.dtype == torch.float64
    assert rel(ours, ref) < 1e-10, rel(ours, ref)


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_kv_cache_and_batches_do_not_change_samples(num_steps):
    model = tiny_model(6).double()
    labels = torch.tensor([1, 2, 8, 8])
    run = lambda **kw: _generate(model, labels, torch.Generator().manual_seed(3), num_steps=num_steps, **kw)  # noqa: E731
    cached = run(cfg=3.0)
    assert rel(run(cfg=3.0, use_cache=False), cached) < 1e-12
    assert rel(run(cfg=3.0, official_batches=True), cached) < 1e-12
    # cfg = 1: the official [cond; uncond] batches give the unguided (cond-only) sampler
    assert rel(run(cfg=1.0, official_batches=True), run(cfg=1.0)) < 1e-12
    assert rel(run(cfg=1.0, official_batches=True, use_cache=False), run(cfg=1.0)) < 1e-12


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_sampler_float32_any_num_steps_and_deterministic(num_steps):
    model = tiny_model(7, attn_dropout=0.5, proj_dropout=0.5).train()
    labels = torch.tensor([0, 5, 9])
    a = sample_xar(model, labels, torch.Generator().manual_seed(1), num_steps=num_steps, cfg=2.0)
    b = sample_xar(model, labels, torch.Generator().manual_seed(1), num_steps=num_steps, cfg=2.0)
    c = sample_xar(model, labels, torch.Generator().manual_seed(2), num_steps=num_steps, cfg=2.0)
    assert a.shape == (3, 16, 4, 4) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # restored; sampling itself ran in eval mode (dropout off)
    nocache = sample_xar(model, labels, torch.Generator().manual_seed(1), num_steps=num_steps, cfg=2.0, use_cache=False)
    torch.testing.assert_close(nocache, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [-1, 10, 1000])
def test_sampler_rejects_out_of_range_labels(bad):
    model = tiny_model(8)
    with pytest.raises(NeonError, match=f"class label {bad} is out of range \\[0, 9\\]") as err:
        sample_xar(model, torch.tensor([1, bad]), torch.Generator(), num_steps=2, cfg=1.5)
    assert "\n" not in str(err.value)
    with pytest.raises(NeonError, match="num_steps must be an integer >= 1"):
        sample_xar(model, torch.tensor([1]), torch.Generator(), num_steps=0, cfg=1.5)


def test_rope_keeps_the_dtype_of_its_input():
    """fp32 tables, 16-bit q and k: q, k and v reach attention in one dtype (bf16 training)."""
    rope = xar_mod.RoPE(8, 4, 2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 2, 16, 8, dtype=dtype)
        assert rope(x, 0).dtype == dtype
    x = torch.randn(1, 2, 16, 8)
    torch.testing.assert_close(rope(x.to(torch.bfloat16), 0).float(), rope(x.to(torch.bfloat16).float(), 0),
                               rtol=1e-2, atol=1e-2)
