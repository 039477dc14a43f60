"""LoRA adapters for served jobs: the one place that calls the pipeline's LoRA methods (diffusers names).

Requests name files inside --lora-dir (motif_video.serve.params.lora_files); the worker switches the pipeline to a
job's LoRA set before generating, and only when the set changes (batches hold jobs with equal sets).
"""

from __future__ import annotations

from pathlib import Path

from motif_video.errors import MotifVideoError

LORA_METHODS = ("load_lora_weights", "set_adapters", "unload_lora_weights")


def lora_supported(pipe) -> bool:
    return all(callable(getattr(pipe, name, None)) for name in LORA_METHODS)


class LoraState:
    """The LoRA set currently applied to one pipeline."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.active: list[list] = []  # sorted [name, scale] pairs

    def apply(self, loras: list[list], files: dict[str, Path]) -> None:
        """Make `loras` (sorted [name, scale] pairs) the pipeline's adapters; [] removes them all."""
        loras = [list(x) for x in loras]
        if loras == self.active:
            return
        if self.active:
            self.pipe.unload_lora_weights()
            self.active = []
        if loras:
            missing = [name for name, _ in loras if name not in files]
            if missing:  # removed from --lora-dir after the job was accepted
                raise MotifVideoError(f"LoRA {missing[0]!r} is no longer in the LoRA folder")
            try:
                for name, _ in loras:
                    self.pipe.load_lora_weights(str(files[name]), adapter_name=name)
                self.pipe.set_adapters([n for n, _ in loras], [s for _, s in loras])
            except BaseException:
                # A set that failed half-way must not stay on for the next job, which thinks it has none.
                self.pipe.unload_lora_weights()
                raise
            self.active = loras
