"""The web page edits an uploaded image (the input shown beside the draft and the final edit) and answers a
question about one (the answer streams in), in a real headless Chromium against `irg serve` on the demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.web.test_page import fill, open_page, report, save_full_page, state, wait_for, wait_until_ended


def input_png(tmp_path: Path) -> Path:
    """A 40 x 24 picture: an edit of it is 848 x 512 (BAGEL's rule), as the official code would make it."""
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:, :, 2] = 200
    pixels[6:18, 10:30] = (230, 120, 20)
    path = tmp_path / "input.png"
    Image.fromarray(pixels).save(path)
    return path


def pick(browser, task: str, image: Path) -> None:
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    assert browser.find_element(By.ID, "input_image").is_displayed()
    browser.find_element(By.ID, "input_image").send_keys(str(image))


def check_screenshot(browser, path: Path) -> None:
    path.unlink(missing_ok=True)
    save_full_page(browser, path)
    with Image.open(path) as shot:
        assert shot.width == 1400 and len(set(shot.convert("RGB").resize((64, 64)).get_flattened_data())) > 100


def test_edit_an_uploaded_image(browser, server, artifacts, tmp_path: Path) -> None:
    open_page(browser, server)
    pick(browser, "edit", input_png(tmp_path))
    assert browser.find_element(By.ID, "width").get_attribute("disabled") is not None  # the size follows the input
    fill(browser, "Make the orange box green.", mode="irg", steps=3, max_tokens=6)
    browser.find_element(By.ID, "submit").click()
    s = wait_until_ended(browser)
    assert s["status"] == "succeeded", report(browser)
    wait_for(
        browser,
        "return [...document.querySelectorAll('#rounds-view img')].filter("
        "(i) => !i.hidden && i.complete && i.naturalWidth > 0).length === 3",
        "the input, draft and final",
        60,
    )
    cards = browser.execute_script("""
        return [...document.querySelectorAll('#rounds-view > .round')].map((card) => {
          const img = card.querySelector('img');
          return {title: card.querySelector('.round-title').textContent, w: img.naturalWidth, h: img.naturalHeight};
        });""")
    assert [c["title"] for c in cards][0] == "Input" and len(cards) == 3, cards
    assert (cards[0]["w"], cards[0]["h"]) == (40, 24)
    assert all((c["w"], c["h"]) == (848, 512) for c in cards[1:]), cards  # the official edit size
    job = server.json("GET", f"/v1/generations/{s['jobId']}")
    assert job["params"]["edit"] and job["params"]["inputs"][0]["width"] == 40
    assert [i["kind"] for i in job["images"]] == ["draft", "final"]
    check_screenshot(browser, artifacts / "edit.png")


def test_ask_about_an_image(browser, server, artifacts, tmp_path: Path) -> None:
    open_page(browser, server)
    pick(browser, "understand", input_png(tmp_path))
    assert browser.find_element(By.ID, "prompt-label").text == "Question"
    fill(browser, "What does this image show?", max_tokens=12)
    browser.find_element(By.ID, "submit").click()
    s = wait_until_ended(browser)
    assert s["status"] == "succeeded", report(browser)
    answer = browser.execute_script("return document.querySelector('.answer-text').textContent")
    assert answer and answer == s["texts"]["answer"] == s["deltas"]["answer"], report(browser)
    assert s["mismatches"] == 0
    types = [e["type"] for e in state(browser)["events"]]
    assert types.count("answer.delta") >= 1 and types[-2:] == ["answer.done", "completed"]
    job = server.json("GET", f"/v1/generations/{s['jobId']}")
    assert job["answer"]["text"] == answer and job["params"]["task"] == "understand"
    check_screenshot(browser, artifacts / "understand.png")
