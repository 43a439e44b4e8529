"""The `potluck` command and what runs on one machine."""

from potluck.runtime.hub_kernels import import_bitsandbytes_offline

import_bitsandbytes_offline()  # before anything here imports peft, which imports bitsandbytes
