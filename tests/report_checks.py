"""Checks of a rendered run report, shared by the report, demo and distill tests.

In headless Chromium where it is installed (the headline on the first screen, every plot loaded and
not blank on a screenshot, the hard-set filters and sort working under real clicks, no console
errors); without it, the same page is checked by parsing its HTML.
"""

from __future__ import annotations

import base64
import time
from html.parser import HTMLParser
from pathlib import Path

from browser import Browser, chromium_path, is_blank

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "input", "link", "col", "area", "base", "source", "wbr"}
MAX_BYTES = 5 * 2**20


class Checker(HTMLParser):
    """Checks that tags nest properly and collects ids, headings, images and hard-set rows."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.images: list[str] = []
        self.h2: list[str] = []
        self.rows: dict[str, list[dict[str, str | None]]] = {}
        self.scripts = 0
        self._in_h2 = False
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"] or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "script":
            self.scripts += 1
            assert "src" not in a, "a script from elsewhere"
        if tag == "link":
            raise AssertionError(f"a linked resource: {a}")
        if tag == "table":
            self._table = a.get("id")
        if tag == "tr" and self._table and "data-group" in a:
            self.rows.setdefault(self._table, []).append(a)
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()
        if tag == "h2":
            self._in_h2 = False
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2[-1] += data


def parse(html_path: Path) -> Checker:
    checker = Checker()
    checker.feed(html_path.read_text(encoding="utf-8"))
    checker.close()
    assert checker.errors == [] and checker.stack == [], checker.errors[:5]
    return checker


def check_report(html_path: Path, profile: Path, figures: set[str], hard_set: bool = True) -> dict[str, float]:
    """Everything a reader relies on; `figures` names the plots that must be there (fig-NAME).

    Returns timings (seconds) of the browser checks, or an empty dict when they did not run.
    """
    assert html_path.stat().st_size < MAX_BYTES, f"{html_path.stat().st_size} bytes"
    page = parse(html_path)
    assert page.h2 and page.h2[0] == "Headline", page.h2
    assert page.h2[-1] == "All recorded metrics", page.h2
    assert {f"fig-{f}" for f in figures} <= set(page.ids), sorted(set(page.ids))
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    if hard_set:
        assert page.rows.get("judged") and page.scripts == 1
    executable = chromium_path()
    if executable is None:
        return {}
    return _in_browser(executable, html_path, profile, figures, hard_set)


def _visible(browser: Browser, table: str) -> list[dict[str, str]]:
    return browser.js(f"[...document.querySelectorAll('#{table} tbody tr')].filter(r => !r.hidden && "
                      "r.offsetParent !== null).map(r => ({...r.dataset}))")


def _in_browser(executable: str, html_path: Path, profile: Path, figures: set[str],
                hard_set: bool) -> dict[str, float]:
    started = time.perf_counter()
    with Browser(executable, profile) as browser:
        browser.open(html_path.resolve().as_uri())
        loaded = time.perf_counter()
        # the headline is on the first screen and reads as one
        top = browser.js("document.querySelector('#headline').getBoundingClientRect().top")
        assert 0 <= top < browser.js("innerHeight") / 2
        text = browser.js("document.querySelector('#headline').innerText")
        assert "final student" in text and "wall time" in text, text
        assert not is_blank(browser.screenshot("#headline .headline"))
        # every plot image decoded, shown at a sensible size, and not blank on screen
        images = browser.js("[...document.images].map(i => [i.complete, i.naturalWidth, i.width, "
                            "i.closest('figure').id])")
        assert {name for *_, name in images} >= {f"fig-{f}" for f in figures}
        for complete, natural, shown, name in images:
            assert complete and natural > 100 and shown > 200, (name, natural, shown)
            assert not is_blank(browser.screenshot(f"#{name} img")), name
        if hard_set:
            _filters_and_sort(browser)
        errors = browser.errors()
        assert errors == [], errors
    return {"load_s": loaded - started, "total_s": time.perf_counter() - started}


def _filters_and_sort(browser: Browser) -> None:
    rows = _visible(browser, "judged")
    hard = [r for r in rows if r["group"] == "hard"]
    assert rows and hard, "the hard-set table shows no hard rows"
    count = browser.js("document.querySelector('.controls[data-for=judged] .count').textContent")
    assert count.startswith(f"{len(rows)} of ")
    browser.click(".controls[data-for=judged] .f-group[value=hard]")  # hide the hard ones
    after = _visible(browser, "judged")
    assert len(after) == len(rows) - len(hard) and all(r["group"] != "hard" for r in after)
    assert browser.js("document.querySelector('.controls[data-for=judged] .count').textContent").startswith(
        f"{len(after)} of ")
    browser.click(".controls[data-for=judged] .f-group[value=hard]")  # and back
    assert len(_visible(browser, "judged")) == len(rows)
    # one domain only (a <select> is set as a person's choice would set it, then told so)
    domain = hard[0]["domain"]
    browser.js("(() => { const s = document.querySelector('.controls[data-for=judged] .f-domain'); "
               f"s.value = {domain!r}; s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()")
    assert {r["domain"] for r in _visible(browser, "judged")} == {domain}
    browser.js("(() => { const s = document.querySelector('.controls[data-for=judged] .f-domain'); "
               "s.value = ''; s.dispatchEvent(new Event('change', {bubbles: true})); })()")
    # sort by gap, largest first
    browser.click("#judged th.sortable")
    gaps = [float(r["gap"]) for r in _visible(browser, "judged") if r["gap"]]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] == max(float(r["gap"]) for r in hard)
