"""MkDocs hook: the benchmark reports (benchmarks/results/*.md and their plots) become pages under
reports/, byte for byte as the benchmarks wrote them, so the docs never re-render a report."""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add every report and plot of benchmarks/results/ as reports/<name>."""
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".png"):
            files.append(File.generated(config, f"reports/{path.name}", abs_src_path=str(path)))
    return files
