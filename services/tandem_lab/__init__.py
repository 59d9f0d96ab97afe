"""The lab: benchmarks, reliability scenarios, fuzzers and the harnesses they share
(network emulation, relays, fleets of processes). Nothing a user of the platform runs;
`python -m tandem_lab --help` lists its commands."""
