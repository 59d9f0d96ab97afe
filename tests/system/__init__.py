"""Across the whole system: end-to-end runs, compressed training with real agents, faults with real processes,
layering, attributes, protos, reflection, security."""
