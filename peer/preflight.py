"""What the commands check on this machine before anything heavy starts (a model loading, the DHT joining).

A typo in an address, a model path or a data file used to surface seconds in, after the model had loaded, as
a traceback from libp2p, transformers or json. Each check raises its concern's own error, one line naming the
flag, field, file or line; the commands report it through their one error path (``run-peer``'s ``user_error``,
the ``except INPUT_ERRORS`` of ``potluck``) with exit status 2:

- the multiaddrs of ``--initial-peers``, ``--host-maddrs`` and ``--announce-maddrs`` (``hivemind_ext/dht.py``);
- ``--identity-path``: a libp2p identity file with an RSA key, if it exists (``hivemind_ext/keys.py``);
- every model the run loads: a folder holding a model, or a hub id, in the local cache while ``HF_HUB_OFFLINE``
  is set (``training/model.py``, ``training/stages/models.py``);
- a trainer's model is of a kind its stage trains, and has the modules its adapter names, from its config alone
  (``training/architecture.py``: an encoder for SFT, a LoRA target that GPT-2 does not have);
- every line of the data: a JSON object with the stage's columns (``training/stages/data.py``);
- ``model.quantization``: bitsandbytes is installed where the spec quantises (``quantization.py``);
- a private run's ``--access-token``: signed by the run's owner, for this run and this peer, not expired
  (``net/access.py``).

The run spec itself is checked as it is read (``protocols/runspec.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from potluck.hivemind_ext.dht import MultiaddrError, check_multiaddrs
from potluck.hivemind_ext.keys import IdentityError, read_identity
from potluck.peer.net.access import AccessTokenError, read_own_token
from potluck.peer.quantization import QuantizationUnavailableError, check_quantization
from potluck.peer.shard.experts import serves_experts
from potluck.peer.training.architecture import UnsupportedModelError, check_architecture
from potluck.peer.training.data import DatasetFormatError
from potluck.peer.training.model import check_model_spec
from potluck.peer.training.stages.data import check_stage_data
from potluck.peer.training.stages.models import check_stage_models
from potluck.protocols.runspec import RunSpec, RunSpecError
from potluck.protocols.shards import MAX_PREFIX_TOKENS


class ClientRoleError(ValueError):
    """The run trains what ``--role client`` cannot (its adapter or stage); ``str()`` is one line naming the field."""


INPUT_ERRORS = (
    RunSpecError, DatasetFormatError, MultiaddrError, FileNotFoundError, UnsupportedModelError, IdentityError,
    QuantizationUnavailableError, ClientRoleError, AccessTokenError,
)  # fmt: skip
"""What the checks raise (``FileNotFoundError``: a data file, or a model, ``WeightsNotFoundError``): a command
reports these as one line and exits with status 2."""


def check_addresses(
    initial_peers: Sequence[str], host_maddrs: Sequence[str] = (), announce_maddrs: Sequence[str] = ()
) -> None:
    """The addresses given on the command line parse; initial peers end in ``/p2p/<peer id>``; announced
    ones have a port."""
    check_multiaddrs(initial_peers, "--initial-peers", peer=True)
    check_multiaddrs(host_maddrs, "--host-maddrs")
    check_multiaddrs(announce_maddrs, "--announce-maddrs", port=True)


def check_identity(identity_path: Path | None) -> None:
    """An ``--identity-path`` that exists is a libp2p identity with an RSA key (the peer signs its records with
    it, ``hivemind_ext/keys.py``); one that does not is made at start."""
    if identity_path is not None and identity_path.exists():
        read_identity(identity_path)


CLIENT_ADAPTERS = ("prompt_tuning", "prefix", "lora")
CLIENT_STAGES = ("sft", "dpo")


def check_client_spec(spec: RunSpec) -> None:
    """What ``--role client`` can train, in one line naming the field."""
    if serves_experts(spec):  # the client trains all but the experts, in full; the expert servers train those
        if spec.adapter.kind != "none":
            raise ClientRoleError(
                f"adapter.kind: a mixture-of-experts run trains its experts on the expert servers and the rest on "
                f"the client, in full: set none, not {spec.adapter.kind!r}"
            )
        if spec.stage != "sft":
            raise ClientRoleError(
                f"stage: --role client trains a mixture of experts in sft, got {spec.stage!r}"
            )
        return
    if spec.adapter.kind not in CLIENT_ADAPTERS:
        raise ClientRoleError(
            f"adapter.kind: --role client trains {', '.join(CLIENT_ADAPTERS)} adapters, got {spec.adapter.kind!r}"
            + (
                " (a full fine-tune would train the servers' frozen blocks)"
                if spec.adapter.kind == "none"
                else ""
            )
        )
    if spec.adapter.kind == "prefix" and spec.adapter.num_virtual_tokens > MAX_PREFIX_TOKENS:
        raise ClientRoleError(
            f"adapter.num_virtual_tokens: {spec.adapter.num_virtual_tokens}, but shard servers take a prefix of at "
            f"most {MAX_PREFIX_TOKENS} tokens"
        )
    if spec.stage not in CLIENT_STAGES:
        raise ClientRoleError(
            f"stage: --role client supports {' and '.join(CLIENT_STAGES)}, got {spec.stage!r}"
        )


def check_run_inputs(
    spec: RunSpec,
    role: str = "trainer",
    save_dir: Path | None = None,
    access_token: Path | None = None,
    identity_path: Path | None = None,
) -> None:
    """The models and data that ``role`` reads for ``spec`` are there and well formed. A trainer loads every
    model of its stage (``init_from`` and run ids resolved in ``save_dir``); a shard or expert server or a client
    loads ``model`` only, and servers read no data. A private run's token (``access_token``) must admit this peer
    (``identity_path``) now."""
    read_own_token(spec, access_token, identity_path)
    if role == "trainer":
        check_stage_models(spec, save_dir)
        check_architecture(spec)
    else:
        check_model_spec(spec.model)
    if role == "client":  # after the model's own check: it reads the model's config
        check_client_spec(spec)
    if role in ("trainer", "shard"):  # a shard client holds no base weights
        check_quantization(spec.model)
    if role not in ("shard", "experts"):  # servers read no data
        check_stage_data(spec)
