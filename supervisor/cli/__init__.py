"""The `qlora-watch` command: `commands` (the parser and each subcommand), `help`, `completion`,
`foreign` (the recipe `qlora-watch run -- COMMAND` builds)."""

from supervisor.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
