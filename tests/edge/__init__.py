"""The edge agent (services/edge/): its Inference server, placements and fallback when the cloud is away."""
