"""Structured output (llamarun/structured.py and the Decoder's grammar hook): what is generated under a
JSON schema parses and validates -- checked by the `jsonschema` package, not by the grammar that made
it --, GBNF, regex, Lark and any-JSON-object constraints hold (checked with Python's `re` and `json`),
forced tokens are appended without a draw, and a constraint that can't be enforced is one line."""
import json
import re

import numpy as np
import pytest

import llamarun
from llamarun.cli import main
from llamarun.decoding import Decoder
from llamarun.errors import LlamarunError
from llamarun.generation import generate_stream
from llamarun.sampling import make_sampler
from llamarun.structured import Grammar, fill_masks, llg_tokenizer, unpack

from conftest import MODELS, require, require_module

jsonschema = require_module("jsonschema")
llguidance = require_module("llguidance")


@pytest.fixture(scope="module")
def smol(smol_path):
    return llamarun.load(smol_path)


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# Every schema keeps its output short (string lengths, item counts, enums), so that generation ends
# because the grammar is complete, within max_tokens.
WORD = {"type": "string", "maxLength": 8}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
SCHEMAS = {
    "flat object": {"type": "object", "properties": {"name": WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                    "required": ["name", "age"], "additionalProperties": False},
    "nested objects": {"type": "object", "properties": {
        "owner": {"type": "object", "properties": {"name": WORD, "pet": {"type": "object", "properties": {"kind": WORD},
                                                                          "required": ["kind"], "additionalProperties": False}},
                  "required": ["name", "pet"], "additionalProperties": False}},
        "required": ["owner"], "additionalProperties": False},
    "four levels deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": {"type": "object", "properties": {"d": DIGIT}, "required": ["d"],
                                               "additionalProperties": False}},
        "required": ["c"], "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
        "required": ["a"], "additionalProperties": False},
    "array min/max items": {"type": "array", "items": DIGIT, "minItems": 2, "maxItems": 4},
    "array exactly 3 booleans": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3},
    "array of enums": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    "array of objects": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {"id": DIGIT, "ok": {"type": "boolean"}},
                                                                   "required": ["id", "ok"], "additionalProperties": False}},
    "nested arrays": {"type": "array", "maxItems": 2, "items": {"type": "array", "items": DIGIT, "maxItems": 2}},
    "tuple (prefixItems)": {"type": "array", "prefixItems": [DIGIT, {"type": "string", "maxLength": 3}, {"type": "boolean"}],
                            "items": False, "minItems": 3},
    "string enum": {"enum": ["yes", "no", "maybe"]},
    "integer enum": {"type": "integer", "enum": [2, 3, 5, 7]},
    "mixed enum": {"enum": ["one", 2, None, True]},
    "enum with escapes and accents": {"enum": ["café", "naïve", "say \"hi\"", "back\\slash"]},
    "const string": {"type": "object", "properties": {"version": {"const": "v2"}, "n": DIGIT},
                     "required": ["version", "n"], "additionalProperties": False},
    "const object": {"const": {"a": [1, 2], "b": None}},
    "anyOf": {"anyOf": [DIGIT, {"type": "string", "maxLength": 4}, {"type": "boolean"}]},
    "oneOf tagged": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["kind", "lives"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
         "required": ["kind", "good"], "additionalProperties": False}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"x": DIGIT}, "required": ["x"]},
                        {"properties": {"y": {"type": "boolean"}}, "required": ["y"]}],
              "properties": {"x": True, "y": True}, "additionalProperties": False},
    "$defs and $ref": {"$defs": {"point": {"type": "object", "properties": {"x": DIGIT, "y": DIGIT}, "required": ["x", "y"],
                                           "additionalProperties": False}},
                       "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
                       "required": ["from", "to"], "additionalProperties": False},
    "recursive $ref (expression)": {"$defs": {"expr": {"anyOf": [DIGIT, {
        "type": "object", "properties": {"op": {"enum": ["+", "*"]},
                                         "args": {"type": "array", "items": {"$ref": "#/$defs/expr"}, "minItems": 2, "maxItems": 2}},
        "required": ["op", "args"], "additionalProperties": False}]}}, "$ref": "#/$defs/expr"},
    "recursive $ref (list)": {"$defs": {"cell": {"type": "object", "properties": {
        "v": DIGIT, "next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/cell"}]}},
        "required": ["v", "next"], "additionalProperties": False}}, "$ref": "#/$defs/cell"},
    "string pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "string min/max length": {"type": "string", "minLength": 3, "maxLength": 6},
    "pattern inside object": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-f0-9]{4}$"},
                                                               "word": {"type": "string", "minLength": 2, "maxLength": 5}},
                              "required": ["code", "word"], "additionalProperties": False},
    "integer bounds": {"type": "integer", "minimum": -20, "maximum": 20},
    "exclusive bounds": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 14},
    "number bounds": {"type": "object", "properties": {"t": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
                      "required": ["t"], "additionalProperties": False},
    "multipleOf": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50},
    "nullable by type list": {"type": "object", "properties": {"nick": {"type": ["string", "null"], "maxLength": 5},
                                                               "n": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
                              "required": ["nick", "n"], "additionalProperties": False},
    "nullable by anyOf": {"type": "object", "properties": {"when": {"anyOf": [{"type": "null"}, DIGIT]}},
                          "required": ["when"], "additionalProperties": False},
    "optional properties, no others": {"type": "object", "properties": {"a": DIGIT, "b": {"type": "boolean"}, "c": {"enum": ["x"]}},
                                       "additionalProperties": False},
    "boolean and null fields": {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}},
                                "required": ["ok", "none"], "additionalProperties": False},
}
SEEDS = (0, 1)
# Recursion has no bound a schema can state, and a 135M model, once it nests, tends to nest the same
# way forever ({"v": 1, "next": {"v": 1, "next": ...): a penalty on what it repeats lets it close.
PENALTIES = {"recursive $ref (expression)": dict(frequency_penalty=1.0), "recursive $ref (list)": dict(repeat_penalty=1.3)}


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_output_under_a_json_schema_validates(smol, name):
    schema = SCHEMAS[name]
    grammar = Grammar.from_json_schema(schema, smol.tokenizer)        # compiled once, one matcher per run
    for seed in SEEDS:
        result = smol.generate(chat_prompt("Answer in JSON."), 128, temperature=0.8, seed=seed, grammar=grammar,
                               **PENALTIES.get(name, {}))
        assert result.finish_reason == "stop", (seed, result.text)
        jsonschema.validate(json.loads(result.text), schema, cls=jsonschema.Draft202012Validator)


