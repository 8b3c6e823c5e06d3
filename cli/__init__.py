"""Command-line interface of fls-compress (a thin Typer layer over :mod:`fls_compress`)."""
