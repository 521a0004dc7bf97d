"""Open a Snakemake report in headless Chromium, as a reader would, and check a table's numbers are visible.

    python tests/render_report.py results/demo/report.html results/demo/tables/table2.csv [--screenshot x.png]

Exits 0 when every number of the table's `ours` rows (one decimal, as the tables show them) is in the text
of the rendered page. Needs a Chromium binary (Debian: `apt-get install chromium`); the slow tests call this
when one is installed and skip otherwise.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--virtual-time-budget=20000",  # let the report's scripts run before the DOM is taken
)
LABEL_COLUMNS = {
    "group",
    "method",
    "matching",
    "source",
    "pck",
    "protocol",
    "trained_on",
    "citation",
    "best_in_group",
}


def chromium() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def rendered_dom(report: Path, browser: str, timeout: int = 300) -> str:
    """The DOM of ``report`` after its scripts ran (``--dump-dom``)."""
    command = [browser, *FLAGS, "--dump-dom", report.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{browser} failed on {report}: {result.stderr[-2000:]}")
    return result.stdout


def screenshot(report: Path, browser: str, png: Path, timeout: int = 300) -> None:
    """A full-HD screenshot of the rendered report, to look at."""
    command = [
        browser,
        *FLAGS,
        "--window-size=1920,2400",
        f"--screenshot={png.resolve()}",
        report.resolve().as_uri(),
    ]
    subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)


class _TextCollector(HTMLParser):
    """The text a reader sees: character data outside <script>, <style> and <head>."""

    HIDDEN = {"script", "style", "head", "title"}

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.depth += tag in self.HIDDEN

    def handle_endtag(self, tag: str) -> None:
        self.depth -= tag in self.HIDDEN and self.depth > 0

    def handle_data(self, data: str) -> None:
        if not self.depth and data.strip():
            self.parts.append(data.strip())


def visible_text(dom: str) -> list[str]:
    """The text pieces (table cells, paragraphs) of a rendered DOM."""
    collector = _TextCollector()
    collector.feed(dom)
    return collector.parts


def expected_numbers(table_csv: Path) -> list[str]:
    """Every number of the table's `ours` rows as displayed (one decimal); not their intervals and the other
    companion columns, which a cell shows after its number (``[lo, hi]``)."""
    from sd4match.table_cells import hidden_columns

    table = pd.read_csv(table_csv)
    ours = table[table["source"] == "ours"]
    companions = hidden_columns(list(table.columns))
    numeric = [column for column in table.columns if column not in LABEL_COLUMNS | companions]
    return [f"{value:.1f}" for value in ours[numeric].to_numpy().ravel() if not math.isnan(float(value))]


def missing_numbers(report: Path, table_csv: Path, browser: str) -> list[str]:
    """The table's numbers that the rendered report does not show (empty: all visible)."""
    shown = set(visible_text(rendered_dom(report, browser)))
    return [number for number in expected_numbers(table_csv) if number not in shown]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("table_csv", type=Path)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args(argv)
    browser = chromium()
    if browser is None:
        print("no Chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    missing = missing_numbers(args.report, args.table_csv, browser)
    if args.screenshot:
        screenshot(args.report, browser, args.screenshot)
    expected = expected_numbers(args.table_csv)
    print(f"{len(expected) - len(missing)} of {len(expected)} numbers of {args.table_csv.name} visible")
    if missing:
        print("missing: " + " ".join(missing), file=sys.stderr)
    return 1 if missing or not expected else 0


if __name__ == "__main__":
    sys.exit(main())