def test_the_suite_is_large_enough():
    assert len(SCHEMAS) >= 30


def test_any_json_object(smol):
    for seed in SEEDS:
        result = smol.generate(chat_prompt("Describe a dog in JSON."), 160, temperature=0.8, seed=seed, json_object=True)
        assert result.finish_reason == "stop" and isinstance(json.loads(result.text), dict), result.text


def test_gbnf_grammar(smol):
    gbnf = 'root ::= answer " (" num ")"\nanswer ::= "yes" | "no"\nnum ::= [1-9] [0-9]?\n'
    for seed in SEEDS:
        result = smol.generate(chat_prompt("Is it raining?"), 32, temperature=0.8, seed=seed, grammar=gbnf)
        assert result.finish_reason == "stop"
        assert re.fullmatch(r"(yes|no) \([1-9][0-9]?\)", result.text), result.text


def test_regex(smol):
    pattern = r"[A-Z][a-z]{2,6} (is|was) [0-9]{1,2}\."
    for seed in SEEDS:
        result = smol.generate("Fact:", 32, temperature=0.8, seed=seed, regex=pattern)
        assert result.finish_reason == "stop"
        assert re.fullmatch(pattern, result.text), result.text


def test_lark(smol):
    lark = 'start: "[" item ("," item)~0..2 "]"\nitem: /[a-z]{1,5}/\n'
    result = smol.generate(chat_prompt("List some fruit."), 40, temperature=0.8, seed=2, lark=lark)
    assert result.finish_reason == "stop"
    assert re.fullmatch(r"\[[a-z]{1,5}(,[a-z]{1,5}){0,2}\]", result.text), result.text


def test_each_chat_reply_follows_the_constraint(smol):
    from llamarun.chat import ChatSession
    session = ChatSession(smol, grammar=Grammar.from_regex(r"(red|green|blue)!", smol.tokenizer), max_tokens=8, seed=1)
    for question in ("Pick a colour.", "And another one?"):
        stream = session.send(question)
        assert re.fullmatch(r"(red|green|blue)!", stream.completion.text)
        assert stream.completion.finish_reason == "stop"


# ----------------------------------------------------------------------------------------------
# forced tokens

