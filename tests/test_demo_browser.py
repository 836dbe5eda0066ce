"""End-to-end: `mmcompress demo` in a subprocess on a free 127.0.0.1 port, driven by Debian's Chromium through
Playwright (browsers are never downloaded: ``executable_path="/usr/bin/chromium"``, installed by ``make setup``).

Checks the title names the app and the model; the opening question is flagged with the words the model cannot read;
picks a bundled benchmark sample and sees its preview, its own question and its expected answer, which gives way
when the question is edited; runs three methods on it (one in-LLM) and checks the answers (equal to the same calls
made in-process) and the token maps; saves a screenshot; uploads an image, which clears the picked sample and
replaces the preview, runs 8 methods and checks that all 8 token maps are visible without scrolling inside the
gallery; fires 8 concurrent requests that all complete; checks a non-image upload's error (one log line, no
traceback) and that the next successful run closes its toast; an easy-VQA sample previews at full size; and the
Results tab shows the --bench-dir folder without Load.

By default the model is a tiny random LLaVA (tests/bench_fixtures.py; ~30 s in all). With
``MMCOMPRESS_WRITE_SCREENSHOT=1`` it runs the real ref-vlm on an easy-VQA test image with tome and visionzip at 25%
and writes the README's screenshot to docs/demo.png:

    MMCOMPRESS_WRITE_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_demo_browser.py -q
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
WRITE_SCREENSHOT = os.environ.get("MMCOMPRESS_WRITE_SCREENSHOT") == "1"
METHODS = ["tome", "visionzip"] if WRITE_SCREENSHOT else ["tome", "visionzip", "fastv"]  # docs/demo.png: two
KEEP = 0.25

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium; `make setup` does it as root)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="needs playwright (pip install -c constraints.txt playwright; in the dev extra)"),
]
if WRITE_SCREENSHOT:
    pytestmark.append(pytest.mark.real)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"demo server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"demo server not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model name or dir, image path, question, server url); the server is stopped after the module."""
    tmp = tmp_path_factory.mktemp("demo_browser")
    from PIL import Image

    if WRITE_SCREENSHOT:
        from mmcompress.evals import easyvqa

        # an image other than the picked sample (easy-VQA test image 0), so the upload visibly replaces it
        q = next(s for s in easyvqa.load_split("test") if s.question.startswith("what is the color") and s.image_id)
        model, image, question = "ref-vlm", Path(q.image_path), q.question
    else:
        sys.path.insert(0, str(ROOT))
        from tests.bench_fixtures import save_tiny_llava

        model = str(save_tiny_llava(tmp / "tiny_llava", layers=4))  # 4 layers: FastV prunes at layer 2
        image, question = tmp / "shape.png", "what colour is the shape"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    bench = tmp / "bench"
    bench.mkdir()
    (bench / "summary.csv").write_text("task,method,keep,n,accuracy,stderr,tokens,prefill_ms,compress_ms\n"
                                       "easyvqa,none,1,100,0.9,0.03,64,10.0,0.0\n"
                                       "easyvqa,tome,0.25,100,0.7,0.04,16,4.0,0.3\n")
    port = free_port()
    log = tmp / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "mmcompress", "demo", "--model", model, "--port", str(port),
                                 "--bench-dir", str(bench)],
                                cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url, proc, log, timeout=600.0 if WRITE_SCREENSHOT else 180.0)  # the model loads first
        yield model, image, question, url, tmp, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def expected_answers(model: str, image: Path | None, sample: str | None, question: str,
                     methods: list[str]) -> dict[str, str]:
    """The same runs in-process: what the browser must show."""
    from demos.app import bundled_photos, run_image
    from demos.image import ImageBackend

    global _BACKEND
    if _BACKEND is None or _BACKEND.model_name != model:
        _BACKEND = ImageBackend(model)
    rows, _ = run_image(_BACKEND, bundled_photos(), str(image) if image else None, sample, question, methods, KEEP)
    return {r[0]: r[1] for r in rows}


_BACKEND = None
EIGHT = ["tome", "pool", "uniform", "random", "divprune", "visionzip", "prumerge+", "adaptive"]


def choose_methods(page, methods: list[str]) -> None:
    boxes = page.locator("#image-methods")
    for m in boxes.locator("input[type=checkbox]").all():
        m.uncheck()
    for m in methods:
        boxes.get_by_label(m, exact=True).check()


