"""Smart-traffic path planning on Eclipse SUMO with Tandem: districts' road-side units
are edge agents; a speed forecaster is trained federated across them; routes are
planned at the edge, in the cloud, or both (docs/traffic.md)."""

__version__ = "1.0.0"
