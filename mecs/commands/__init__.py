"""One module per ``mecs`` subcommand; each defines ``register(sub)``."""
