"""The playground (GET /steer) in a real headless Chromium against a real `sae-steer serve`: find a feature,
steer with it, compare streamed answers, sweep, the telemetry heat map, the logit lens, a CAA build with the
admin key, and hostile strings (in a label, a top context and a model answer) that must stay text.

The tests share one page and run in file order (each builds on the page the previous one left); the
screenshots they take go to docs/screenshots/ (the README shows them) with SAE_STEER_SCREENSHOTS=1."""
from __future__ import annotations

import ast
import json
import re

import pytest
import requests

from tests.browser.conftest import API_KEY, AUTH, HOSTILE, IMG, SCRIPT
from tests.server.conftest import ADMIN_KEY

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]
WAIT = 120  # seconds for the engine's answers on a busy CPU
seen: dict[str, tuple[str, str]] = {}  # answers one test shows the next


@pytest.fixture(scope="module")
def page(browser, playground):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(playground.url + "/steer")
    status = lambda d: d.find_element("id", "status").text  # noqa: E731
    WebDriverWait(browser, WAIT).until(status)
    assert status(browser).startswith("401"), status(browser)  # the server runs with --api-key: nothing loads
    browser.find_element("id", "api-key").send_keys(API_KEY, Keys.TAB)
    WebDriverWait(browser, WAIT).until(lambda d: status(d) == "ready")
    return browser


def wait(driver, condition, what: str):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:  # the page re-renders what it shows: an element found a moment ago may be gone
        return WebDriverWait(driver, WAIT, poll_frequency=0.2, ignored_exceptions=(
            NoSuchElementException, StaleElementReferenceException)).until(condition)
    except TimeoutException:
        raise AssertionError(f"waited for {what}; status line: {driver.find_element('id', 'status').text!r}") from None


def css(driver, selector: str):
    return driver.find_elements("css selector", selector)


def click(driver, selector: str, index: int = 0):
    css(driver, selector)[index].click()


def run(driver, button: str, status: str, what: str):
    """Click a button and wait for the status line to start with `status` (cleared first: the last run's
    line must not pass for this one's)."""
    driver.execute_script("document.getElementById('status').textContent = ''")
    click(driver, button)
    wait(driver, lambda d: d.find_element("id", "status").text.startswith(status), what)


def set_value(driver, element_id: str, value: str):
    node = driver.find_element("id", element_id)
    node.clear()
    node.send_keys(value)


def shot(driver, screenshots, name: str, element_id: str | None = None):
    target = driver.find_element("id", element_id) if element_id else driver
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", target) if element_id else None
    target.screenshot(str(screenshots / name))


def not_pwned(driver, *containers: str):
    """Nothing planted ran, and no element was made from a planted string (the CSP aside: text nodes only)."""
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    for c in containers:
        assert not css(driver, f"#{c} script, #{c} img"), f"#{c} holds an element made from model text"


