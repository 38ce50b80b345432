"""Device mesh, logical-to-mesh sharding rules and activation constraints."""
