"""The training config: YAML/TOML, includes, overrides, and one-line errors for every kind of mistake."""

import pytest

from motif_video.cli import main as cli_main
from motif_video.errors import ConfigError
from motif_video.train.config import TrainConfig, load_config

YAML = """
output_dir: runs/x
model: {preset: motif-video-tiny, overrides: {image_embed_dim: null}}
data: {cache_dirs: [c1, c2], batch_size: {1: 8, 33: 2}}
optim: {lr: 1e-4, betas: [0.9, 0.95], schedule: cosine, steps: 100, warmup_steps: 10}
routing: {selection_ratio: 0.5, start_layer: 1, end_layer: -1}
"""

TOML = """
output_dir = "runs/x"
[model]
preset = "motif-video-tiny"
overrides = {}
[data]
cache_dirs = ["c1", "c2"]
batch_size = {1 = 8, 33 = 2}
[optim]
lr = 1e-4
betas = [0.9, 0.95]
schedule = "cosine"
steps = 100
warmup_steps = 10
[routing]
selection_ratio = 0.5
start_layer = 1
end_layer = -1
"""


def test_yaml_and_toml_give_the_same_typed_config(tmp_path):
    (tmp_path / "a.yaml").write_text(YAML)
    (tmp_path / "a.toml").write_text(TOML)
    a = load_config(tmp_path / "a.yaml", ["model.overrides={}"])
    b = load_config(tmp_path / "a.toml")
    assert a == b
    assert a.optim.lr == 1e-4 and isinstance(a.optim.lr, float)  # YAML 1.1 reads "1e-4" as a string
    assert a.optim.betas == (0.9, 0.95)
    assert a.data.batch_size == {1: 8, 33: 2}  # TOML keys are strings; the schema makes them ints
    assert a.route_config().resolve(4) == (1, 3)
    # off by default
    assert a.alignment is None and a.lora is None and a.validation is None and a.stage is None


def test_overrides_and_includes(tmp_path):
    (tmp_path / "base.yaml").write_text(YAML)
    (tmp_path / "child.yaml").write_text("include: base.yaml\noptim: {lr: 3.0e-4}\n")
    c = load_config(tmp_path / "child.yaml", ["optim.steps=70", "routing=null", "alignment.weight=0.25",
                                                "lora.rank=4", "data.cache_dirs=[z]"])
    assert c.optim.lr == 3e-4 and c.optim.schedule == "cosine"  # merged under the child's values
    assert c.optim.steps == 70
    assert c.routing is None
    assert c.alignment.weight == 0.25 and c.alignment.teacher == "dinov2"  # a section created by an override
    assert c.lora.rank == 4 and "to_q" in c.lora.target_modules
    assert c.data.cache_dirs == ["z"]
    # the saved config loads back to the same thing
    c.dump(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == c


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("optim.steps=ten", "optim.steps must be an integer"),
    ("optim.steps=0", "optim.steps must be >= 1"),
    ("optim.schedule=linear", "optim.schedule='linear': choose one of constant, cosine"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 values"),
    ("objective.text_dropout=1.5", "objective.text_dropout must be in [0, 1]"),
    ("routing.selection_ratio=1.0", "selection_ratio must be in [0, 1)"),
    ("routing.end_layer=9", "must give 0 <= start < end <= 4"),
    ("alignment.block=4", "alignment.block=4 but the model has 4 blocks"),
    ("model.preset=motif-video-huge", "unknown preset 'motif-video-huge'"),
    ("model.overrides.num_heads=3", "unknown transformer field 'num_heads'"),
    ("data.interleave=I-X", "data.interleave='I-X'"),
    ("data.batch_size=0", "data.batch_size must be a positive integer"),
    ("ema.decay=1.0", "ema.decay must be in (0, 1)"),
    ("precision=fp8", "precision='fp8': choose one of auto, fp32, bf16"),
    ("stage.transitions=[grow_wings]", "unknown 'grow_wings'"),
    ("model.pretrained=some/folder", "set exactly one of preset and pretrained"),
    ("validation.prompts=[a cat]", "validation.prompts need validation.pipeline"),
    ("optim", "use key=value"),
])
def test_bad_values_are_one_line_config_errors(tmp_path, override, message):
    (tmp_path / "a.yaml").write_text(YAML)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.yaml", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(ConfigError, match="use a .yaml"):
        load_config(tmp_path / "a.json")
    (tmp_path / "b.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- a list")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: d.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "d.yaml")


def test_defaults_need_data_and_a_model():
    with pytest.raises(ConfigError, match="set exactly one of preset and pretrained"):
        TrainConfig().validate()
    with pytest.raises(ConfigError, match="data.cache_dirs: name at least one"):
        load_config(data={"model": {"preset": "motif-video-tiny"}})


def test_cli_rejects_a_bad_config_in_one_line(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(YAML + "optim: {lr: -1}\n")
    assert cli_main(["train", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: optim.lr must be > 0, got -1.0"
