import pytest
import torch

from revelio_nb.capture import BlockNotFoundError, FeatureCapture, list_blocks, tokens_to_grid
from revelio_nb.models import ModelLoadError, load_model


@pytest.fixture(scope="module")
def unet(tiny_unet_path):
    return load_model(tiny_unet_path)


def _no_hooks_left(model):
    return all(not m._forward_hooks for m in model.denoiser.modules())


def test_capture_unet_blocks_and_tuples(unet):
    x = torch.randn(2, 1, 32, 32)
    with FeatureCapture(unet, ["down_blocks.0", "mid_block", "up_blocks.1"], early_exit=False) as cap:
        feats = cap.run(x, 25)
    # down blocks return (hidden, residuals): the hidden state is taken
    assert feats["down_blocks.0"].shape == (2, 8, 16, 16)
    assert feats["mid_block"].shape == (2, 16, 16, 16)
    assert feats["up_blocks.1"].shape == (2, 8, 32, 32)
    assert _no_hooks_left(unet)


def test_early_exit_same_values_and_skips_decoder(unet):
    x = torch.randn(3, 1, 32, 32)
    fired = []
    h = unet.denoiser.conv_out.register_forward_hook(lambda *a: fired.append(1))
    try:
        with FeatureCapture(unet, ["mid_block"], early_exit=True) as cap:
            early = cap.run(x, 10)["mid_block"]
        assert fired == []  # the decoder never ran
        with FeatureCapture(unet, ["mid_block"], early_exit=False) as cap:
            full = cap.run(x, 10)["mid_block"]
        assert fired == [1]
    finally:
        h.remove()
    torch.testing.assert_close(early, full, rtol=0, atol=0)


def test_hooks_removed_when_forward_raises(unet):
    with pytest.raises(RuntimeError):
        with FeatureCapture(unet, ["mid_block", "up_blocks.0"]) as cap:
            cap.run(torch.randn(1, 3, 32, 32), 5)  # wrong channel count: conv_in raises
    assert _no_hooks_left(unet)


def test_unknown_block_lists_valid_names(unet):
    with pytest.raises(BlockNotFoundError) as e:
        FeatureCapture(unet, ["mid_blok"])
    msg = str(e.value)
    assert "mid_blok" in msg and "up_blocks.0" in msg and "Did you mean ['mid_block'" in msg


def test_dit_tokens_to_grid_permute(tiny_dit_path):
    # patchify (B, D, h, w) -> (B, N, D) via flatten(2).transpose(1, 2); our inverse must give back the grid
    grid = torch.randn(2, 5, 3, 4)
    tokens = grid.flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens_to_grid(tokens, 30, 40), grid)
    assert not torch.equal(tokens.reshape(2, 5, 3, 4), grid)  # the naive reshape is wrong
    dit = load_model(tiny_dit_path)
    x = torch.randn(2, 1, 16, 16)
    with FeatureCapture(dit, ["transformer_blocks.1"], early_exit=False) as cap:
        f = cap.run(x, 50, dit.conditioning(2))["transformer_blocks.1"]
    assert f.shape == (2, 16, 4, 4)
    seen = {}
    h = dit.denoiser.transformer_blocks[1].register_forward_hook(lambda m, a, o: seen.setdefault("t", o))
    try:
        dit.denoise(x, 50)
    finally:
        h.remove()
    torch.testing.assert_close(f, seen["t"].reshape(2, 4, 4, 16).permute(0, 3, 1, 2))


def test_list_blocks_shapes_cond_unet(tiny_sd_pipeline):
    sd = load_model(tiny_sd_pipeline)
    table = list_blocks(sd, image_size=64)
    row = table.set_index("block").loc["mid_block"]
    assert row.output_shape == (16, 4, 4) and row.type == "UNetMidBlock2DCrossAttn"
    assert table.exec_order.notna().sum() > 5


def test_model_errors(unet, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="multiple of 2"):
        unet.check_image_size(33)
    with pytest.raises(ValueError, match="0..999"):
        unet.check_timestep(1000)
    with pytest.raises(ModelLoadError, match="embedded:animals-unet"):
        load_model("embedded:nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline.*embedded:animals-unet"):
        load_model("runwayml/stable-diffusion-v1-5")
    with pytest.raises(ModelLoadError, match="no unet/ or transformer/"):
        load_model(tmp_path)
