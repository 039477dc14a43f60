"""A tied model trained without the query LayerNorm's bias converts to the released diffusers layout (and GGUF)
exactly; one trained with it (the released checkpoint's form) is refused, as before."""

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel

from motif_video import MotifVideoTransformer
from motif_video.cli import main as cli_main
from motif_video.train.checkpoint import resolve_checkpoint
from motif_video.train.loop import train
from tests.train.engine_helpers import WIDE_TINY, build_config, make_cache, one_thread  # noqa: F401


def trained_transformer(tmp_path, query_bias: bool):
    """Three steps of tied-form training (image conditioning on): the run's final fp32 transformer folder."""
    cache = make_cache(tmp_path / "cache", n_images=2, n_videos=4)
    overrides = {**WIDE_TINY, "image_embed_dim": None, "cross_attention_form": "tied",
                 "cross_attention_query_bias": query_bias}
    config = build_config(tmp_path, cache, model={"preset": "motif-video-tiny", "overrides": overrides},
                          objective={"image_condition": {"probability": 0.5}},
                          optim={"lr": 1e-2, "steps": 3, "warmup_steps": 0}, ema={"enabled": False},
                          checkpointing={"every": 100, "save_final": True})
    train(config)
    return resolve_checkpoint(tmp_path / "run") / "transformer"


def test_bias_free_query_norm_converts_exactly_to_diffusers(tmp_path, capsys):
    folder = trained_transformer(tmp_path, query_bias=False)
    assert '"cross_attention_query_bias": false' in (folder / "config.json").read_text()
    ours = MotifVideoTransformer.from_pretrained(folder).eval()
    norm = ours.single_transformer_blocks[0].cross_attn.query_norm
    assert norm.bias is None and not torch.equal(norm.weight, torch.ones_like(norm.weight))  # trained, bias-free
    assert cli_main(["convert", str(folder), str(tmp_path / "diffusers"), "--to", "diffusers"]) == 0
    reference = MotifVideoTransformer3DModel.from_pretrained(str(tmp_path / "diffusers")).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 2, 4, 4, generator=gen)
    x[:, 16:] = 0
    x[0, 16:32, :1], x[0, 32, 0] = torch.randn(16, 1, 4, 4, generator=gen), 1.0  # an image-conditioned sample
    text = torch.randn(2, 5, ours.config.text_embed_dim, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    t = torch.tensor([800.0, 200.0])
    with torch.no_grad():
        expected = reference(x, t, text, mask, return_dict=False)[0]
        got = ours(x, t, text, mask)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # quantize reads the tied folder through the same fold: f32 GGUF gives the same output
    assert cli_main(["quantize", str(folder), str(tmp_path / "m.gguf"), "--type", "f32", "--no-progress"]) == 0
    with torch.no_grad():
        quantized = MotifVideoTransformer.from_single_file(tmp_path / "m.gguf").eval()(x, t, text, mask)
    assert (quantized - expected).abs().max() <= 1e-5 * expected.abs().max()
    # and back: the diffusers folder loads here too
    again = MotifVideoTransformer.from_pretrained(tmp_path / "diffusers").eval()
    with torch.no_grad():
        assert torch.allclose(again(x, t, text, mask), got, atol=1e-5 * got.abs().max().item(), rtol=0)


def test_a_trained_query_bias_still_loads_and_is_refused_by_convert(tmp_path, capsys):
    folder = trained_transformer(tmp_path, query_bias=True)
    ours = MotifVideoTransformer.from_pretrained(folder)
    assert ours.single_transformer_blocks[0].cross_attn.query_norm.bias.abs().max() > 1e-6
    capsys.readouterr()
    assert cli_main(["convert", str(folder), str(tmp_path / "diffusers"), "--to", "diffusers"]) == 2
    assert "non-zero bias" in capsys.readouterr().err


@pytest.mark.parametrize("query_bias", [True, False])
def test_config_json_records_the_flag_and_defaults_to_a_bias(query_bias):
    from motif_video import preset

    config = preset("motif-video-tiny", cross_attention_form="tied", cross_attention_query_bias=query_bias)
    assert config.to_diffusers_json()["cross_attention_query_bias"] is query_bias
    old = {k: v for k, v in config.to_dict().items() if k != "cross_attention_query_bias"}
    assert type(config).from_dict(old).cross_attention_query_bias is True  # configs written before the flag
    assert "cross_attention_query_bias" not in config.replace(cross_attention_form="untied").to_diffusers_json()
