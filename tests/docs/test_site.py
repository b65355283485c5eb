"""The built documentation site, opened in a headless Chromium: the home page and the API
reference render (title, navigation, a function's signature and its filled docstring) in the
DOM the browser built, scripts run.

Needs the site (``make docs`` writes ``site/``) and a Chromium (Debian's ``chromium``). Without
either the tests skip, saying which is missing; with ``LEANLOSS_REQUIRE_DOCS_TEST=1`` (CI sets
it) they fail instead.
"""
from __future__ import annotations

import functools
import html
import http.server
import os
import importlib
import importlib.util
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

import leanloss
import leanloss.functional
import leanloss.parallel

SITE = Path(__file__).resolve().parents[2] / "site"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# what a headless Chromium needs as root on a machine without a display or a network
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _unavailable(reason: str) -> None:
    if os.environ.get("LEANLOSS_REQUIRE_DOCS_TEST") == "1":
        pytest.fail(f"{reason} (LEANLOSS_REQUIRE_DOCS_TEST=1 requires the documentation test)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        _unavailable(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}): apt-get install chromium")
    return found


@pytest.fixture(scope="module")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        _unavailable(f"the documentation site is not built ({SITE / 'index.html'} is missing): run `make docs`")
    return SITE


@pytest.fixture(scope="module")
def site_url(site) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def rendered_dom(browser: str, url: str, profile: Path) -> str:
    """The DOM Chromium holds after loading ``url`` and running its scripts."""
    result = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
         "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chromium exited {result.returncode}: {result.stderr[-2000:]}"
    assert "<html" in result.stdout, f"chromium printed no DOM for {url}: {result.stderr[-2000:]}"
    return result.stdout


def page_text(dom: str) -> str:
    """The visible text of ``dom``: scripts and styles dropped, tags removed, entities decoded,
    whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def contains(dom: str, phrase: str) -> bool:
    """Whether the visible text of ``dom`` holds ``phrase``, whitespace aside (highlighted code
    puts each token in its own element, so spaces between tokens are not in the DOM's text)."""
    def squash(s: str) -> str:
        return re.sub(r"\s+", "", s)

    visible = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S | re.I)
    return squash(phrase) in squash(html.unescape(re.sub(r"<[^>]+>", "", visible)))


def nav_labels(dom: str) -> list:
    """The labels of the site navigation's links."""
    nav = re.search(r'<nav class="md-nav md-nav--primary".*?</nav>\s*</div>\s*</div>', dom, flags=re.S)
    assert nav is not None, "no primary navigation in the rendered page"
    return [page_text(label) for label in re.findall(r'<a [^>]*class="md-nav__link[^"]*"[^>]*>(.*?)</a>', nav.group(0), flags=re.S)]


def title(dom: str) -> str:
    found = re.search(r"<title>(.*?)</title>", dom, flags=re.S)
    assert found is not None, "the rendered page has no <title>"
    return html.unescape(found.group(1)).strip()


def test_home_page_renders(browser, site_url, tmp_path):
    dom = rendered_dom(browser, site_url + "/", tmp_path)
    assert title(dom) == "leanloss"
    assert re.search(r'<html[^>]*class="[^"]*\bjs\b', dom), "the theme's scripts did not run (html still 'no-js')"
    labels = nav_labels(dom)
    for label in ("Home", "Getting started", "Fused linear-head losses", "Troubleshooting",
                  "API reference", "leanloss.functional"):
        assert label in labels, f"navigation lacks {label!r}: {labels}"
    assert contains(dom, "Entropy-family losses for PyTorch")  # the README's introduction, included
    assert contains(dom, "loss = leanloss.linear_cross_entropy(hidden, lm_head.weight, labels")  # its example


def test_api_reference_renders_signatures_and_filled_docstrings(browser, site_url, tmp_path):
    dom = rendered_dom(browser, site_url + "/api/functional/", tmp_path)
    assert title(dom) == "leanloss.functional - leanloss"
    assert 'id="leanloss.functional.linear_cross_entropy"' in dom
    # the signature, as mkdocstrings renders it from the imported function
    assert contains(dom, "linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, "
                         "bias: Optional[Tensor] = None, *, ignore_index: int = -100, reduction: str ="), \
        "linear_cross_entropy's signature is not on the rendered page"
    assert contains(dom, "return_lse: bool = False, chunk_size: Optional[int] = None")
    # its docstring, with the shared entries filled in at import (leanloss._docs)
    assert contains(dom, "Cross entropy of hidden @ weight.T + bias without materializing the logits.")
    assert contains(dom, "weight of the lse_r**2 penalty (PaLM's z-loss)")
    text = page_text(dom)
    assert "@doc" not in text, "a docstring still holds an unfilled '@doc NAME' line"
    # reStructuredText markup turned into Markdown by docs/_ext/rst_markup.py
    assert not re.search(r":(func|class|mod|math):`|\.\. math::", text), "reStructuredText markup left on the page"
    # and the other public modules' pages exist and hold their functions
    for page, name in (("parallel", "vocab_parallel_linear_cross_entropy"),
                       ("transformers", "apply_leanloss"), ("leanloss", "LinearCrossEntropyLoss")):
        other = rendered_dom(browser, f"{site_url}/api/{page}/", tmp_path)
        assert re.search(rf'id="leanloss\.[\w.]*{name}"', other), f"api/{page} lacks {name}"


def test_api_reference_documents_every_public_name(site):
    """Every name in the ``__all__`` of ``leanloss``, ``leanloss.functional``, ``leanloss.parallel``
    ``leanloss.integrations.transformers`` and ``leanloss.integrations.trl`` has an entry (an
    anchor) in the API reference."""
    transformers_api = pytest.importorskip("leanloss.integrations.transformers")
    modules = [(leanloss.functional, "functional"), (leanloss.parallel, "parallel"),
               (transformers_api, "transformers")]
    if importlib.util.find_spec("trl") is not None:  # the trl extra: its page is checked too
        modules.append((importlib.import_module("leanloss.integrations.trl"), "trl"))
    pages = {page: (site / "api" / page / "index.html").read_text()
             for page in ["leanloss"] + [page for _, page in modules]}
    missing = []
    for name in leanloss.__all__:  # the functions are documented once, under leanloss.functional
        anchors = {f'id="leanloss.{name}"', f'id="leanloss.functional.{name}"'}
        if not any(a in pages["leanloss"] or a in pages["functional"] for a in anchors):
            missing.append(f"leanloss.{name}")
    for module, page in modules:
        missing += [f"{module.__name__}.{name}" for name in module.__all__
                    if f'id="{module.__name__}.{name}"' not in pages[page]]
    assert not missing, f"public names without an API reference entry: {missing}"
