"""The `tokprof` subcommands, one module per area; each registers on the app of `_app.py`."""
