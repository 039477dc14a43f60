import json
import math
from pathlib import Path

import pytest
import torch

from motif_video import MotifVideoTransformer
from motif_video.cli import main
from motif_video.eval.attention import AttentionRecorder, FrameAttention, frame_attention
from motif_video.eval.attention_report import analyze
from motif_video.model.backends import SDPABackend, set_attention_backend
from motif_video.model.layout import GRID_KINDS, TEXT, VIDEO, AttentionLayout, AttentionSite, Segment
from motif_video.routing import TokenRoute
from motif_video.testing import save_tiny_pipeline
from tests.conftest import randomize_

NANO = Path(__file__).resolve().parents[2] / "src" / "motif_video" / "assets" / "motif-video-nano"


class Capture:
    """Keeps every call's inputs (the explicit reference below recomputes the full map from them)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, q, k, v, key_mask, layout, site):
        self.calls.append((site, q.clone(), k.clone(), key_mask, layout))
        return self.inner(q, k, v, key_mask, layout, site)


def full_map_frames(q, k, key_mask, layout):
    """The per-frame mass from the explicit (heads, N_q, N_k) map of batch row 0, one frame and bin at a time."""
    scores = q[0].double() @ k[0].double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[0, 0, 0], float("-inf"))
    probs = scores.softmax(-1)  # (heads, N_q, N_k)
    t, h, w = layout.grid
    kept = layout.kept[0].tolist() if layout.kept is not None else None

    def frame(i):  # the frame of the i-th token of a grid segment
        return (kept[i] if kept is not None else i) // (h * w)

    columns, start = [], 0  # (label, key positions)
    for seg in layout.key:
        if seg.kind in GRID_KINDS:
            for f in range(t):
                columns.append(((seg.kind, f), [start + i for i in range(seg.length) if frame(i) == f]))
        else:
            columns.append(((seg.kind, None), list(range(start, start + seg.length))))
        start += seg.length
    mass = torch.zeros(q.shape[1], t, len(columns), dtype=torch.float64)
    for f in range(t):
        rows = [i for i in range(layout.query[0].length) if frame(i) == f]
        for j, (_, keys) in enumerate(columns):
            if rows and keys:
                mass[:, f, j] = probs[:, rows][:, :, keys].sum(-1).mean(-1)
    return mass, [label for label, _ in columns]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny"), std=0.3).eval()
    gen = torch.Generator().manual_seed(0)
    c = model.config
    inputs = dict(hidden_states=torch.randn(2, c.in_channels, 3, 8, 8, generator=gen),
                  timestep=torch.tensor([600.0, 600.0]),
                  encoder_hidden_states=torch.randn(2, 6, c.text_embed_dim, generator=gen),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
                  image_embeds=torch.randn(2, 3, c.image_embed_dim, generator=gen))
    return model, inputs


@pytest.mark.parametrize("routed", [False, True])
def test_recorded_mass_equals_the_explicit_full_map(tiny, routed):
    model, inputs = tiny
    if routed:  # TREAD through the second encoder block and the decoder: the recorder reads frames from `kept`
        kept = torch.stack([torch.randperm(48, generator=torch.Generator().manual_seed(s))[:29].sort().values
                            for s in (1, 2)])
        inputs = {**inputs, "route": TokenRoute(2, model.config.num_blocks, kept)}
    capture = Capture(SDPABackend())
    recorder = AttentionRecorder(capture, kinds=("self", "cross"), chunk_bytes=2 * 4 * 2 * 60 * 7)  # 7 queries
    set_attention_backend(model, recorder)
    try:
        recorder.arm(0)
        with torch.no_grad():
            model(**inputs)
    finally:
        set_attention_backend(model, SDPABackend())
    assert len(recorder.records) == len(capture.calls) == 6  # 4 self-attentions, 2 Shared Cross-Attentions
    for record, (site, q, k, key_mask, layout) in zip(recorder.records, capture.calls):
        expected, bins = full_map_frames(q, k, key_mask, layout)
        assert record.site == site and record.bins == bins
        torch.testing.assert_close(record.mass, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(record.mass.sum(-1), torch.ones(record.mass.shape[:2], dtype=torch.float64))
        if site.kind == "self" and site.block < 3:  # queries [video]; keys [video; image; text]
            assert [kind for kind, _ in bins] == ["video"] * 3 + ["image", "text"]
    decoder = next(r for r in recorder.records if r.site.block == 3)
    assert decoder.query_kind == "decoder" and {k for k, _ in decoder.bins} == {"decoder", "encoder"}
    # the masked text keys of row 0 get no attention: text mass equals the explicit map over the 4 kept keys
    assert 0 < recorder.records[0].shares()["text"] < 1


def test_recorder_leaves_the_output_unchanged(tiny):
    model, inputs = tiny
    with torch.no_grad():
        expected = model(**inputs)
        recorder = set_attention_backend(model, AttentionRecorder(SDPABackend(), chunk_bytes=4096))
        recorder.arm(0)
        try:
            got = model(**inputs)
        finally:
            set_attention_backend(model, SDPABackend())
    assert recorder.records and torch.equal(got, expected)


def test_uniform_attention_has_the_analytic_shares():
    # zero queries: softmax is uniform over the 12 video keys (3 frames x 4) and 4 text keys
    layout = AttentionLayout((Segment(VIDEO, 12), Segment(TEXT, 4)), (Segment(VIDEO, 12), Segment(TEXT, 4)),
                             (3, 2, 2))
    q, k = torch.zeros(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    mass, bins, counts = frame_attention(q, k, None, layout, chunk_bytes=1)
    shares = FrameAttention(AttentionSite(0, "self"), 0, VIDEO, bins, mass, counts).shares()
    assert counts == [4, 4, 4]
    assert shares["video_same_frame"] == pytest.approx(4 / 16) and shares["other_frames"] == pytest.approx(8 / 16)
    assert shares["text"] == pytest.approx(4 / 16)
    assert shares["frame_distance"] == pytest.approx(shares["uniform_frame_distance"]) == pytest.approx(8 / 9)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", guidance_scale=4.0)


def test_cli_writes_heatmaps_json_and_summary(model_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    size = ["--height", "32", "--width", "32", "--frames", "9"]
    assert main(["analyze", "a red circle moving left", "--model", str(model_dir), "--out", str(out),
                 "--steps", "3", "--quiet", "--per-head", *size]) == 0
    assert "| block | stage |" in capsys.readouterr().out
    results = json.loads((out / "attention.json").read_text())
    assert results["at_steps"] == [0, 1, 2] and results["grid"] == [3, 2, 2]
    assert [b["stage"] for b in results["blocks"]] == ["dual", "encoder", "encoder", "decoder"]
    for block in results["blocks"]:
        assert set(block["steps"]) == {"0", "1", "2"} and len(block["per_head"]) == 2
        for row in block["mass"]:
            assert sum(row) == pytest.approx(1.0, abs=1e-4)
        assert (out / f"heatmaps/block_{block['block']:02d}_{block['stage']}.png").is_file()
    assert (out / "summary.png").stat().st_size > 10_000 and "| 3 | decoder |" in (out / "summary.md").read_text()
    assert str(tmp_path) not in (out / "attention.json").read_text()
    # recording only step 0 stops sampling there
    assert main(["analyze", "a red circle", "--model", str(model_dir), "--out", str(tmp_path / "a0"),
                 "--steps", "3", "--at-steps", "0", "--quiet", *size]) == 0
    assert json.loads((tmp_path / "a0" / "attention.json").read_text())["timesteps"].keys() == {"0"}


def test_bad_input_is_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    cases = [(["--steps", "3", "--at-steps", "3"], "outside the 3 sampling steps"),
             (["--steps", "0"], "at least 1"),
             (["--out", str(tmp_path / "file")], "is not a folder"),
             (["--model", str(tmp_path / "missing")], "not found")]
    for extra, message in cases:
        args = ["analyze", "a cat", "--out", str(tmp_path / "o"), "--model", str(model_dir), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_shipped_model_sampling_is_unchanged_by_recording(tmp_path):
    from motif_video.pipeline.pipeline import MotifVideoPipeline

    pipe = MotifVideoPipeline.from_pretrained(NANO, device="cpu")
    report = analyze(pipe, "a red circle moving left", tmp_path, model_name="nano", steps=3, at_steps=[0, 2])
    plain = pipe("a red circle moving left", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="latent", encoder_reuse=1, progress=False)
    assert torch.equal(report["latents"], plain)
    blocks = report["results"]["blocks"]
    assert len(blocks) == pipe.transformer.config.num_blocks and blocks[-1]["stage"] == "decoder"
    assert (tmp_path / "summary.png").is_file() and len(report["files"]["heatmaps"]) == len(blocks)
