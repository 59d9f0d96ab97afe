"""One module per `tandem` subcommand or family of subcommands, each with `register(subparsers)`."""
