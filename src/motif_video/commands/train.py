"""`motif-video train CONFIG [--override key=value ...] [--resume]`: train on cached latents.

One process per device: `python -m` / `motif-video` for one CPU or GPU, `accelerate launch` or `torchrun` for
several (see docs/training.md). CONFIG is a YAML/TOML file, or a run folder / checkpoint to resume with the config
saved in it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune the transformer on cached latents",
        description="Train from a YAML/TOML config (see configs/ and docs/training.md). Every checkpoint holds the "
                    "whole config, so a run folder or checkpoint can be given instead of a config to resume it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", help="config file (.yaml/.toml), or a run folder to resume (the folder given is the "
                                  "run: its checkpoints are read and new ones written there)")
    p.add_argument("--override", "-o", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="set a config value, e.g. optim.lr=1e-4 data.batch_size=8 routing=null (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in output_dir (starts fresh if there is none)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..train.checkpoint import checkpoint_step, list_checkpoints, resolve_checkpoint, run_folder
    from ..train.config import load_config
    from ..train.loop import train

    overrides = [item for group in args.override for item in group]
    source = Path(args.config)
    resume = args.resume
    if source.is_dir():
        # A run folder or checkpoint: its saved config, resumed (what else would one want from a run folder?).
        checkpoint = resolve_checkpoint(source)
        run = run_folder(source)
        if checkpoint == run:
            raise ConfigError(f"{source} is a checkpoint outside a run folder: put it under RUN/checkpoints/ to resume "
                              "it, or start a new run from its weights with stage.init_from")
        latest = list_checkpoints(run / "checkpoints")
        if checkpoint_step(source) >= 0 and latest and checkpoint != latest[-1]:
            raise ConfigError(f"{checkpoint} is not the run's latest checkpoint ({latest[-1].name}); a run resumes "
                              "from its latest: move the newer ones out of checkpoints/ to resume from this one")
        # The folder given is the run, wherever it was first written (moved or copied runs continue in place).
        config = load_config(checkpoint / "config.yaml", [f"output_dir={run}", *overrides])
        resume = True
    else:
        config = load_config(source, overrides)
    result = train(config, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per process
        print(f"trained to step {result.step}; last checkpoint: {result.checkpoint}")
    return 0
