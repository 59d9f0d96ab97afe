"""The example task packages (examples/), loaded through their entry points as Tandem loads them."""
