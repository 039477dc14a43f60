"""`motif-video cache` at scale: keys from the source, re-runs that skip, resume after a kill, bad clips skipped,
several processes (torchrun, gloo on CPU) and WebDataset tar shards all giving the one-process folder cache."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from motif_video.cli import main as cli_main
from motif_video.pipeline.video_io import read_video
from motif_video.testing import save_tiny_pipeline
from motif_video.train.cached import CachedLatentDataset, sample_key, write_cached_samples, CachedSample

REPO = Path(__file__).resolve().parents[2]
BUCKETS = ["--buckets", "1x32x32", "9x32x32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny model, a folder of 4 clips + 2 images + 2 broken clips, and its cache written by one process."""
    root = tmp_path_factory.mktemp("corpus")
    torch.set_num_threads(1)
    model = save_tiny_pipeline(root / "model")
    data = root / "data"
    assert cli_main(["nano-data", str(data), "--clips", "4", "--images", "2", "--frames", "9", "--size", "32",
                     "--eval-prompts", "0"]) == 0
    (data / "metadata.jsonl").unlink()
    (data / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))  # not a video at all
    (data / "noise.txt").write_text("static")
    whole = (data / "clip_00001.mp4").read_bytes()
    (data / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # truncated mid-stream
    (data / "cut.txt").write_text("a clip cut short")
    reference = root / "reference"
    assert cli_main(["cache", str(data), str(reference), "--model", str(model), *BUCKETS, "--batch-size", "2",
                     "--quiet"]) == 0
    return {"root": root, "model": model, "data": data, "reference": reference}


def by_key(folder) -> dict:
    ds = CachedLatentDataset(folder)
    return {record["key"]: (record, ds[i]) for i, (_, record) in enumerate(ds.records)}


def assert_same_cache(a, b):
    ka, kb = by_key(a), by_key(b)
    assert sorted(ka) == sorted(kb)
    for key, (record, item) in ka.items():
        other_record, other = kb[key]
        assert (record["source"], record["bucket"], record["caption"]) == \
            (other_record["source"], other_record["bucket"], other_record["caption"])
        assert (item["latents"] - other["latents"]).abs().max() <= 1e-6, record["source"]
        assert torch.equal(item["text_mask"], other["text_mask"])
        assert torch.allclose(item["text"], other["text"], atol=1e-5), record["source"]
        assert record.get("condition_caption") == other_record.get("condition_caption")
        if "condition_text" in item:
            assert torch.allclose(item["condition_text"], other["condition_text"], atol=1e-5), record["source"]
    assert any("condition_caption" in record for record, _ in ka.values())  # nano-data's clips carry one
    ea, eb = CachedLatentDataset(a).empty_prompt(), CachedLatentDataset(b).empty_prompt()
    assert torch.allclose(ea[0], eb[0], atol=1e-5)


def make_shards(data: Path, out: Path, per_shard: int, frames_of: str | None = None) -> list[Path]:
    """WebDataset shards of a folder, members sorted by name (as `tar --sort=name -C data .`); `frames_of` stores
    that clip as numbered PNG frames instead of its mp4."""
    names = sorted(p.name for p in data.iterdir())
    keys = sorted({n.partition(".")[0] for n in names})
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(keys), per_shard):
        path = out / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for name in names:
                key = name.partition(".")[0]
                if key not in keys[s:s + per_shard]:
                    continue
                if key == frames_of and name.endswith(".mp4"):
                    for i, frame in enumerate(read_video(data / name)):
                        buf = io.BytesIO()
                        Image.fromarray(frame).save(buf, format="PNG")
                        add_bytes(tar, f"./{key}.{i:04d}.png", buf.getvalue())
                else:
                    tar.add(data / name, arcname=f"./{name}")
        shards.append(path)
    return shards


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_keys_derive_from_the_source_and_a_rerun_skips(corpus, tmp_path, capsys):
    index = json.loads((corpus["reference"] / "index.json").read_text())
    sources = sorted(r["source"] for r in index["samples"])
    assert sources == ["clip_00000.mp4", "clip_00001.mp4", "clip_00002.mp4", "clip_00003.mp4",
                       "image_00000.png", "image_00001.png"]
    for record in index["samples"]:
        assert record["key"] == sample_key(record["source"], record["bucket"])
    # the text encoder by a name that survives moving the model, not the folder it was installed in
    assert index["text_encoder"] == "model/text_encoder"
    assert index["frame_rate"] == "source"

    copy = tmp_path / "cache"
    assert cli_main(["cache", str(corpus["data"]), str(copy), "--model", str(corpus["model"]), *BUCKETS,
                     "--quiet"]) == 0
    files = sorted(p.name for p in copy.iterdir())
    assert cli_main(["cache", str(corpus["data"]), str(copy), "--model", str(corpus["model"]), *BUCKETS,
                     "--quiet"]) == 0
    assert "cached 0 new samples" in capsys.readouterr().out
    assert sorted(p.name for p in copy.iterdir()) == files  # no new shard
    assert_same_cache(copy, corpus["reference"])  # and another batch size gives the same samples

    # a new clip in the folder: only it is encoded
    (corpus["data"] / "late.png").write_bytes((corpus["data"] / "image_00000.png").read_bytes())
    (corpus["data"] / "late.txt").write_text("a late image")
    try:
        assert cli_main(["cache", str(corpus["data"]), str(copy), "--model", str(corpus["model"]), *BUCKETS,
                         "--quiet"]) == 0
    finally:
        (corpus["data"] / "late.png").unlink()
        (corpus["data"] / "late.txt").unlink()
    out = capsys.readouterr().out
    assert "cached 1 new samples" in out and "6 already cached" in out
    assert len(CachedLatentDataset(copy)) == 7


