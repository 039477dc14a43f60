"""The training config: one typed dataclass tree, read from YAML or TOML, with `a.b=value` overrides.

Every problem (an unknown key, a wrong type, a value out of range) is found before any model is built and reported
as one `ConfigError` line naming the dotted key. Optional features (routing, alignment, validation, LoRA, stage
transitions) are sections that are `null` / absent when off. The resolved config is written into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from ..model.config import PRESETS, TransformerConfig


# -- sections ------------------------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    """The network to train: a preset, or a transformer folder (diffusers layout or ours), plus field overrides."""

    preset: str | None = None
    pretrained: str | None = None  # folder with config.json + safetensors; its weights are loaded
    # TransformerConfig fields; with `pretrained` only those that keep its weights' layout (e.g. rope_theta)
    overrides: dict[str, Any] = field(default_factory=dict)
    # The DDT decoder's init for a preset: "random", or "matched" (decoder token i reads encoder token i from step
    # 0; train.surgery.init_matched_decoder), whose Q/K skip the channels RoPE turns over `matched_grid`
    decoder_init: Literal["random", "matched"] = "random"
    matched_grid: list[int] = field(default_factory=lambda: [5, 4, 4])  # (T', H', W') tokens of the longest clips

    def validate(self, key: str) -> None:
        if (self.pretrained is None) == (self.preset is None):
            raise ConfigError(f"{key}: set exactly one of preset and pretrained")
        if len(self.matched_grid) != 3 or any(n < 1 for n in self.matched_grid):
            raise ConfigError(f"{key}.matched_grid must be three positive token counts (T', H', W')")
        if self.pretrained is None and self.preset not in PRESETS:
            raise ConfigError(f"{key}.preset: unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(TransformerConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ConfigError(f"{key}.overrides: unknown transformer field {unknown[0]!r}")

    def architecture(self) -> TransformerConfig | None:
        """The target architecture when it is fully described here (a preset); None for a `pretrained` folder."""
        if self.pretrained is not None:
            return None
        return TransformerConfig(**{**PRESETS[self.preset], **self.overrides})


@dataclass
class DataSection:
    cache_dirs: list[str] = field(default_factory=list)  # folders written by `motif-video cache`
    # GLOBAL batch (all ranks together; each rank takes batch_size / world_size), or per frame count {1: 64, 33: 16}
    batch_size: int | dict[int, int] = 4
    interleave: str | None = "I-V-V"  # order of image (I) and video (V) batches; "" or null mixes buckets freely
    buckets: list[str] | None = None  # keep only these bucket keys (None: all in the cache)
    text_encoder: str | None = None  # if set, every cache must have been written with this text encoder
    num_workers: int = 0
    # Samples per forward/backward on each process; a step accumulates ceil(per-process batch / this) of them and
    # equals the unsplit step. None: the whole per-process batch at once.
    micro_batch_size: int | None = None
    # The shard planner (train/planner.py): null = one bucket per step at batch_size; "greedy" or "annealed" =
    # mixed buckets balanced across ranks, each micro-batch filled up to planner_max_tokens latent tokens (null:
    # one sample of the largest bucket), planner_micro_batches per rank per step. batch_size and interleave are
    # then unused: a step holds what the plan puts in it.
    planner: Literal["greedy", "annealed"] | None = None
    planner_max_tokens: int | None = None
    planner_micro_batches: int = 1

    def validate(self, key: str) -> None:
        if not self.cache_dirs:
            raise ConfigError(f"{key}.cache_dirs: name at least one cached-latent folder")
        sizes = self.batch_size.values() if isinstance(self.batch_size, dict) else [self.batch_size]
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ConfigError(f"{key}.batch_size must be a positive integer or a map frame count -> positive integer")
        if self.num_workers < 0:
            raise ConfigError(f"{key}.num_workers must be >= 0")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"{key}.micro_batch_size must be >= 1 or null")
        if self.planner_max_tokens is not None and self.planner_max_tokens < 1:
            raise ConfigError(f"{key}.planner_max_tokens must be >= 1 or null")
        if self.planner_micro_batches < 1:
            raise ConfigError(f"{key}.planner_micro_batches must be >= 1")
        if self.planner is not None and self.micro_batch_size is not None:
            raise ConfigError(f"{key}.micro_batch_size does not apply with {key}.planner (the plan sizes each "
                              f"micro-batch by {key}.planner_max_tokens)")
        parts = [p for p in self.interleave.split("-") if p] if self.interleave else []
        if any(p not in ("I", "V") for p in parts):
            raise ConfigError(f"{key}.interleave={self.interleave!r}: use letters I and V joined by '-', e.g. I-V-V")


@dataclass
class ImageConditionSection:
    """Image-to-video training: a `probability` fraction of video samples is conditioned on its own first frame
    (the clean first latent frame in the condition channels, mask 1 on frame 0, SigLIP tokens of the frame where
    the cache holds them), exactly as generation conditions on a given image.

    The release documents no augmentation of the condition (its pipelines and ComfyUI nodes encode the image
    clean), so none is on by default; `noise_probability` of the conditioned samples get Gaussian noise of
    standard deviation `noise_std` on the condition latent, which makes the model lean less on pixel-exact first
    frames (an image that was not VAE-encoded from the same clip, a re-encoded JPEG).

    `text_dropout` (None: the objective's) is the fraction of conditioned samples trained with the empty prompt.
    Captions name the object's colour and shape, so a conditioned clip can be denoised from its caption alone; the
    clips trained without one are where the model must take the look from the image, which a prompt that names only
    a direction (or nothing) asks for at generation.

    `condition_caption` is the fraction of conditioned samples that, where the cache holds one, train with their
    clip's condition caption (`NAME.condition.txt` or a `condition_caption` column: what the first frame does not
    show, e.g. "moving to the left") in place of the caption. A prompt that names only the motion is what users of
    image-to-video write; a model that only saw full captions reads such a prompt as a description of some
    default object and overrides the image (measured on nano: docs/nano.md)."""

    probability: float = 0.5
    noise_probability: float = 0.0
    noise_std: float = 0.05
    text_dropout: float | None = None
    condition_caption: float = 0.0

    def validate(self, key: str) -> None:
        for name in ("probability", "noise_probability", "text_dropout", "condition_caption"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}.{name} must be in [0, 1], got {value}")
        if self.noise_std < 0:
            raise ConfigError(f"{key}.noise_std must be >= 0, got {self.noise_std}")


@dataclass
class ObjectiveSection:
    """Rectified flow matching. t = shift(sigmoid(N(logit_mean, logit_std))); shift is unknown for Motif (their
    internal base checkpoint used 2.5); 1.0 (no shift) suits small latents, larger shifts push training toward
    noisier timesteps, which high resolutions need."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    text_dropout: float = 0.1  # CFG: fraction of samples trained with the empty prompt
    # distill: few-step distillation on cached teacher trajectories (train/distill.py; data.cache_dirs are
    # `motif-video distill-data` folders, the fields above are unused); encoder_refresh: the student's sampling
    # steps that run the encoder (the rest reuse it, as the pipeline's encoder_refresh), null: every step;
    # rollout_fraction: the fraction of samples whose segment starts from the student's own sampled state;
    # segment_weights: how often each student step is trained, relative (null: uniformly)
    kind: Literal["flow", "distill"] = "flow"
    encoder_refresh: list[int] | None = None
    rollout_fraction: float = 0.0
    segment_weights: list[float] | None = None
    image_condition: ImageConditionSection | None = None  # None: text-to-video only

    def validate(self, key: str) -> None:
        if self.encoder_refresh is not None and self.kind != "distill":
            raise ConfigError(f"{key}.encoder_refresh applies to kind: distill only")
        if self.rollout_fraction and self.kind != "distill":
            raise ConfigError(f"{key}.rollout_fraction applies to kind: distill only")
        if not 0.0 <= self.rollout_fraction <= 1.0:
            raise ConfigError(f"{key}.rollout_fraction must be in [0, 1], got {self.rollout_fraction}")
        if self.segment_weights is not None:
            if self.kind != "distill":
                raise ConfigError(f"{key}.segment_weights applies to kind: distill only")
            if min(self.segment_weights, default=-1) < 0 or sum(self.segment_weights) <= 0:
                raise ConfigError(f"{key}.segment_weights must be >= 0 with a positive sum, got {self.segment_weights}")
        if self.image_condition is not None:
            self.image_condition.validate(f"{key}.image_condition")
        if self.logit_std <= 0:
            raise ConfigError(f"{key}.logit_std must be > 0, got {self.logit_std}")
        if self.shift <= 0:
            raise ConfigError(f"{key}.shift must be > 0, got {self.shift}")
        if not 0.0 <= self.text_dropout <= 1.0:
            raise ConfigError(f"{key}.text_dropout must be in [0, 1], got {self.text_dropout}")


