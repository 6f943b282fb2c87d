"""The chat page at / in a real headless browser (Debian's chromium and chromedriver)."""

import shutil

import pytest
from demo_fixtures import demo_cache, demo_ckpt  # noqa: F401
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from servers import InProcessServer

from llama import Llama


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the page test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    with webdriver.Chrome(service=Service(driver), options=options) as browser:
        yield browser


def test_the_page_streams_an_answer_and_keeps_the_conversation(demo_ckpt, browser):  # noqa: F811
    generator = Llama.build(demo_ckpt, max_seq_len=160, max_batch_size=2, dtype="float32")
    requests = []
    submit = generator.engine.submit
    generator.engine.submit = lambda request: requests.append(request) or submit(request)
    server = InProcessServer(generator)
    try:
        browser.get(server.url + "/")
        assert browser.title == "llama chat"
        browser.find_element(By.ID, "max_tokens").send_keys("24")
        for turn, question in enumerate(["What is the capital of France?", "And of Italy?"]):
            browser.find_element(By.ID, "message").send_keys(question)
            browser.find_element(By.ID, "send").click()
            WebDriverWait(browser, 120).until(
                lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == turn + 1
            )
            reply = browser.find_elements(By.CSS_SELECTOR, ".assistant")[turn].text
            assert reply.strip() and not reply.startswith("Error")
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == [
            "What is the capital of France?", "And of Italy?"]
        first_reply = generator.tokenizer.encode(browser.find_elements(By.CSS_SELECTOR, ".assistant")[0].text,
                                                 bos=False, eos=False)
        prompts = [r.prompt for r in requests]
        assert prompts[1][: len(prompts[0])] == prompts[0]  # the second turn carries the first
        assert len(prompts[1]) > len(prompts[0]) + len(first_reply)
        assert [r.sequence.max_gen_len for r in requests] == [24, 24]  # the page's max tokens
    finally:
        server.close()