def test_broken_clips_are_skipped_and_logged(corpus, tmp_path, capsys, caplog):
    assert cli_main(["cache", str(corpus["data"]), str(tmp_path / "c"), "--model", str(corpus["model"]), *BUCKETS,
                     "--quiet"]) == 0
    assert "2 unreadable (skipped)" in capsys.readouterr().out
    assert "skipping noise.mp4: cannot open" in caplog.text and "skipping cut.mp4" in caplog.text

    # metadata that gives every number: the broken clip is first opened while its batch is decoded
    rows = [{"path": str(corpus["data"] / name), "caption": "x", "fps": 24, "num_frames": 9, "height": 32,
             "width": 32} for name in ("clip_00000.mp4", "noise.mp4", "clip_00002.mp4")]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    caplog.clear()
    assert cli_main(["cache", str(tmp_path / "meta.jsonl"), str(tmp_path / "m"), "--model", str(corpus["model"]),
                     *BUCKETS, "--batch-size", "3", "--quiet"]) == 0
    assert "1 unreadable (skipped)" in capsys.readouterr().out
    assert "noise.mp4: decode failed" in caplog.text
    assert sorted(Path(r["source"]).name for _, r in CachedLatentDataset(tmp_path / "m").records) == \
        ["clip_00000.mp4", "clip_00002.mp4"]
    assert len(CachedLatentDataset(tmp_path / "c")) == 6


def test_tar_shards_give_the_cache_of_their_folder(corpus, tmp_path, capsys, caplog):
    shards = make_shards(corpus["data"], tmp_path / "shards", per_shard=3)
    assert len(shards) == 3
    spec = str(tmp_path / "shards" / "shard-{00000..00002}.tar")
    assert cli_main(["cache", spec, str(tmp_path / "c"), "--model", str(corpus["model"]), *BUCKETS,
                     "--batch-size", "3", "--quiet"]) == 0
    assert "skipping noise.mp4" in caplog.text and "2 unreadable (skipped)" in capsys.readouterr().out
    assert_same_cache(tmp_path / "c", corpus["reference"])
    # a glob names the same shards; as a URL (file://) through fsspec likewise
    assert cli_main(["cache", f"file://{tmp_path}/shards/*.tar", str(tmp_path / "c"), "--model",
                     str(corpus["model"]), *BUCKETS, "--quiet"]) == 0
    assert "cached 0 new samples" in capsys.readouterr().out


