"""k-SAE: sparse kernels equal the dense reference, sparsify layout, resume, NaN handling, AuxK, data streaming."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import revelio_nb.sae.kernels as kernels
import revelio_nb.sae.step as step_mod
from revelio_nb.sae import (
    ArraySource,
    SaeConfig,
    SaeError,
    SaeTrainingError,
    SaeTrainStep,
    SparseAutoencoder,
    TrainConfig,
    batch_tokens,
    dense_decode,
    evaluate_sae,
    geometric_median,
    permute,
    plot_firing_histogram,
    save_eval,
    sparse_decode,
    train_sae,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


def _sparse_data(n: int, d: int = 16, n_atoms: int = 48, active: int = 3, seed: int = 0) -> np.ndarray:
    """Non-negative sparse combinations of random unit atoms plus an offset (a toy 'feature' distribution)."""
    atoms = np.random.default_rng(1000 + d).normal(size=(n_atoms, d))  # one dictionary for all seeds
    rng = np.random.default_rng(seed)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :active]
    coef = rng.exponential(1.0, size=(n, active))
    return (np.einsum("ns,nsd->nd", coef, atoms[idx]) + 2.0).astype(np.float32)


def _memmap(tmp_path, array: np.ndarray, name: str = "feats.f32") -> np.memmap:
    mm = np.memmap(tmp_path / name, dtype=np.float32, mode="w+", shape=array.shape)
    mm[:] = array
    mm.flush()
    return np.memmap(tmp_path / name, dtype=np.float32, mode="r", shape=array.shape)


def _small_cfg(**kw) -> TrainConfig:
    base = dict(sae=SaeConfig(expansion_factor=4, k=4), batch_size=128, steps=12, warmup_steps=2,
                checkpoint_every=5, lr=1e-3, init_tokens=256, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("m,k", [(4096, 4), (4096, 16), (100, 7)])
def test_two_stage_topk_equals_topk(m, k):
    torch.manual_seed(0)
    pre = torch.randn(37, m)
    pre[:, ::5] = pre[:, ::5].round()  # ties
    vals, idx = torch.empty(37, k), torch.empty(37, k, dtype=torch.long)
    kernels._topk(pre, k, out=(vals, idx))
    ref = pre.topk(k, dim=1).values
    assert torch.equal(vals.sort(1, descending=True).values, ref)
    assert torch.equal(pre.gather(1, idx), vals)
    assert all(len(set(row.tolist())) == k for row in idx)


@pytest.mark.parametrize("workspace", [False, True])
def test_encode_select_chunks_equal_topk_and_aux_among_dead(workspace, monkeypatch):
    """Row chunks (several, last one short) and the training step's reused buffers give the exact top-k, and the
    AuxK top-k only among dead latents, also when the number of dead latents changes between calls."""
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMS", 5 * 300)
    monkeypatch.setattr(kernels, "TRAIN_CHUNK_ELEMS", 7 * 300)
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 12), torch.randn(300, 12), torch.randn(300)
    pre = torch.addmm(b, x, w.t())
    ws = kernels._Workspace(torch.device("cpu")) if workspace else None
    for n_dead, k_aux in ((40, 6), (90, 6), (20, 3)):
        dead = torch.randperm(300)[:n_dead].sort().values
        acts, idx, aux_acts, aux_idx = kernels._encode_select(x, w, b, 5, dead, k_aux, workspace=ws)
        ref = pre.topk(5, dim=1).values.clamp_min(0)
        torch.testing.assert_close(acts.sort(1, descending=True).values, ref)  # GEMM blocking: last-bit noise
        torch.testing.assert_close(pre.gather(1, idx).clamp_min(0), acts)
        ref_aux = pre[:, dead].topk(k_aux, dim=1).values.clamp_min(0)
        torch.testing.assert_close(aux_acts.sort(1, descending=True).values, ref_aux)
        assert torch.isin(aux_idx, dead).all()
        torch.testing.assert_close(pre.gather(1, aux_idx).clamp_min(0), aux_acts)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_decode_equals_dense(device):
    torch.manual_seed(0)
    b, m, d, k = 33, 200, 24, 5
    w = torch.randn(m, d, device=device, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(b, k, device=device, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(m, device=device)[:k] for _ in range(b)])
    gy = torch.randn(b, d, device=device, dtype=torch.float64)
    y = sparse_decode(acts, idx, w)
    ga, gw = torch.autograd.grad(y, (acts, w), gy)
    y_ref = dense_decode(acts, idx, w)
    ga_ref, gw_ref = torch.autograd.grad(y_ref, (acts, w), gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ga, ga_ref)
    torch.testing.assert_close(gw, gw_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_backward_equals_dense_autograd(device, dtype, monkeypatch):
    """All gradients (W_enc, b_enc, W_dec, b_dec, x) of FVU + AuxK equal dense autograd; chunked CPU path included."""
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMS", 3 * 4096)  # several encoder chunks of 3 rows
    torch.manual_seed(0)
    model = SparseAutoencoder(SaeConfig(d_in=32, num_latents=4096, k=8), device=device, dtype=dtype)
    with torch.no_grad():
        model.encoder.bias.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
    dead = torch.zeros(4096, dtype=torch.bool, device=device)
    dead[torch.randperm(4096)[:300].to(device)] = True
    x0 = torch.randn(20, 32, device=device, dtype=dtype)
    grads = {}
    for dense in (False, True):
        model.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        out = model(x, dead_mask=dead, dense=dense)
        (out.fvu + 0.5 * out.auxk_loss).backward()
        grads[dense] = {n: p.grad.clone() for n, p in model.named_parameters()} | {"x": x.grad.clone()}
        grads[dense]["loss"] = torch.stack([out.fvu, out.auxk_loss]).detach()
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
    assert grads[False]["loss"][1] > 0  # the AuxK path ran
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec", "x", "loss"):
        torch.testing.assert_close(grads[False][name], grads[True][name], **tol, msg=name)


def test_encode_matches_dense_topk_and_no_grad_path():
    torch.manual_seed(1)
    model = SparseAutoencoder(SaeConfig(d_in=16, num_latents=2048, k=6))
    x = torch.randn(9, 16)
    pre = torch.relu((x - model.b_dec) @ model.encoder.weight.T + model.encoder.bias)
    with torch.no_grad():
        acts, idx = model.encode(x)
    acts_g, idx_g = model.encode(x)
    assert torch.equal(acts.sort(1).values, pre.topk(6).values.sort(1).values)
    torch.testing.assert_close(pre.gather(1, idx), acts)
    assert torch.equal(idx, idx_g) and torch.equal(acts, acts_g.detach())


def test_decoder_rows_unit_norm_and_parallel_gradient_removed():
    torch.manual_seed(0)
    model = SparseAutoencoder(SaeConfig(d_in=12, num_latents=64, k=4))
    x = torch.randn(50, 12) * 3
    out = model(x)
    out.fvu.backward()
    g = model.W_dec.grad.clone()
    assert (g * model.W_dec).sum(1).abs().max() > 1e-4  # there is something to remove
    model.remove_gradient_parallel_to_decoder_directions()
    torch.testing.assert_close((model.W_dec.grad * model.W_dec).sum(1), torch.zeros(64), atol=1e-6, rtol=0)
    # only the parallel part was removed
    par = (g * model.W_dec).sum(1, keepdim=True) * model.W_dec
    torch.testing.assert_close(model.W_dec.grad, g - par, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csr_matmul_overwrites_its_buffer_and_pair_dots(dtype):
    """The gradient kernels write every row of a reused buffer (empty rows as zeros, NaN garbage ignored) and the
    pair dot products equal a gather + sum."""
    torch.manual_seed(0)
    dense = torch.randn(6, 5, dtype=dtype)
    crow, col, vals = torch.tensor([0, 2, 2, 5, 5]), torch.tensor([0, 4, 1, 1, 5]), torch.tensor([1.0, 2, 3, 4, 5])
    out = torch.full((4, 5), float("nan"), dtype=dtype)
    kernels._csr_matmul(crow, col, vals, dense, out=out)
    ref = torch.zeros(4, 5, dtype=dtype)
    ref[0] = dense[0] + 2 * dense[4]
    ref[2] = 3 * dense[1] + 4 * dense[1] + 5 * dense[5]
    torch.testing.assert_close(out, ref)
    table = torch.randn(9, 5, dtype=dtype)
    rows, vec_rows = torch.tensor([3, 3, 0, 8]), torch.tensor([5, 0, 0, 2])
    torch.testing.assert_close(kernels._pair_dots(table, rows, dense, vec_rows), (table[rows] * dense[vec_rows]).sum(1))


def _reference_steps(model, xs, deads, lr, auxk_alpha, normalize):
    """The textbook step on a copy: dense autograd, projection, torch.optim.Adam, renormalisation."""
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=lr, eps=1e-8)
    for x, dead in zip(xs, deads):
        out = ref(x, dead_mask=dead, dense=True)
        opt.zero_grad(set_to_none=True)
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        if normalize:
            ref.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        if normalize:
            ref.set_decoder_norm_to_unit_norm()
    return ref, opt


@pytest.mark.parametrize("normalize,fused", [(True, True), (True, False), (False, True)])
def test_train_step_equals_dense_autograd_adam_reference(normalize, fused, monkeypatch):
    """SaeTrainStep's hand-written sparse gradients, blockwise projection, Adam and renormalisation give the
    parameters and Adam state of dense autograd + torch.optim.Adam, over several steps, with AuxK on some of them,
    latents never selected (empty CSR rows) and a non-unit input scale."""
    monkeypatch.setattr(step_mod, "_FUSED_ADAM", fused)
    torch.manual_seed(0)
    dt = torch.float64
    model = SparseAutoencoder(SaeConfig(d_in=24, num_latents=300, k=5, normalize_decoder=normalize), dtype=dt)
    with torch.no_grad():
        model.encoder.bias.normal_(-1.6, 0.1)  # some selected pre-activations are negative: the ReLU gradient
        model.encoder.bias[:60] = -1e3  # latents 0-59 are never selected
        model.b_dec.normal_(0, 0.1)
    model.input_scale = 2.0
    dead = torch.zeros(300, dtype=torch.bool)
    dead[torch.randperm(240)[:70] + 60] = True
    xs = [torch.randn(40, 24, dtype=dt) * 3 for _ in range(5)]
    deads = [dead if i % 2 == 0 else None for i in range(5)]
    ref, ref_opt = _reference_steps(model, xs, deads, lr=1e-2, auxk_alpha=0.5, normalize=normalize)
    step = SaeTrainStep(model, lr=1e-2, eps=1e-8, auxk_alpha=0.5, dead_after=10**9)
    auxk, zero_acts = [], []
    for x, d in zip(xs, deads):
        out = step.forward(x, dead_mask=d)
        auxk.append(float(out.auxk_loss))
        zero_acts.append(float((out.top_acts == 0).double().mean()))
        step.update()
    assert auxk[0] > 0 and auxk[1] == 0
    assert 0 < min(zero_acts) and max(zero_acts) < 0.5
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.equal(model.encoder.bias[60:], torch.zeros(240, dtype=dt))
    ours, theirs = step.optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for i in ours:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[i][key].to(theirs[i][key]), theirs[i][key], rtol=1e-9, atol=1e-15)
    if normalize:
        norms = model.W_dec.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-12)


def test_train_step_bookkeeping_and_errors():
    torch.manual_seed(0)
    model = SparseAutoencoder(SaeConfig(d_in=8, num_latents=64, k=3))
    step = SaeTrainStep(model, lr=1e-3, dead_after=100)
    with pytest.raises(SaeError, match="forward"):
        step.update()
    step.since_fired += 1000  # every latent dead: the AuxK path runs
    out = step(torch.randn(30, 8))
    assert out.num_dead == 64 and out.auxk_loss > 0
    fired = torch.zeros(64, dtype=torch.bool)
    fired[out.top_idx[out.top_acts > 0]] = True
    assert fired.any()
    assert torch.equal(step.since_fired, torch.where(fired, 0, 1030))


def test_training_keeps_unit_decoder_rows_and_learns(tmp_path):
    x = _sparse_data(2048)
    model = train_sae(x, _small_cfg(steps=100, lr=4e-3, checkpoint_every=1000), tmp_path / "run", progress=False)
    norms = model.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert model.W_dec.shape == (64, 16)
    ev = evaluate_sae(model, _sparse_data(512, seed=1))
    init = SparseAutoencoder(model.cfg)
    init.b_dec.data.copy_(geometric_median(torch.from_numpy(x)))
    assert ev["fvu"] < 0.5 * evaluate_sae(init, _sparse_data(512, seed=1))["fvu"]


# ------------------------------------------------------------------------------------- save / load
def test_save_load_roundtrip_sparsify_layout(tmp_path):
    torch.manual_seed(0)
    cfg = SaeConfig(d_in=10, expansion_factor=3, k=4, hookpoint="up_blocks.1", timestep=25, model_id="toy-unet")
    model = SparseAutoencoder(cfg)
    with torch.no_grad():
        model.encoder.bias.normal_()
        model.b_dec.normal_()
    model.input_scale = 8.0  # a power of two, as training picks
    model.save(tmp_path / "sae")

    raw = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert raw["d_in"] == 10 and raw["k"] == 4 and raw["num_latents"] == 30
    for key in ("activation", "expansion_factor", "normalize_decoder", "multi_topk", "skip_connection", "transcode"):
        assert key in raw  # sparsify's SparseCoderConfig fields
    assert raw["hookpoint"] == "up_blocks.1" and raw["timestep"] == 25 and raw["model_id"] == "toy-unet"
    assert raw["input_scale"] == 8.0
    tensors = load_file(str(tmp_path / "sae" / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "encoder.weight": (30, 10), "encoder.bias": (30,), "W_dec": (30, 10), "b_dec": (10,)}

    # the saved tensors alone reproduce the model on raw features (how sparsify would run them)
    x = torch.randn(7, 10) * 8
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    vals, idx = pre.topk(4)
    x_hat_sparsify = torch.einsum("bk,bkd->bd", vals, tensors["W_dec"][idx]) + tensors["b_dec"]
    out = model(x)
    torch.testing.assert_close(out.x_hat, x_hat_sparsify, rtol=1e-5, atol=1e-5)
    norms = tensors["W_dec"].norm(dim=1)  # normalize_decoder: unit rows in the file too
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)

    loaded = SparseAutoencoder.load(tmp_path / "sae", d_in=10)
    assert loaded.input_scale == 8.0 and loaded.cfg.hookpoint == "up_blocks.1"
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1  # power-of-two scale folds and unfolds exactly
    torch.testing.assert_close(loaded(x).x_hat, out.x_hat)


def test_load_refuses_d_in_mismatch(tmp_path):
    SparseAutoencoder(SaeConfig(d_in=10, num_latents=20, k=2)).save(tmp_path / "sae")
    with pytest.raises(SaeError, match="d_in=10.*width 12"):
        SparseAutoencoder.load(tmp_path / "sae", d_in=12)
    with pytest.raises(SaeError, match="width 12"):
        evaluate_sae(SparseAutoencoder.load(tmp_path / "sae"), np.zeros((4, 12), np.float32))
    with pytest.raises(SaeError, match="not an SAE folder"):
        SparseAutoencoder.load(tmp_path / "nowhere")


def test_config_errors_name_the_bad_value():
    with pytest.raises(SaeError, match="b_dec_init='mode'"):
        SaeConfig(b_dec_init="mode")
    with pytest.raises(SaeError, match=r"SaeConfig.pooling 'grid' is not one of \['auto', 'mean', 'tokens'\]"):
        SaeConfig(pooling="grid")
    with pytest.raises(SaeError, match="'spatial' is now 'tokens'"):
        SaeConfig(pooling="spatial")
    with pytest.raises(SaeError, match="k=50 exceeds num_latents=40"):
        SaeConfig(d_in=10, expansion_factor=4, k=50).resolved()


# ------------------------------------------------------------------------------------ data streaming
def test_batch_order_is_a_fresh_permutation_each_epoch():
    n, bs = 1000, 128  # batches straddle epoch boundaries
    epochs = [[], [], []]
    for s in range(math.ceil(3 * n / bs)):
        pos = s * bs + np.arange(bs)
        tokens = batch_tokens(s, bs, n, seed=3)
        assert np.all(np.diff(tokens) >= 0)  # sorted for memmap locality
        # which epoch each token belongs to: positions are consecutive, tokens sorted per epoch part
        perm_parts = [permute(pos[pos // n == e] % n, n, key=3 * 1_000_003 + e) for e in np.unique(pos // n)]
        assert np.array_equal(np.sort(np.concatenate(perm_parts)), tokens)
        for e, part in zip(np.unique(pos // n), perm_parts):
            if e < 3:
                epochs[e].append(part)
    firsts = []
    for e in range(3):
        seen = np.concatenate(epochs[e])
        assert np.array_equal(np.sort(seen), np.arange(n)), e  # every token exactly once per epoch
        firsts.append(seen[:bs])
    assert not np.array_equal(firsts[0], firsts[1])  # a fresh order each epoch
    assert not np.array_equal(np.sort(firsts[0]), np.arange(bs))  # and not the identity
    assert np.array_equal(batch_tokens(2, bs, n, seed=3), batch_tokens(2, bs, n, seed=3))
    assert not np.array_equal(batch_tokens(0, bs, n, seed=3), batch_tokens(0, bs, n, seed=4))


def test_spatial_source_gathers_tokens_with_positions(tmp_path):
    rng = np.random.default_rng(0)
    arr = _memmap(tmp_path, rng.normal(size=(6, 5, 3, 4)).astype(np.float32))
    src = ArraySource(arr, rows=[1, 3, 4])
    assert src.spatial and src.d_in == 5 and src.grid == (3, 4) and src.n_tokens == 3 * 12
    tokens = np.array([0, 13, 35])
    rows, h, w = src.locate(tokens)
    assert rows.tolist() == [1, 3, 4] and h.tolist() == [0, 0, 2] and w.tolist() == [0, 1, 3]
    got = src.gather(tokens)
    assert got.shape == (3, 5)
    for i in range(3):
        np.testing.assert_array_equal(got[i], arr[rows[i], :, h[i], w[i]])
    with pytest.raises(SaeError, match="row indices"):
        ArraySource(arr, rows=[7])


def test_train_on_spatial_tokens(tmp_path):
    rng = np.random.default_rng(0)
    flat = _sparse_data(64 * 16, d=8, n_atoms=16)
    arr = _memmap(tmp_path, flat.reshape(64, 4, 4, 8).transpose(0, 3, 1, 2).copy())
    cfg = _small_cfg(sae=SaeConfig(expansion_factor=4, k=3), steps=8)
    model = train_sae(ArraySource(arr, rows=np.arange(48)), cfg, tmp_path / "run", progress=False)
    assert model.cfg.pooling == "tokens" and model.grid == (4, 4)
    loaded = SparseAutoencoder.load(tmp_path / "run", d_in=8)
    assert loaded.grid == (4, 4) and loaded.cfg.pooling == "tokens"
    ev = evaluate_sae(loaded, ArraySource(arr, rows=np.arange(48, 64)))
    assert ev["n_tokens"] == 16 * 16 and 0 < ev["l0"] <= 3
    with pytest.raises(SaeError, match="pooling='mean'"):
        train_sae(arr, _small_cfg(sae=SaeConfig(pooling="mean")), tmp_path / "other", progress=False)
    del rng


# ---------------------------------------------------------------------------------- train lifecycle
def test_default_lr_rule_and_checkpoint_files(tmp_path):
    cfg = _small_cfg(lr=None, steps=3)
    train_sae(_sparse_data(512), cfg, tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["lr"] == pytest.approx(2e-4 / math.sqrt(64 / 2**14))
    assert state["step"] == 3
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"cfg.json", "sae.safetensors", "optimizer.safetensors", "train_state.json", "train_cfg.json"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in names)
    assert TrainConfig(**json.loads((tmp_path / "run" / "train_cfg.json").read_text())) == cfg


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    x = _memmap(tmp_path, _sparse_data(1000))
    cfg = _small_cfg(steps=13, auxk_alpha=1 / 32, dead_tokens_threshold=256)
    full = train_sae(x, cfg, tmp_path / "full", progress=False)
    part = train_sae(x, cfg, tmp_path / "resumed", stop_after=7, progress=False)
    assert json.loads((tmp_path / "resumed" / "train_state.json").read_text())["step"] == 7
    assert not all(torch.equal(a, b) for a, b in zip(part.parameters(), full.parameters()))
    resumed = train_sae(x, cfg, tmp_path / "resumed", progress=False)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    a = load_file(str(tmp_path / "full" / "optimizer.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "optimizer.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run just loads
    again = train_sae(x, cfg, tmp_path / "full", progress=False)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), again.parameters()))
    with pytest.raises(SaeError, match="another config"):
        train_sae(x, _small_cfg(steps=14), tmp_path / "full", progress=False)


def test_checkpoint_of_an_earlier_version_resumes(tmp_path):
    """A checkpoint whose run signature names SaeConfig.pooling ``tokens`` (as before) resumes, not refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    x = _memmap(tmp_path, _sparse_data(600))
    cfg = _small_cfg(steps=8)
    full = train_sae(x, cfg, tmp_path / "full", progress=False)
    train_sae(x, cfg, tmp_path / "old", stop_after=5, progress=False)
    opt = tmp_path / "old" / "optimizer.safetensors"
    with safe_open(str(opt), framework="pt") as f:
        meta = f.metadata()
    state = json.loads(meta["train_state"])
    sae_sig = state["signature"]["train_cfg"]["sae"]
    sae_sig["tokens"] = sae_sig.pop("pooling")
    save_file(load_file(str(opt)), str(opt), metadata={**meta, "train_state": json.dumps(state)})
    resumed = train_sae(x, cfg, tmp_path / "old", progress=False)
    assert json.loads((tmp_path / "old" / "train_state.json").read_text())["step"] == 8
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


