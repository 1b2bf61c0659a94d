"""Every text of the console exists in English and Japanese; the language negotiation; the SVG charts."""

from __future__ import annotations

import re
from pathlib import Path

from fedpeft_edge.console import i18n
from fedpeft_edge.console.charts import Series, line_chart

TEMPLATES = Path(i18n.__file__).resolve().parent / "templates"


def _keys_used() -> set[str]:
    used: set[str] = set()
    for path in TEMPLATES.glob("*.html"):
        text = path.read_text()
        used |= set(re.findall(r"""\bt\(\s*["']([a-z0-9_]+)["']\s*[,)]""", text))
    return used


def test_every_key_a_template_uses_is_translated() -> None:
    missing = sorted(_keys_used() - set(i18n.TEXTS))
    assert not missing, f"keys used in templates but not in i18n.TEXTS: {missing}"


def test_dynamic_keys_are_translated() -> None:
    from fedpeft_edge.console.events import KINDS
    from fedpeft_edge.console.fleet_view import DISPLAY_STATE

    for kind in KINDS:
        assert f"ev_{kind}" in i18n.TEXTS
    for state in {*DISPLAY_STATE.values(), "unknown"}:
        assert f"state_{state}" in i18n.TEXTS
    for role in ("viewer", "operator"):
        assert f"role_{role}" in i18n.TEXTS


def test_both_languages_are_filled_and_take_the_same_placeholders() -> None:
    for key, (en, ja) in i18n.TEXTS.items():
        assert en.strip() and ja.strip(), key
        assert set(re.findall(r"{(\w+)}", en)) == set(re.findall(r"{(\w+)}", ja)), key
        if re.search(r"[A-Za-z]{2,}", re.sub(r"{\w+}", "", en)):  # words, not just placeholders and symbols
            assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", ja), key


def test_negotiation() -> None:
    assert i18n.negotiate(None, "ja-JP,ja;q=0.9,en;q=0.8") == "ja"
    assert i18n.negotiate(None, "en-US,en;q=0.9,ja;q=0.8") == "en"
    assert i18n.negotiate(None, "fr-FR,ja;q=0.5,en;q=0.4") == "ja"
    assert i18n.negotiate(None, "de,fr") == "en"
    assert i18n.negotiate(None, None) == "en"
    assert i18n.negotiate("ja", "en-US") == "ja"  # the switch wins over the browser
    assert i18n.negotiate("xx", "ja") == "ja"  # a bad cookie is ignored
    assert i18n.negotiate(None, "en;q=abc, ja;q=0.1") == "ja"


def test_translator_formats_and_shows_unknown_keys() -> None:
    t = i18n.translator("ja")
    assert t("round_of", round=3, max=5) == "ラウンド 3 / 5"
    assert t("no_such_key") == "no_such_key"


def test_chart_escapes_labels_and_handles_gaps() -> None:
    svg = line_chart(
        [Series("<script>x</script>", [(0, 0.5), (1, float("nan")), (2, 0.7)])], title="a & b", chart_id="c1"
    )
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "a &amp; b" in svg
    assert svg.count("<circle") == 2 and svg.startswith("<svg") and svg.endswith("</svg>")


def test_chart_without_points() -> None:
    svg = line_chart([Series("s", [])], title="empty", chart_id="c2")
    assert "<path" not in svg and "empty" in svg
