"""The whole `motif-video generate` command for the distilled student against its teacher, interleaved.

Each round runs `motif-video generate PROMPT -o OUT --model M` once per model, in a fresh process, alternating the
order from round to round so that the machine's drifting speed hits both alike; the time is the whole command
(imports, loading the model, text encoding, sampling, decoding, writing the MP4) as a user waits for it, and the part
the command reports as generating (text encoding, sampling and decoding). Each model samples at the defaults in its
own folder (the teacher: 20 CFG steps; the student: 4 unguided steps).

    python benchmarks/fast_generate.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_cost import run_cli  # noqa: E402  (one fresh process per command, wall time and peak RSS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="motif-video-nano", help="teacher model (folder or built-in name)")
    parser.add_argument("--student", default="motif-video-nano-fast", help="student model (folder or built-in name)")
    parser.add_argument("--prompt", default="a blue square moving up")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/fast_generate.json")
    args = parser.parse_args()

    models = {"teacher": args.teacher, "student": args.student}
    seconds = {name: [] for name in models}
    generating = {name: [] for name in models}
    peaks = {name: [] for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = list(models) if round_ % 2 == 0 else list(reversed(models))
            for name in order:
                result = run_cli(["generate", args.prompt, "-o", str(Path(tmp) / f"{name}.mp4"),
                                  "--model", models[name], "--seed", str(round_), "--quiet"])
                seconds[name].append(result["seconds"])
                generating[name].append(float(re.search(r"\(([\d.]+) s generating\)", result["stdout"]).group(1)))
                peaks[name].append(result["peak_rss_mb"])
    summary = {name: {"median_seconds": statistics.median(seconds[name]), "seconds": seconds[name],
                      "median_generating_seconds": statistics.median(generating[name]),
                      "generating_seconds": generating[name], "peak_rss_mb": max(peaks[name])} for name in models}
    ratio = summary["teacher"]["median_seconds"] / summary["student"]["median_seconds"]
    print("| model | median seconds per `generate` | all runs | median s generating | peak RSS (MB) |\n"
          "|---|---:|---|---:|---:|")
    for name in models:
        s = summary[name]
        print(f"| {name} ({models[name]}) | {s['median_seconds']:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in s['seconds'])} | {s['median_generating_seconds']:.2f} | "
              f"{s['peak_rss_mb']:.0f} |")
    print(f"the student's command is {ratio:.2f}x faster")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "results": summary, "speedup": ratio,
                               "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
