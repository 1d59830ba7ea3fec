"""The web console in a real browser (Debian's chromium driven by Playwright) against the real
endpoint, inference worker, Jobs API, Celery converter and Redis: the models and workers show, the
chat playground streams an answer, a job submitted from the page runs to its final state there,
and an error is shown, not swallowed; all of it under the page's Content-Security-Policy, which the
browser never had to enforce against the console. Screenshots go to ``test-artifacts/``."""
from __future__ import annotations

import shutil

import pytest

from tests.helpers import REPO
from tests.services.conftest import wait_workers

ARTIFACTS = REPO / "test-artifacts"

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CSP_REFUSALS: list[str] = []
PAGE_HEADERS: dict[str, str] = {}


@pytest.fixture(scope="module")
def page(http):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.set_default_timeout(30_000)
        # what the browser refused under the Content-Security-Policy (it says so on the console)
        page.on("console", lambda m: "Content Security Policy" in m.text and CSP_REFUSALS.append(m.text))
        PAGE_HEADERS.update(page.goto(http.base + "/").headers)
        yield page
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console-last.png"), full_page=True)
        browser.close()


def celery_worker(stack_redis, stack_dir, queues: str, name: str):
    """A Celery jobs worker on the endpoint's Redis and store, so jobs from the page run."""
    from services.jobs.settings import JobsSettings
    from tests.jobs.conftest import Worker

    settings = JobsSettings(redis_url=stack_redis.url, store_root=str(stack_dir / "store"))
    return Worker(settings, queues, stack_dir / f"{name}.log", name).wait_ready()


@pytest.fixture(scope="module")
def converter(stack_redis, stack_dir):
    w = celery_worker(stack_redis, stack_dir, "convert,export", "console-converter")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def trainer(stack_redis, stack_dir):
    w = celery_worker(stack_redis, stack_dir, "preprocess,finetune", "console-trainer")
    yield w
    w.stop()


def test_models_and_workers_show(page, http, worker, chat_model_dir):
    wait_workers(http, 1)
    page.locator("#model-table tbody tr").first.wait_for()
    assert page.locator("#model-table tbody tr td").first.inner_text() == chat_model_dir.name
    sync_api.expect(page.locator("#worker-table tbody")).to_contain_text(worker.address)
    # the precision served: the tiny chat model's fp32 weights, the fp16 KV cache of the CPU kernels
    sync_api.expect(page.locator("#worker-table tbody")).to_contain_text("float32; float16 KV cache")


def test_chat_playground_streams_an_answer(page, chat_model_dir):
    page.click("nav button[data-tab=chat]")
    page.locator(f"#chat-model option[value='{chat_model_dir.name}']").wait_for(state="attached")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max", "8")
    page.fill("#chat-input", "Hello there")
    page.click("#chat-send")
    sync_api.expect(page.locator("#chat-usage")).to_contain_text("completion tokens")
    assert page.locator(".msg.user").inner_text().endswith("Hello there")
    assert page.locator(".msg.assistant").inner_text().strip()
    assert page.locator("#chat-usage").inner_text().split(" + ")[1].startswith("8 ")
    assert page.locator("#error").is_hidden()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console-chat.png"), full_page=True)


def test_job_submitted_from_the_page(page, stack_dir, tiny_hf, converter):
    shutil.copytree(tiny_hf[1], stack_dir / "store" / "imports" / "browser-hf", dirs_exist_ok=True)
    page.click("nav button[data-tab=jobs]")
    page.select_option("#job-kind", "convert")
    page.fill("#job-fields", '{"source": "imports/browser-hf", "output": "from-the-browser"}')
    page.click("#job-form button[type=submit]")
    row = page.locator("#job-table tbody tr.selected")
    sync_api.expect(row).to_contain_text("convert")
    sync_api.expect(page.locator("#job-detail")).to_be_visible()
    sync_api.expect(row).to_contain_text("succeeded", timeout=120_000)  # run by the converter, seen live
    sync_api.expect(page.locator("#job-detail-text")).to_contain_text("from-the-browser")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console-jobs.png"), full_page=True)
    # a refused submission is shown with the service's message
    page.fill("#job-fields", '{"source": "imports/not-there", "output": "x"}')
    page.click("#job-form button[type=submit]")
    sync_api.expect(page.locator("#error")).to_contain_text("not-there")
    page.click("nav button[data-tab=store]")
    sync_api.expect(page.locator("#store-table tbody")).to_contain_text("from-the-browser")


def test_a_fine_tune_from_the_page_shows_its_progress_and_whole_loss_curve(page, stack_dir, chat_model_dir,
                                                                          trainer, tmp_path):
    """A fine-tune submitted from the page shows its step progress while it runs and its final
    state; a page opened after it ended draws every step's loss from the Jobs API."""
    import json

    from internlm_core.data import preprocess
    from tests.helpers import DATA

    store = stack_dir / "store"
    shutil.copytree(chat_model_dir, store / "models" / "browser-base", dirs_exist_ok=True)
    src = tmp_path / "alpaca48.json"
    src.write_text(json.dumps(json.loads((DATA / "alpaca" / "alpaca_en.json").read_text())[:48]))
    preprocess("alpaca", src, store / "datasets" / "browser-alpaca", seq_length=32)
    steps = 100
    page.click("nav button[data-tab=jobs]")
    page.select_option("#job-kind", "finetune")
    page.fill("#job-fields", json.dumps({"base_model": "browser-base", "dataset": "browser-alpaca",
                                         "output": "browser-tuned", "method": "lora", "max_steps": steps,
                                         "save_every": 0}))
    page.click("#job-form button[type=submit]")
    row = page.locator("#job-table tbody tr.selected")
    sync_api.expect(row).to_contain_text("finetune")
    sync_api.expect(row).to_contain_text("running", timeout=120_000)
    sync_api.expect(row).to_contain_text(f"/{steps}", timeout=120_000)  # step k of 100, live
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console-finetune-running.png"), full_page=True)
    sync_api.expect(row).to_contain_text("succeeded", timeout=600_000)
    page.reload()  # a page that saw none of it
    page.click("nav button[data-tab=jobs]")
    page.locator("#job-table tbody tr", has_text="finetune").first.click()
    chart = page.locator("#loss-chart polyline")
    sync_api.expect(chart).to_have_count(1)
    page.wait_for_function("document.querySelector('#loss-chart polyline')"
                           f".getAttribute('points').trim().split(' ').length === {steps}")
    page.screenshot(path=str(ARTIFACTS / "console-finetune-curve.png"), full_page=True)


def test_the_console_ran_under_its_content_security_policy(page):
    """After every tab, a streamed chat, jobs, the store and a loss curve: the page came with the
    policy (no framing, own files only) and the browser refused nothing the console does."""
    assert "frame-ancestors 'none'" in PAGE_HEADERS["content-security-policy"]
    assert PAGE_HEADERS["x-frame-options"] == "DENY" and PAGE_HEADERS["x-content-type-options"] == "nosniff"
    page.click("nav button[data-tab=models]")
    page.locator("#model-table tbody tr").first.wait_for()
    assert CSP_REFUSALS == []
