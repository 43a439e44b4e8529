"""The `potluck` command and what runs on one machine."""

from potluck.runtime.hub_kernels import refuse_hub_kernels

refuse_hub_kernels()  # before anything here imports peft, which imports bitsandbytes
