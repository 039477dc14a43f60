"""Transformer forward time: this tree's model against the model of an earlier commit, side by side.

The earlier commit's `motif_video` package is extracted with `git archive` and imported under another name, so both
models live in one process with the same weights and inputs; their forwards alternate (old, new, old, new, ...) so
that other load on the machine hits both alike. Reported per case: the fastest and the median forward of each, in wall
time and in this thread's CPU time (less disturbed by other jobs on a shared machine), the ratios new / old of the
medians (below 1: the new code is faster), the same ratio for a second copy of the old model (how far the ratio
moves with nothing changed: the noise floor), and whether the outputs are bit-identical.

Cases: the shipped nano model at its generation size (batch 2: the conditional and unconditional passes of
guidance, a padded prompt in the batch), where fixed per-block costs weigh most, and the small preset at
17x128x128, where the matmuls dominate.

    OMP_NUM_THREADS=1 python benchmarks/forward_speed.py --old 63a202c
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def import_old_package(commit: str, folder: Path):
    """The `motif_video` package of `commit`, imported as `motif_video_old` (its imports are relative)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src/motif_video"], check=True,
                             capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder, filter="data")
    init = folder / "src" / "motif_video" / "__init__.py"
    spec = importlib.util.spec_from_file_location("motif_video_old", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["motif_video_old"] = module
    spec.loader.exec_module(module)
    return module


def case_inputs(config, batch: int, latent: tuple[int, int, int], text_len: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *latent, generator=gen)
    t = torch.full((batch,), 700.0)
    text = torch.randn(batch, text_len, config.text_embed_dim, generator=gen)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[-1, text_len // 2:] = 0  # a padded prompt in the batch: the masked attention path
    return x, t, text, mask


def time_case(models: dict, inputs, repeats: int) -> dict:
    """Wall and CPU (this thread's) seconds per forward of each model, the order rotating every round."""
    names = list(models)
    samples = {name: {"wall": [], "cpu": []} for name in names}
    with torch.no_grad():
        outs = {name: model(*inputs) for name, model in models.items()}  # warm-up (and the RoPE caches)
        for round_ in range(repeats):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                wall, cpu = time.perf_counter(), time.thread_time()
                models[name](*inputs)
                samples[name]["cpu"].append(time.thread_time() - cpu)
                samples[name]["wall"].append(time.perf_counter() - wall)
    stats = (min, statistics.median)
    result = {name: {f"{kind}_{stat.__name__}_s": stat(v) for kind, v in times.items() for stat in stats}
              for name, times in samples.items()}
    for name in names[1:]:
        for kind in ("wall", "cpu"):
            result[f"ratio_{name}_over_old_{kind}_median"] = (result[name][f"{kind}_median_s"]
                                                              / result["old"][f"{kind}_median_s"])
    result["outputs_identical"] = bool(torch.equal(outs["old"], outs["new"]))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="63a202c", help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=200, help="timed forwards of each model (nano case)")
    parser.add_argument("--json", default="benchmarks/results/forward_speed.json")
    args = parser.parse_args(argv)

    from motif_video import MotifVideoTransformer
    from motif_video.commands.generate import DEFAULT_MODEL_DIR

    torch.manual_seed(0)
    shipped = json.loads((DEFAULT_MODEL_DIR / "motif_video.json").read_text())["generation"]
    nano_latent = ((shipped["num_frames"] - 1) // 4 + 1, shipped["height"] // 8, shipped["width"] // 8)
    cases = {
        "nano (shipped weights)": (lambda: MotifVideoTransformer.from_pretrained(DEFAULT_MODEL_DIR, "transformer",
                                                                                  torch_dtype=torch.float32),
                                   2, nano_latent, 16, args.repeats),
        "small 17x128x128": (lambda: MotifVideoTransformer.from_preset("motif-video-small", text_embed_dim=64),
                             2, (5, 16, 16), 32, max(4, args.repeats // 20)),
    }
    results = {"old_commit": args.old, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.machine(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        old_package = import_old_package(args.old, Path(tmp))
        for name, (build, batch, latent, text_len, repeats) in cases.items():
            new_model = build().eval()
            models = {"old": None, "new": new_model, "old_copy": None}
            for copy in ("old", "old_copy"):  # a second copy of the old model: the noise floor of the ratio
                models[copy] = old_package.MotifVideoTransformer(**new_model.config.to_dict()).eval()
                models[copy].load_state_dict(new_model.state_dict())
            inputs = case_inputs(new_model.config, batch, latent, text_len)
            results["cases"][name] = {"batch": batch, "latent": list(latent), "repeats": repeats,
                                      **time_case(models, inputs, repeats)}
            r = results["cases"][name]
            print(f"{name:24s} median cpu: old {r['old']['cpu_median_s'] * 1e3:8.2f} ms  new "
                  f"{r['new']['cpu_median_s'] * 1e3:8.2f} ms  ratio new/old: "
                  f"cpu {r['ratio_new_over_old_cpu_median']:.3f}  wall {r['ratio_new_over_old_wall_median']:.3f}  "
                  f"(old copy / old: cpu {r['ratio_old_copy_over_old_cpu_median']:.3f})  "
                  f"identical outputs: {r['outputs_identical']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
