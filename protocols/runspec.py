"""The run spec: one typed, validated description of a training run.

The same spec is read by every peer (and, later, published by the coordinator and announced in the
DHT). Load it with :func:`load_run_spec`; a bad spec raises :class:`RunSpecError` whose message names
every offending field and, where the field is an enumeration, the allowed values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

_RUN_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    name_or_path: str = Field(min_length=1)
    """A Hugging Face hub id (``org/name``) or a local folder written by ``save_pretrained``."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; defaults to ``name_or_path``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; ignored for local folders."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype. Keep float32 on CPU; bfloat16 halves memory on recent GPUs."""


class NoAdapter(_Strict):
    kind: Literal["none"] = "none"
    """Full fine-tuning: every parameter is trainable and averaged."""


class LoraAdapter(_Strict):
    kind: Literal["lora"]
    r: int = Field(8, ge=1)
    """LoRA rank. Raise it if the task underfits; the bytes averaged per step grow linearly with it."""
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]
    """Module names to wrap (Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)."""


class PrefixTuningAdapter(_Strict):
    kind: Literal["prefix"]
    num_virtual_tokens: int = Field(8, ge=1)


class PTuningAdapter(_Strict):
    kind: Literal["p_tuning"]
    num_virtual_tokens: int = Field(8, ge=1)
    encoder_hidden_size: int = Field(128, ge=1)
    """Hidden size of the prompt encoder MLP that produces the virtual tokens."""


class PromptTuningAdapter(_Strict):
    kind: Literal["prompt_tuning"]
    num_virtual_tokens: int = Field(8, ge=1)


AdapterSpec = Annotated[
    NoAdapter | LoraAdapter | PrefixTuningAdapter | PTuningAdapter | PromptTuningAdapter,
    Field(discriminator="kind"),
]
ADAPTER_KINDS = ("none", "lora", "prefix", "p_tuning", "prompt_tuning")


class DataSpec(_Strict):
    path: str = Field(min_length=1)
    """A local JSONL file, or a Hugging Face ``datasets`` path (loaded with ``datasets.load_dataset``)."""
    split: str = "train"
    """Split to read when ``path`` is a ``datasets`` path."""
    format: Literal["auto", "prompt_completion", "messages", "text"] = "auto"
    """TRL's dataset formats; ``auto`` picks by the columns of the first row."""
    max_length: int = Field(256, ge=8)
    """Examples are truncated to this many tokens."""
    eval_path: str | None = None
    """Optional held-out JSONL (same format) for ``potluck evaluate`` and the demo's before/after table."""


