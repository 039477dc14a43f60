"""`generate --prompts FILE -o DIR`: one clip per prompt, clip i the same as `generate PROMPT_i --seed SEED+i`,
written with its prompt as the clip + .txt pairs `motif-video eval` reads."""

import json

import numpy as np
import pytest

from motif_video.cli import main as cli_main
from motif_video.eval.report import load_items
from motif_video.pipeline.video_io import read_video

SMALL = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2", "--quiet"]
PROMPTS = ["a red square moving up", "a green circle moving left", "a blue triangle"]


def test_batch_equals_single_clips(model_dir, tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                                                    for i, p in enumerate(PROMPTS)))
    out = tmp_path / "clips"
    assert cli_main(["generate", "--prompts", str(tmp_path / "prompts.jsonl"), "-o", str(out), "--model",
                     str(model_dir), "--seed", "7", "--batch-size", "2", *SMALL]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [f"000{i}.{e}" for i in range(3) for e in ("mp4", "txt")]
    assert [item["prompt"] for item in load_items(out)] == PROMPTS
    for i, prompt in enumerate(PROMPTS):
        single = tmp_path / f"single{i}.mp4"
        assert cli_main(["generate", prompt, "-o", str(single), "--model", str(model_dir), "--seed", str(7 + i),
                         *SMALL]) == 0
        a, b = read_video(out / f"000{i}.mp4").astype(int), read_video(single).astype(int)
        assert a.shape == b.shape == (5, 32, 32, 3)
        assert np.abs(a - b).mean() < 0.5, i  # batched matmuls round differently: at most a unit here and there
    # a second run replaces the clips of the first (stale ones would join an evaluation)
    (tmp_path / "two.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    assert cli_main(["generate", "--prompts", str(tmp_path / "two.txt"), "-o", str(out), "--model", str(model_dir),
                     "--overwrite", *SMALL]) == 0
    assert len(list(out.glob("*.mp4"))) == 2


@pytest.mark.parametrize("extra, message", [
    (["a red square"], "not both"),
    (["--image", "IMAGE"], "--image"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_batch_options(model_dir, tmp_path, capsys, extra, message):
    (tmp_path / "p.txt").write_text("a red square\n")
    (tmp_path / "first.png").write_bytes(b"")
    extra = [str(tmp_path / "first.png") if a == "IMAGE" else a for a in extra]
    code = cli_main(["generate", "--prompts", str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), "--model",
                     str(model_dir), *SMALL, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


def test_folder_with_other_files_is_kept(model_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red square\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert cli_main(["generate", "--prompts", str(tmp_path / "p.txt"), "-o", str(out), "--model",
                         str(model_dir), *SMALL, *extra]) == 2
        assert "error:" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.md"]
    assert cli_main(["generate", "-o", str(tmp_path / "x.mp4"), "--model", str(model_dir), *SMALL]) == 2
    assert "--prompts" in capsys.readouterr().err
