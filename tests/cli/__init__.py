"""The `tandem` command (services/tandem_cli/)."""
