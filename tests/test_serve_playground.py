"""The playground page at `/`, a small code editor, in a real headless Chromium (Debian's
chromium + chromedriver, installed with apt-get when missing), driven by selenium: type code,
see the completion at the caret as ghost text equal to the API's own answer, accept it with
Tab, type on and watch the request in flight aborted and a new one sent; Tab / Shift-Tab /
Enter indentation; the API key; and no request to anything but our server. The highlight
route's lexing is checked without a browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import httpx
import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from serve_server import Server  # noqa: E402

from polycoder.checkpoint import build_model, save_checkpoint  # noqa: E402
from polycoder.serve.common import APIError  # noqa: E402
from polycoder.serve.playground import highlight  # noqa: E402

slow = pytest.mark.slow
FALLBACK_NOTE = "prefix only"


def chromium_paths() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages if they are missing."""
    def found():
        return shutil.which("chromium"), shutil.which("chromedriver")

    browser, driver = found()
    if browser and driver:
        return browser, driver
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium and chromedriver are missing and cannot be installed here (needs apt-get as root): "
                    "apt-get install chromium chromium-driver")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium with apt-get ({' '.join(cmd)}): {done.stderr.strip()[-300:]}")
    browser, driver = found()
    if not (browser and driver):
        pytest.skip("apt-get installed chromium but chromium/chromedriver are still not on PATH")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = chromium_paths()
    profile = tempfile.mkdtemp(prefix="polycoder-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1200,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every network request the page makes
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tiny_folder):
    """A model without FIM tokens: the server refuses `suffix`, the page falls back to the prefix."""
    s = Server(tiny_folder, "--max-batch-size", "4")
    yield s
    s.stop()


# ---- driving the page --------------------------------------------------------------------------