def test_page_headers_and_routes_in_openapi(playground):
    page = requests.get(playground.url + "/steer", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = {d.split()[0]: d.split()[1:] for d in page.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'none'"] and csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert "<script>" not in page.text and not re.search(r"\s(style|on[a-z]+)\s*=", page.text)  # nothing inline
    assert not re.search(r"https?:|//[\w.-]+\.\w", page.text)  # nothing from another origin
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = requests.get(f"{playground.url}/steer/assets/{name}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"https?:|url\(|@import", asset.text), name  # no outside fetch, font or sheet
    script = requests.get(playground.url + "/steer/assets/playground.js", timeout=30).text
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|eval\(", script)
    for bad in ("../endpoints.py", "playground.html", "x.js"):
        assert requests.get(f"{playground.url}/steer/assets/{bad}", timeout=30).status_code == 404
    paths = requests.get(playground.url + "/openapi.json", timeout=30).json()["paths"]
    assert {"/steer", "/steer/assets/{name}", "/v1/steering/lens"} <= set(paths)


def test_search_and_open_a_card(page, screenshots):
    set_value(page, "search", "winter")
    click(page, "#search-go")
    hits = wait(page, lambda d: css(d, "#results li button"), "search results")
    assert [h.text.strip() for h in hits[:2]] == ["#5", f"#{HOSTILE}"]  # both fire on " winter" (3 points each)
    hits[0].click()
    wait(page, lambda d: "cold weather" in d.find_element("id", "card").text, "feature 5's card")
    card = page.find_element("id", "card").text
    assert "density 0.60% of tokens" in card and "calibrated: add 30" in card and "automatic label: label 5" in card
    assert [m.text for m in css(page, "#card mark")] == [" winter"]  # the firing token, highlighted
    assert len(css(page, "#card .chip")) == 16  # 8 promoted and 8 suppressed tokens
    shot(page, screenshots, "find.png", "find")


def test_hostile_label_and_context_stay_text(page):
    set_value(page, "feature-index", str(HOSTILE))
    click(page, "#feature-go")
    wait(page, lambda d: f"#{HOSTILE}" in d.find_element("css selector", "#card h3").text, "the hostile card")
    assert page.find_element("css selector", "#card .label").text == SCRIPT
    assert page.find_element("css selector", "#card .auto-label").text == IMG
    context = page.find_element("css selector", "#card .context").text
    assert SCRIPT in context and IMG in context
    not_pwned(page, "card", "results")


def test_steer_with_a_card_and_compare_streamed(page, screenshots):
    set_value(page, "feature-index", "5")
    click(page, "#feature-go")
    wait(page, lambda d: "cold weather" in d.find_element("id", "card").text, "feature 5's card")
    click(page, "#card .steer-add")
    auto = wait(page, lambda d: [a for a in css(d, "#interventions .auto") if a.is_selected()], "'auto' (calibrated)")
    assert len(auto) == 1
    request = json.loads(page.find_element("id", "request-json").text)
    assert request["steering"]["interventions"] == [{"type": "sae", "sae": "tiny-sae", "feature": 5, "mode": "add",
                                                     "strength": "auto"}]
    assert request["stream"] is True and request["compare"] is True and request["telemetry"]["sae"] == "tiny-sae"
    run(page, "#generate-go", "done", "the answers")
    steered, unsteered = [a.text for a in css(page, "#answers .answer .text")]
    assert steered and unsteered and steered != unsteered
    seed = int(page.find_element("id", "seed-shown").text.split()[1])
    assert json.loads(page.find_element("id", "request-json").text)["seed"] == seed
    curl = page.find_element("id", "request-curl").text
    assert json.loads(curl.split(" -d '", 1)[1].rstrip("'")) == request | {"seed": seed}
    call = ast.parse(page.find_element("id", "request-python").text).body[-1].value  # r = client...create(...)
    python = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert python.pop("extra_body") == {k: request[k] for k in ("steering", "compare", "telemetry")}
    assert python == {k: v for k, v in (request | {"seed": seed}).items() if k not in ("steering", "compare", "telemetry")}
    shot(page, screenshots, "steer.png", "steer")
    shot(page, screenshots, "compare.png", "generate")
    seen["answers"] = (steered, unsteered)


def test_heat_map_and_its_features(page, screenshots):
    tokens = css(page, "#heatmap span.tok")  # one per generated token (the tiny model's bytes do not all decode alone)
    assert len(tokens) == json.loads(page.find_element("id", "request-json").text)["max_tokens"]
    shades = {t.value_of_css_property("background-color") for t in tokens}
    assert len(shades) > 1  # shaded by each token's strongest feature
    from selenium.webdriver import ActionChains
    ActionChains(page).move_to_element(tokens[0]).perform()
    features = wait(page, lambda d: css(d, "#inspector li button"), "the hovered token's features")
    assert len(features) <= 5  # top_k of the telemetry request
    # labels: the labels file's, else the feature records' ("label N"; feature 6's is the planted script)
    wait(page, lambda d: all(s.text for s in css(d, "#inspector .flabel")), "the features' labels")
    for button, label in zip(features, css(page, "#inspector .flabel")):
        i = int(button.text.lstrip("#"))
        assert label.text == {5: "cold weather", HOSTILE: SCRIPT}.get(i, f"label {i}")
    shot(page, screenshots, "heatmap.png", "inside")
    index = features[0].text.lstrip("#")
    features[0].click()
    wait(page, lambda d: f"#{index}" in d.find_element("css selector", "#card h3").text, "the clicked feature's card")


def test_sweep_sent_as_one_batch(page):
    set_value(page, "sweep", "0, 30")
    run(page, "#sweep-go", "swept", "the sweep")
    at_zero, at_30 = [a.text for a in css(page, "#answers .answer .text")]
    # greedy, one seed: strength 0 adds nothing (the unsteered answer), 30 is what "auto" stood for
    assert (at_zero, at_30) == (seen["answers"][1], seen["answers"][0])


def test_a_calibrated_vector_offers_auto(page):
    click(page, "#add-vector")
    row = css(page, "#interventions .intervention")[-1]
    auto = row.find_element("css selector", ".auto")
    assert auto.is_enabled() and not auto.is_selected() and "auto (2)" in row.text
    auto.click()
    request = json.loads(page.find_element("id", "request-json").text)
    assert request["steering"]["interventions"][-1] == {"type": "vector", "vector": "calm", "coef": "auto"}
    row.find_element("css selector", ".remove").click()
    assert len(json.loads(page.find_element("id", "request-json").text)["steering"]["interventions"]) == 1


def test_logit_lens_grid_steered_and_unsteered(page, screenshots):
    click(page, "#lens-go")
    wait(page, lambda d: css(d, "table.lens"), "the lens grid")
    rows = css(page, "table.lens tr")
    assert [r.find_element("css selector", "th").text for r in rows] == ["layer 3", "layer 2", "layer 1", "layer 0", "input"]
    assert len(rows[0].find_elements("css selector", "td")) == len(rows[-1].find_elements("css selector", "th")) - 1
    click(page, "#lens-toggle")
    assert page.find_element("id", "lens-which").text.startswith("steered")
    assert css(page, "table.lens td.changed")  # steering at layer 1 moves the later layers' predictions
    shot(page, screenshots, "lens.png", "lens")
    click(page, "#lens-toggle")
    assert not css(page, "table.lens td.changed")


def vector_names(playground) -> list[str]:
    return [v["name"] for v in requests.get(playground.url + "/v1/steering/vectors", headers=AUTH, timeout=30).json()["data"]]


def test_build_a_vector_with_the_admin_key(page, playground, screenshots):
    set_value(page, "build-name", "kind")
    set_value(page, "build-layers", "1")
    run(page, "#build-go", "401", "the refusal without the key")
    assert "kind" not in vector_names(playground)
    set_value(page, "admin-key", ADMIN_KEY)
    run(page, "#build-go", "vector kind built", "the build")
    assert "kind" in vector_names(playground)
    request = json.loads(page.find_element("id", "request-json").text)
    assert request["steering"]["interventions"][-1] == {"type": "vector", "vector": "kind", "coef": 1}
    assert page.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    shot(page, screenshots, "build.png", "build")
    run(page, "#generate-go", "done", "answers with the built vector")
    steered, unsteered = [a.text for a in css(page, "#answers .answer .text")]
    assert steered != unsteered
    width, height = page.get_window_size()["width"], page.get_window_size()["height"]
    page.set_window_size(width, page.execute_script("return document.documentElement.scrollHeight") + 140)
    page.save_screenshot(str(screenshots / "playground.png"))  # the whole page, every section in use
    page.set_window_size(width, height)


def test_completion_route_not_streamed(page):
    click(page, "input[name=api][value=completion]")
    click(page, "#stream")  # off
    request = json.loads(page.find_element("id", "request-json").text)
    assert request["prompt"] == "The cold came in winter and" and "stream" not in request and request["logprobs"] == 0
    run(page, "#generate-go", "done", "the completions")
    steered, unsteered = [a.text for a in css(page, "#answers .answer .text")]
    assert steered and unsteered and steered != unsteered


@pytest.mark.parametrize("api", ["completion", "chat"])
def test_hostile_model_answer_stays_text(page, api):
    payload = SCRIPT + IMG
    # The answer itself is the payload: the engine's structured outputs force it token by token.
    click(page, f"input[name=api][value={api}]")
    if page.find_element("id", "stream").is_selected() != (api == "chat"):
        click(page, "#stream")  # chat streamed, completion not
    set_value(page, "max-tokens", "120")
    if not page.find_element("id", "extra").is_displayed():
        click(page, "#extra-summary")
    set_value(page, "extra", json.dumps({"structured_outputs": {"choice": [payload]}}))
    run(page, "#generate-go", "done", "the hostile answers")
    answers = [a.text for a in css(page, "#answers .answer .text")]
    assert answers == [payload, payload]
    assert "".join(t.text for t in css(page, "#heatmap span.tok")).startswith(payload)  # then its end token
    not_pwned(page, "answers", "heatmap", "inspector", "card")


def test_no_request_left_the_origin_and_no_csp_violation(page, playground):
    urls = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(playground.url + "/") for u in urls), urls
    logs = [e["message"] for e in page.get_log("browser")]
    assert not [m for m in logs if "Content Security Policy" in m], logs
