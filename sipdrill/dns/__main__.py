"""``python -m sipdrill.dns --topology FILE ...``: the same as ``sipdrill serve dns``,
without loading the rest of the CLI."""

import typer

from sipdrill.dns.cli import serve_dns


def main() -> None:
    typer.run(serve_dns)


if __name__ == "__main__":
    main()
