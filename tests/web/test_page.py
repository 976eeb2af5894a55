"""The web page at `/`, in a real headless Chromium, against a real `irg serve` on the demo model.

The page exposes `window.irgDebug` (server/web/app.js): `state` is the job as the page saw it (events, texts,
image loads, reconnects), `dropEvery` makes it drop its connection as a flaky network would, and `validate`
turns the form's own checks off so the server's 422 can be seen.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from PIL import Image
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.web.conftest import API_KEY, Server

PROMPT = "A lighthouse on a cliff at dusk, waves crashing below"
# the demo model is tiny and CPU-bound; greedy thoughts (irg's default samples at 0.3, and on a CPU drawing from
# 152k probabilities costs more per token than the tiny model itself)
SMALL = {"width": 64, "height": 64, "steps": 4, "max_tokens": 48, "temperature": 0}
LONG = {"width": 256, "height": 256, "steps": 200, "max_tokens": 64}  # runs long enough to be stopped
HUGE = {"width": 1024, "height": 1024, "steps": 200, "max_tokens": 1}  # runs for minutes
JOB_WAIT_S = 120  # generous: other test suites may share the two cores
TERMINAL = ("succeeded", "failed", "cancelled", "error")


# -- helpers ------------------------------------------------------------------------------------------------


def report(browser) -> str:
    """What the page shows and knows, for failure messages."""
    try:
        info = browser.execute_script("""
            const text = (id) => document.getElementById(id)?.innerText ?? null;
            const s = window.irgDebug?.state;
            return {status: text("status"), runError: text("run-error"), formError: text("form-error"),
                    state: s && {...s, events: s.events.length, lastEvents: s.events.slice(-5)}};""")
        logs = [f"{e['level']} {e['message']}" for e in browser.get_log("browser")]
    except Exception as e:  # the page itself may be what broke
        return f"(could not read the page: {e})"
    return "page: " + json.dumps(info, ensure_ascii=False, indent=1)[:3000] + "\nconsole:\n" + "\n".join(logs[-20:])


def wait_for(browser, script: str, what: str, timeout: float = JOB_WAIT_S):
    """Poll a JavaScript expression until it is truthy; fail with the page's state if it never is."""
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda d: d.execute_script(script))
    except TimeoutException:
        pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{report(browser)}", pytrace=False)


def open_page(browser, server: Server) -> None:
    browser.get("about:blank")  # ends the previous test's page (and its streams) first
    browser.get(server.url + "/")
    wait_for(browser, "return !!window.irgDebug", "the page's script to load", 30)
    wait_for(browser, "return document.getElementById('health').dataset.tone === 'done'", "the health check", 30)


def fill(browser, prompt: str = PROMPT, **fields: object) -> None:
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    for name, value in fields.items():
        el = browser.find_element(By.ID, name)
        if el.tag_name == "select":
            Select(el).select_by_value(str(value))
        else:
            el.clear()
            el.send_keys(str(value))


def state(browser) -> dict:
    return browser.execute_script("return JSON.parse(JSON.stringify(window.irgDebug.state))")


def wait_until_ended(browser) -> dict:
    wait_for(
        browser, f"const s = window.irgDebug.state; return s && {list(TERMINAL)}.includes(s.status)", "the job to end"
    )
    return state(browser)


def text_of(browser, selector: str) -> str:
    """textContent, exactly (Selenium's .text normalises whitespace)."""
    return browser.execute_script("return document.querySelector(arguments[0]).textContent", selector)


def loaded_images(browser) -> list[dict]:
    return browser.execute_script("""
        return [...document.querySelectorAll('#rounds-view img')]
          .filter((img) => !img.hidden && img.complete && img.naturalWidth > 0)
          .map((img) => ({round: img.closest('.round').dataset.round, kind: img.closest('.round').dataset.kind,
                          width: img.naturalWidth, height: img.naturalHeight, src: img.src, alt: img.alt}));""")