def test_browser_sample_upload_eight_maps_concurrency_and_bad_upload(setup):
    from playwright.sync_api import expect, sync_playwright

    from demos.app import benchmark_questions

    model, image, question, url, tmp, log = setup
    sample = "easy-VQA test image 0" if WRITE_SCREENSHOT else "detail test scene 0"
    s_question, s_answer = benchmark_questions()[sample]
    t0 = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        shown = "ref-vlm" if model == "ref-vlm" else Path(model).name
        expect(page.locator("#title")).to_contain_text(f"mmcompress demo: {shown}")
        assert page.title() == f"mmcompress demo: {shown}"

        if not WRITE_SCREENSHOT:  # the tiny model's vocabulary lacks words of the opening question
            expect(page.locator("#image-question-note")).to_contain_text("The model cannot read: in, image")

        # pick a benchmark sample: its preview, its own question and its expected answer appear
        page.locator("#image-photo input").click()
        page.get_by_role("option", name=sample, exact=True).click()
        expect(page.locator("#image-question textarea")).to_have_value(s_question, timeout=30_000)
        expect(page.locator("#image-expected")).to_contain_text(f"expected answer: {s_answer}")
        page.locator("#image-question textarea").fill("what colour is the shape")  # the caption follows the edit
        expect(page.locator("#image-expected")).to_contain_text("your own question", timeout=30_000)
        expect(page.locator("#image-expected")).not_to_contain_text("expected answer")
        page.locator("#image-question textarea").fill(s_question)
        expect(page.locator("#image-expected")).to_contain_text(f"expected answer: {s_answer}", timeout=30_000)
        preview = page.locator("#image-preview img")
        expect(preview).to_be_visible(timeout=30_000)
        assert preview.evaluate("im => im.complete && im.naturalWidth") > 0
        first_preview = preview.get_attribute("src")
        choose_methods(page, METHODS)
        page.locator("#image-run").click()
        answers = page.locator("#image-answers")
        for m in METHODS:
            expect(answers).to_contain_text(m, timeout=60_000)
        overlays = page.locator("#image-overlays img")
        expect(overlays).to_have_count(len(METHODS), timeout=30_000)
        if "fastv" in METHODS:
            expect(answers).to_contain_text("layers 0-1:")  # FastV's image tokens per LLM layer
        for i in range(len(METHODS)):  # every token map loaded and drawn, the in-LLM one too
            expect(overlays.nth(i)).to_be_visible()
            assert overlays.nth(i).evaluate("im => im.complete && im.naturalWidth") == 224
        want = expected_answers(model, None, sample, s_question, METHODS)
        text = answers.inner_text()
        for m in ["none", *METHODS]:
            assert want[m] and want[m] in text, (m, want[m], text)
        shot = ROOT / "docs" / "demo.png" if WRITE_SCREENSHOT else tmp / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        # an upload replaces the picked sample, visibly: the choice is cleared and the preview shows the upload
        page.locator("#image-upload input[type=file]").set_input_files(str(image))
        expect(page.locator(f'#image-upload a[href$="/{image.name}"]')).to_have_count(1, timeout=30_000)
        expect(page.locator("#image-photo input")).to_have_value("", timeout=30_000)
        expect(preview).not_to_have_attribute("src", first_preview or "", timeout=30_000)
        page.locator("#image-question textarea").fill(question)
        choose_methods(page, EIGHT)
        page.locator("#image-run").click()
        expect(overlays).to_have_count(8, timeout=120_000)
        gal = page.locator("#image-overlays").bounding_box()
        for i in range(8):  # every map inside the gallery's own box: none hidden behind a scroll bar
            expect(overlays.nth(i)).to_be_visible()
            box = overlays.nth(i).bounding_box()
            assert box["y"] >= gal["y"] - 1 and box["y"] + box["height"] <= gal["y"] + gal["height"] + 1, (i, box, gal)
        want = expected_answers(model, image, None, question, ["tome"])

        # 8 concurrent requests through the same queue (one model behind a lock): all complete, all equal
        from gradio_client import Client, handle_file

        # download_files=False: gradio rewrites a cached output file in place when another request produces the
        # same bytes (processing_utils.save_pil_to_cache), so 8 identical results downloaded at once can race;
        # the point here is the queue: every request completes with the right answers
        client = Client(url, verbose=False, download_files=False)

        def call(_: int):
            rows, gallery = client.predict(handle_file(str(image)), None, question, ["tome"], KEEP,
                                           api_name="/run_image")
            return [r[1] for r in rows["data"]], len(gallery)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
        assert len(results) == 8 and all(r == (results[0][0], 1) for r in results)
        assert results[0][0] == [want["none"], want["tome"]]

        # a non-image upload is refused with a message
        page.reload()
        bad = tmp / "notes.png"
        bad.write_text("this is not an image")
        page.locator("#image-upload input[type=file]").set_input_files(str(bad))
        expect(page.locator(f'#image-upload a[href$="/{bad.name}"]')).to_have_count(1, timeout=30_000)
        page.locator("#image-run").click()
        # the upload's note says it at once; the run's refusal comes later, as a toast and one log line
        expect(page.get_by_text("Cannot use this upload").first).to_be_visible(timeout=30_000)
        deadline = time.monotonic() + 60.0
        while "refused: the uploaded file is not an image" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert "refused: the uploaded file is not an image" in text and "Traceback" not in text, text[-3000:]
        expect(page.locator('[data-testid="toast-body"]').first).to_contain_text("not an image", timeout=30_000)
        # the next successful run closes the error toast (it stayed up beside the new result)
        page.locator("#image-photo input").click()  # picking a sample clears the bad upload
        page.get_by_role("option", name=sample, exact=True).click()
        expect(page.locator("#image-question textarea")).to_have_value(s_question, timeout=30_000)
        choose_methods(page, ["tome"])
        page.locator("#image-run").click()
        expect(overlays).to_have_count(1, timeout=60_000)
        expect(page.locator('[data-testid="toast-body"]')).to_have_count(0, timeout=3_000)

        # a small benchmark picture (easy-VQA: 64 px) previews at full size, not ~50 px
        page.reload()
        page.locator("#image-photo input").click()
        options = page.get_by_role("option").all_inner_texts()
        easy = next((o for o in options if o.startswith("easy-VQA test image")), None)
        if easy is not None:
            page.get_by_role("option", name=easy, exact=True).click()
            expect(preview).to_be_visible(timeout=30_000)
            assert preview.bounding_box()["width"] >= 200, preview.bounding_box()

        # the Results tab shows the --bench-dir folder at once
        page.get_by_role("tab", name="Results").click()
        expect(page.locator("#results-table")).to_contain_text("tome", timeout=30_000)
        expect(page.locator("#results-message")).to_contain_text("2 rows from")
        browser.close()
    if not WRITE_SCREENSHOT:
        assert time.monotonic() - t0 < 300  # a loaded 2-core machine; unloaded it takes about a minute