@dataclass
class RoutingSection:
    """TREAD (see motif_video.routing): layer indices are absolute over dual -> single -> decoder blocks;
    negative values count from the end."""

    selection_ratio: float = 0.5
    start_layer: int = 2
    end_layer: int = -4

    def validate(self, key: str) -> None:
        if not 0.0 <= self.selection_ratio < 1.0:
            raise ConfigError(f"{key}.selection_ratio must be in [0, 1), got {self.selection_ratio}")


@dataclass
class AlignmentSection:
    """REPA: align the tokens after `block` with a frozen teacher's patch features, until `stop_step`."""

    teacher: str = "dinov2"  # name recorded in the cache's teacher features (dinov2, vjepa2, or a model id)
    block: int = 2  # absolute block index whose output is aligned
    weight: float = 0.5
    stop_step: int | None = None  # None: for the whole stage
    projector_dim: int = 2048

    def validate(self, key: str) -> None:
        if self.weight < 0:
            raise ConfigError(f"{key}.weight must be >= 0")
        if self.block < 0:
            raise ConfigError(f"{key}.block must be >= 0")
        if self.stop_step is not None and self.stop_step < 0:
            raise ConfigError(f"{key}.stop_step must be >= 0")


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    steps: int = 1000

    def validate(self, key: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{key}.betas must be in [0, 1), got {list(self.betas)}")
        if self.steps < 1:
            raise ConfigError(f"{key}.steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"{key}.warmup_steps must be in [0, steps], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{key}.min_lr_ratio must be in [0, 1]")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError(f"{key}: weight_decay must be >= 0 and eps > 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"{key}.grad_clip must be > 0 or null")


@dataclass
class EmaSection:
    enabled: bool = True
    decay: float = 0.9999

    def validate(self, key: str) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"{key}.decay must be in (0, 1), got {self.decay}")


