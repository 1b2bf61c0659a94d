"""README's measured figures are copies of bench/RESULTS.md and docs/: this keeps the copies honest.

Every figure in the README sections below — a number with a decimal point or thousands separators, or a
number with a unit (×, %, s, ms, KB, MB, B, updates/s, points) — must appear, as written, in one of the
files that section copies from. A re-run benchmark that changes bench/RESULTS.md therefore fails here
until README follows. Links from README into those files must point at headings that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# README section (its "##"/"###" heading) -> the files whose figures it copies.
SOURCES: dict[str, list[str]] = {
    "What the demo shows": ["docs/experiments.md", "docs/results/demo-default/report.md"],
    "Comparing PEFT methods (`fedpeft-edge experiment`)": [
        "docs/experiments.md", "docs/results/experiment-medium/results.md",
        "docs/results/experiment-compression/results.md",
        "docs/results/experiment-compression-long/results.md",
    ],
    "Measured": ["bench/RESULTS.md"],
}

UNITS = r"×|%|ms|s|KB|kB|MB|GB|B|updates/s|points?"
FIGURE = re.compile(
    rf"(?<![\w.,/\-])(?P<num>\d{{1,3}}(?:,\d{{3}})+|\d+\.\d+|\d+)(?:\s?(?P<unit>{UNITS})(?![\w]))?"
)


def sections(markdown: str) -> dict[str, str]:
    """Heading text -> body (up to the next heading of any level), code blocks dropped."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    parts = re.split(r"^#{2,3} (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def figures(text: str) -> list[str]:
    """The figures quoted in ``text``: decimals, thousands, or numbers with a unit."""
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets hold no figures
    found = []
    for m in FIGURE.finditer(text):
        num, unit = m.group("num"), m.group("unit")
        if unit or "." in num or "," in num:
            found.append(f"{num} {unit}" if unit else num)
    return found


def appears(figure: str, source: str) -> bool:
    num, _, unit = figure.partition(" ")
    tail = rf"\s?{re.escape(unit)}(?!\w)" if unit else r"(?![\d])(?!\.\d)"
    return re.search(rf"(?<![\d.,]){re.escape(num)}{tail}", source) is not None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def test_sections_exist():
    found = sections(README.read_text(encoding="utf-8"))
    missing = [name for name in SOURCES if name not in found]
    assert not missing, f"README sections renamed or gone (update SOURCES): {missing}"


@pytest.mark.parametrize("section", sorted(SOURCES))
def test_readme_figures_match_their_sources(section):
    body = sections(README.read_text(encoding="utf-8"))[section]
    source = "\n".join((REPO / p).read_text(encoding="utf-8") for p in SOURCES[section])
    quoted = figures(body)
    assert quoted, f"no figures found in README section {section!r}"
    stale = sorted({f for f in quoted if not appears(f, source)})
    assert not stale, (f"README section {section!r} quotes figures that are not in "
                       f"{', '.join(SOURCES[section])}: {stale}")


def test_readme_links_into_results_hit_headings():
    readme = README.read_text(encoding="utf-8")
    bad = []
    for target, anchor in re.findall(r"\]\(((?:bench|docs)/[^)#\s]+)(?:#([^)\s]+))?\)", readme):
        path = REPO / target
        if not path.exists():
            bad.append(target)
        elif anchor and path.suffix == ".md":
            heads = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
            if anchor not in {slug(h) for h in heads}:
                bad.append(f"{target}#{anchor}")
    assert not bad, f"README links to missing files or headings: {bad}"


def test_checker_flags_a_drifted_figure():
    assert figures("C is 4.4× numpy, 13,500 updates/s, r=8, MiniLM-L6 in 30 s") == [
        "4.4 ×", "13,500 updates/s", "30 s"]
    assert appears("3.89 ×", "| 3.89× |") and not appears("3.8 ×", "| 3.89× |")
    assert appears("0.95", "0.95 test") and not appears("0.95", "0.950")
