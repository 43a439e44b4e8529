"""The peer: joins the DHT, takes a role (trainer for now), trains or serves, reports metrics."""

from potluck.runtime.hub_kernels import refuse_hub_kernels

refuse_hub_kernels()  # before any part of the peer imports peft, which imports bitsandbytes
