"""The chat page at / : one self-contained HTML file that streams replies, in headless Chromium."""
import pytest

from conftest import require_module

pytestmark = pytest.mark.slow          # a server and a browser

require_module("uvicorn")


def test_chat_page_streams_a_reply(browser, smol_path):
    import llamarun
    from llamarun.server import create_app
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_server import Running

    running = Running(create_app(llamarun.load(smol_path), "smollm2", parallel=1, ctx=512))
    try:
        browser.get(running.url + "/")
        html = browser.page_source
        assert "http://" not in html.replace(running.url, "") and "https://" not in html   # no network assets
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("8")
        browser.find_element(By.ID, "input").send_keys("Hello! Who are you?")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
        user = browser.find_element(By.CSS_SELECTOR, ".msg.user").text
        reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
        assert user == "Hello! Who are you?"
        assert reply.text.strip() and "error" not in reply.get_attribute("class")
        assert not [m for m in browser.get_log("browser") if m["level"] == "SEVERE"]
    finally:
        running.stop()
