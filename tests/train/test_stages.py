"""The curriculum: stage configs chain and agree on the architecture; stage transitions keep what they should."""

from pathlib import Path

import pytest
import torch

from motif_video import MotifVideoTransformer, preset
from motif_video.errors import CheckpointError, ConfigError
from motif_video.train.checkpoint import read_weights
from motif_video.train.config import load_config
from motif_video.train.loop import Trainer, train
from motif_video.train.stages import apply_transitions, build_transformer
from motif_video.train.surgery import replace_text_projection
from tests.train.engine_helpers import base_config, make_cache, one_thread  # noqa: F401

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = ["stage01", "stage02", "stage03", "stage04", "stage05", "stage06", "stage07", "stage08", "stage09",
          "stage10", "stage10-sft"]


def test_every_shipped_config_is_valid():
    files = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "base.yaml")
    assert {p.stem for p in files} >= {*STAGES, "tiny-cpu"}
    for path in files:
        load_config(path)


def test_the_2b_curriculum_chains_and_its_architecture_steps_are_the_transitions():
    """Walk the ten stages on the meta device: each starts from the previous stage's output and, after its listed
    transitions, has exactly the architecture its config describes (the paper's table)."""
    configs = [load_config(CONFIGS / "motif-2b" / f"{name}.yaml") for name in STAGES]
    assert configs[0].stage.init_from is None and configs[0].alignment.teacher.startswith("dinov2")
    with torch.device("meta"):
        model = MotifVideoTransformer(configs[0].model.architecture())
        for previous, config in zip(configs, configs[1:]):
            assert config.stage.init_from == previous.output_dir
            model = apply_transitions(model, config.stage.transitions, config.model.architecture(), config.stage.name)
    transitions = {name: c.stage.transitions for name, c in zip(STAGES, configs) if c.stage.transitions}
    assert transitions == {"stage04": ["switch_text_encoder"], "stage09": ["insert_shared_cross_attention"]}
    assert [c.alignment is not None for c in configs] == [True] * 3 + [False] * 8  # REPA: stages 1-3 only
    # the curriculum ends at the release architecture (which ships the same weights in the untied layout)
    assert model.config.replace(cross_attention_form="untied") == preset("motif-video-2b")


def tiny_stage_config(tmp_path, cache, name, **sections):
    return load_config(data=base_config(tmp_path / name, cache, optim={"lr": 1e-2, "steps": 2}, **sections))


def test_a_stage_starts_from_the_previous_ema_with_its_transitions(tmp_path):
    # stage A: 16-d text, no cross-attention
    cache16 = make_cache(tmp_path / "c16", text_dim=16)
    arch_a = {"image_embed_dim": None, "text_embed_dim": 16, "enable_text_cross_attention_single": False}
    first = train(tiny_stage_config(tmp_path, cache16, "a", model={"preset": "motif-video-tiny", "overrides": arch_a}))
    ema = read_weights(first.checkpoint, "ema", lora=False)
    live = read_weights(first.checkpoint, "model", lora=False)
    assert any(not torch.equal(ema[k], live[k]) for k in ema)

    # stage B: a 32-d text encoder and Shared Cross-Attention (paper's tied form)
    cache32 = make_cache(tmp_path / "c32", text_dim=32)
    arch_b = {"image_embed_dim": None, "text_embed_dim": 32, "enable_text_cross_attention_single": True,
              "cross_attention_form": "tied"}
    stage = {"name": "b", "init_from": str(tmp_path / "a" / "run"),
             "transitions": ["switch_text_encoder", "insert_shared_cross_attention"]}
    config = tiny_stage_config(tmp_path, cache32, "b", model={"preset": "motif-video-tiny", "overrides": arch_b},
                               stage=stage)
    trainer = Trainer(config)
    trainer.setup()
    state = {k: v.detach() for k, v in trainer.module.transformer.state_dict().items()}
    kept = [k for k in ema if not k.startswith("context_embedder.")]
    assert kept and all(torch.equal(state[k], ema[k]) for k in kept)  # the previous stage's EMA weights
    assert state["context_embedder.linear_1.weight"].shape == (32, 32)
    new_cross = [k for k in state if ".cross_attn." in k]
    assert new_cross and all(state[k].abs().max() == 0 for k in new_cross if ".out_proj." in k)
    result = trainer.train()
    assert result.step == 2 and all(torch.isfinite(torch.tensor(list(result.losses.values()))))

    # init_weights: model takes the live weights instead
    stage_live = {**stage, "init_weights": "model", "transitions": ["switch_text_encoder"]}
    config = tiny_stage_config(tmp_path, cache32, "c", stage=stage_live, model={
        "preset": "motif-video-tiny", "overrides": {**arch_a, "text_embed_dim": 32}})
    model = build_transformer(config)
    assert torch.equal(model.state_dict()["x_embedder.proj.weight"], live["x_embedder.proj.weight"])


