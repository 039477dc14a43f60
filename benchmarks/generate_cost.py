"""Time and peak memory of `motif-video generate` modes at a small size, each in a fresh process.

Builds a random pipeline of a given preset in the release layout (plus a Q8_0 GGUF of its transformer), then runs
T2V, I2V, T2V from GGUF and T2V with VAE tiling through the real CLI. Prints a markdown table and writes JSON.

    python benchmarks/generate_cost.py --preset motif-video-small --height 128 --width 128 --frames 17 --steps 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import resource, sys, time
from motif_video.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print("RESULT", code, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run_cli(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None or line.split()[1] != "0":
        raise SystemExit(f"generate failed: {out.stderr.strip().splitlines()[-1:]}")
    _, _, seconds, peak = line.split()
    return {"seconds": float(seconds), "peak_rss_mb": float(peak), "stdout": out.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="motif-video-small")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", default="benchmarks/results/generate_cost.json")
    args = parser.parse_args()

    from PIL import Image

    from motif_video.cli import main as cli
    from motif_video.testing import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_pipeline(tmp / "model", preset_name=args.preset, text_embed_dim=32)
        cli(["quantize", str(model), str(tmp / "q8.gguf"), "--type", "q8_0", "--no-progress"])
        Image.fromarray(np.full((args.height, args.width, 3), 128, np.uint8)).save(tmp / "first.png")
        base = ["generate", "a red circle moving left", "--model", str(model), "--height", str(args.height),
                "--width", str(args.width), "--frames", str(args.frames), "--steps", str(args.steps), "--quiet"]
        modes = {
            "T2V": [],
            "I2V": ["--image", str(tmp / "first.png")],
            "T2V, GGUF Q8_0 transformer": ["--gguf", str(tmp / "q8.gguf")],
            "T2V, VAE tiling": ["--vae-tiling"],
        }
        results = {}
        for name, extra in modes.items():
            results[name] = run_cli([*base, "-o", str(tmp / "out.mp4"), *extra])
    print(f"| mode | seconds | peak RSS (MB) |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "results": results, "date": time.strftime("%Y-%m-%d")},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
