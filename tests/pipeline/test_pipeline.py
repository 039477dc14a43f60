"""Generation against diffusers' MotifVideoPipeline on tiny random components saved in the release layout."""

import numpy as np
import pytest
import torch
from diffusers import MotifVideoPipeline as DiffusersPipeline
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from PIL import Image

from motif_video import MotifVideoPipeline
from motif_video.cli import main as cli_main
from motif_video.errors import CheckpointError, MotifVideoError
from motif_video.pipeline.guidance import AdaptiveProjectedGuidance
from motif_video.pipeline.video_io import probe_video

SIZE = dict(height=32, width=32, num_frames=9)


def noise(seed=0):
    return torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_matches_diffusers_pipeline_with_same_latents(model_dir, pipe):
    reference = DiffusersPipeline.from_pretrained(str(model_dir))
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red square moving up", negative_prompt="bad quality", num_inference_steps=3,
                  latents=noise(), output_type="np", **SIZE)
    expected = reference(**kwargs).frames
    got = pipe(guider="cfg", guidance_scale=4.0, progress=False, **kwargs)
    assert got.shape == expected.shape == (1, 9, 32, 32, 3)
    assert np.abs(got - expected).max() <= 1e-3


def test_apg_matches_diffusers_normalized_guidance():
    gen = torch.Generator().manual_seed(0)
    ours = AdaptiveProjectedGuidance(scale=8.0, norm_threshold=12.0, momentum=0.1, eta=0.0)
    buffer = MomentumBuffer(0.1)
    for _ in range(3):  # momentum carries across steps
        cond, uncond = torch.randn(2, 16, 3, 4, 4, generator=gen) * 5, torch.randn(2, 16, 3, 4, 4, generator=gen) * 5
        expected = normalized_guidance(cond, uncond, 8.0, buffer, 0.0, 12.0, False, (1, 3, 4))
        assert torch.allclose(ours(cond, uncond), expected, atol=1e-5)


def test_sequential_guidance_equals_batched(pipe):
    common = dict(prompt="a red square", negative_prompt="bad quality", num_inference_steps=2, latents=noise(),
                  progress=False, **SIZE)
    assert np.abs(pipe(batch_guidance=False, **common) - pipe(**common)).max() <= 1e-5


def test_trimmed_padding_equals_full_padding(pipe):
    states, mask = pipe.prompts.encode(["a red square"], trim_padding=True)
    full, full_mask = pipe.prompts.encode(["a red square"], trim_padding=False)
    assert mask is None and full.shape[1] == 512
    assert torch.allclose(states, full[:, : states.shape[1]], atol=1e-5)
    x = torch.randn(1, 33, 3, 4, 4)
    t = torch.tensor([500.0])
    with torch.no_grad():
        trimmed = pipe.transformer(x, t, states, None)
        padded = pipe.transformer(x, t, full, full_mask)
    assert torch.allclose(trimmed, padded, atol=1e-5)


def test_seeds_determine_the_video(pipe):
    run = lambda seed: pipe("a blue circle", num_inference_steps=2, progress=False, solver="dpm++",
                            generator=torch.Generator().manual_seed(seed), **SIZE)
    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_image_to_video_conditions_on_the_first_frame(pipe, tmp_path):
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[8:24, 8:24] = (255, 0, 0)
    Image.fromarray(frame).save(tmp_path / "first.png")
    common = dict(num_inference_steps=2, latents=noise(), progress=False, **SIZE)
    i2v = pipe("a red square", image=tmp_path / "first.png", **common)
    t2v = pipe("a red square", **common)
    assert i2v.shape == (1, 9, 32, 32, 3)
    assert np.abs(i2v - t2v).max() > 1e-3


