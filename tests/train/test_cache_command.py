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


def test_cache_rejects_a_folder_without_model(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert cli_main(["cache", str(tmp_path / "data"), str(tmp_path / "cache"), "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err
