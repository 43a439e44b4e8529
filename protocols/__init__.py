"""What peers and the coordinator share: the run spec, DHT record schemas and gRPC stubs."""

from potluck.runtime import grpc_fork  # noqa: F401 (before anything here imports grpc; see that module)
