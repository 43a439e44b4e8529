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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from potluck.protocols.access import owner_public_key

_RUN_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class QuantizationSpec(_Strict):
    kind: Literal["none", "8bit", "4bit"] = "none"
    """Store the frozen base weights of the model's linear layers in 8 or 4 bits (bitsandbytes; QLoRA with a
    ``lora`` adapter), on trainers and shard servers; adapters, embeddings, norms and the LM head stay in full
    precision, so a quantised peer and an unquantised one train and average the same adapter tensors. 4-bit
    holds about a quarter of the float16 base; use it when the model does not fit, at some cost in quality.
    Needs the ``quant`` extra (``pip install 'potluck[quant]'``)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """(4bit) The 4-bit data type: ``nf4`` (QLoRA's NormalFloat, for normally distributed weights) or ``fp4``."""
    double_quant: bool = True
    """(4bit) Quantise the quantisation constants too (QLoRA's double quantisation): about 0.4 bits less per
    weight."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """(4bit) The dtype 4-bit weights are dequantised to for each matrix multiply; unset: ``model.dtype``.
    bfloat16 is QLoRA's choice on GPUs; keep float32 on CPU."""

    @field_validator("quant_type", "double_quant", "compute_dtype")
    @classmethod
    def _only_for_4bit(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if kind is not None and kind != "4bit" and value != cls.model_fields[info.field_name].default:
            raise ValueError(f"only used with kind '4bit' (kind is {kind!r})")
        return value


class ModelSpec(_Strict):
    name_or_path: str = Field(min_length=1)
    """A Hugging Face hub id (``org/name``) or a local folder written by ``save_pretrained``."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; defaults to ``name_or_path``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; ignored for local folders."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype. Keep float32 on CPU; bfloat16 halves memory on recent GPUs."""
    quantization: QuantizationSpec = QuantizationSpec()
    """Frozen base weights in 8 or 4 bits (``kind``, or just ``quantization: 4bit``); needs an adapter, since a
    full fine-tune would train the quantised weights themselves. Peers of one run may differ here (a small GPU
    quantises, a large one need not): it changes what a peer holds, not what the swarm averages."""

    @field_validator("quantization", mode="before")
    @classmethod
    def _kind_alone(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @property
    def quantized(self) -> bool:
        return self.quantization.kind != "none"


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


class IA3Adapter(_Strict):
    kind: Literal["ia3"]
    target_modules: list[str] | None = None
    """Modules whose activations IA3 rescales; none given: peft's choice for the architecture (Llama: k_proj,
    v_proj, down_proj). Far fewer tensors to average than LoRA; raise to LoRA if the task underfits."""
    feedforward_modules: list[str] = []
    """Those of ``target_modules`` that are feed-forward layers (their input is rescaled, not their output)."""

    @field_validator("feedforward_modules")
    @classmethod
    def _feedforward_among_targets(cls, modules: list[str], info: ValidationInfo) -> list[str]:
        targets = info.data.get("target_modules")
        if modules and targets is None:
            raise ValueError(
                "needs target_modules too (without them peft picks both lists for the architecture)"
            )
        outside = [m for m in modules if m not in targets]
        if outside:
            raise ValueError(f"must be among target_modules ({targets}); not there: {outside}")
        return modules


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
    NoAdapter | LoraAdapter | IA3Adapter | PrefixTuningAdapter | PTuningAdapter | PromptTuningAdapter,
    Field(discriminator="kind"),
]
ADAPTER_KINDS = ("none", "lora", "ia3", "prefix", "p_tuning", "prompt_tuning")


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
    max_nonfinite_losses: int = Field(0, ge=0)
    """Local batches whose loss is NaN or Inf a peer skips (no backward: nothing reaches the swarm) before it
    stops with an error; 0 stops at the first. Raise it (e.g. 10) for float16 runs whose loss overflows now and
    then; a peer that stops on every run points at a learning rate that diverges or weights that hold NaN."""


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


class AggregatorSpec(_Strict):
    kind: Literal["mean", "trimmed_mean", "median", "centered_clip"] = "mean"
    """How the peer that reduces a chunk of the averaged tensors combines the group's values: ``mean`` weights
    each by the samples its sender claims (hivemind's; one malicious peer moves it anywhere); the others
    ignore the claimed weights and bound what one sender can do (``hivemind_ext/aggregators.py``,
    docs/security.md), at some cost in how fast honest peers learn. Every averaged tensor uses it: gradients,
    parameters and optimizer statistics, DiLoCo's pseudo-gradients, a span's LoRA replicas."""
    trim: float = Field(0.25, ge=0, lt=0.5)
    """(trimmed_mean) Fraction of the largest and of the smallest values dropped per coordinate: a group of n
    drops floor(trim × n) at each end (at least 1), so it bounds that many attackers in the group (3 of 8 need
    0.375)."""
    clip_radius: float | None = Field(None, gt=0)
    """(centered_clip) L2 radius a sender's difference from the centre is clipped to, per chunk; unset: the
    median distance of the senders from their median, each round."""
    iterations: int = Field(10, ge=1, le=100)
    """(centered_clip) Clipping iterations."""
    outlier_norm: float = Field(5.0, gt=1)
    """(robust kinds) A sender whose chunk's L2 norm is over this many times the group's median is left out
    of that chunk, logged with its peer id and counted (``potluck_refused_averaging_parts``)."""
    weight_cap: float | None = Field(4.0, gt=1)
    """(mean) A sender's claimed weight (its samples) counts for at most this many times the median of the other
    senders' in a round, so a peer that inflates its sample count counts for a few honest peers, not for the
    swarm; a capped sender is logged with its peer id and counted (``potluck_capped_averaging_weights``). Honest
    peers' gradients are estimates of the same gradient: weighting them differently does not bias the step.
    null: each sender counts for what it claims (hivemind's)."""

    attackers: int = Field(1, ge=1, le=64)
    """(robust kinds) How many malicious peers one averaging group must outvote. Groups smaller than the rule
    needs for that many do not average, and matchmaking waits for one that large (``min_group_size``): 2f + 1
    for ``median`` and ``centered_clip``, and under ``trimmed_mean`` also floor(trim × n) ≥ f (3 of 8 with
    ``trim`` 0.375: groups of 8). A rule applies per group, and groups are drawn from the swarm, so count every
    attacker the run may hold: with the default 1, three attackers meeting in a group of 3–5 were not bounded
    (docs/security.md). Peers of a run smaller than that group step alone."""

    @field_validator("trim", "clip_radius", "iterations", "outlier_norm", "weight_cap", "attackers")
    @classmethod
    def _only_for_its_kind(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        used_by = {
            "trim": ("trimmed_mean",),
            "clip_radius": ("centered_clip",),
            "iterations": ("centered_clip",),
            "weight_cap": ("mean",),
        }
        kinds = used_by.get(info.field_name, ("trimmed_mean", "median", "centered_clip"))
        if kind is not None and kind not in kinds and value != cls.model_fields[info.field_name].default:
            raise ValueError(f"only used with kind {' or '.join(map(repr, kinds))} (kind is {kind!r})")
        return value

    def rule(self):
        """The :class:`~potluck.hivemind_ext.aggregators.Aggregator` reducers run."""
        from potluck.hivemind_ext.aggregators import Aggregator

        return Aggregator(**self.model_dump())


class AveragingSpec(_Strict):
    strategy: Literal["gradient", "diloco"] = "gradient"
    """How peers combine their work: ``gradient`` averages accumulated gradients every global step;
    ``diloco`` lets each peer take ``inner_steps`` local AdamW steps, then averages the change of the
    weights (the pseudo-gradient) and applies an outer SGD-Nesterov step: about ``inner_steps`` times
    fewer bytes, for links too slow to average every step (home internet)."""
    inner_steps: int = Field(50, ge=1)
    """(diloco) Local optimizer steps between outer steps (DiLoCo's H): a peer that has taken them waits for
    the slower ones (see ``compute_while_waiting``). Larger sends fewer bytes per sample; lower it if the
    held-out loss lags the ``gradient`` strategy's or peers' losses drift apart. A global step is one outer
    step."""
    outer_lr: float = Field(0.7, gt=0)
    """(diloco) Learning rate of the outer SGD step on the averaged pseudo-gradient (DiLoCo: 0.7); 1.0
    without momentum is plain model averaging. Lower it if the loss jumps right after outer steps."""
    nesterov: bool = True
    """(diloco) Nesterov momentum in the outer SGD step, as in DiLoCo; needs ``outer_momentum > 0``."""
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    """(diloco) Momentum of the outer SGD step (DiLoCo: 0.9). Lower it if the loss oscillates across outer
    steps with few peers; it is part of the state that late joiners download."""
    overlap_communication: bool = True
    """(diloco) Average in the background while the next inner steps run, and apply the outer step when
    the round completes (keeping the inner steps taken meanwhile), so compute does not wait on the
    network. Set false to wait for each round (exact DiLoCo; useful to compare utilisation)."""
    compute_while_waiting: bool = False
    """(diloco) A peer that has taken its ``inner_steps`` while slower peers have not keeps taking inner
    steps until they are ready, instead of idling: no compute is left idle, but fast peers then take more
    than H steps per outer step, and each peer a different number (the run is no longer the DiLoCo of
    the spec). Off by default: every peer takes exactly H inner steps per outer step."""
    matchmaking_time: float = Field(1.0, ge=0.1, le=60)
    """Seconds a peer waits to gather a group before averaging. Raise it if peers often average alone
    (``potluck_averaging_rounds_total{outcome="failed"}`` grows) on slow or distant links."""
    target_group_size: int | None = Field(None, ge=2)
    """Start a round as soon as this many peers have joined its group instead of waiting out
    ``matchmaking_time`` (and never average in larger groups). Set it to the swarm's size when that is
    known and fixed, as ``potluck demo`` does; left unset, every round waits the full matchmaking time
    so that peers on slow links still make it into the group."""
    averaging_timeout: float = Field(30.0, ge=1, le=3600)
    """Seconds before an averaging round is abandoned and the peer steps with its local gradients; at
    least twice ``matchmaking_time`` (the round's matchmaking counts against it)."""
    load_state_timeout: float = Field(60.0, gt=0)
    """Seconds one attempt to download the swarm's state may take before trying another donor."""
    load_state_attempts: int = Field(3, ge=1)
    """Attempts to download state before continuing from local state (hivemind would retry forever)."""
    donor_slots: int = Field(2, ge=1)
    """State downloads one peer serves at once; newcomers beyond that are sent on to the next donor, so
    peers that join together spread over the swarm instead of queueing on its newest peer."""
    compression: Literal["none", "fp16", "scaled_fp16", "uint8", "quantile_8bit"] = "none"
    """Compression of averaged gradients (``diloco``: pseudo-gradients); ``none`` keeps peers bit-for-bit
    in step. 8-bit codecs send 4x fewer bytes than ``none``; ``bench/strategies.py`` shows the loss cost."""
    average_state_every: int = Field(1, ge=1)
    """Average parameters and optimizer statistics every N global steps, to undo drift from failed rounds."""
    aggregator: AggregatorSpec = AggregatorSpec()
    """How reducers combine the group's values: the weighted ``mean`` (default), or a rule robust to a
    malicious peer (``kind: trimmed_mean``, ``median`` or ``centered_clip``). Under a robust rule only groups
    that outvote ``attackers`` average (3 or more for one: in a group of 2 a malicious peer is half of it): a
    swarm of 2 never averages."""

    @field_validator("aggregator")
    @classmethod
    def _groups_that_can_vote(cls, value: AggregatorSpec, info: ValidationInfo) -> AggregatorSpec:
        target, fewest = info.data.get("target_group_size"), value.rule().min_group_size
        if value.kind != "mean" and target is not None and target < fewest:
            raise ValueError(
                f"kind {value.kind!r} with attackers {value.attackers} averages only groups of {fewest} or more,"
                f" and target_group_size is {target}"
            )
        return value

    @field_validator("averaging_timeout")
    @classmethod
    def _room_for_matchmaking(cls, value: float, info: ValidationInfo) -> float:
        matchmaking = info.data.get("matchmaking_time")
        if matchmaking is not None and value < 2 * matchmaking:
            raise ValueError(
                f"must be at least twice matchmaking_time ({matchmaking:g} s): a round abandoned while it"
                " still gathers its group never averages"
            )
        return value

    @property
    def download_chunk_timeout(self) -> float:
        """Seconds a state download may wait for its next chunk (hivemind falls back to ``request_timeout``,
        well under a second, per chunk): the averagers that serve state to late joiners derive it here,
        DiLoCo's outer state and a span's LoRA replicas."""
        return max(self.request_timeout, self.load_state_timeout / 10)

    @property
    def request_timeout(self) -> float:
        """Seconds one averaging request (matchmaking, a part of the all-reduce) may take: under half
        the matchmaking time, or hivemind's matchmaking can deadlock (a leader waits on a follower that
        waits on it). Every averager derives it here: gradient and state rounds, DiLoCo's outer rounds,
        LoRA replicas of a shard span."""
        return min(3.0, self.matchmaking_time / 2)

    @field_validator(
        "inner_steps",
        "outer_lr",
        "nesterov",
        "outer_momentum",
        "overlap_communication",
        "compute_while_waiting",
    )
    @classmethod
    def _only_for_diloco(cls, value: Any, info: ValidationInfo) -> Any:
        # runs only for fields the spec sets: a DiLoCo option changed under another strategy is a mistake
        # (a default value passes: specs round-trip through model_dump, which writes every field)
        strategy = info.data.get("strategy")
        changed = value != cls.model_fields[info.field_name].default
        if strategy is not None and strategy != "diloco" and changed:
            raise ValueError(f"only used with strategy 'diloco' (strategy is {strategy!r})")
        if info.field_name == "outer_momentum" and value == 0 and info.data.get("nesterov", True):
            raise ValueError("must be > 0 with nesterov (set nesterov: false for plain outer SGD)")
        return value


class AccessSpec(_Strict):
    private: bool = False
    """Only peers holding an access token signed by ``owner_key`` take part: average, serve or download state,
    call or serve shards, count in the swarm's progress (``protocols/access.py``, docs/security.md)."""
    owner_key: str | None = Field(None, validate_default=True)
    """The public half of the key that signs the run's access tokens: the ``.pub`` file of ``potluck access keygen``
    or of a coordinator (``[owner:ssh-rsa …]``), or an ``ssh-rsa …`` key."""

    @field_validator("owner_key")
    @classmethod
    def _an_rsa_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("private"):
                raise ValueError(
                    "required when private is true: the public key that signs the run's access tokens"
                )
            return value
        owner_public_key(value)  # raises ValueError naming what is wrong
        return value


class CheckpointSpec(_Strict):
    save_every: int = Field(50, ge=1)
    """Write a checkpoint to ``--save-dir`` every N global steps (and always at the end)."""
    keep: int = Field(2, ge=0)
    """Checkpoints to keep in ``--save-dir``; 0 keeps all."""


class SpanAdapterSpec(_Strict):
    """How shard servers (``run-peer --role shard``) train a ``lora`` adapter inside their spans
    (``peer/shard/server/adapters.py``). Their optimizer is the run's ``optimizer`` (AdamW's ``lr``, ``betas``,
    ``weight_decay``, ``max_grad_norm``; ``warmup_steps`` and the ``schedule`` over ``max_global_steps``) counted
    in *span steps*: one optimizer step of one server on its span. They checkpoint every ``checkpoint.save_every``
    span steps into ``--save-dir``, keeping ``checkpoint.keep``."""

    accumulate_backwards: int = Field(1, ge=1)
    """Backward requests whose adapter gradients a server averages into one optimizer step (a span step). 1 steps
    on every request, as asynchronous SGD; raise it when clients send small batches and the loss is noisy, or
    when many clients share a server (each span step then learns from that many requests)."""
    average_every: float = Field(5.0, ge=1, le=3600)
    """Seconds of the swarm's clock (DHT time) between averaging rounds of a span's replicas: every replica
    starts a round at each multiple of it, so replicas that started at different moments meet in the same
    round (trainers meet at each global step). Each round averages the adapter and its AdamW statistics, as a
    trainers' state round does, each replica weighted by the span steps it took since its last round (under a
    robust aggregator: one vote each). Lower it if replicas' adapters drift apart between rounds (clients see other
    losses on each replica); raise it to spend less bandwidth. Each round is bounded by
    ``averaging.averaging_timeout``."""


class ExpertReplicasSpec(_Strict):
    """How expert servers (``run-peer --role experts``) that host the same expert keep it one expert
    (``peer/shard/server/expert_replicas.py``). Each server trains its experts with the run's ``optimizer``, one
    step per backward request (``optimizer.warmup_steps`` and ``schedule`` counted in those steps)."""

    average_every: float = Field(30.0, ge=1, le=3600)
    """Seconds of the swarm's clock (DHT time) between averaging rounds of an expert's replicas: every replica
    snapshots the expert at each multiple of it and averages it (weights and AdamW statistics) with the other
    replicas' snapshots. Lower it if trainers see replicas drift apart; raise it to spend less bandwidth (each
    round moves an expert's whole state between every pair of its replicas). A round lasts at most
    ``min(averaging.averaging_timeout, average_every / 2)``."""


class ExpertCallsSpec(_Strict):
    """How a trainer of a mixture-of-experts run (``run-peer --role client``) calls its experts' servers
    (``peer/shard/client/expert_calls.py``, whose fault rule these tune)."""

    capacity_factor: float | None = Field(None, gt=0)
    """Each expert takes at most ``ceil(capacity_factor × token-expert pairs / experts)`` of a layer's tokens per
    call, the batch's first ones; the rest skip it as if it were dropped (their other gates renormalised) and are
    counted (``overflow_tokens``). Unset (the default): no limit, as the local model. 1.0–1.25 bounds the work
    one hot expert's server gets from a batch."""
    request_timeout: float = Field(10.0, gt=0, le=600)
    """Seconds one expert call may take before the trainer tries a replica (a dead server costs this per
    attempt): above the slowest call you expect."""
    ban_seconds: float = Field(60.0, ge=0, le=3600)
    """Seconds a server that failed a call is left out before the trainer tries it again."""


StageName = Literal["sft", "rm", "dpo", "grpo", "ppo", "distill"]
STAGE_DATA_FORMATS: dict[str, str] = {
    "sft": "TRL's language-modeling formats: prompt/completion, messages or text",
    "distill": "TRL's language-modeling formats: prompt/completion, messages or text",
    "rm": 'preference pairs: prompt, chosen, rejected (e.g. {"prompt": "2+3=", "chosen": "5", "rejected": "6"})',
    "dpo": 'preference pairs: prompt, chosen, rejected (e.g. {"prompt": "2+3=", "chosen": "5", "rejected": "6"})',
    "grpo": 'prompt-only: prompt, plus answer for the exact_answer reward (e.g. {"prompt": "2+3=", "answer": "5"})',
    "ppo": 'prompt-only: prompt, plus answer for the exact_answer reward (e.g. {"prompt": "2+3=", "answer": "5"})',
}
"""What the data of each stage looks like; quoted by the error when a dataset lacks a stage's columns."""
EXACT_ANSWER = "exact_answer"


class ReferenceSpec(_Strict):
    path: str | None = None
    """Run id (its final checkpoint in ``--save-dir``) or folder of the frozen reference; default: the weights the
    run starts from (``init_from``, else ``model.name_or_path``)."""


class RewardModelSpec(_Strict):
    center_rewards_coefficient: float | None = Field(None, ge=0)
    """Penalty on ``(chosen + rejected)**2`` that keeps rewards near 0; set it (e.g. 0.01) if they drift large."""


class DPOSpec(_Strict):
    beta: float = Field(0.1, gt=0)
    """Pull toward the reference: higher stays closer. Lower it if preference accuracy plateaus early."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    """``sigmoid`` (DPO), ``hinge`` (SLiC), ``ipo`` (per-token log-ratios) or ``robust`` (noisy labels)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed probability that a preference label is flipped (cDPO / robust DPO)."""


class RLSpec(_Strict):
    reward: str = Field(EXACT_ANSWER, min_length=1)
    """``exact_answer`` (verifiable: 1 when the completion equals the row's ``answer``, else 0) or a reward model:
    the run id of an ``rm`` run (its final checkpoint in ``--save-dir``) or a folder loadable by
    ``AutoModelForSequenceClassification``. A reward model with another tokenizer gets the rollouts re-tokenized."""
    kl_coef: float = Field(0.05, ge=0)
    """Weight of the KL penalty to the reference. Raise it if the KL metric keeps growing (reward hacking)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """Per-token KL estimator of the GRPO loss (PPO's reward penalty always uses ``k1``, as TRL does)."""
    group_size: int = Field(8, ge=2)
    """GRPO completions per prompt; advantages are relative to the group. More = steadier, costlier rollouts."""
    max_new_tokens: int = Field(8, ge=1)
    """Generation length of a rollout."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of rollouts; lower it if rewards are all zero, raise it if groups never differ."""
    updates_per_rollout: int = Field(1, ge=1)
    """Local steps each rollout batch is trained on (TRL: ``num_ppo_epochs`` for PPO, ``num_iterations`` for
    GRPO). 1 is on-policy: the importance ratio stays 1 and clipping never acts. Above 1 a peer generates once
    and reuses the rollouts (and their rewards and advantages) for that many local steps, so generation costs
    less per step; the ratio departs from 1 once a global step has updated the policy, and ``clip_range`` bounds
    it. Try 2 to 4 when generation dominates (``generation_time_share``); lower it if ``clip_fraction`` stays
    above ~0.3 or ``kl`` jumps."""
    clip_range: float = Field(0.2, gt=0)
    """PPO/GRPO ratio clip epsilon."""
    clip_range_value: float = Field(0.2, gt=0)
    """PPO value-function clip (scale it with the rewards' magnitude)."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the PPO value loss."""
    gamma: float = Field(1.0, gt=0, le=1)
    """PPO discount per token."""
    lam: float = Field(0.95, ge=0, le=1)
    """PPO GAE lambda: lower trades variance for bias."""


class TeacherSpec(_Strict):
    path: str = Field(min_length=1)
    """Run id (its final checkpoint in ``--save-dir``) or folder of the teacher; it must share the tokenizer."""
    temperature: float = Field(2.0, gt=0)
    """Softening of both distributions; above 1 passes on more of the teacher's ranking of unlikely tokens."""
    hard_label_weight: float = Field(0.0, ge=0)
    """Weight of the usual cross-entropy on the data's completions, added to the KL."""


class RunSpec(_Strict):
    run_id: str = Field(pattern=_RUN_ID_PATTERN)
    """Names the run in the DHT; every key of the run is prefixed by it. Lowercase, digits, ``-`` and ``_``."""
    model: ModelSpec
    adapter: AdapterSpec = Field(NoAdapter(), validate_default=True)
    data: DataSpec
    stage: StageName = "sft"
    """Training stage; it decides how batches are built and which loss is computed (``STAGE_DATA_FORMATS``)."""
    init_from: str | None = None
    """Start from another run's final checkpoint: its run id (found in this peer's ``--save-dir``) or a
    checkpoint folder. It takes the place of ``model.name_or_path`` (weights, and tokenizer unless
    ``model.tokenizer`` is set); the previous stage must have trained the whole model (adapter ``none``)."""
    reference: ReferenceSpec = ReferenceSpec()
    """The frozen reference model of ``dpo``, ``grpo`` and ``ppo`` (KL penalty / DPO log-ratios)."""
    rm: RewardModelSpec = RewardModelSpec()
    """Options of the ``rm`` stage."""
    dpo: DPOSpec = DPOSpec()
    """Options of the ``dpo`` stage."""
    rl: RLSpec = RLSpec()
    """Rollouts, reward and clipping of the ``grpo`` and ``ppo`` stages."""
    teacher: TeacherSpec | None = Field(None, validate_default=True)
    """The teacher of the ``distill`` stage (required there)."""
    optimizer: OptimizerSpec = OptimizerSpec()
    batch: BatchSpec
    max_global_steps: int = Field(1000, ge=1)
    """The run ends when the swarm reaches this many global steps."""
    averaging: AveragingSpec = AveragingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    span_adapter: SpanAdapterSpec = SpanAdapterSpec()
    """How shard servers train a ``lora`` adapter in their spans: accumulation and averaging rounds."""
    expert_replicas: ExpertReplicasSpec = ExpertReplicasSpec()
    """How expert servers average the replicas of an expert."""
    expert_calls: ExpertCallsSpec = ExpertCallsSpec()
    """How trainers call expert servers: capacity factor, timeout, bans."""
    access: AccessSpec = Field(AccessSpec(), validate_default=True)
    """Who may take part: everyone (default), or, with ``private: true``, peers with a token from the run's owner."""
    seed: int = 0
    """Seeds adapter initialisation (identical on every peer) and, with the peer id, each peer's data order."""

    @field_validator("stage")
    @classmethod
    def _stage_fits_adapter(cls, stage: str, info: ValidationInfo) -> str:
        adapter = info.data.get("adapter")
        model = info.data.get("model")
        if stage == "rm" and model is not None and model.quantized:
            raise ValueError(
                "stage 'rm' trains a whole sequence-classification model: set model.quantization none"
                + (" and adapter.kind none" if adapter is not None and adapter.kind != "none" else "")
            )
        if stage == "rm" and adapter is not None and adapter.kind != "none":
            raise ValueError("stage 'rm' trains a whole sequence-classification model: set adapter.kind none")
        return stage

    @field_validator("span_adapter")
    @classmethod
    def _span_adapter_only_for_lora(cls, value: SpanAdapterSpec, info: ValidationInfo) -> SpanAdapterSpec:
        adapter = info.data.get("adapter")
        if adapter is not None and adapter.kind != "lora" and value != SpanAdapterSpec():
            raise ValueError(f"only used with adapter.kind 'lora' (shard servers train no {adapter.kind!r})")
        return value

    @field_validator("adapter")
    @classmethod
    def _adapter_over_quantized_base(cls, adapter, info: ValidationInfo):
        model = info.data.get("model")
        if model is not None and model.quantized and adapter.kind == "none":
            raise ValueError(
                f"kind 'none' trains every weight, but model.quantization is {model.quantization.kind!r} (a frozen "
                "base): set adapter.kind lora (QLoRA) or another adapter, or model.quantization none"
            )
        return adapter

    @field_validator("teacher")
    @classmethod
    def _teacher_only_for_distill(cls, teacher: TeacherSpec | None, info: ValidationInfo):
        stage = info.data.get("stage")
        if stage == "distill" and teacher is None:
            raise ValueError("required for stage 'distill' (teacher.path: a run id or a model folder)")
        if teacher is not None and stage is not None and stage != "distill":
            raise ValueError(f"only used by stage 'distill', not {stage!r}")
        return teacher

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
                "init_from": resolve(self.init_from),
                "reference": self.reference.model_copy(update={"path": resolve(self.reference.path)}),
                "rl": self.rl.model_copy(update={"reward": resolve(self.rl.reward)}),
                "teacher": self.teacher
                and self.teacher.model_copy(update={"path": resolve(self.teacher.path)}),
            }
        )


class RunSpecError(ValueError):
    """A run spec that failed validation; ``str()`` names every bad field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:  # one line, as every other input error of the commands
            super().__init__(f"invalid run spec {source}: {problems[0]}")
        else:
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
    shown = given is not None and not isinstance(given, dict | list | BaseModel)  # a default is a BaseModel
    suffix = f" (got {given!r})" if shown else ""
    return f"{loc or '<root>'}: {message}{suffix}"


def parse_run_spec(raw: Any, source: str = "<spec>") -> RunSpec:
    """Validate an already-parsed mapping (from YAML, JSON or the wire)."""
    if not isinstance(raw, dict):
        raise RunSpecError(source, [f"<root>: expected a mapping of fields, got {type(raw).__name__}"])
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as e:
        raise RunSpecError(source, [_describe(err) for err in e.errors()]) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans several lines and quotes
    the offending line)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_run_spec(path: str | Path) -> RunSpec:
    """Load and validate a YAML run spec; relative paths in it are resolved against its folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunSpecError(str(path), [f"cannot read the file: {e.strerror}"]) from None
    except UnicodeDecodeError as e:  # a binary file, or a text file in another encoding
        raise RunSpecError(
            str(path),
            [f"not a YAML text file: byte 0x{e.object[e.start]:02x} at offset {e.start} is not UTF-8"],
        ) from None
    except yaml.YAMLError as e:
        raise RunSpecError(str(path), [f"not valid YAML: {_yaml_problem(e)}"]) from None
    except (ValueError, RecursionError) as e:  # PyYAML on an impossible date ("2001-13-45"), on deep nesting
        raise RunSpecError(str(path), [f"not valid YAML: {e}"]) from None
    return parse_run_spec(raw, str(path)).resolve_paths(path.parent)
