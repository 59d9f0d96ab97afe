"""The shared library (services/tandem/): codec, compression, data, training, certificates, TLS hardening, batching."""