def open_page(driver, server: Server, **settings) -> None:
    """Load the page and fill in its settings (element id -> value; a bool sets a checkbox, a
    string picks a select's option by value)."""
    driver.get(server.url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return !!window.playgroundStats"))
    for name, value in settings.items():
        element = driver.find_element(By.ID, name)
        if isinstance(value, bool):
            if element.is_selected() != value:
                element.click()
        elif element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(str(value))


def put(driver, text: str, caret: int) -> None:
    """Set the editor's text and caret without typing it (typing would add Enter's indentation)."""
    driver.execute_script("""
        const code = document.getElementById("code");
        code.focus(); code.value = arguments[0]; code.setSelectionRange(arguments[1], arguments[1]);""", text, caret)


def editor(driver):
    return driver.find_element(By.ID, "code")


def state(driver) -> str:
    return driver.find_element(By.ID, "editor").get_attribute("data-state")


def wait_for_state(driver, *states: str, timeout: float = 90) -> str:
    WebDriverWait(driver, timeout, poll_frequency=0.005).until(lambda d: state(d) in states)
    return state(driver)


def ghost(driver) -> str | None:
    return driver.execute_script("const g = document.getElementById('ghost'); return g && g.textContent;")


def stats(driver) -> dict:
    return driver.execute_script("return window.playgroundStats;")


def caret(driver) -> tuple[int, int]:
    return tuple(driver.execute_script("const c = document.getElementById('code'); return [c.selectionStart, c.selectionEnd];"))


def painted_around_ghost(driver) -> tuple[str, str]:
    """The text the <pre> paints before and after the ghost span."""
    return tuple(driver.execute_script("""
        const view = document.getElementById("highlight"), g = document.getElementById("ghost");
        const before = document.createRange(); before.setStart(view, 0); before.setEndBefore(g);
        const after = document.createRange(); after.setStartAfter(g); after.setEnd(view, view.childNodes.length);
        return [before.toString(), after.toString()];"""))


def api_completion(server: Server, prompt: str, max_tokens: int, suffix: str | None = None) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if suffix:
        body["suffix"] = suffix
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def completed_at_caret(driver, server: Server, max_tokens: int, fim: bool) -> str:
    """Wait for the completion, check it is the API's answer shown at the caret, and return it."""
    assert wait_for_state(driver, "done", "error") == "done", driver.find_element(By.ID, "status").text
    text = editor(driver).get_attribute("value")
    at, end = caret(driver)
    assert at == end
    prefix, suffix = text[:at], text[at:]
    expected = api_completion(server, prefix, max_tokens, suffix if fim else None)
    assert expected, "the tiny model's completion is empty: pick another prompt"
    shown = ghost(driver)
    assert shown == expected
    assert painted_around_ghost(driver) == (prefix, suffix + "\n")  # the <pre> ends with a filler newline
    body = stats(driver)["lastBody"]
    assert body["prompt"] == prefix and body.get("suffix") == (suffix if fim and suffix else None)
    return shown


# ---- the browser tests ---------------------------------------------------------------------------

@slow
def test_ghost_text_is_the_apis_completion_at_the_caret_and_tab_accepts_it(browser, server):
    open_page(browser, server, max_tokens=12)
    assert browser.title == "polycoder playground"
    assert browser.find_element(By.ID, "model").text == "tiny"
    text = "def greet(name):\n    \n\nprint(greet('you'))\n"
    at = text.index("\n\n")
    put(browser, text, at)
    editor(browser).send_keys("ret")  # typed: the page asks as the user types
    shown = completed_at_caret(browser, server, 12, fim=False)
    # The model has no FIM tokens: the server refused `suffix`, the page said so once and sent the prefix.
    assert FALLBACK_NOTE in browser.find_element(By.ID, "mode").text
    before = text[:at] + "ret"
    assert editor(browser).get_attribute("value") == before + text[at:]  # ghost text is not part of the text
    editor(browser).send_keys(Keys.TAB)
    assert editor(browser).get_attribute("value") == before + shown + text[at:]
    assert caret(browser) == (len(before + shown),) * 2
    # Accepting asks for what comes next, from the prefix alone (no second try with suffix).
    completed_at_caret(browser, server, 12, fim=False)
    assert browser.find_element(By.ID, "mode").text.count(FALLBACK_NOTE) == 1


@slow
def test_typing_more_asks_again_and_aborts_the_request_in_flight(browser, server):
    open_page(browser, server, max_tokens=200)
    put(browser, "int main(void) {\n    int", len("int main(void) {\n    int"))
    # " =" is typed by the page itself in the same task that sees the stream start, so the
    # request is in flight by construction (a second WebDriver call could come after the
    # stream ended: the tiny model's answer may be short).
    browser.execute_script("""
        const box = document.getElementById("editor"), code = document.getElementById("code");
        const seen = new MutationObserver(() => {
          if (box.dataset.state !== "streaming") return;
          seen.disconnect();
          const aborted = window.playgroundStats.aborted, requests = window.playgroundStats.requests;
          code.setRangeText(" =", code.selectionStart, code.selectionEnd, "end");
          code.dispatchEvent(new Event("input"));
          window.typedWhileStreaming = { aborted: window.playgroundStats.aborted - aborted, requests };
        });
        seen.observe(box, { attributes: true, attributeFilter: ["data-state"] });""")
    editor(browser).send_keys(" x")
    WebDriverWait(browser, 90, poll_frequency=0.01).until(lambda d: d.execute_script("return window.typedWhileStreaming"))
    typed = browser.execute_script("return window.typedWhileStreaming")
    assert typed["aborted"] == 1
    completed_at_caret(browser, server, 200, fim=False)
    assert stats(browser)["requests"] > typed["requests"]
    assert editor(browser).get_attribute("value") == "int main(void) {\n    int x ="


@slow
def test_esc_dismisses_and_moving_the_caret_drops_the_suggestion(browser, server):
    open_page(browser, server, max_tokens=8)
    put(browser, "x = 1\n", 6)
    editor(browser).send_keys("y")
    wait_for_state(browser, "done")
    assert ghost(browser)
    editor(browser).send_keys(Keys.ESCAPE)
    assert ghost(browser) is None and state(browser) == "idle"
    editor(browser).send_keys(Keys.TAB)  # nothing shown: Tab indents
    assert editor(browser).get_attribute("value") == "x = 1\ny   "  # to the next stop of 4
    wait_for_state(browser, "done")
    assert ghost(browser)
    editor(browser).send_keys(Keys.ARROW_LEFT)
    assert ghost(browser) is None


@slow
def test_tab_shift_tab_and_enter_handle_indentation(browser, server):
    open_page(browser, server, auto=False)  # no suggestions: every Tab indents
    code = editor(browser)
    put(browser, "", 0)
    code.send_keys("if x:", Keys.ENTER, Keys.TAB, "y = 1", Keys.ENTER, "z")
    assert code.get_attribute("value") == "if x:\n    y = 1\n    z"  # Enter kept the line's indentation
    code.send_keys(Keys.SHIFT, Keys.TAB)
    assert code.get_attribute("value") == "if x:\n    y = 1\nz"
    browser.execute_script("document.getElementById('code').setSelectionRange(0, 100)")
    code.send_keys(Keys.TAB)  # a selection over lines: each line indented
    assert code.get_attribute("value") == "    if x:\n        y = 1\n    z"
    code.send_keys(Keys.SHIFT, Keys.TAB)
    assert code.get_attribute("value") == "if x:\n    y = 1\nz"
    browser.find_element(By.CSS_SELECTOR, "#indent option[value=tab]").click()
    put(browser, "a", 1)
    code.send_keys(Keys.HOME, Keys.TAB)
    assert code.get_attribute("value") == "\ta"
    assert stats(browser)["requests"] == 0


@slow
def test_code_is_highlighted_under_the_textarea(browser, server):
    open_page(browser, server, auto=False)
    put(browser, "", 0)
    editor(browser).send_keys("def f(x):")
    painted = """
        const view = document.getElementById("highlight"), k = view.querySelector("span.k"), f = view.querySelector("span.nf");
        return k && f && [view.textContent, k.textContent, f.textContent,
                          getComputedStyle(k).color, getComputedStyle(view).color];"""
    # Read in one script: each highlight answer repaints the <pre>, so elements found earlier go stale.
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(painted))
    text, keyword, name, keyword_colour, plain_colour = browser.execute_script(painted)
    assert (text, keyword, name) == ("def f(x):\n", "def", "f")
    assert keyword_colour != plain_colour


