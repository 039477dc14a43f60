"""The fine-tuning walkthrough (docs/finetune.md) end to end at toy scale, with its own config and the shipped
model: new-shape clips, a cache made with the built-in model, a LoRA trained from its transformer, a clip generated
with `--lora` and scored by the evaluator taught the new shape."""

import json
import os
from pathlib import Path

from motif_video.cli import main as cli_main
from motif_video.train.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "nano" / "lora.yaml"


def test_walkthrough_config():
    config = load_config(CONFIG)
    assert config.model.pretrained == "motif-video-nano"
    assert config.lora.target_modules == "all-linear" and config.lora.rank == 16
    assert config.objective.shift == 3.0 and config.ema.enabled is False
    assert [Path(p).name for p in config.data.cache_dirs] == ["diamond-cache", "palette-cache"]


def test_walkthrough_runs_at_toy_scale(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's paths are relative, as in the walkthrough
    data = Path("runs/finetune")
    assert cli_main(["nano-data", str(data / "diamond"), "--clips", "4", "--images", "0", "--seed", "2",
                     "--eval-prompts", "2", "--shape", "diamond", "--object-size", "large"]) == 0
    assert cli_main(["nano-data", str(data / "palette"), "--clips", "4", "--images", "0", "--seed", "2",
                     "--eval-prompts", "0"]) == 0
    for name in ("diamond", "palette"):
        assert cli_main(["cache", str(data / name), str(data / f"{name}-cache"), "--model", "motif-video-nano",
                         "--buckets", "17x64x64"]) == 0
    assert cli_main(["train", str(CONFIG), "-o", "optim.steps=2", "optim.warmup_steps=1", "data.batch_size=2",
                     "checkpointing.every=2", "logging.progress=false"]) == 0
    checkpoint = data / "lora" / "checkpoints" / "step-00000002"
    assert (checkpoint / "lora").is_dir()
    prompts = data / "diamond" / "heldout_prompts.jsonl"
    assert cli_main(["generate", "--prompts", str(prompts), "-o", str(data / "clips"), "--lora", str(checkpoint),
                     "--steps", "2"]) == 0
    assert cli_main(["eval", str(data / "clips"), "--out", str(data / "report"), "--shape", "diamond"]) == 0
    results = json.loads((data / "report" / "results.json").read_text())
    # two steps teach nothing: what is checked is that every diamond prompt was read and every clip scored
    assert results["shapes"] == ["diamond"] and len(results["clips"]) == 2
    assert all(c["expected"]["shape"] == "diamond" and c["measured"] for c in results["clips"])
    assert not any(os.path.isabs(c["path"]) for c in results["clips"])