def test_inserting_cross_attention_at_a_stage_boundary_keeps_the_output(tmp_path):
    cache = make_cache(tmp_path / "cache")
    arch = {"image_embed_dim": None, "enable_text_cross_attention_single": False}
    first = train(tiny_stage_config(tmp_path, cache, "a", model={"preset": "motif-video-tiny", "overrides": arch}))
    before = MotifVideoTransformer.from_pretrained(first.checkpoint / "ema").eval()
    config = tiny_stage_config(tmp_path, cache, "b", model={"preset": "motif-video-tiny", "overrides": {
        **arch, "enable_text_cross_attention_single": True, "cross_attention_form": "tied"}},
        stage={"init_from": str(first.checkpoint), "transitions": ["insert_shared_cross_attention"]})
    after = build_transformer(config).eval()
    gen = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 33, 2, 4, 4, generator=gen), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        assert torch.equal(before(x, t, text), after(x, t, text))


def test_stage_mistakes_are_config_errors(tmp_path):
    cache = make_cache(tmp_path / "cache")
    first = train(tiny_stage_config(tmp_path, cache, "a"))
    # the text dim changes but the transition is not listed
    config = tiny_stage_config(tmp_path, cache, "b", model={"preset": "motif-video-tiny", "overrides": {
        "image_embed_dim": None, "text_embed_dim": 48}}, stage={"init_from": str(first.checkpoint)})
    with pytest.raises(ConfigError, match=r"text_embed_dim=32 .* says 48 \(add switch_text_encoder"):
        build_transformer(config)
    # a transition that has nothing to do
    model = MotifVideoTransformer.from_preset("motif-video-tiny")
    with pytest.raises(ConfigError, match="already takes text_embed_dim=32"):
        replace_text_projection(model, 32)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        build_transformer(tiny_stage_config(tmp_path, cache, "c", stage={"init_from": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="stage.transitions need stage.init_from"):
        tiny_stage_config(tmp_path, cache, "d", stage={"transitions": ["switch_text_encoder"]})


def test_pretrained_overrides_may_not_change_the_weight_layout(tmp_path):
    cache = make_cache(tmp_path / "cache")
    folder = MotifVideoTransformer.from_preset("motif-video-tiny").save_pretrained(tmp_path / "base")
    config = tiny_stage_config(tmp_path, cache, "a", model={"pretrained": str(folder), "overrides": {
        "rope_theta": 500.0}})
    assert build_transformer(config).config.rope_theta == 500.0  # a behaviour setting: allowed
    config = tiny_stage_config(tmp_path, cache, "b", model={"pretrained": str(folder), "overrides": {
        "text_embed_dim": 48}})
    with pytest.raises(ConfigError, match="change the layout of the pretrained weights"):
        build_transformer(config)


def test_a_preset_run_can_start_from_the_matched_decoder_init(tmp_path):
    section = {"preset": "motif-video-tiny", "overrides": {"image_embed_dim": None}}

    def decoder_attention(**model):
        config = load_config(data=base_config(tmp_path, tmp_path, model={**section, **model}))
        return build_transformer(config).single_transformer_blocks[-1].attn

    matched = decoder_attention(decoder_init="matched", matched_grid=[3, 4, 4])
    assert torch.equal(matched.to_q.weight, matched.to_k.weight)
    plain = decoder_attention()
    assert not torch.equal(plain.to_q.weight, plain.to_k.weight)
    with pytest.raises(ConfigError, match="model.matched_grid must be three positive token counts"):
        decoder_attention(matched_grid=[3, 4])