def test_nan_features_raise_and_keep_last_good_checkpoint(tmp_path):
    clean = _sparse_data(1000)
    bs = 128
    first_seen = {}
    for s in range(8):
        for t in batch_tokens(s, bs, len(clean), seed=0):
            first_seen.setdefault(int(t), s)
    bad_row = next(t for t, s in first_seen.items() if s == 3)
    poisoned = clean.copy()
    poisoned[bad_row, 2] = np.nan
    cfg = _small_cfg(steps=8, checkpoint_every=2, batch_size=bs, init_tokens=bs)
    with pytest.raises(SaeTrainingError, match=rf"step 3 .*rows \[{bad_row}\].*after 2 steps") as err:
        train_sae(_memmap(tmp_path, poisoned), cfg, tmp_path / "run", progress=False)
    assert err.value.step == 3 and err.value.last_checkpoint_step == 2
    # the checkpoint is the state after 2 good steps, identical to a clean run stopped there
    saved = SparseAutoencoder.load(tmp_path / "run", d_in=16)
    ref = train_sae(clean, cfg, tmp_path / "ref", stop_after=2, progress=False)
    for (name, a), b in zip(ref.named_parameters(), saved.parameters()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "run" / "train_state.json").read_text())["step"] == 2


def test_nonfinite_loss_raises(tmp_path):
    x = _sparse_data(512)
    x[:] = np.float32(3e38)  # finite features whose variance overflows
    with pytest.raises(SaeTrainingError, match="non-finite (loss|features)"):
        train_sae(x, _small_cfg(steps=3, sae=SaeConfig(expansion_factor=4, k=4, normalize_input=False,
                                                       b_dec_init="zeros")), tmp_path / "run", progress=False)


