"""Render placement options: validate.vae_tiles (the grid of the tiled VAE decode, with seams
that line up) and validate.offload = text_encoder (T5 streamed block by block, diffusers' group
offloading), on the tiny model's real VAE and T5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvx.config import load_config
from cogvx.errors import ConfigError
from cogvx.inference import relative_difference, stream_text_encoder, tile_span, vae_tile_settings
from cogvx.models.build import build_pipeline


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_pipeline("tiny-t2v", seed=0)


@pytest.mark.parametrize("latents", [8, 13, 60, 90, 96, 170])
@pytest.mark.parametrize("tiles", [1, 2, 3, 4])
@pytest.mark.parametrize("share", [1 / 6, 1 / 5])
def test_tile_span_gives_the_grid_asked_with_whole_seams(latents, tiles, share):
    """diffusers' loop (range(0, latents, step)) makes exactly ``tiles`` tiles, each (but the
    last) overlapping the next by what the blend covers, and the kept part of a tile is the step:
    the decoded tiles join without a gap or a double-counted strip."""
    tile, factor = tile_span(latents, tiles, share, scale=8)
    step = int(tile * (1 - factor))  # diffusers' own expressions
    blend = int(tile * 8 * factor)
    assert len(range(0, latents, step)) == tiles
    if tiles > 1:
        assert blend == (tile - step) * 8
        assert tile * 8 - blend == step * 8  # diffusers' row limit: the part of a tile kept
        assert 0 < factor < 0.5


def test_vae_tiles_decode_in_that_many_tiles_close_to_the_untiled_decode(tiny_pipe):
    """The tiny VAE (same 8x spatial scale as the real one) decodes 64x96 pixels in 1 x 2 and
    2 x 2 tiles: the decoder runs once per tile and latent frame batch, and the frames differ
    from the untiled decode only by the blending at the seams."""
    vae = tiny_pipe.vae.eval()
    latents = torch.randn(1, vae.config.latent_channels, 3, 8, 12, generator=torch.Generator().manual_seed(0))  # [B, C, F, h, w]
    calls = []
    vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        vae.disable_tiling()
        untiled = vae.decode(latents).sample
        frame_batches = len(calls)
        for rows, cols in ((1, 2), (2, 2)):
            calls.clear()
            vae.enable_tiling(**vae_tile_settings(vae, 8, 12, rows, cols))
            tiled = vae.decode(latents).sample
            assert len(calls) == rows * cols * frame_batches
            assert tiled.shape == untiled.shape
            assert 0 < relative_difference(tiled, untiled) < 0.2


def test_streamed_text_encoder_encodes_what_the_resident_one_does(tiny_pipe):
    """validate.offload = text_encoder: T5 behind diffusers' block-level group offloading (its
    blocks inside ``encoder``, the tied embedding once) gives the same embeddings."""
    text_encoder = tiny_pipe.text_encoder.eval()
    ids = tiny_pipe.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        resident = text_encoder(ids)[0]
        stream_text_encoder(text_encoder, torch.device("cpu"))
        streamed = text_encoder(ids)[0]
        hooks = [module._diffusers_hook for module in text_encoder.modules() if hasattr(module, "_diffusers_hook")]
        stream_text_encoder(text_encoder, torch.device("cpu"))  # placed again: the same hooks, none added
        again = text_encoder(ids)[0]
    assert hooks and hooks == [module._diffusers_hook for module in text_encoder.modules()
                               if hasattr(module, "_diffusers_hook")]
    assert all(len(registry.hooks) == 1 for registry in hooks), [list(registry.hooks) for registry in hooks]
    torch.testing.assert_close(streamed, resident)
    torch.testing.assert_close(again, resident)


def test_vae_tiles_and_text_encoder_offload_in_the_config(tmp_path):
    """validate.vae_tiles is a [rows, columns] pair of positive counts; fp8 compute renders with
    the transformer resident (text_encoder) and is refused with the model-moving modes."""
    assert load_config(None, ["validate.vae_tiles=[1,2]"]).validate_.vae_tiles == (1, 2)
    assert load_config(None, []).validate_.vae_tiles is None
    for bad in ("[0,2]", "[1]", "[1,2,3]", "two"):
        with pytest.raises(ConfigError, match="vae_tiles"):
            load_config(None, [f"validate.vae_tiles={bad}"])
    config = load_config(None, ["validate.fp8_compute=true", "validate.offload=text_encoder"])
    assert config.validate_.offload == "text_encoder"
    with pytest.raises(ConfigError, match="set validate.offload = text_encoder"):
        load_config(None, ["validate.fp8_compute=true", "validate.offload=model"])
    assert np.isfinite(tile_span(1, 3, 0.2, 8)[1])
