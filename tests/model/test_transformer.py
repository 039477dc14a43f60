"""The transformer against diffusers' MotifVideoTransformer3DModel with identical random weights."""

import json

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel

from motif_video import MotifVideoTransformer, TransformerConfig, preset
from motif_video.cli import main as cli_main
from motif_video.convert.layouts import (diffusers_to_tied, original_to_tied, tied_to_diffusers, tied_to_original,
                                         to_layout)
from motif_video.errors import CheckpointError, ConfigError, MotifVideoError
from motif_video.train.surgery import insert_shared_cross_attention
from tests.conftest import randomize_


def diffusers_kwargs(cfg: TransformerConfig) -> dict:
    d = cfg.to_dict()
    d.pop("cross_attention_form")
    d.pop("cross_attention_query_bias")
    return d


def inputs(cfg: TransformerConfig, batch=2, grid=(3, 6, 10), text_len=7, image_tokens=0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *grid, generator=gen)
    t = torch.tensor([700.0, 15.0][:batch])
    text = torch.randn(batch, text_len, cfg.text_embed_dim, generator=gen)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[-1, text_len // 2:] = 0  # a padded prompt in the batch
    image = torch.randn(batch, image_tokens, cfg.image_embed_dim, generator=gen) if image_tokens else None
    return x, t, text, mask, image


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = {
    "t2v_cross": dict(image_embed_dim=None),
    "i2v_cross": dict(),
    "t2v_no_cross": dict(image_embed_dim=None, enable_text_cross_attention_single=False),
    "i2v_dual_cross": dict(enable_text_cross_attention_dual=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("masked", [True, False])
def test_parity_with_diffusers_both_directions(case, masked, tmp_path):
    cfg = preset("motif-video-tiny", **CASES[case])
    ref = randomize_(MotifVideoTransformer3DModel(**diffusers_kwargs(cfg))).eval()
    ref.save_pretrained(tmp_path / "ref")
    ours = MotifVideoTransformer.from_pretrained(tmp_path / "ref").eval()
    assert set(ours.state_dict()) == set(ref.state_dict())

    x, t, text, mask, image = inputs(cfg, image_tokens=4 if cfg.image_embed_dim else 0)
    mask = mask if masked else None
    with torch.no_grad():
        expected = ref(x, t, text, mask, image, return_dict=False)[0]
        got = ours(x, t, text, mask, image)
    assert got.shape == (2, 16, 3, 6, 10)
    assert rel_err(got, expected) <= 1e-4

    # and the reverse: saved by us, loaded by diffusers
    randomize_(ours, seed=5).save_pretrained(tmp_path / "ours")
    back = MotifVideoTransformer3DModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(ours(x, t, text, mask, image), back(x, t, text, mask, image, return_dict=False)[0]) <= 1e-4


def test_release_preset_has_the_release_parameter_count():
    with torch.device("meta"):
        model = MotifVideoTransformer.from_preset("motif-video-2b")
    assert sum(p.numel() for p in model.parameters()) == 2_037_809_600
    assert model.config.rope_theta == 10000.0


def test_diffusers_config_json_builds_the_same_network(tmp_path):
    cfg = preset("motif-video-tiny")
    MotifVideoTransformer3DModel(**diffusers_kwargs(cfg)).save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    model = MotifVideoTransformer(**config_json)
    assert model.config == cfg


def test_sharded_save_roundtrip(tmp_path):
    model = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny"))
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    loaded = MotifVideoTransformer.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # diffusers reads our shards too
    MotifVideoTransformer3DModel.from_pretrained(tmp_path)


def test_saving_over_a_model_keeps_it_whole_until_the_new_one_is_complete(tmp_path):
    """A save that fails part-way (here safetensors refuses two tensors sharing memory, in the last of several
    shards) leaves the old model exactly as it was; a complete save replaces its weights and config, drops its old
    shards and index, and keeps the user's own files."""
    from motif_video.convert.checkpoint import save_state_dict_folder

    folder = tmp_path / "model"
    old = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny"), seed=1)
    old.save_pretrained(folder, max_shard_size=20_000)
    (folder / "README.md").write_text("notes on this model\n")
    (folder / "samples").mkdir()
    (folder / "samples" / "prompt.txt").write_text("a red circle\n")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert len([p for p in before if p.suffix == ".safetensors"]) > 2

    new = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny"), seed=2)
    broken = new.state_dict()
    broken["alias"] = broken[list(broken)[-1]]
    with pytest.raises(RuntimeError, match="share memory"):
        save_state_dict_folder(broken, new.config.to_diffusers_json(), folder, 20_000)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left beside it
    assert all(torch.equal(v, old.state_dict()[k])
               for k, v in MotifVideoTransformer.from_pretrained(folder).state_dict().items())

    new.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "diffusion_pytorch_model.safetensors", "samples"]
    assert (folder / "samples" / "prompt.txt").read_text() == "a red circle\n"
    assert all(torch.equal(v, new.state_dict()[k])
               for k, v in MotifVideoTransformer.from_pretrained(folder).state_dict().items())


def test_tied_form_shares_parameters_and_equals_diffusers_form():
    cfg = preset("motif-video-tiny", image_embed_dim=None, cross_attention_form="tied")
    tied = randomize_(MotifVideoTransformer(cfg)).eval()
    block = tied.single_transformer_blocks[0]
    names = {n for n, _ in block.named_parameters()}
    assert "cross_attn.query_proj.weight" in names and "cross_attn.to_k.weight" not in names  # no copies
    with torch.no_grad():  # the paper's query LayerNorm is affine; a zero bias makes it foldable
        for b in tied.single_transformer_blocks[: cfg.num_encoder_single_layers]:
            b.cross_attn.query_norm.bias.zero_()
    untied = MotifVideoTransformer(cfg.replace(cross_attention_form="untied")).eval()
    untied.load_state_dict(tied_to_diffusers(tied.state_dict()))
    block_u = untied.single_transformer_blocks[0].cross_attn
    assert torch.equal(block_u.to_k.weight, untied.single_transformer_blocks[0].attn.to_k.weight)
    x, t, text, mask, _ = inputs(cfg)
    with torch.no_grad():
        assert rel_err(untied(x, t, text, mask), tied(x, t, text, mask)) <= 1e-4


def test_original_layout_roundtrips_exactly_and_loads(tmp_path):
    cfg = preset("motif-video-tiny", cross_attention_form="tied")
    model = randomize_(MotifVideoTransformer(cfg))
    original = tied_to_original(model.state_dict())
    assert any(k.endswith("single_transformer_blocks.0.cross_attn_query_proj.weight") for k in original)
    back = original_to_tied(original)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())

    # an original-layout folder loads as a tied model with the same outputs
    from motif_video.convert.checkpoint import save_state_dict_folder

    save_state_dict_folder(original, cfg.replace(cross_attention_form="untied").to_diffusers_json(), tmp_path,
                           max_shard_size=1 << 30)
    loaded = MotifVideoTransformer.from_pretrained(tmp_path)
    assert loaded.config.cross_attention_form == "tied"
    x, t, text, mask, image = inputs(cfg, image_tokens=3)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, mask, image), model(x, t, text, mask, image))


