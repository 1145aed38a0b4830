"""The web demo: the page's answering function streams each policy in turn; the app starts on a free
local port, answers through `gradio_client` exactly what the chat session answers, and works in a real
headless browser (Debian's Chromium and ChromeDriver, installed by .ci/run), which saves a screenshot."""

import os
import shutil
import socket
from pathlib import Path

import pytest
from ppo_tiny import one_thread
from sft_helpers import REPO
from test_chat import QUESTION, run  # noqa: F401  (the run-folder fixture)

from stackllama.chat import ChatArguments, ChatSession, SamplingSettings
from stackllama.chat.web import WAITING, answer_columns, build_app, example_questions

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# where the browser test leaves its screenshot (pass or fail), to be looked at
ARTIFACTS = Path(os.environ.get("STACKLLAMA_TEST_ARTIFACTS", REPO / ".test-artifacts"))
SETTINGS = SamplingSettings(max_new_tokens=8, seed=3)


@pytest.fixture(scope="module")
def session(run):  # noqa: F811
    return ChatSession.load(ChatArguments(run_dir=str(run), compare=True, dtype="float32", device="cpu"))


def test_columns_stream_each_policy_in_turn(session):
    frames = list(answer_columns(session, QUESTION, SETTINGS))
    n = len(session.names)
    final = session.answers(QUESTION, SETTINGS)
    assert frames[-1] == [a.text for a in final] + [a.summary() for a in final]
    first_done = next(i for i, f in enumerate(frames) if f[n])  # SFT's summary appears once its answer is complete
    assert all(f[1] == WAITING for f in frames[:first_done])  # the next policy waits its turn
    assert any(0 < len(f[0]) < len(final[0].text) for f in frames[:first_done])  # streamed, not all at once


def test_example_questions_are_held_out_and_short(run):  # noqa: F811
    from stackllama.data.loading import load_pairs

    held_out = set(load_pairs(run / "data", "evaluation")["question"])
    examples = example_questions(run, 2)
    assert len(examples) == 2 and set(examples) <= held_out and example_questions(run, 2) == examples
    assert example_questions(run / "nowhere", 2) == [] and example_questions(run, 0) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(session, run):  # noqa: F811
    app = build_app(session, str(run), example_questions(run, 2), SETTINGS)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_app_answers_through_gradio_client(served, session):
    from gradio_client import Client

    client = Client(served, verbose=False)
    result = client.predict(QUESTION, SETTINGS.max_new_tokens, SETTINGS.temperature, SETTINGS.top_k, SETTINGS.top_p,
                            SETTINGS.do_sample, SETTINGS.seed, api_name="/answer")
    expected = session.answers(QUESTION, SETTINGS)
    assert list(result) == [a.text for a in expected] + [a.summary() for a in expected]
    assert all(summary.startswith("reward ") for summary in result[len(expected):])
    with pytest.raises(Exception, match="the question is empty"):  # a gr.Error, not a traceback
        client.predict("  ", 8, 1.0, 0, 1.0, True, 0, api_name="/answer")


def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("STACKLLAMA_REQUIRE_BROWSER"):  # set by .ci/run, which installs them
            pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing: apt-get install chromium chromium-driver")
        pytest.skip("no system Chromium here (apt-get install chromium chromium-driver); .ci/run installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_page_answers_a_question_in_a_real_browser(served, session, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(tmp_path)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "demo_app.png"
    try:
        driver.get(served)
        wait = WebDriverWait(driver, 60)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
        assert "StackLLaMA" in driver.title
        box.send_keys(QUESTION)
        driver.find_element(By.CSS_SELECTOR, "#answer-button").click()
        wait.until(lambda d: d.find_element(By.ID, f"summary-{session.names[-1]}").text.startswith("reward "))
        expected = session.answers(QUESTION, SETTINGS)
        for name, answer in zip(session.names, expected):
            shown = driver.find_element(By.CSS_SELECTOR, f"#answer-{name} textarea").get_attribute("value")
            assert shown == answer.text
            assert driver.find_element(By.ID, f"summary-{name}").text == answer.summary()
    finally:
        driver.save_screenshot(str(screenshot))
        driver.quit()
    assert screenshot.stat().st_size > 10_000
    shutil.copy(screenshot, tmp_path / screenshot.name)


def test_demo_script_without_a_trained_policy_is_a_one_line_error(tmp_path):
    """The run folder is read before Gradio starts: no server, no traceback, the folder named."""
    import subprocess
    import sys

    (tmp_path / "run" / "data").mkdir(parents=True)  # prepared, nothing trained yet
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_app.py"), "--run_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"demo_app.py: error: no trained policy in {tmp_path / 'run'}") and "make demo" in line


def test_missing_gradio_says_how_to_install_it(monkeypatch):
    import sys

    from stackllama.chat.web import import_gradio
    from stackllama.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "gradio", None)  # import fails as when the extra is not installed
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[demo\]"'):
        import_gradio()
