"""Attention maps: the recorded weights (against a numpy reference forward pass), the HTML page in
headless Chromium, the PNG files, and `llamarun attention` on the command line."""
import base64
import json
import re

import numpy as np
import pytest

import llamarun
from llamarun.cli import main
from llamarun.inspect.attention import record_attention
from llamarun.inspect.report import render_html, write_html, write_pngs
from llamarun.model import Batch, KVCache, Probe

import reference
from conftest import MODELS, require

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny():
    """Random weights, float32, grouped-query (4 heads, 2 kv heads), with the Llama 2 tokenizer."""
    return llamarun.load(require(MODELS / "tiny_gqa.bin"), tokenizer=require(MODELS / "tokenizer.bin"))


@pytest.fixture(scope="module")
def smol(smol_path):
    return llamarun.load(smol_path, exact=True)      # float32 activations: no int8 rounding in decode steps


@pytest.fixture(scope="module")
def smol_record(smol):
    return record_attention(smol, PROMPT, 6)


# ----------------------------------------------------------------------------------------------
# the weights recorded

def test_recorded_weights_match_a_reference_forward_pass(tiny):
    """Prompt rows come from the prefill (one batch, serial kernel), the generated ones from decode
    steps (the parallel kernel): both must be the model's true attention weights."""
    record = record_attention(tiny, PROMPT, 5)
    assert len(record.ids) == record.n_prompt + 5 and record.n_prompt == len(tiny.encode(PROMPT))
    expected = reference.forward(tiny.checkpoint.weights, tiny.config, record.ids).attention
    np.testing.assert_allclose(record.probs, expected, atol=2e-6)


@pytest.mark.slow          # SmolLM2 layer by layer, recording
def test_gguf_rows_from_prefill_and_decode(smol, smol_record):
    """SmolLM2 (quantized GGUF): every row is a distribution over the tokens up to the query, and the
    rows recorded in the prefill and while decoding equal those of one teacher-forced pass over the
    same tokens (up to float32 rounding: that pass multiplies through BLAS)."""
    r = smol_record
    T = len(r.ids)
    assert r.probs.shape == (30, 9, T, T) and T == r.n_prompt + 6
    np.testing.assert_allclose(r.probs.sum(-1), 1.0, atol=1e-5)
    assert not np.triu(r.probs, k=1).any()
    rows = []
    probe = Probe(attention=lambda layer, batch, probs: rows.append(probs.copy()))
    smol.model.forward(Batch.sequence(r.ids, all_logits=True), KVCache(smol.config, seq_len=T), probe)
    forced = np.stack(rows).transpose(0, 2, 1, 3)                # (L, H, T, T)
    np.testing.assert_allclose(r.probs, forced, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the HTML page

def page_data_of(html: str) -> dict:
    return json.loads(re.search(r"const DATA = (.*);\n", html).group(1))


def test_page_is_self_contained_and_stores_every_weight(smol_record):
    html = render_html(smol_record)
    assert not re.search(r"(src|href)\s*=|https?://|@import|fetch\(|XMLHttpRequest", html)
    data = page_data_of(html)
    L, H, T, _ = smol_record.probs.shape
    assert data["tokens"] == smol_record.labels and (data["n_layers"], data["n_heads"]) == (L, H)
    stored = np.frombuffer(base64.b64decode(data["probs"]), np.uint8).reshape(L, H, T * (T + 1) // 2)
    rows, cols = np.tril_indices(T)
    root = np.sqrt(smol_record.probs[:, :, rows, cols])
    assert np.abs(stored / 255 - root).max() <= 0.5 / 255 + 1e-6


CANVAS_PIXELS = """const c = document.getElementById('map');
const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let h = 0; const colours = new Set();
for (let i = 0; i < px.length; i += 4) { h = (h * 31 + px[i] * 7 + px[i + 1] * 13 + px[i + 2]) >>> 0; colours.add(px[i] << 16 | px[i + 1] << 8 | px[i + 2]); }
return [h, colours.size, c.dataset.drawn];"""


def choose(browser, select_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select
    Select(browser.find_element("id", select_id)).select_by_value(value)


def test_page_in_headless_chromium(browser, smol_record, tmp_path):
    path = write_html(smol_record, tmp_path / "report.html")
    browser.get_log("browser")                                   # drop earlier pages' messages
    browser.get(path.as_uri())
    severe = [m for m in browser.get_log("browser") if m["level"] == "SEVERE"]
    assert not severe, severe
    L, H = smol_record.probs.shape[:2]
    layers = browser.execute_script("return [...document.getElementById('layer').options].map(o => o.value)")
    heads = browser.execute_script("return [...document.getElementById('head').options].map(o => o.text)")
    assert layers == [str(l) for l in range(L)] and heads == ["mean over heads"] + [str(h) for h in range(H)]
    first, n_colours, drawn = browser.execute_script(CANVAS_PIXELS)
    assert drawn == "0/-1" and n_colours > 10                    # not uniform: a map, not a blank
    choose(browser, "head", "3")
    second, _, drawn = browser.execute_script(CANVAS_PIXELS)
    assert drawn == "0/3" and second != first                    # another head, another picture
    choose(browser, "layer", "7")
    third, _, drawn = browser.execute_script(CANVAS_PIXELS)
    assert drawn == "7/3" and third not in (first, second)
    # the mean-over-heads view is the mean of the heads as the page decodes them
    mean, heads_mean = browser.execute_script(
        "const m = mapOf(7, -1), s = new Float32Array(m.length);"
        "for (let h = 0; h < H; h++) mapOf(7, h).forEach((v, i) => s[i] += v / H);"
        "return [Array.from(m), Array.from(s)];")
    np.testing.assert_allclose(mean, heads_mean, atol=1e-6)
    T = len(smol_record.ids)
    np.testing.assert_allclose(np.reshape(mean, (T, T)), smol_record.probs[7].mean(0), atol=0.02)
    assert not [m for m in browser.get_log("browser") if m["level"] == "SEVERE"]


# ----------------------------------------------------------------------------------------------
# PNG files and the command line

def test_pngs_are_valid_and_not_uniform(tiny, tmp_path):
    from PIL import Image
    record = record_attention(tiny, PROMPT, 3)
    written = write_pngs(record, tmp_path / "png")
    assert [p.name for p in written] == [f"layer_{l:02d}.png" for l in range(tiny.config.n_layers)]
    for p in written:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape[0] > 100 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_cli_writes_page_and_pngs(tmp_path, capsys):
    out, png = tmp_path / "report.html", tmp_path / "png"
    code = main(["attention", PROMPT, "-m", str(require(MODELS / "tiny_gqa.bin")), "-z", str(MODELS / "tokenizer.bin"),
                 "-n", "4", "--out", str(out), "--png", str(png)])
    assert code == 0
    data = page_data_of(out.read_text())
    assert len(data["tokens"]) == data["n_prompt"] + 4 and data["n_layers"] == 3
    assert len(list(png.glob("layer_*.png"))) == 3
    assert capsys.readouterr().out.startswith(PROMPT)


@pytest.mark.parametrize("argv, message", [
    (["attention", PROMPT], "--out report.html and/or --png DIR"),
    (["attention", "--out", "/nonexistent-dir/r.html", PROMPT], "cannot write /nonexistent-dir/r.html"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv + ["-m", str(require(MODELS / "tiny_gqa.bin")), "-z", str(MODELS / "tokenizer.bin")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
