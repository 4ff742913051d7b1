"""MkDocs hook: adds one page per ``gradlens`` subcommand, ``cli/NAME.md``, generated at build time from the parser
``gradlens NAME --help`` prints (:mod:`gradlens.cli.reference`), so no flag is ever copied by hand."""

from __future__ import annotations

from mkdocs.structure.files import File, Files


def on_files(files: Files, config) -> Files:
    from gradlens.cli.main import SUBCOMMANDS
    from gradlens.cli.reference import command_page

    for name in SUBCOMMANDS:
        files.append(File.generated(config, f"cli/{name}.md", content=command_page(name)))
    return files