def test_auxk_revives_dead_latents(tmp_path):
    """Latents whose encoder rows start tiny never win the top-k; only AuxK gives them a gradient."""
    x = _sparse_data(4096, d=16, n_atoms=64)
    x_test = _sparse_data(2048, d=16, n_atoms=64, seed=1)
    torch.manual_seed(0)
    init = SparseAutoencoder(SaeConfig(d_in=16, num_latents=64, k=3))
    with torch.no_grad():
        init.b_dec.copy_(geometric_median(torch.from_numpy(x)))
        init.encoder.weight[32:] *= 0.02
    dead = {}
    for alpha in (0.0, 1 / 32):
        cfg = _small_cfg(sae=SaeConfig(num_latents=64, k=3), steps=200, batch_size=256, auxk_alpha=alpha,
                         dead_tokens_threshold=1024, checkpoint_every=1000)
        model = train_sae(x, cfg, tmp_path / f"a{alpha}", init=init, progress=False)
        freq = evaluate_sae(model, x_test)["firing_frequency"]
        dead[alpha] = float(np.mean(freq[32:] == 0))
    assert dead[0.0] > 0.9  # without AuxK they stay dead
    assert dead[1 / 32] < dead[0.0] - 0.25


def test_evaluate_sae_matches_direct_computation():
    torch.manual_seed(0)
    model = SparseAutoencoder(SaeConfig(d_in=8, num_latents=40, k=3))
    with torch.no_grad():
        model.encoder.bias.normal_(0, 0.5)
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    ev = evaluate_sae(model, x, batch_size=64)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        acts, idx = model.encode(xt)
        x_hat = model.decode(acts, idx)
    fvu = ((xt - x_hat) ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum()
    assert ev["fvu"] == pytest.approx(fvu.item(), rel=1e-5)
    assert ev["l0"] == pytest.approx((acts > 0).sum().item() / 300)
    counts = np.bincount(idx[acts > 0].numpy(), minlength=40)
    np.testing.assert_allclose(ev["firing_frequency"], counts / 300)
    assert ev["dead_fraction"] == pytest.approx(np.mean(counts == 0))


def test_save_eval_tables_and_histogram(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = {"fvu": 0.1, "l0": 3.0, "dead_fraction": 0.25, "n_tokens": 10, "num_latents": 4, "k": 3,
              "firing_frequency": np.array([0.0, 0.1, 0.5, 0.02])}
    metrics_path, firing_path = save_eval(result, tmp_path / "tables", name="blk")
    import pandas as pd

    assert pd.read_csv(metrics_path).loc[0, "dead_fraction"] == 0.25
    assert pd.read_csv(firing_path)["dead"].tolist() == [True, False, False, False]
    ax = plot_firing_histogram(result["firing_frequency"])
    assert "25.0% never fire" in ax.get_title()


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("spatial", [False, True])
def test_memmap_reads_keep_rss_flat(tmp_path, monkeypatch, spatial):
    """Gathering every token of a 64 MB memmap adds far less than 64 MB of file pages to the RSS."""
    shape = (4096, 64, 4, 16) if spatial else (65536, 256)
    path = tmp_path / "big.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    arr[:] = 1.0
    arr.flush()
    del arr
    store = np.load(path, mmap_mode="r")
    monkeypatch.setattr(ArraySource, "remap_bytes", 4 << 20)
    src = ArraySource(store)
    before = _rss_file_kb()
    peak = before
    for s in range(0, src.n_tokens, 8192):
        assert src.gather(np.arange(s, min(src.n_tokens, s + 8192))).shape[1] == src.d_in
        peak = max(peak, _rss_file_kb())
    assert (peak - before) < 24 * 1024, (peak - before) / 1024
    # the naive way (fancy-indexing the user's memmap) is what this guards against
    for s in range(0, shape[0], 4096):
        np.asarray(store[s : s + 4096]).sum()
    assert _rss_file_kb() - before > 48 * 1024


def test_kill_inside_checkpoint_resumes(tmp_path, monkeypatch):
    """A crash after optimizer.safetensors (the commit point) but before the sparsify view is rewritten: the rerun
    repairs the view and ends equal to an uninterrupted run."""
    from safetensors.torch import load_file

    from revelio_nb import sae as S

    x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    cfg = S.TrainConfig(sae=S.SaeConfig(k=4, expansion_factor=4), steps=40, batch_size=64, checkpoint_every=10)
    S.train_sae(x, cfg, tmp_path / "ref", progress=False)

    real_save = S.SparseAutoencoder.save
    calls = {"n": 0}

    def dying_save(self, folder, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the 3rd checkpoint (step 30): optimizer file written, view not yet
            raise KeyboardInterrupt("killed inside checkpoint")
        return real_save(self, folder, metadata)

    monkeypatch.setattr(S.SparseAutoencoder, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        S.train_sae(x, cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(S.SparseAutoencoder, "save", real_save)
    assert json.loads((tmp_path / "run" / "train_state.json").read_text())["step"] == 20  # the view lags behind
    S.train_sae(x, cfg, tmp_path / "run", progress=False)
    for name in ("sae.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(tmp_path / "run" / name)), load_file(str(tmp_path / "ref" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------- sparsify invariants of the saved folder
def _sparsify_forward(tensors: dict, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sparsify's SparseCoder.encode / decode written out independently: x - b_dec, encoder Linear, ReLU, top-k;
    W_dec^T z + b_dec. Returns (top_acts, top_idx, x_hat)."""
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    acts, idx = pre.topk(k, dim=1, sorted=True)
    x_hat = torch.einsum("bk,bkd->bd", acts, tensors["W_dec"][idx]) + tensors["b_dec"]
    return acts, idx, x_hat


def test_trained_folder_keeps_every_sparsify_invariant(tmp_path):
    """A trained SAE on features far from unit scale: its folder says normalize_decoder and its decoder rows are
    unit norm; sparsify's forward on raw features reproduces our raw-space reconstruction; its code is s * ours."""
    x = _sparse_data(800) * 40.0  # rms ~ 40: input_scale is a power of two far from 1
    cfg = _small_cfg(steps=12)
    model = train_sae(x, cfg, tmp_path / "run", progress=False)
    s = model.input_scale
    assert s >= 8 and math.log2(s) == round(math.log2(s))
    raw = json.loads((tmp_path / "run" / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "run" / "sae.safetensors"))
    assert raw["normalize_decoder"] is True and raw["input_scale"] == s
    norms = tensors["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert raw["layout_version"] == 2
    xt = torch.from_numpy(x[:64])
    acts, idx, x_hat = _sparsify_forward(tensors, raw["k"], xt)
    with torch.no_grad():
        ours = model(xt)
        z, zi = model.encode(xt)
    torch.testing.assert_close(x_hat, ours.x_hat, rtol=1e-5, atol=1e-4)
    order = torch.sort(z, dim=1, descending=True)
    torch.testing.assert_close(acts, order.values * s, rtol=1e-5, atol=1e-5)  # the raw-space code is s * z
    assert torch.equal(idx.sort(1).values, zi.sort(1).values)
    loaded = SparseAutoencoder.load(tmp_path / "run", d_in=16)
    assert loaded.input_scale == s
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1  # power-of-two scale: exact
    # training continues from the folder's optimizer checkpoint as before
    more = train_sae(x, _small_cfg(steps=12), tmp_path / "run", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(more.parameters(), model.parameters()))


def test_layout_1_folders_still_load(tmp_path):
    """Folders written before layout_version 2 (scale folded into W_enc / W_dec) load to the same model."""
    torch.manual_seed(0)
    model = SparseAutoencoder(SaeConfig(d_in=10, expansion_factor=3, k=4))
    with torch.no_grad():
        model.encoder.bias.normal_()
        model.b_dec.normal_()
    model.input_scale = 4.0
    s = model.input_scale
    folder = tmp_path / "old"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file({"encoder.weight": (model.encoder.weight / s).detach().contiguous(),
               "encoder.bias": model.encoder.bias.detach().clone(), "W_dec": (model.W_dec * s).detach().contiguous(),
               "b_dec": (model.b_dec * s).detach().contiguous()}, str(folder / "sae.safetensors"))
    cfg = model.config_dict()
    for key in ("layout_version", "weights_act_on", "raw_code_scale"):
        cfg.pop(key, None)
    cfg["scale_folded_into_weights"] = True
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = SparseAutoencoder.load(folder, d_in=10)
    assert loaded.input_scale == s
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    cfg["layout_version"] = 7
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeError, match="layout_version=7"):
        SparseAutoencoder.load(folder)


def test_resume_rewrites_a_layout_1_view(tmp_path):
    """A finished run cached by an older version (layout 1 view) is rewritten in the current layout when train_sae
    meets it again, from the optimizer checkpoint (the commit point), with the same model."""
    x = _sparse_data(400) * 40.0
    cfg = _small_cfg(steps=4)
    model = train_sae(x, cfg, tmp_path / "run", progress=False)
    cfg_path = tmp_path / "run" / "cfg.json"
    old = json.loads(cfg_path.read_text())
    old.pop("layout_version")
    cfg_path.write_text(json.dumps(old))  # the tensors do not matter: the view is rebuilt from the checkpoint
    again = train_sae(x, cfg, tmp_path / "run", progress=False)
    assert json.loads(cfg_path.read_text())["layout_version"] == 2
    norms = load_file(str(tmp_path / "run" / "sae.safetensors"))["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


def test_package_names_and_one_way_imports():
    """The public names resolve from ``revelio_nb.sae``, and each module of the package imports only the modules
    listed before it in the package docstring's order (no cycle), each under 400 lines."""
    import ast
    from pathlib import Path

    import revelio_nb.sae as pkg

    assert all(hasattr(pkg, name) for name in pkg.__all__)
    order = ["config", "kernels", "model", "step", "source", "train", "evaluate", "plots"]
    folder = Path(pkg.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == sorted(order)
    for i, name in enumerate(order):
        text = (folder / f"{name}.py").read_text()
        assert len(text.splitlines()) < 400, name
        siblings = {node.module for node in ast.walk(ast.parse(text))
                    if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert siblings <= set(order[:i]), (name, siblings - set(order[:i]))
