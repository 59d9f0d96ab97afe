"""The coordinator (services/cloud/): rounds, update intake, limits, defences, store, inference serving, replicas, placement."""
