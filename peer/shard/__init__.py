"""Shards: servers that hold a span of a model's blocks (or some experts), and the client that routes through them."""