class CountingSampler:
    """A sampler that counts its draws."""

    def __init__(self, sampler):
        self.sampler, self.draws = sampler, 0

    def sample(self, logits, history):
        self.draws += 1
        return self.sampler.sample(logits, history)

    def distribution(self, logits, history):
        return self.sampler.distribution(logits, history)


def test_forced_tokens_are_appended_without_sampling_in_one_forward(smol, monkeypatch):
    forwards = []
    real = smol.model.forward
    monkeypatch.setattr(smol.model, "forward", lambda batch, *a, **k: forwards.append(len(batch)) or real(batch, *a, **k))
    sampler = CountingSampler(make_sampler("default", temperature=0.8, seed=0))
    prompt = smol.encode("Say it:")
    grammar = Grammar.from_regex("hello world, again", smol.tokenizer).matcher()
    events = list(generate_stream(smol.model, smol.tokenizer, prompt, sampler, max_tokens=16, grammar=grammar))
    # the grammar leaves nothing to choose: no draw, and the tokens are the tokenizer's own encoding
    assert sampler.draws == 0
    assert [e.token for e in events] == smol.tokenizer.encode("hello world, again", bos=False)
    assert "".join(e.text for e in events) == "hello world, again" and events[-1].finish_reason == "stop"
    # the prompt and every forced token but the last (which never needs to run) in one forward
    assert forwards == [len(prompt) + len(events) - 1]


def test_a_schema_draws_only_what_it_leaves_open(smol):
    schema = {"type": "object", "properties": {"colour_of_the_sky": {"enum": ["blue", "grey"]}},
              "required": ["colour_of_the_sky"], "additionalProperties": False}
    sampler = CountingSampler(make_sampler("default", temperature=0.8, seed=3))
    result = llamarun.decoding.Completion("", [])
    list(generate_stream(smol.model, smol.tokenizer, smol.encode(chat_prompt("Sky?")), sampler, max_tokens=32,
                         grammar=Grammar.from_json_schema(schema, smol.tokenizer).matcher(), result=result))
    assert json.loads(result.text)["colour_of_the_sky"] in ("blue", "grey") and result.finish_reason == "stop"
    assert 1 <= sampler.draws < len(result.tokens) / 2, (sampler.draws, len(result.tokens))


# ----------------------------------------------------------------------------------------------
# the decoder alone, on logits made up here (no model)

@pytest.fixture(scope="module")
def llama2_tokenizers():
    from llamarun.tokenizers import load_tokenizer
    return [load_tokenizer(require(MODELS / "tokenizer.bin")), load_tokenizer(require(MODELS / "tokenizer.model"))]


def run_decoder(tokenizer, grammar, seed, max_tokens=40, vocab=None):
    """Decode on random logits (a uniform-ish model: it wanders everywhere the grammar lets it)."""
    rng = np.random.default_rng(seed)
    decoder = Decoder(tokenizer, make_sampler("default", temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=seed),
                      [tokenizer.bos_id, 450], context=512, max_tokens=max_tokens, grammar=grammar.matcher())
    while not decoder.done:
        decoder.take_forced(decoder.forced())
        if not decoder.done:
            decoder.next_token(rng.normal(0, 3, vocab or tokenizer.vocab_size).astype(np.float32))
    return decoder.completion


def test_sentencepiece_and_llama2c_vocabularies(llama2_tokenizers):
    """Tokenizers without a tokenizer.json: llguidance sees their raw token bytes."""
    schema = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 6}, "n": DIGIT},
              "required": ["w", "n"], "additionalProperties": False}
    for tokenizer in llama2_tokenizers:
        grammar = Grammar.from_json_schema(schema, tokenizer)
        for seed in range(3):
            # a model whose classifier is longer than the vocabulary: the padding rows are never drawn
            result = run_decoder(tokenizer, grammar, seed, vocab=tokenizer.vocab_size + 7)
            assert result.finish_reason == "stop", result.text
            jsonschema.validate(json.loads(result.text), schema)
            assert max(result.tokens) < tokenizer.vocab_size


def test_speculative_accept_respects_the_mask(llama2_tokenizers):
    tokenizer = llama2_tokenizers[0]
    grammar = Grammar.from_regex("[0-9]{4}", tokenizer)
    decoder = Decoder(tokenizer, make_sampler("default", temperature=0), [1, 450], context=64, max_tokens=8,
                      grammar=grammar.matcher())
    draft = tokenizer.encode("12ab", bos=False)
    rows = np.zeros((len(draft) + 1, tokenizer.vocab_size), np.float32)
    rows[np.arange(len(draft)), draft] = 10.0            # the target model agrees with the draft throughout
    events = decoder.accept(rows, draft)
    text = "".join(e.text for e in events)
    assert re.fullmatch(r"[0-9]{1,4}", text) and "a" not in text