@slow
def test_the_servers_error_is_shown(browser, server):
    open_page(browser, server, max_tokens=100000)
    put(browser, "x", 1)
    editor(browser).send_keys("y")
    assert wait_for_state(browser, "done", "error") == "error"
    assert "max_tokens" in browser.find_element(By.ID, "status").text


@slow
def test_code_longer_than_the_context_is_sent_as_a_window_around_the_caret(browser, server):
    open_page(browser, server, max_tokens=8)
    text = "".join(f"x{i} = {i}\n" for i in range(2000))  # far over the tiny model's 256 tokens
    put(browser, text + "\n" + text, len(text))
    editor(browser).send_keys("y")
    assert wait_for_state(browser, "done", "error") == "done", browser.find_element(By.ID, "status").text
    prompt = stats(browser)["lastBody"]["prompt"]
    assert (text + "y").endswith(prompt) and len(prompt) < len(text) and (text + "y")[-len(prompt) - 1] == "\n"
    assert ghost(browser) == api_completion(server, prompt, 8)


@slow
def test_the_page_asks_nothing_but_our_server(browser, server):
    browser.get_log("performance")  # drop what earlier tests logged
    open_page(browser, server, max_tokens=8, language="c")
    put(browser, "int f(void) {\n", 14)
    editor(browser).send_keys("  return")
    wait_for_state(browser, "done")
    editor(browser).send_keys(Keys.TAB)
    wait_for_state(browser, "done")
    entries = browser.execute_script(
        "return performance.getEntries().filter((e) => e.name.includes(':')).map((e) => e.name);")
    logged = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    requested = [m["params"]["request"]["url"] for m in logged if m["method"] == "Network.requestWillBeSent"]
    assert any(u.endswith("/playground/editor.js") for u in requested)
    assert any(u.endswith("/playground/highlight") for u in requested)
    assert any(u.endswith("/v1/completions") for u in requested)
    for url in entries + requested:
        assert url.startswith(server.url + "/"), url


@pytest.fixture(scope="module")
def guarded(tiny_folder):
    s = Server(tiny_folder, env={"POLYCODER_API_KEY": "s3cret"})
    yield s
    s.stop()