def test_a_truncated_shard_keeps_the_samples_before_the_fault(corpus, tmp_path, caplog):
    shard = make_shards(corpus["data"], tmp_path / "shards", per_shard=100)[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut_at = next(m for m in members if m.name == "./clip_00002.mp4")  # the third clip's first member
    data = shard.read_bytes()
    shard.write_bytes(data[: cut_at.offset_data + cut_at.size // 2])
    assert cli_main(["cache", str(shard), str(tmp_path / "c"), "--model", str(corpus["model"]), *BUCKETS,
                     "--quiet"]) == 0
    assert "cannot read the shard" in caplog.text
    cached = sorted(r["source"] for _, r in CachedLatentDataset(tmp_path / "c").records)
    assert cached == ["clip_00000.mp4", "clip_00001.mp4"]


def test_tar_shards_stream_over_http(corpus, tmp_path, capsys):
    """Shards written by the `webdataset` package itself, served by a plain web server."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import webdataset

    (tmp_path / "shards").mkdir()
    with webdataset.ShardWriter(str(tmp_path / "shards" / "shard-%05d.tar"), maxcount=4) as sink:
        for media in sorted(p for p in corpus["data"].iterdir() if p.suffix != ".txt"):
            condition = media.with_suffix(".condition.txt")  # here as the JSON field (make_shards: a member)
            meta = {"source": "procedural", **({"condition_caption": condition.read_text()}
                                                if condition.is_file() else {})}
            sink.write({"__key__": media.stem, media.suffix[1:]: media.read_bytes(),
                        "txt": media.with_suffix(".txt").read_text(), "json": meta})
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 2
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(tmp_path / "shards"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{00000..00002}}.tar"  # the third is missing
        assert cli_main(["cache", url, str(tmp_path / "c"), "--model", str(corpus["model"]), *BUCKETS,
                         "--quiet"]) == 0
    finally:
        server.shutdown()
    assert "3 unreadable (skipped)" in capsys.readouterr().out  # noise.mp4, cut.mp4, the missing shard
    assert_same_cache(tmp_path / "c", corpus["reference"])


def test_tar_frames_sample_equals_its_frame_folder(corpus, tmp_path):
    """A sample stored as numbered PNG frames caches like the same frames as a frame folder listed in metadata."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("clip_00002.mp4", "clip_00002.txt", "clip_00002.condition.txt"):
        (data / name).write_bytes((corpus["data"] / name).read_bytes())
    make_shards(data, tmp_path / "shards", per_shard=10, frames_of="clip_00002")
    folder = tmp_path / "frames" / "clip_00002"
    folder.mkdir(parents=True)
    for i, frame in enumerate(read_video(data / "clip_00002.mp4")):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    caption = (data / "clip_00002.txt").read_text().strip()
    condition = (data / "clip_00002.condition.txt").read_text()
    (tmp_path / "frames" / "meta.jsonl").write_text(
        json.dumps({"path": "clip_00002", "caption": caption, "condition_caption": condition}) + "\n")
    model = str(corpus["model"])
    assert cli_main(["cache", str(tmp_path / "shards" / "shard-00000.tar"), str(tmp_path / "a"), "--model", model,
                     *BUCKETS, "--quiet"]) == 0
    assert cli_main(["cache", str(tmp_path / "frames" / "meta.jsonl"), str(tmp_path / "b"), "--model", model,
                     *BUCKETS, "--quiet"]) == 0
    assert_same_cache(tmp_path / "a", tmp_path / "b")
    assert by_key(tmp_path / "a").popitem()[1][0]["source"] == "clip_00002"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_one_process_cache(corpus, tmp_path):
    out = tmp_path / "two"
    # One process caches the first two clips; two processes then add the rest, skipping those.
    assert cli_main(["cache", str(corpus["data"]), str(out), "--model", str(corpus["model"]), *BUCKETS,
                     "--limit", "2", "--quiet"]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "motif_video.cli", "cache", str(corpus["data"]), str(out), "--model", str(corpus["model"]), *BUCKETS,
         "--batch-size", "2", "--quiet"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # one summary, from the first process
    assert result.stdout.count("cached 4 new samples") == 1 and "2 already cached" in result.stdout
    # each process of the second run wrote its own shards; one merged index, no part left
    shards = sorted(p.name for p in out.glob("shard-0002-*"))
    assert {name.split("-")[2] for name in shards} == {"00000", "00001"}
    assert not list(out.glob("index-*.json"))
    assert_same_cache(out, corpus["reference"])


def test_a_killed_cache_resumes(corpus, tmp_path):
    """Killed (SIGKILL) while streaming a shard after two samples; the next run keeps them and encodes the rest."""
    shard = make_shards(corpus["data"], tmp_path / "shards", per_shard=100)[0]
    # The stream: the first two samples, then a filler sample whose header lets the second one complete, then
    # nothing: the reader blocks there, so the kill lands at a known point.
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_two = [m for m in members if m[0].removeprefix("./").partition(".")[0] in ("clip_00000", "clip_00001")]
    assert len(first_two) == 6  # media, caption, condition caption
    head = b""
    for name, data in first_two + [("./filler.bin", bytes(1 << 16))]:  # no end-of-archive blocks
        info = tarfile.TarInfo(name)
        info.size = len(data)
        head += info.tobuf() + data + bytes(-len(data) % tarfile.BLOCKSIZE)
    fifo = tmp_path / "stream.tar"
    os.mkfifo(fifo)

    def feed():
        try:
            with open(fifo, "wb") as f:
                f.write(head)
                while not stop.is_set():
                    time.sleep(0.05)
        except BrokenPipeError:
            pass

    stop = threading.Event()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    out = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "motif_video.cli", "cache", str(fifo), str(out), "--model", str(corpus["model"]),
         *BUCKETS, "--batch-size", "1", "--shard-size", "1e-6", "--quiet"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        done = 0
        while done < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the cache never wrote its first samples"
            parts = list(out.glob("index-*.json"))
            done = len(json.loads(parts[0].read_text())["samples"]) if parts else 0
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert json.loads((out / "index.json").read_text())["samples"] == []  # killed before the merge

    assert cli_main(["cache", str(shard), str(out), "--model", str(corpus["model"]), *BUCKETS, "--quiet"]) == 0
    assert not list(out.glob("index-*.json")) and not list(out.glob("*.tmp"))
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["shards"]) == sorted(p.name for p in out.glob("shard-*"))  # nothing unindexed is left
    assert len({r["key"] for r in index["samples"]}) == len(index["samples"]) == 6
    assert_same_cache(out, corpus["reference"])


def test_caches_written_before_still_load_and_refuse_duplicating(corpus, tmp_path, capsys):
    # a cache of the earlier layout: counter keys, the text encoder by its install path
    old = tmp_path / "old"
    write_cached_samples(old, [CachedSample(torch.randn(16, 1, 4, 4), torch.randn(3, 32), caption="x")],
                         text_encoder=str(corpus["model"] / "text_encoder"))
    index = json.loads((old / "index.json").read_text())
    assert index["samples"][0]["key"] == "s00000000"
    ds = CachedLatentDataset(old, text_encoder=str(corpus["model"] / "text_encoder"))
    assert ds[0]["latents"].shape == (16, 1, 4, 4)
    # a training config naming the encoder by path or by its recorded name matches a new cache
    CachedLatentDataset(corpus["reference"], text_encoder=str(corpus["model"] / "text_encoder"))
    CachedLatentDataset(corpus["reference"], text_encoder="model/text_encoder")
    # caching into the old one would duplicate (its keys cannot be matched to clips): refused in one line
    assert cli_main(["cache", str(corpus["data"]), str(old), "--model", str(corpus["model"]), *BUCKETS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written before samples were keyed by their source clip" in err


@pytest.mark.parametrize("case", ["output-file", "foreign-folder", "fps-0", "fps-nan", "limit-0", "batch-0",
                                  "shard-size-0", "missing-shard", "not-a-shard", "other-fps", "locked",
                                  "unwritable"])
def test_bad_cache_input_is_one_line(corpus, tmp_path, capsys, case):
    model, data = str(corpus["model"]), str(corpus["data"])
    out = tmp_path / "out"
    args = ["cache", data, str(out), "--model", model, *BUCKETS]
    if case == "output-file":
        out.write_text("mine")
    elif case == "foreign-folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case in ("fps-0", "fps-nan"):
        args += ["--fps", case[4:]]
    elif case == "limit-0":
        args += ["--limit", "0"]
    elif case == "batch-0":
        args += ["--batch-size", "0"]
    elif case == "shard-size-0":
        args += ["--shard-size", "0"]
    elif case == "missing-shard":
        args[1] = str(tmp_path / "shard-{0..1}.tar")
    elif case == "not-a-shard":
        args[1] = "file://" + str(tmp_path / "*.txt")
        (tmp_path / "a.txt").write_text("x")
    elif case == "other-fps":
        out = corpus["reference"]
        args[2] = str(out)
        args += ["--fps", "12"]
    elif case == "locked":
        import fcntl

        out.mkdir()
        held = open(out / ".cache.lock", "a")
        fcntl.flock(held, fcntl.LOCK_EX)
    elif case == "unwritable":
        args[2] = "/proc/motif-video-cache"  # not writable even by root
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else None
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else None
    assert after == before  # the user's files are untouched
