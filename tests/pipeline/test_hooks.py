"""Generation hooks: the per-step callback, previews, interruption, and per-clip generators."""

import threading

import numpy as np
import pytest
import torch

from motif_video import MotifVideoPipeline
from motif_video.cli import main as cli_main
from motif_video.errors import GenerationInterrupted

SIZE = dict(height=32, width=32, num_frames=9)


def test_callback_sees_every_step_and_leaves_the_result_unchanged(pipe):
    seen = []
    common = dict(prompt="a red square", num_inference_steps=4, progress=False, **SIZE)
    with_callback = pipe(generator=torch.Generator().manual_seed(3), preview=True,
                         callback=lambda info: seen.append((info.step, info.num_steps, info.timestep,
                                                            info.latents.clone(), info.preview)), **common)
    plain = pipe(generator=torch.Generator().manual_seed(3), **common)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[1] == 4 for s in seen)
    assert [s[2] for s in seen] == sorted([s[2] for s in seen], reverse=True)  # timesteps fall
    assert all(s[4].shape == (1, 32, 32, 3) and s[4].dtype == np.uint8 for s in seen)
    assert np.array_equal(with_callback, plain)
    final = pipe(generator=torch.Generator().manual_seed(3), output_type="latent", **common)
    assert torch.equal(seen[-1][3], final)


def test_callback_returning_true_interrupts_after_that_step(pipe):
    seen = []

    def stop_after_second(info):
        seen.append(info.step)
        return info.step == 1

    with pytest.raises(GenerationInterrupted) as caught:
        pipe("a red square", num_inference_steps=5, progress=False, callback=stop_after_second, **SIZE)
    assert seen == [0, 1] and caught.value.step == 2


def test_interrupt_event_stops_before_the_next_step(pipe):
    event = threading.Event()
    seen = []

    def record(info):
        seen.append(info.step)
        if info.step == 2:
            event.set()  # as another thread (a server's cancel) would

    with pytest.raises(GenerationInterrupted):
        pipe("a red square", num_inference_steps=6, progress=False, callback=record, interrupt=event, **SIZE)
    assert seen == [0, 1, 2]


def test_generator_list_gives_each_clip_its_own_noise(pipe):
    common = dict(num_inference_steps=2, progress=False, guidance_scale=1.0, **SIZE)
    alone = pipe("a blue circle", generator=torch.Generator().manual_seed(5), **common)
    batched = pipe(["a red square", "a blue circle"],
                   generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(5)], **common)
    assert np.abs(batched[1] - alone[0]).max() <= 1e-5


def test_cli_interrupt_exits_130_and_writes_nothing(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "clip.mp4"

    def interrupted(self, *args, **kwargs):
        raise GenerationInterrupted(1)

    monkeypatch.setattr(MotifVideoPipeline, "__call__", interrupted)
    assert cli_main(["generate", "a red square", "-o", str(out), "--model", str(model_dir), "--quiet"]) == 130
    assert list(tmp_path.iterdir()) == []
