"""The code browser in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
installs) driven by playwright, opening the site straight from disk (file://).

Known-answer site: a codebook whose codes are the model's own embedding rows at `hook_embed`
(cosine similarity) maps token t to code t; two tokens' texts are HTML/JS payloads.
"""

import shutil

import pytest
import torch

from tl_codebook.analysis.cache import CodeCache
from tl_codebook.analysis.dashboard import write_dashboard
from tl_codebook.codebook import Codebook, CodebookConfig
from tl_codebook.hooks.model import HookedCodebookTransformer

PAYLOADS = ["<img src=x onerror=window.__pwned=1>", "</script><script>window.__pwned=2</script>"]
VOCAB = ["t0", "t1", "t2", PAYLOADS[0], PAYLOADS[1], "t5", "t6", "t7", "t8", "t9", "t10"]


@pytest.fixture(scope="module")
def site(tmp_path_factory, make_tiny_cfg):
    model = HookedCodebookTransformer(make_tiny_cfg())
    codebook = Codebook(
        CodebookConfig(d_in=16, num_codes=11, similarity="cosine", hook_name="hook_embed")
    )
    with torch.no_grad():
        codebook.codes.copy_(model.W_E[None])
    model.add_codebook(codebook)
    tokens = torch.randint(0, 11, (6, 12), generator=torch.Generator().manual_seed(0))
    root = tmp_path_factory.mktemp("browser")
    cache = CodeCache.build(model, tokens, root / "cache", vocab=VOCAB, progress=False)
    index = write_dashboard(cache, root / "site", model=model)
    file_id = cache.manifest["hooks"][0]["file_id"]
    return index, file_id, tokens


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "the browser tests need Debian's chromium (`apt-get install chromium`, as .ci/run "
            "does): no `chromium` on PATH"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site):
    """A page that records console errors, uncaught exceptions and every request it makes."""
    page = browser.new_page()
    page.set_default_timeout(5000)
    page.errors = []
    page.requests = []
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: page.requests.append(r.url))
    yield page
    page.close()


def open_site(page, index, route="#/"):
    page.goto(index.as_uri() + route)
    page.wait_for_selector(f'body[data-ready="{route}"]')


def check_clean(page, index):
    site_url = index.parent.as_uri() + "/"
    assert page.errors == []
    assert page.requests and all(url.startswith(site_url) for url in page.requests), page.requests
    assert page.evaluate("typeof window.__pwned") == "undefined"


def search(page, mode, query):
    page.select_option("#mode", mode)
    page.fill("#q", query)
    page.click("#go")
    # CSP forbids eval'd waits; the status line is empty (hidden) after an error, so wait for
    # the attribute on the attached element; submitting sets it to "running" synchronously
    page.wait_for_selector('#search-status[data-state="done"]', state="attached")


def test_index_loads_offline_with_every_codebook(page, site):
    index, _, _ = site
    open_site(page, index)
    assert page.text_content("#codebooks .name") == "hook_embed"
    assert "0 dead codes" in page.text_content("#codebooks .dead")
    assert page.locator("#codebooks svg.hist rect.bar").count() > 0
    check_clean(page, index)
    page.screenshot(path="/tmp/dashboard_index.png", full_page=True)


def test_token_search_returns_the_tokens_code(page, site):
    index, file_id, _ = site
    open_site(page, index)
    search(page, "token", "t7")
    first = page.locator("#results tr").nth(1)
    cells = first.locator("td").all_text_contents()
    assert cells[0] == "t7"
    assert cells[1] == "hook_embed · code 7"
    assert cells[2:4] == ["1", "1"]  # precision and recall 1.0
    assert first.locator("a").get_attribute("href") == f"#/{file_id}/0/7"
    check_clean(page, index)


def test_code_page_highlights_the_firing_token_in_every_context(page, site):
    index, file_id, tokens = site
    open_site(page, index, f"#/{file_id}/0/7")
    fired = page.locator("#contexts .fire").all_text_contents()
    assert fired == ["t7"] * min(int((tokens == 7).sum()), 20)
    assert page.text_content("#code-title") == "hook_embed · code 7"
    check_clean(page, index)
    page.screenshot(path="/tmp/dashboard_code.png", full_page=True)


def test_regex_and_code_id_search(page, site):
    index, file_id, _ = site
    open_site(page, index)
    search(page, "regex", "t8")
    assert page.locator("#results a").first.text_content() == "hook_embed · code 8"
    search(page, "code", f"{file_id}/0/5")
    assert page.locator("#results a").all_text_contents() == ["hook_embed · code 5"]
    search(page, "regex", "(")
    assert "invalid regex" in page.text_content("#results .error")
    check_clean(page, index)


@pytest.mark.parametrize("token", [3, 4])
def test_payload_token_text_renders_as_text_and_runs_nothing(page, site, token):
    index, file_id, _ = site
    open_site(page, index, f"#/{file_id}/0/{token}")
    assert set(page.locator("#contexts .fire").all_text_contents()) == {VOCAB[token]}
    assert page.locator("#contexts img").count() == 0
    open_site(page, index)
    search(page, "token", VOCAB[token])
    assert page.locator("#results td .tok").first.text_content() == VOCAB[token]
    check_clean(page, index)
