"""The peer: joins the DHT, takes a role (trainer for now), trains or serves, reports metrics."""

from potluck.runtime.hub_kernels import import_bitsandbytes_offline

import_bitsandbytes_offline()  # before any part of the peer imports peft, which imports bitsandbytes
