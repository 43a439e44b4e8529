"""The peer: joins the DHT, takes a role (trainer for now), trains or serves, reports metrics."""
