"""Client connections: the protocols that speak HTTP to clients."""
