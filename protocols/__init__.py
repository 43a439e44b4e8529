"""What peers and the coordinator share: the run spec and (later) DHT record schemas and gRPC stubs."""