@dataclass
class ParallelSection:
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (less memory, more traffic)
    ulysses: int = 1  # sequence parallelism: each sample's video tokens over ulysses x ring processes
    ring: int = 1

    def validate(self, key: str) -> None:
        for name in ("ulysses", "ring"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be at least 1")


@dataclass
class LoggingSection:
    tensorboard: str | None = "tensorboard"  # event-file folder (relative: inside output_dir); null: off
    every: int = 10  # steps between log lines (log.jsonl, TensorBoard)
    progress: bool = True  # tqdm bar on the main process

    def validate(self, key: str) -> None:
        if self.every < 1:
            raise ConfigError(f"{key}.every must be >= 1")


@dataclass
class CheckpointSection:
    every: int = 1000
    keep_last: int = 3
    save_final: bool = True

    def validate(self, key: str) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ConfigError(f"{key}: every and keep_last must be >= 1")


@dataclass
class ValidationSection:
    """A fixed-noise, fixed-timestep loss on held-out cached clips (always available), and sample videos for
    `prompts` when a generation pipeline with a text encoder and VAE is given (optional)."""

    every: int = 500
    cache_dir: str | None = None  # held-out cache; None: the first `num_samples` training samples
    num_samples: int = 8
    prompts: list[str] = field(default_factory=list)
    pipeline: str | None = None  # a model folder with text_encoder/, tokenizer/, vae/ for sample videos
    num_inference_steps: int = 30
    width: int = 256
    height: int = 256
    num_frames: int = 17
    # A first frame (image file) for an image-to-video sample video with the first prompt. None, with
    # objective.image_condition on: the first validation clip's own first frame (decoded from its cached latent)
    # and caption.
    image: str | None = None

    def validate(self, key: str) -> None:
        if self.image is not None and (self.pipeline is None or not self.prompts):
            raise ConfigError(f"{key}.image needs {key}.pipeline (a folder with the text encoder and VAE) and a "
                              f"prompt in {key}.prompts")
        if self.every < 1 or self.num_samples < 1:
            raise ConfigError(f"{key}: every and num_samples must be >= 1")
        if self.prompts and self.pipeline is None:
            raise ConfigError(f"{key}.prompts need {key}.pipeline (a folder with the text encoder and VAE)")


# Attention projections, named as in diffusers' MotifVideoTransformer3DModel (so adapters load there too).
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Named target sets for `lora.target_modules`: full-match patterns over module names (a bare `proj_out` would also
# match every single block's `proj_out`, so the output head is named by its full name).
_ATTENTION = r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_CROSS_ATTENTION = r".*\.cross_attn\.(query_proj|out_proj)"  # the tied form's own layers (K/V are the block's)
_MLP = r".*\.(ff|ff_context)\.net\.(0\.proj|2)|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
_CONDITION_EMBEDDERS = r"(context_embedder|image_embedder)\.linear_[12]"
_OUTPUT_HEAD = r"proj_out|norm_out\.linear"
_MODULATION = r".*\.(norm1|norm1_context|norm)\.linear|time_text_embed\.timestep_embedder\.linear_[12]"
LORA_TARGET_PRESETS = {
    "attention": [_ATTENTION],
    "attention+mlp": [_ATTENTION, _CROSS_ATTENTION, _MLP],
    "all-linear": [_ATTENTION, _CROSS_ATTENTION, _MLP, _CONDITION_EMBEDDERS, _OUTPUT_HEAD, _MODULATION],
}


@dataclass
class LoraSection:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # module-name suffixes, or a preset name from LORA_TARGET_PRESETS
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def validate(self, key: str) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError(f"{key}: rank must be >= 1 and alpha > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules not in LORA_TARGET_PRESETS:
            raise ConfigError(f"{key}.target_modules={self.target_modules!r}: give a list of module names or one of "
                              f"the presets {', '.join(LORA_TARGET_PRESETS)}")
        if not self.target_modules:
            raise ConfigError(f"{key}.target_modules must name at least one module")

    def peft_targets(self) -> list[str] | str:
        """PEFT's `target_modules`: the list of name suffixes as given, or a preset as one full-match regex."""
        if isinstance(self.target_modules, str):
            return "(" + "|".join(f"(?:{p})" for p in LORA_TARGET_PRESETS[self.target_modules]) + ")"
        return list(self.target_modules)


TRANSITIONS = ("switch_text_encoder", "insert_shared_cross_attention")


@dataclass
class StageSection:
    """Curriculum stage: start from the previous stage's checkpoint and apply the listed architecture changes.

    `switch_text_encoder` re-initialises `context_embedder` for the text dim in `model`; `insert_shared_cross_attention`
    adds zero-initialised Shared Cross-Attention (form from model.overrides.cross_attention_form, default tied).
    """

    name: str = ""
    init_from: str | None = None  # a checkpoint folder, or a run's output_dir (its latest checkpoint)
    init_weights: Literal["ema", "model"] = "ema"
    transitions: list[str] = field(default_factory=list)

    def validate(self, key: str) -> None:
        bad = [t for t in self.transitions if t not in TRANSITIONS]
        if bad:
            raise ConfigError(f"{key}.transitions: unknown {bad[0]!r}; choose from: {', '.join(TRANSITIONS)}")
        if self.transitions and self.init_from is None:
            raise ConfigError(f"{key}.transitions need {key}.init_from (a checkpoint to transform)")


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    routing: RoutingSection | None = None
    alignment: AlignmentSection | None = None
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EmaSection = field(default_factory=EmaSection)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    grad_checkpointing: bool = False
    # torch.compile each transformer block in place (regional: one graph per block kind), inside the FSDP2 wrapping
    compile: bool = False
    compile_backend: str = "inductor"  # "aot_eager": the same graphs without code generation (tests, debugging)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpointing: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection | None = None
    lora: LoraSection | None = None
    stage: StageSection | None = None

    def validate(self) -> "TrainConfig":
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        if self.stage is not None and self.stage.init_from is not None and self.model.pretrained is not None:
            raise ConfigError("stage.init_from and model.pretrained both give starting weights: keep one")
        if self.objective.kind == "distill" and self.alignment is not None:
            raise ConfigError("alignment (REPA) needs cached teacher features; objective.kind: distill has none")
        if self.objective.kind == "distill" and self.objective.encoder_refresh and self.routing is not None:
            raise ConfigError("objective.encoder_refresh (encoder reuse) cannot be combined with routing")
        if self.lora is not None and self.stage is not None and self.stage.transitions:
            raise ConfigError("lora with stage.transitions: a LoRA run cannot change the base architecture")
        arch = self.model.architecture()
        if arch is not None:
            if self.routing is not None:
                try:
                    self.route_config().resolve(arch.num_blocks)
                except ConfigError as e:
                    raise ConfigError(f"routing: {e}") from None
            if self.alignment is not None and self.alignment.block >= arch.num_blocks:
                raise ConfigError(f"alignment.block={self.alignment.block} but the model has {arch.num_blocks} blocks")
        return self

    def route_config(self):
        from ..routing import RouteConfig

        r = self.routing
        return None if r is None else RouteConfig(r.selection_ratio, r.start_layer, r.end_layer)

    def to_dict(self) -> dict:
        return _to_plain(self)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# -- loading -------------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None
                ) -> TrainConfig:
    """A validated TrainConfig from a YAML/TOML file (or a dict), with `a.b=value` overrides applied on top."""
    raw: dict = {}
    if path is not None:
        raw = read_config_file(Path(path))
    if data is not None:
        raw = _deep_merge(raw, data)
    for item in overrides or []:
        apply_override(raw, item)
    config = _build(TrainConfig, raw, "")
    return config.validate()


def read_config_file(path: Path, _seen: tuple = ()) -> dict:
    """The file's mapping; a top-level `include: [files]` is merged underneath it (paths relative to the file)."""
    if path.resolve() in _seen:
        raise ConfigError(f"config include cycle at {path}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    else:
        raise ConfigError(f"config {path}: use a .yaml, .yml or .toml file")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    base: dict = {}
    for inc in includes:
        base = _deep_merge(base, read_config_file(path.parent / inc, _seen + (path.resolve(),)))
    return _deep_merge(base, raw)


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`, value parsed as YAML (numbers, true/false, null, [lists], {maps})."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: use key=value, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, key: str):
    """`value` checked (and gently converted: ints to floats, '1e-4' strings to floats) against type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be null")
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if value is None:
        raise ConfigError(f"{key} must not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (a mapping), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        out = {}
        for k, v in value.items():
            if key_type is int and isinstance(k, str):  # TOML keys are always strings
                try:
                    k = int(k)
                except ValueError:
                    raise ConfigError(f"{key}: key {k!r} must be an integer") from None
            out[_coerce(key_type, k, f"{key} key")] = _coerce(value_type, v, f"{key}[{k}]")
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover - schema bug


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r}; known here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value

