"""`motif-video cache`: a clip dataset -> cached latents and text states that equal direct encoding."""

import torch

from motif_video.cli import main as cli_main
from motif_video.pipeline.pipeline import MotifVideoPipeline
from motif_video.train.cached import CachedLatentDataset
from motif_video.testing import save_tiny_pipeline


def test_cache_encodes_clips_and_images_like_the_pipeline(tmp_path):
    model = save_tiny_pipeline(tmp_path / "model")
    assert cli_main(["nano-data", str(tmp_path / "data"), "--clips", "3", "--images", "2", "--frames", "9",
                     "--size", "32", "--eval-prompts", "0"]) == 0
    assert cli_main(["cache", str(tmp_path / "data"), str(tmp_path / "cache"), "--model", str(model),
                     "--buckets", "1x32x32", "9x32x32", "--batch-size", "2", "--quiet"]) == 0
    dataset = CachedLatentDataset(tmp_path / "cache")
    assert len(dataset) == 5
    shapes = sorted(tuple(dataset[i]["latents"].shape) for i in range(5))
    assert shapes == [(16, 1, 4, 4)] * 2 + [(16, 3, 4, 4)] * 3
    assert dataset.empty_prompt() is not None

    # the cached text states equal what the pipeline computes for the same caption
    pipe = MotifVideoPipeline.from_pretrained(model, device="cpu")
    item = dataset[0]
    states, mask = pipe.prompts.encode([item["caption"]])
    assert mask is None
    assert torch.allclose(item["text"], states[0], atol=1e-5)

    # clips (not images) also carry their condition caption (nano-data writes the motion alone) and its states
    for i, (_, record) in enumerate(dataset.records):
        item = dataset[i]
        if item["latents"].shape[1] == 1:
            assert "condition_caption" not in record and "condition_text" not in item
            continue
        written = (tmp_path / "data" / record["source"]).with_suffix(".condition.txt").read_text().strip()
        assert record["condition_caption"] == written and written not in record["caption"].split(", ")
        states, _ = pipe.prompts.encode([written])
        assert torch.allclose(item["condition_text"], states[0], atol=1e-5)


def test_cache_rejects_a_folder_without_model(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert cli_main(["cache", str(tmp_path / "data"), str(tmp_path / "cache"), "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_cache_stores_first_frame_image_tokens_as_generation_computes_them(tmp_path):
    """With a vision tower in the text encoder, each clip (not image) carries the SigLIP tokens of its first frame,
    equal to what the pipeline computes from that frame given as the image; training on them runs end to end."""
    import json

    from motif_video.pipeline.video_io import read_video
    from motif_video.train.loop import train
    from tests.train.engine_helpers import build_config

    model = save_tiny_pipeline(tmp_path / "model")
    assert cli_main(["nano-data", str(tmp_path / "data"), "--clips", "2", "--images", "1", "--frames", "9",
                     "--size", "32", "--eval-prompts", "0"]) == 0
    assert cli_main(["cache", str(tmp_path / "data"), str(tmp_path / "cache"), "--model", str(model),
                     "--buckets", "1x32x32", "9x32x32", "--quiet"]) == 0
    dataset = CachedLatentDataset(tmp_path / "cache")
    pipe = MotifVideoPipeline.from_pretrained(model, device="cpu")
    clips = [i for i in range(len(dataset)) if dataset[i]["latents"].shape[1] > 1]
    assert len(clips) == 2 and all("image_tokens" not in dataset[i] for i in set(range(3)) - set(clips))
    for i in clips:
        first = read_video(tmp_path / "data" / dataset.records[i][1]["source"])[0]
        expected = pipe._image_tokens(pipe._image_tensor(first, 32, 32))[0]
        assert torch.allclose(dataset[i]["image_tokens"], expected, atol=1e-5)
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["image_dim"] == expected.shape[1]

    config = build_config(tmp_path, tmp_path / "cache", model={"preset": "motif-video-tiny",
                                                               "overrides": {"image_embed_dim": expected.shape[1]}},
                          data={"cache_dirs": [str(tmp_path / "cache")], "batch_size": 1},
                          objective={"image_condition": {"probability": 1.0}},
                          optim={"lr": 1e-3, "steps": 2, "warmup_steps": 0}, ema={"enabled": False},
                          checkpointing={"every": 100, "save_final": False})
    result = train(config)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