def test_mask_bits_are_the_tokens_llguidance_allows(smol):
    """unpack's bit order against llguidance's byte-per-token logit bias (0 or 200), and fill_masks
    (parallel, for a batch) against each matcher alone."""
    grammar = Grammar.from_json_schema(SCHEMAS["flat object"], smol.tokenizer)
    matchers, references = [], []
    for prefix in ("", '{"', '{"name": "Bo'):
        m, reference = grammar.matcher(), grammar.matcher()
        for token in smol.tokenizer.encode(prefix, bos=False) if prefix else []:
            m.consume(token)
            reference.consume(token)
        matchers.append(m)
        references.append(reference)
    rows = fill_masks(matchers)
    for row, reference in zip(rows, references):
        bias = np.frombuffer(reference.llg.compute_logit_bias(), np.uint8)[:smol.tokenizer.vocab_size]
        np.testing.assert_array_equal(row, bias > 0)
        assert 0 < row.sum() < len(row)
    bits = np.zeros(2, np.int32)
    bits.view(np.uint32)[:] = [1 | (1 << 31), 1 << 2]
    assert list(np.flatnonzero(unpack(bits, 40))) == [0, 31, 34]


def test_the_llguidance_tokenizer_is_built_once_per_tokenizer(smol):
    assert llg_tokenizer(smol.tokenizer) is llg_tokenizer(smol.tokenizer)


# ----------------------------------------------------------------------------------------------
# what can't be enforced is one line, before anything runs

@pytest.mark.parametrize("constraint, words", [
    (dict(json_schema={"type": "object", "not": {"required": ["a"]}}), ["not", "schema"]),
    (dict(json_schema={"type": "array", "uniqueItems": True}), ["uniqueItems"]),
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "strnig"}}}), ["strnig"]),
    (dict(json_schema={"$ref": "#/$defs/missing"}), ["missing"]),
    (dict(json_schema='{"type": "object",'), ["not valid JSON"]),
    (dict(json_schema={"type": "string", "pattern": "(?<=a)b"}), ["look-around"]),
    (dict(grammar='root ::= greeting\n'), ["greeting"]),
    (dict(grammar='root := "a"\n'), ["::="]),
    (dict(regex="a(b"), ["unclosed group"]),
    (dict(lark="start: undefined_rule\n"), ["undefined_rule"]),
    (dict(regex="a", json_object=True), ["regex and json_object"]),
])
def test_what_cannot_be_enforced_is_one_line(smol, constraint, words):
    with pytest.raises(LlamarunError) as e:
        smol.generate("x", 4, **constraint)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_cli_flags(smol_path, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["flat object"]))
    assert main(["generate", "A person:", "-m", str(smol_path), "-n", "64", "--seed", "1", "--json-schema", str(schema)]) == 0
    out, err = capsys.readouterr()
    jsonschema.validate(json.loads(out[len("A person:"):]), SCHEMAS["flat object"])
    assert "finish: stop" in err
    assert main(["chat", "--prompt", "Yes or no?", "-m", str(smol_path), "--seed", "1", "--grammar", 'root ::= "yes" | "no"']) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    assert main(["generate", "Code:", "-m", str(smol_path), "--seed", "1", "--regex", "[A-F]{3}"]) == 0
    assert re.fullmatch(r"Code:[A-F]{3}\n", capsys.readouterr().out)
    assert main(["generate", "Data:", "-m", str(smol_path), "--seed", "1", "-n", "48", "--json-schema",
                 '{"type": "array", "items": {"type": "integer"}, "maxItems": 2}']) == 0
    assert isinstance(json.loads(capsys.readouterr().out[len("Data:"):]), list)
    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text('root ::= [0-9] [0-9]\n')
    assert main(["generate", "N:", "-m", str(smol_path), "--seed", "1", "--grammar-file", str(gbnf)]) == 0
    assert re.fullmatch(r"N:[0-9]{2}\n", capsys.readouterr().out)
    assert main(["generate", "x", "-m", str(smol_path), "--json", "--regex", "a"]) != 0
    assert "one constraint" in capsys.readouterr().err