@slow
def test_the_api_key_is_asked_for_and_sent(browser, guarded):
    open_page(browser, guarded, max_tokens=8)
    assert browser.find_element(By.ID, "api_key").is_displayed()
    put(browser, "def f():\n", 9)
    editor(browser).send_keys("  ")
    assert wait_for_state(browser, "done", "error") == "error"
    assert "API key" in browser.find_element(By.ID, "status").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#highlight span")  # highlighting needs the key too
    browser.find_element(By.ID, "api_key").send_keys("s3cret")
    editor(browser).send_keys("r")
    assert wait_for_state(browser, "done", "error") == "done", browser.find_element(By.ID, "status").text
    assert ghost(browser)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return !!document.querySelector('#highlight span.k')"))


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory, tiny_config, code_tokenizer):
    """A tiny random model whose tokenizer has the FIM sentinels (in rows of the padded embedding)."""
    tokenizer = code_tokenizer.with_fim_tokens()
    assert tokenizer.vocab_size <= tiny_config.vocab_size
    folder = tmp_path_factory.mktemp("fim") / "model"
    save_checkpoint(build_model(tiny_config, seed=1), tokenizer, folder)
    s = Server(folder)
    yield s
    s.stop()


@slow
def test_a_model_that_fills_in_the_middle_gets_the_text_after_the_caret(browser, fim_server):
    open_page(browser, fim_server, max_tokens=12)
    text = "def greet(name):\n    \n\nprint(greet('you'))\n"
    at = text.index("\n\n")
    put(browser, text, at)
    editor(browser).send_keys("ret")
    shown = completed_at_caret(browser, fim_server, 12, fim=True)  # the API's answer for prompt + suffix
    assert browser.find_element(By.ID, "mode").text == ""
    assert api_completion(fim_server, text[:at] + "ret", 12) != shown  # the suffix made a difference
    editor(browser).send_keys(Keys.TAB)
    assert editor(browser).get_attribute("value") == text[:at] + "ret" + shown + text[at:]


@pytest.fixture(scope="module")
def lenient(tiny_folder):
    """A model without FIM tokens on a server that completes the prefix alone when sent a suffix."""
    s = Server(tiny_folder, "--suffix-fallback", "prefix-only")
    yield s
    s.stop()


@slow
def test_the_servers_own_prefix_only_fallback_is_said_once(browser, lenient):
    open_page(browser, lenient, max_tokens=12)
    text = "int f(int x) {\n    \n}\n"
    put(browser, text, text.index("\n}"))
    editor(browser).send_keys("return")
    completed_at_caret(browser, lenient, 12, fim=True)  # the page sent the suffix, the server ignored it
    assert "suffix was ignored" in browser.find_element(By.ID, "mode").text


# ---- the highlight route, without a browser --------------------------------------------------------

def test_highlight_tokens_join_to_the_code_exactly():
    code = "\n\ndef f(x):\n\treturn x  # why\n\n\n"  # newlines at both ends, a tab: kept as they are
    out = highlight(code, "python")
    assert out["language"] == "Python"
    assert "".join(t for _, t in out["tokens"]) == code
    assert ["k", "def"] in out["tokens"] and ["c1", "# why"] in out["tokens"]
    assert highlight("x", "text")["tokens"] == [["", "x"]]
    assert highlight("", "rust")["tokens"] == []
    assert highlight("\ufeffx = 1", "python")["tokens"] == [["", "\ufeffx = 1"]]  # a lexer that drops the BOM
    assert "".join(t for _, t in highlight("echo $x;", "php")["tokens"]) == "echo $x;"


def test_highlight_refuses_an_unknown_language():
    with pytest.raises(APIError) as e:
        highlight("x", "klingon")
    assert e.value.status == 400 and "Pygments lexer name" in e.value.message


@slow
def test_highlight_route_checks_its_body(server):
    url = server.url + "/playground/highlight"
    r = httpx.post(url, json={"code": "fn main() {}", "language": "rust"}, timeout=30)
    assert r.status_code == 200 and r.json()["language"] == "Rust"
    for body, param in [({"code": 1}, "code"), ({"code": "x", "language": "nope"}, "language"),
                        ({"code": "x" * 200_001, "language": "c"}, "code")]:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert httpx.get(server.url + "/playground/editor.js", timeout=30).headers["content-type"].startswith(
        "text/javascript")
