"""The search page in a real browser: headless Chromium (Debian's chromium and chromium-driver, which
.ci/run installs) types a query, waits for the tiles' pictures, shows the attention maps and opens a photo.

SEARCH_SCREENSHOT=PATH also saves the page with its maps as a PNG there; SEARCH_LIBRARY=LIB
serves that library instead of the test's own, and SEARCH_QUERY its query (docs/search.png was made so,
from the demo's library: see docs/search.md)."""

import os
import shutil
import socket
import threading
import time

import pytest

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless Chromium is absent (Debian's chromium and chromium-driver; .ci/run installs them)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytest.importorskip("uvicorn")

import index  # noqa: E402
from photo_library.searcher import Searcher  # noqa: E402
from photo_library.server import create_app  # noqa: E402
from photo_world import make_world  # noqa: E402

# Chromium's flags for a closed network, as root, without a display.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the page's URL, the number of photos) of a library served by uvicorn in a thread."""
    import uvicorn

    lib = os.environ.get("SEARCH_LIBRARY")
    if not lib:
        world = make_world(tmp_path_factory.mktemp("world"), seeds=(0,))
        lib = str(tmp_path_factory.mktemp("served") / "lib")
        assert (
            index.main(
                [
                    "--images",
                    world.images,
                    "--checkpoint",
                    world.checkpoints[0],
                    "--regions",
                    *world.rows,
                    "--library",
                    lib,
                ]
            )
            == 0
        )
    searcher = Searcher(lib)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", searcher.library.count()
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"the page never met: {condition}")


LOADED = (
    "return [...document.querySelectorAll('.tile img')]"
    ".filter(i => i.complete && i.naturalWidth > 0 && i.src.includes('{part}'))"
)


def test_type_a_query_see_the_photos_their_maps_and_one_opened(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, photos = served
    browser.get(url)
    query = os.environ.get("SEARCH_QUERY", "a dog next to a bench and a kite")
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("10")
    box = browser.find_element(By.ID, "q")
    box.send_keys(query)
    browser.find_element(By.ID, "go").click()
    tiles = wait_for(browser, LOADED.replace("{part}", "/thumbnail") + ".length === 10 ? 10 : 0")
    assert tiles == 10
    summary = browser.find_element(By.ID, "summary").text
    assert summary == f"The top 10 of {photos} photos for “{query}”"
    scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, ".tile .score")]
    assert scores == sorted(scores, reverse=True)

    browser.find_element(By.ID, "maps").click()  # each tile's thumbnail with its attention map
    assert wait_for(browser, LOADED.replace("{part}", "/map") + ".length === 10 ? 10 : 0") == 10

    browser.find_elements(By.CSS_SELECTOR, ".tile")[0].click()
    wait_for(
        browser,
        "const v = document.getElementById('view'); return document.getElementById('viewer').classList.contains('open')"
        " && v.complete && v.naturalWidth > 0",
    )
    overlap = browser.execute_script(  # the Close button lies beside the picture, not over its map's labels
        "const a = document.getElementById('close').getBoundingClientRect(),"
        " b = document.getElementById('view').getBoundingClientRect();"
        "return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;"
    )
    assert overlap is False
    about = browser.find_element(By.ID, "about").text
    first = browser.find_elements(By.CSS_SELECTOR, ".tile .name")[0].text
    assert about.startswith(first) and f"score {scores[0]:.4f}" in about
    assert browser.find_element(By.ID, "original").get_attribute("href").endswith("/file")
    screenshot = os.environ.get("SEARCH_SCREENSHOT")
    if screenshot:
        browser.find_element(By.ID, "close").click()
        browser.save_screenshot(screenshot)


def test_the_page_opens_with_the_library_its_examples_and_shows_errors_as_errors(served, browser):
    from selenium.webdriver.common.by import By

    url, photos = served
    browser.get(url)
    size = wait_for(browser, "const t = document.getElementById('size').textContent; return t.includes('try') && t")
    assert size.startswith(f"{photos} photos · the model knows ") and size.endswith(" words · try:")
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    assert len(examples) == 3 and browser.find_element(By.ID, "readonly").get_attribute("hidden")
    examples[0].click()  # an example fills the box and searches
    assert wait_for(browser, LOADED.replace("{part}", "/thumbnail") + ".length > 0 ? 1 : 0") == 1
    assert browser.find_element(By.ID, "q").get_attribute("value") == examples[0].text
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("zzyzx qwerty")  # no word the model knows: refused by the server
    browser.find_element(By.ID, "go").click()
    error = wait_for(browser, "const e = document.getElementById('error'); return !e.hidden && e.textContent")
    assert error.startswith("the query 'zzyzx qwerty': none of its words is in the model's vocabulary")
    shown = browser.find_element(By.ID, "error")
    assert shown.get_attribute("role") == "alert" and shown.value_of_css_property("color") == "rgba(139, 26, 26, 1)"
    assert browser.find_elements(By.CSS_SELECTOR, ".tile") == []
    logs = [entry for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]
    assert logs == []  # the page's own script and style run under its policy
