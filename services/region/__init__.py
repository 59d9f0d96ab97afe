"""The regional aggregator: a coordinator to the agents of its region and one member to
its parent (docs/scale-out.md). It wires `cloud` and `edge` together, as the command
line does; neither of them imports it."""
