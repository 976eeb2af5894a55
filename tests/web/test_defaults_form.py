"""The form shows the server's defaults for the chosen mode (GET v1/defaults), and keeps what the user typed."""

from __future__ import annotations

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.web.test_page import fill, open_page, report, wait_for, wait_until_ended

FIELDS = {
    "width": "width",
    "height": "height",
    "steps": "steps",
    "max_tokens": "max_think_tokens",
    "temperature": "temperature",
}


def values(browser) -> dict[str, float]:
    return {name: float(browser.find_element(By.ID, name).get_attribute("value")) for name in FIELDS}


def expected(defaults: dict, mode: str) -> dict[str, float]:
    return {name: float(defaults["modes"][mode][key]) for name, key in FIELDS.items()}


def test_form_follows_the_servers_defaults_per_mode(browser, server) -> None:
    defaults = server.json("GET", "/v1/defaults")
    assert defaults["modes"]["irg"]["temperature"] == 0.3 and defaults["modes"]["think"]["temperature"] == 0.0
    open_page(browser, server)
    want = expected(defaults, "irg")
    wait_for(
        browser,
        f"return document.getElementById('temperature').value === '{want['temperature']:g}'",
        "the irg defaults",
        30,
    )
    assert values(browser) == want
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("7")
    Select(browser.find_element(By.ID, "mode")).select_by_value("think")
    assert values(browser) == dict(expected(defaults, "think"), steps=7.0)  # typed values stay


def test_a_thought_cut_by_the_limit_says_so(browser, server) -> None:
    open_page(browser, server)
    fill(browser, width=64, height=64, steps=3, max_tokens=6)  # the random demo model never ends a thought in 6
    browser.find_element(By.ID, "submit").click()
    s = wait_until_ended(browser)
    assert s["status"] == "succeeded", report(browser)
    done = [data for _, event, data in server.events(s["jobId"]) if event in ("thinking.done", "reflection.done")]
    assert [d["truncated"] for d in done] == [True, True]
    cut = browser.execute_script(
        "return [...document.querySelectorAll('.thought-text')].map((el) => el.hasAttribute('data-truncated'))"
    )
    assert cut == [True, True]
    job = server.json("GET", f"/v1/generations/{s['jobId']}")
    assert [t["truncated"] for t in job["texts"]] == [True, True]