class OptimizerSpec(_Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up, counted in global steps (the swarm's optimizer steps)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up, over ``max_global_steps``."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Clip each peer's local gradient to this norm before accumulation; null disables clipping."""


class BatchSpec(_Strict):
    per_peer_batch_size: int = Field(ge=1)
    """Samples one peer processes per local step (its micro-batch)."""
    target_batch_size: int = Field(ge=1)
    """Samples the whole swarm accumulates per global step. Larger = fewer averaging rounds per sample."""

    @field_validator("target_batch_size")
    @classmethod
    def _target_holds_a_peer_batch(cls, target: int, info: ValidationInfo) -> int:
        per_peer = info.data.get("per_peer_batch_size")
        if per_peer is not None and target < per_peer:
            raise ValueError(
                f"must be >= per_peer_batch_size ({per_peer}): a global step holds at least one local batch"
            )
        return target


class AveragingSpec(_Strict):
    strategy: Literal["gradient"] = "gradient"
    """How peers combine their work: ``gradient`` averages accumulated gradients every global step."""
    matchmaking_time: float = Field(1.0, gt=0)
    """Seconds a peer waits to gather a group before averaging. Raise it if peers often average alone
    (``potluck_averaging_rounds_total{outcome="failed"}`` grows) on slow or distant links."""
    averaging_timeout: float = Field(30.0, gt=0)
    """Seconds before an averaging round is abandoned and the peer steps with its local gradients."""
    load_state_timeout: float = Field(60.0, gt=0)
    """Seconds one attempt to download the swarm's state may take before trying another donor."""
    load_state_attempts: int = Field(3, ge=1)
    """Attempts to download state before continuing from local state (hivemind would retry forever)."""
    compression: Literal["none", "fp16", "scaled_fp16", "uint8", "quantile_8bit"] = "none"
    """Compression of averaged gradients; ``none`` keeps peers bit-for-bit in step."""
    average_state_every: int = Field(1, ge=1)
    """Average parameters and optimizer statistics every N global steps, to undo drift from failed rounds."""


class CheckpointSpec(_Strict):
    save_every: int = Field(50, ge=1)
    """Write a checkpoint to ``--save-dir`` every N global steps (and always at the end)."""
    keep: int = Field(2, ge=0)
    """Checkpoints to keep in ``--save-dir``; 0 keeps all."""


class RunSpec(_Strict):
    run_id: str = Field(pattern=_RUN_ID_PATTERN)
    """Names the run in the DHT; every key of the run is prefixed by it. Lowercase, digits, ``-`` and ``_``."""
    model: ModelSpec
    adapter: AdapterSpec = NoAdapter()
    data: DataSpec
    stage: Literal["sft"] = "sft"
    """Training stage; it decides how batches are built and which loss is computed."""
    optimizer: OptimizerSpec = OptimizerSpec()
    batch: BatchSpec
    max_global_steps: int = Field(1000, ge=1)
    """The run ends when the swarm reaches this many global steps."""
    averaging: AveragingSpec = AveragingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    seed: int = 0
    """Seeds adapter initialisation (identical on every peer) and, with the peer id, each peer's data order."""

    def resolve_paths(self, base: Path) -> RunSpec:
        """Return a copy whose relative local paths are resolved against ``base`` (the spec's folder)."""

        def resolve(value: str | None) -> str | None:
            if value is None or not value.startswith(("./", "../")):
                return value
            return str((base / value).resolve())

        return self.model_copy(
            update={
                "model": self.model.model_copy(
                    update={
                        "name_or_path": resolve(self.model.name_or_path),
                        "tokenizer": resolve(self.model.tokenizer),
                    }
                ),
                "data": self.data.model_copy(
                    update={"path": resolve(self.data.path), "eval_path": resolve(self.data.eval_path)}
                ),
            }
        )


class RunSpecError(ValueError):
    """A run spec that failed validation; ``str()`` names every bad field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid run spec {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc if not re.fullmatch(r"function-after\[.*\]", str(p))]
    # pydantic puts the discriminated union's tag in the path (adapter.lora.r); users wrote adapter.r
    return ".".join(
        p for i, p in enumerate(parts) if not (i > 0 and parts[i - 1] == "adapter" and p in ADAPTER_KINDS)
    )


def _describe(error: dict[str, Any]) -> str:
    loc = _field_path(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return f"{loc}: required field is missing"
    if kind == "extra_forbidden":
        return f"{loc}: unknown field"
    if kind == "union_tag_invalid":
        return (
            f"{loc}.kind: unknown value {error['input'].get('kind')!r}; allowed: {', '.join(ADAPTER_KINDS)}"
        )
    if kind == "union_tag_not_found":
        return f"{loc}.kind: required field is missing; allowed: {', '.join(ADAPTER_KINDS)}"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    suffix = f" (got {given!r})" if given is not None and not isinstance(given, dict | list) else ""
    return f"{loc or '<root>'}: {message}{suffix}"


def parse_run_spec(raw: Any, source: str = "<spec>") -> RunSpec:
    """Validate an already-parsed mapping (from YAML, JSON or the wire)."""
    if not isinstance(raw, dict):
        raise RunSpecError(source, [f"<root>: expected a mapping of fields, got {type(raw).__name__}"])
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as e:
        raise RunSpecError(source, [_describe(err) for err in e.errors()]) from None


def load_run_spec(path: str | Path) -> RunSpec:
    """Load and validate a YAML run spec; relative paths in it are resolved against its folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RunSpecError(str(path), [f"cannot read the file: {e.strerror}"]) from None
    except yaml.YAMLError as e:
        raise RunSpecError(str(path), [f"not valid YAML: {e}"]) from None
    return parse_run_spec(raw, str(path)).resolve_paths(path.parent)