def test_image_to_video_input_holds_the_encoded_first_frame(pipe, tmp_path):
    """The transformer's input at the first step: [noise | VAE latent of the image on frame 0 | mask 1 on frame 0],
    the same assembly (latents.model_input) that image-to-video training uses; the latent is recomputed here with
    diffusers' VAE and the config's normalisation."""
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[8:24, 8:24] = (0, 255, 0)
    Image.fromarray(frame).save(tmp_path / "first.png")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        pipe("a green square", image=tmp_path / "first.png", num_inference_steps=1, latents=noise(),
             guidance_scale=1.0, progress=False, output_type="latent", **SIZE)
    finally:
        handle.remove()
    vae = pipe.codec.vae
    pixels = torch.from_numpy(frame.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    expected = torch.zeros(1, 33, 3, 4, 4)
    expected[:, :16] = noise()
    expected[:, 16:32, :1] = (z - mean) / std
    expected[:, 32, 0] = 1.0
    assert len(seen) == 1 and seen[0].shape == expected.shape
    assert torch.allclose(seen[0], expected, atol=1e-5)


def test_a_transformer_in_memory_generates_like_from_pretrained(model_dir, pipe, tmp_path):
    """The pipeline around a module held in memory (here the transformer inside a training module, rebuilt from
    the config and given the weights by state dict) generates exactly what the loaded folder does."""
    from motif_video import MotifVideoTransformer
    from motif_video.model_folder import ModelFolder
    from motif_video.train.objective import TrainModule

    transformer = MotifVideoTransformer(pipe.transformer.config)
    transformer.load_state_dict(pipe.transformer.state_dict())
    module = TrainModule(transformer)
    folder = ModelFolder(model_dir)
    in_memory = MotifVideoPipeline(module.transformer, folder.vae(torch.device("cpu"), torch.float32),
                                   folder.text_encoder(torch.float32), folder.tokenizer(), folder.image_processor(),
                                   folder.defaults)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "first.png")
    for image in (None, tmp_path / "first.png"):
        common = dict(prompt="a red square", negative_prompt="bad quality", image=image, num_inference_steps=2,
                      progress=False, **SIZE)
        run = lambda p: p(generator=torch.Generator().manual_seed(4), **common)
        assert np.array_equal(run(in_memory), run(pipe))


@pytest.mark.parametrize("extra", [[], ["--image", "FIRST"]])
def test_cli_writes_a_playable_mp4(model_dir, tmp_path, extra, capsys):
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(tmp_path / "first.png")
    extra = [str(tmp_path / "first.png") if a == "FIRST" else a for a in extra]
    out = tmp_path / "clip.mp4"
    code = cli_main(["generate", "a green triangle moving left", "-o", str(out), "--model", str(model_dir),
                     "--height", "32", "--width", "48", "--frames", "9", "--steps", "2", "--quiet", *extra])
    assert code == 0
    info = probe_video(out)
    assert (info["frames"], info["height"], info["width"]) == (9, 32, 48)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--frames", "10"], "4k+1"),
    (["--height", "40"], "multiple"),
    (["--image", "/nonexistent.png"], "image file not found"),
    (["--model", "NOTMODEL"], "not a Motif-Video model folder"),
    (["--model", "CORRUPT"], "corrupt"),
    (["--model", "nobody-here/no-model"], "unreachable"),
    (["--attention", "sage"], "needs the sageattention package"),
])
def test_cli_bad_input_is_one_line_and_leaves_no_file(model_dir, tmp_path, capsys, args, message):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    weights = next((corrupt / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    (tmp_path / "notmodel").mkdir()
    args = [{"NOTMODEL": str(tmp_path / "notmodel"), "CORRUPT": str(corrupt)}.get(a, a) for a in args]
    if "--model" not in args:
        args += ["--model", str(model_dir)]
    out = tmp_path / "out.mp4"
    assert cli_main(["generate", "a red square", "-o", str(out), "--steps", "1", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_empty_prompt_is_rejected(pipe, tmp_path, capsys):
    with pytest.raises(MotifVideoError, match="empty"):
        pipe("   ", **SIZE)
    assert cli_main(["generate", "", "-o", str(tmp_path / "x.mp4")]) == 2
    assert "empty" in capsys.readouterr().err


def test_missing_component_folder(model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="missing vae"):
        MotifVideoPipeline.from_pretrained(broken)


def test_encoder_reuse_runs_the_encoder_on_every_kth_step(pipe):
    calls = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    common = dict(num_inference_steps=5, latents=noise(), progress=False, **SIZE)
    try:
        exact = pipe("a red square", **common)
        assert len(calls) == 5
        calls.clear()
        assert np.array_equal(pipe("a red square", encoder_reuse=1, **common), exact)
        calls.clear()
        reused = pipe("a red square", encoder_reuse=2, **common)
        assert len(calls) == 3  # steps 0, 2, 4
    finally:
        hook.remove()
    assert 0 < np.abs(reused - exact).max() < 0.5
    with pytest.raises(MotifVideoError, match="encoder_reuse"):
        pipe("a red square", encoder_reuse=0, **common)
