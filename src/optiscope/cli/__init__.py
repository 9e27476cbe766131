"""Command-line interface (typer). Thin: parses arguments and calls experiments / lab."""
