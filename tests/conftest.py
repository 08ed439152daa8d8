"""Shared test helpers: where the reference material lives, and how to read a golden case.

The references (llama2.c's run.c outputs, models, tokenizers) live in ../shared beside the checkout,
or wherever $LLAMARUN_SHARED points. Without them the tests that need them skip, except under CI
(CI=true), where a missing reference is a failure; so is a missing test dependency (require_module).
"""
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(os.environ.get("LLAMARUN_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
MODELS = SHARED / "models"
GOLDEN = SHARED / "golden"


def unavailable(message: str):
    """Skip the test (or the module, at import) for want of something; under CI (CI=true) fail:
    there everything the tests need must be installed, and a skip would pass unnoticed."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def require(path: Path) -> Path:
    """The path, or skip (fail under CI) when the reference is not there."""
    if not path.exists():
        unavailable(f"reference file {path} is missing (set LLAMARUN_SHARED to the shared folder)")
    return path


def require_module(name: str):
    """The imported module, or skip (fail under CI) when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"python package {name.split('.')[0]} is missing ({e}); pip install -e '.[test]'")


def golden_names() -> list[str]:
    return sorted(p.stem for p in GOLDEN.glob("*.json")) or ["s260K_greedy"]


def load_golden(name: str) -> dict:
    case = json.loads(require(GOLDEN / f"{name}.json").read_text())
    case["logits"] = np.load(GOLDEN / case["logits_file"])
    case["model_path"] = str(require(MODELS / case["model"]))
    case["tokenizer_path"] = str(MODELS / case["tokenizer"]) if case.get("tokenizer") else None
    return case


def logits_tolerance(reference: np.ndarray, scale: float) -> np.ndarray:
    """Per-row tolerance scale * (1 + max|row|), as the acceptance criteria state it."""
    return scale * (1.0 + np.abs(reference).max(axis=-1))


def golden_tolerance(case: dict) -> float:
    # runq.c's int8 activations make v2 files less tightly defined than float32 ones
    return 1e-4 if case["model"].endswith(".v2.bin") else 2e-5


@pytest.fixture(autouse=True)
def no_compile_notice(monkeypatch):
    """The command line's compile notice (llamarun/compiling.py) only after a minute, in the tests that run
    `main` in this process: a compile that runs past the notice's half second on a busy machine (numba's
    typed-list methods compile in every process) put a line into stderr where a test counts one.
    tests/test_threads.py sets it back to test the notice itself."""
    from llamarun import compiling
    monkeypatch.setattr(compiling, "NOTICE_AFTER", 60.0)


@pytest.fixture(scope="session")
def smol_path() -> Path:
    """The default model, SmolLM2-135M-Instruct Q4_1, where `llamarun pull` puts it ($LLAMARUN_HOME)."""
    from llamarun.hub import default_model_path
    return require(default_model_path())


@pytest.fixture(scope="session")
def smol_checkpoint(smol_path):
    from llamarun.formats import load_checkpoint
    return load_checkpoint(smol_path)


# ----------------------------------------------------------------------------------------------
# a headless browser, for the pages llamarun writes or serves (attention report, chat page)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by selenium (Debian's `chromium` and `chromium-driver`, which .ci/run
    installs; nothing is downloaded). `browser.get_log("browser")` holds the page's console messages."""
    for program in (CHROMIUM, CHROMEDRIVER):
        if not program.exists():
            unavailable(f"{program} is missing (apt-get install chromium chromium-driver, as .ci/run does)")
    webdriver = require_module("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()
