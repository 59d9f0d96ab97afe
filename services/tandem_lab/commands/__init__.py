"""One module per `python -m tandem_lab` subcommand or family, each with `register(subparsers)`."""
