"""What deploy/ ships: Kubernetes manifests, the Dockerfile, Prometheus configuration, rules and dashboards."""
