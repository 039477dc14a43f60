"""One module per `motif-video` subcommand."""