def test_diffusers_to_original_requires_tied_copies():
    cfg = preset("motif-video-tiny")
    model = randomize_(MotifVideoTransformer(cfg))
    with pytest.raises(CheckpointError, match="untied"):
        to_layout(model.state_dict(), "original")
    # tied copies and a mean-free query projection convert exactly
    sd = model.state_dict()
    for i in range(cfg.num_encoder_single_layers):
        p = f"single_transformer_blocks.{i}."
        for name in ("to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias", "norm_q.weight", "norm_k.weight"):
            sd[p + "cross_attn." + name] = sd[p + "attn." + name].clone()
        w, b = sd[p + "cross_attn.to_q.weight"], sd[p + "cross_attn.to_q.bias"]
        sd[p + "cross_attn.to_q.weight"], sd[p + "cross_attn.to_q.bias"] = w - w.mean(0), b - b.mean()
    tied = MotifVideoTransformer(cfg.replace(cross_attention_form="tied")).eval()
    tied.load_state_dict(diffusers_to_tied(sd))
    model.load_state_dict(sd)
    x, t, text, mask, image = inputs(cfg, image_tokens=2)
    with torch.no_grad():
        assert rel_err(tied(x, t, text, mask, image), model.eval()(x, t, text, mask, image)) <= 1e-4


def test_inserting_cross_attention_leaves_output_bit_identical():
    cfg = preset("motif-video-tiny", enable_text_cross_attention_single=False)
    model = randomize_(MotifVideoTransformer(cfg)).eval()
    x, t, text, mask, image = inputs(cfg, image_tokens=3)
    with torch.no_grad():
        before = model(x, t, text, mask, image)
        for form in ("tied", "untied"):
            fresh = MotifVideoTransformer(cfg).eval()
            fresh.load_state_dict(model.state_dict())
            insert_shared_cross_attention(fresh, form)
            assert fresh.config.enable_text_cross_attention_single
            assert torch.equal(fresh(x, t, text, mask, image), before)
    with pytest.raises(MotifVideoError, match="already"):
        insert_shared_cross_attention(fresh)