def wait_job_status(server: Server, job_id: str, statuses: tuple[str, ...], timeout: float = JOB_WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = server.json("GET", f"/v1/generations/{job_id}")
        if job["status"] in statuses or time.monotonic() > deadline:
            assert job["status"] in statuses, f"job {job_id} is {job['status']}, expected one of {statuses}"
            return job
        time.sleep(0.2)


def save_full_page(browser, path) -> None:
    height, chrome = browser.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    browser.set_window_size(1400, max(1000, height + chrome))  # the whole page, nothing cut off
    try:
        wait_for(
            browser,
            "return document.documentElement.clientHeight >= document.documentElement.scrollHeight",
            "the window to fit the page",
            10,
        )
        assert browser.save_screenshot(str(path)), "the browser could not take a screenshot"
    finally:
        browser.set_window_size(1400, 1000)


# -- the tests (the first is the acceptance test) ------------------------------------------------------


def test_full_trajectory_renders(browser, server, artifacts):
    open_page(browser, server)
    fill(browser, **SMALL)
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, "return document.getElementById('status').dataset.tone === 'busy'", "the page to start", 30)

    s = wait_until_ended(browser)
    assert s["status"] == "succeeded", report(browser)
    wait_for(
        browser,
        "return document.querySelectorAll('#rounds-view img:not([hidden])').length === 2 && "
        "[...document.querySelectorAll('#rounds-view img')].every((i) => i.complete && i.naturalWidth > 0)",
        "both images to load",
        30,
    )
    images = loaded_images(browser)
    assert [(i["round"], i["kind"]) for i in images] == [("1", "draft"), ("2", "final")]
    assert all(i["width"] == 64 and i["height"] == 64 for i in images), images

    thinking = text_of(browser, ".round[data-round='1'] .thought-text")
    reflection = text_of(browser, ".round[data-round='2'] .thought-text")
    assert thinking.strip() and reflection.strip(), "the thinking or the reflection text is empty"
    assert thinking == s["texts"]["thinking-1"] and reflection == s["texts"]["reflection-2"]
    assert s["mismatches"] == 0, "the streamed pieces did not add up to the *.done texts"

    job = server.json("GET", f"/v1/generations/{s['jobId']}")
    assert job["status"] == "succeeded"
    assert browser.find_element(By.ID, "status").text.startswith("Done in")
    facts = browser.find_element(By.ID, "facts").text
    assert s["jobId"] in facts and str(job["params"]["seed"]) in facts, facts
    timings = browser.find_element(By.ID, "timings")
    assert timings.is_displayed() and len(timings.find_elements(By.CSS_SELECTOR, "tbody tr")) >= 4
    assert "Whole run" in timings.text
    assert browser.find_element(By.ID, "cancel").get_attribute("disabled") is not None
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, f"console errors: {severe}"

    path = artifacts / "trajectory.png"
    path.unlink(missing_ok=True)
    save_full_page(browser, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as shot:
        shot.verify()
    with Image.open(path) as shot:
        assert shot.width == 1400 and shot.height >= 800, shot.size
        assert len(set(shot.convert("RGB").resize((64, 64)).get_flattened_data())) > 100, "the screenshot is blank"


def submitted(server: Server) -> float:
    """Jobs the server has accepted so far (its Prometheus counter)."""
    _, raw, _ = server.request("GET", "/metrics")
    found = re.findall(r'^irg_jobs_submitted_total\{mode="irg"\} (\S+)$', raw.decode(), re.M)
    return float(found[0]) if found else 0.0


def test_stream_resumes_without_losing_or_repeating_events(browser, server):
    open_page(browser, server)
    fill(browser, **SMALL)
    before = submitted(server)
    # A very flaky network: the first stream drops before its first event (the page POSTs again with the same
    # Idempotency-Key), then the connection drops after every 7 events (the page resumes with Last-Event-ID).
    browser.execute_script("window.irgDebug.dropOnOpen = true; window.irgDebug.dropEvery = 7")
    browser.find_element(By.ID, "submit").click()
    s = wait_until_ended(browser)
    assert s["status"] == "succeeded", report(browser)
    assert s["posts"] == 2 and submitted(server) == before + 1, "the second POST queued a second job"
    # (a drop lands mid-chunk, so how many happen depends on how the server's bytes arrive; at least 2 do)
    assert s["reconnects"] >= 2, f"the page reconnected {s['reconnects']} times"
    assert s["duplicates"] == 0, "the server sent events again after Last-Event-ID"

    # Exactly the server's stream, in order: what a fresh reader of the whole stream gets.
    full = server.events(s["jobId"])
    assert [(e["id"], e["type"]) for e in s["events"]] == [(i, t) for i, t, _ in full]
    for key, whole in s["texts"].items():
        assert s["deltas"][key] == whole, f"{key}: the streamed pieces differ from the whole text"
    assert s["mismatches"] == 0
    wait_for(
        browser,
        "return [...document.querySelectorAll('#rounds-view img')]"
        ".filter((i) => i.complete && i.naturalWidth > 0).length === 2",
        "both images to load",
        30,
    )

    # A reload comes back to the job named in the address and replays its whole stream.
    assert browser.current_url.endswith("#" + s["jobId"])
    browser.refresh()
    wait_for(
        browser,
        "const s = window.irgDebug?.state; return s && s.status === 'succeeded' && "
        "[...document.querySelectorAll('#rounds-view img')].filter((i) => i.naturalWidth > 0).length === 2",
        "the reloaded page to show the job again",
        30,
    )
    again = state(browser)
    assert again["jobId"] == s["jobId"] and again["posts"] == 0 and again["texts"] == s["texts"]
    assert text_of(browser, ".round[data-round='1'] .thought-text") == s["texts"]["thinking-1"]


def test_cancel_stops_a_running_job(browser, server):
    open_page(browser, server)
    fill(browser, **LONG)
    browser.find_element(By.ID, "submit").click()
    wait_for(
        browser,
        "const s = window.irgDebug.state; return s && s.status === 'running' && "
        "s.events.some((e) => e.type === 'thinking.delta')",
        "the job to run",
    )
    browser.find_element(By.ID, "cancel").click()

    s = wait_until_ended(browser)
    assert s["status"] == "cancelled", report(browser)
    assert browser.find_element(By.ID, "status").text == "Cancelled."
    assert "Cancelled" in text_of(browser, ".round[data-round='2'] .placeholder")
    assert server.json("GET", f"/v1/generations/{s['jobId']}")["status"] == "cancelled"
    assert browser.find_element(By.ID, "submit").is_enabled()
    assert not browser.find_element(By.ID, "cancel").is_enabled()


def test_invalid_input_is_explained_in_words(browser, server):
    open_page(browser, server)
    fill(browser, **dict(SMALL, width=100))
    browser.find_element(By.ID, "submit").click()
    error = browser.find_element(By.ID, "form-error")
    assert error.is_displayed() and "Width must be a multiple of 16 from 16 to 1024." in error.text
    width = browser.find_element(By.ID, "width")
    assert width.get_attribute("aria-invalid") == "true"
    assert browser.execute_script("return window.irgDebug.state") is None, "an invalid form was sent"

    browser.execute_script("window.irgDebug.validate = false")  # let the server judge it
    browser.find_element(By.ID, "submit").click()
    wait_for(
        browser,
        "return document.getElementById('form-error').textContent.includes('server refused')",
        "the server's 422",
        30,
    )
    text = browser.find_element(By.ID, "form-error").text
    assert re.search(r"The server refused the request\. Width: .*multiple of 16", text), text
    assert width.get_attribute("aria-invalid") == "true"
    assert state(browser)["status"] == "error"


def test_full_queue_and_queue_position_are_shown(browser, server):
    body = {
        "prompt": "keeps the worker busy",
        "width": HUGE["width"],
        "height": HUGE["height"],
        "steps": HUGE["steps"],
        "thinking": {"max_tokens": HUGE["max_tokens"]},
    }
    running = server.json("POST", "/v1/generations", body)["id"]
    waiting = None
    try:
        wait_job_status(server, running, ("running",))
        waiting = server.json("POST", "/v1/generations", body)["id"]  # the one-job queue is now full

        open_page(browser, server)
        fill(browser, **SMALL)
        browser.find_element(By.ID, "submit").click()
        wait_for(
            browser,
            "return document.getElementById('form-error').textContent.includes('queue is full')",
            "the 429 to be shown",
            30,
        )
        text = browser.find_element(By.ID, "form-error").text
        assert re.fullmatch(r"The queue is full\. Retry in [1-3] s\.", text), text
        assert not browser.find_element(By.ID, "submit").is_enabled(), "Generate is enabled during Retry-After"

        server.json("DELETE", f"/v1/generations/{waiting}")
        wait_for(browser, "return !document.getElementById('submit').disabled", "Retry-After to pass", 15)
        assert "Try again now" in browser.find_element(By.ID, "form-error").text
        browser.find_element(By.ID, "submit").click()
        wait_for(
            browser,
            "return document.getElementById('status').textContent === 'Queued: position 1.'",
            "the queue position",
            30,
        )
        browser.find_element(By.ID, "cancel").click()  # a queued job never runs
        s = wait_until_ended(browser)
        assert s["status"] == "cancelled" and [e["type"] for e in s["events"]] == ["queued", "cancelled"]
    finally:
        for job_id in (running, waiting):
            if job_id:
                server.request("DELETE", f"/v1/generations/{job_id}")
        wait_job_status(server, running, ("cancelled", "succeeded", "failed"))


def test_api_key_and_failed_job(browser, keyed_server):
    open_page(browser, keyed_server)
    key = browser.find_element(By.ID, "api_key")
    wait_for(browser, "return !document.getElementById('key-field').hidden", "the API key field", 10)
    fill(browser, **SMALL)
    browser.find_element(By.ID, "submit").click()
    wait_for(
        browser,
        "return document.getElementById('form-error').textContent.includes('API key')",
        "the 401 to be shown",
        30,
    )
    assert key.get_attribute("aria-invalid") == "true"

    key.send_keys(API_KEY)
    browser.find_element(By.ID, "submit").click()
    s = wait_until_ended(browser)
    assert s["status"] == "succeeded", report(browser)
    wait_for(
        browser,
        "return [...document.querySelectorAll('#rounds-view img')]"
        ".filter((i) => i.complete && i.naturalWidth > 0).length === 2",
        "both images to load",
        30,
    )
    assert all(i["src"].startswith("blob:") for i in loaded_images(browser)), "images not fetched with the key"

    fill(browser, **HUGE)  # runs longer than the server's 10 s job timeout
    browser.find_element(By.ID, "submit").click()
    s = wait_until_ended(browser)
    assert s["status"] == "failed", report(browser)
    error = browser.find_element(By.ID, "run-error")
    assert error.is_displayed() and re.fullmatch(r"The job failed: .*longer than 10 s \(timeout\)\.", error.text)
    assert browser.find_element(By.ID, "status").text == "Failed."


def test_event_parser_handles_any_chunking(browser, server):
    """sse.js's reader, fed a stream cut at awkward places: CR, LF and CRLF line ends, a CRLF and a UTF-8
    character split across chunks, comments, multi-line data, and an unfinished event at the end."""
    open_page(browser, server)
    events, order = browser.execute_async_script(r"""
        const done = arguments[arguments.length - 1];
        import('./sse.js').then(async ({ readEvents, compareIds }) => {
          const bytes = (s) => new TextEncoder().encode(s);
          const e = bytes('data: caf\u00e9\n\n');
          const chunks = [bytes('id: 1\r'), bytes('\nevent: a\r\ndata: {"x"'), bytes(':1}\r\n\r\n'),
                          bytes(': keep-alive\r\n\r\n'), bytes('id: 2\nevent: b\ndata: one\ndata: two\n\n'),
                          bytes('id: 3\revent: c\rdata:z\r\r'), e.slice(0, e.length - 3), e.slice(e.length - 3),
                          bytes('id: 9\ndata: unfinished')];
          const body = new ReadableStream({ start(c) { chunks.forEach((x) => c.enqueue(x)); c.close(); } });
          const out = [];
          await readEvents(body, (ev) => out.push(ev));
          const pairs = [['1', '2'], ['10', '9'], ['1700000000000-1', '1700000000000-0'],
                         ['1700000000001-0', '1700000000000-5'], ['7', '7']];
          done([out, pairs.map(([a, b]) => compareIds(a, b))]);
        }, (err) => done(String(err)));""")
    assert events == [
        {"id": "1", "event": "a", "data": '{"x":1}'},
        {"id": "2", "event": "b", "data": "one\ntwo"},
        {"id": "3", "event": "c", "data": "z"},
        {"id": None, "event": "message", "data": "caf\u00e9"},
    ]
    assert order == [-1, 1, 1, 1, 0]


def test_the_image_forms_in_place_while_it_is_denoised(browser, server, artifacts):
    """Live previews (image.preview, ephemeral) replace the placeholder mid-denoising; the finished image
    replaces the last preview. A screenshot is taken while round 1 is still being drawn."""
    open_page(browser, server)
    fill(browser, width=256, height=256, steps=40, max_tokens=8)
    browser.find_element(By.ID, "submit").click()
    card = ".round[data-round='1']"
    wait_for(
        browser,
        f"const c = document.querySelector(\"{card}\"); const i = c && c.querySelector('img');"
        "return i && !i.hidden && i.classList.contains('preview') && i.src.startsWith('data:image/jpeg') && "
        "i.complete && i.naturalWidth === 256 && !c.classList.contains('has-image')",
        "a preview of round 1 while it is denoised",
    )
    step = int(browser.execute_script(f'return document.querySelector("{card}").dataset.previewStep'))
    assert 1 <= step < 39, step
    path = artifacts / "forming.png"
    path.unlink(missing_ok=True)
    assert browser.save_screenshot(str(path)), "the browser could not take a screenshot"
    with Image.open(path) as shot:
        assert shot.size[0] == 1400 and len(set(shot.convert("RGB").get_flattened_data())) > 100

    s = wait_until_ended(browser)
    assert s["status"] == "succeeded", report(browser)
    assert s["previews"] >= 4, s.get("previews")
    assert all(e["id"] for e in s["events"]), "a live event was recorded as a durable one"
    wait_for(
        browser,
        "const imgs = [...document.querySelectorAll('#rounds-view img')];"
        "return imgs.length === 2 && imgs.every((i) => !i.classList.contains('preview') && "
        "i.src.startsWith('blob:') && i.complete && i.naturalWidth === 256)",
        "the finished images",
        30,
    )