def test_bad_inputs_raise_one_clear_error():
    model = MotifVideoTransformer.from_preset("motif-video-tiny").eval()
    x, t, text, mask, image = inputs(model.config, image_tokens=2)
    with pytest.raises(MotifVideoError, match="hidden_states"):
        model(x[:, :16], t, text)
    with pytest.raises(MotifVideoError, match="divisible"):
        model(x[..., :5], t, text)
    with pytest.raises(MotifVideoError, match="encoder_hidden_states"):
        model(x, t, text[..., :8])
    with pytest.raises(MotifVideoError, match="encoder_attention_mask"):
        model(x, t, text, mask[:, :3])
    with pytest.raises(MotifVideoError, match="image_embeds"):
        model(x, t, text, mask, image[..., :5])
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("motif-video-9b")
    with pytest.raises(ConfigError, match="rope_axes_dim"):
        preset("motif-video-tiny", rope_axes_dim=(4, 4, 4))


def test_checkpoint_problems_are_clear(tmp_path):
    cfg = preset("motif-video-tiny")
    model = MotifVideoTransformer(cfg)
    model.save_pretrained(tmp_path / "ok")
    # config that does not match the weights
    other = tmp_path / "mismatch"
    model.save_pretrained(other)
    (other / "config.json").write_text(json.dumps({**cfg.to_diffusers_json(), "num_single_layers": 4}))
    with pytest.raises(CheckpointError, match="does not match its config"):
        MotifVideoTransformer.from_pretrained(other)
    (other / "config.json").write_text(json.dumps({**cfg.to_diffusers_json(), "attention_head_dim": 32,
                                                   "rope_axes_dim": [8, 12, 12]}))
    with pytest.raises(CheckpointError, match="shape"):
        MotifVideoTransformer.from_pretrained(other)
    # truncated weights
    weights = tmp_path / "ok" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        MotifVideoTransformer.from_pretrained(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="not found"):
        MotifVideoTransformer.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="unreachable"):
        MotifVideoTransformer.from_pretrained("nobody-here/not-a-model", subfolder="transformer")


def test_convert_cli_roundtrip_and_errors(tmp_path, capsys):
    cfg = preset("motif-video-tiny", cross_attention_form="tied")
    model = randomize_(MotifVideoTransformer(cfg))
    with torch.no_grad():
        for b in model.single_transformer_blocks:
            if b.cross_attn is not None:
                b.cross_attn.query_norm.bias.zero_()
    model.save_pretrained(tmp_path / "tied")
    assert cli_main(["convert", str(tmp_path / "tied"), str(tmp_path / "orig"), "--to", "original"]) == 0
    assert cli_main(["convert", str(tmp_path / "orig"), str(tmp_path / "diff"), "--to", "diffusers"]) == 0
    ref = MotifVideoTransformer3DModel.from_pretrained(tmp_path / "diff").eval()
    x, t, text, mask, image = inputs(cfg, image_tokens=2)
    with torch.no_grad():
        assert rel_err(ref(x, t, text, mask, image, return_dict=False)[0], model.eval()(x, t, text, mask, image)) <= 1e-4
    capsys.readouterr()
    assert cli_main(["convert", str(tmp_path / "nothing"), str(tmp_path / "o"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_encoder_reuse_refresh_equals_full_forward_and_reuse_skips_the_encoder():
    from motif_video.model.layout import DECODER, ENCODER, AttentionInputs, AttentionLayout, Segment
    from motif_video.model.transformer import EncoderCache

    model = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny")).eval()
    x, t, text, mask, image = inputs(model.config, image_tokens=2)
    cache = EncoderCache()
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask, image, encoder_cache=cache), model(x, t, text, mask, image))
        encoder_tokens = cache.tokens
        # a later step with reuse: the encoder does not run, the decoder sees the cached tokens and the new input
        calls = []
        hook = model.transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
        cache.refresh = False
        x2, t2 = x + 0.1, t - 10
        reused = model(x2, t2, text, mask, image, encoder_cache=cache)
        hook.remove()
        assert not calls and cache.tokens is encoder_tokens
        assert not torch.equal(reused, model(x2, t2, text, mask, image))
        # reference: the decoder blocks run by hand on the new input's patch embedding and the cached tokens
        cfg = model.config
        temb = model.time_text_embed(t2)
        decoder, context = model.x_embedder(x2), encoder_tokens
        streams = (Segment(DECODER, 45), Segment(ENCODER, 45))
        inputs_ = AttentionInputs(AttentionLayout(streams, streams, (3, 3, 5)), model.rope((3, 3, 5), x2.device), None)
        for block in model.single_transformer_blocks[cfg.num_encoder_single_layers:]:
            decoder, context = block(decoder, context, temb, inputs_)
        patches = model.proj_out(model.norm_out(decoder, temb)).reshape(2, 3, 3, 5, 16, 1, 2, 2)
        expected = torch.einsum("bthwcqyx->bctqhywx", patches).reshape(2, 16, 3, 6, 10)
        assert torch.allclose(reused, expected, atol=1e-6)
        with pytest.raises(MotifVideoError, match="do not match"):
            model(x2[:1], t2[:1], text[:1], mask[:1], image[:1], encoder_cache=cache)
