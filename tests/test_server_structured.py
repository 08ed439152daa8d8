"""The server's structured output, tool calls and n > 1 choices (issue 21, points 2-4), driven by the
official `openai` client on SmolLM2 (one in-process server for the module: tests/test_server.py's).

What is checked is independent of the server: outputs validate against their schemas with the
`jsonschema` package, a GBNF's output is one of the strings it allows, choices are counted in the
tokens the model actually ran (its forward calls), and tool calls come back in OpenAI's shapes as
the client's own types parse them. Short schemas and small max_tokens keep the module fast.
"""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import require_module
from test_server import KEY, Running

openai = require_module("openai")
jsonschema = require_module("jsonschema")
httpx = require_module("httpx")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smol_path):
    import llamarun
    from llamarun.server import create_app
    running = Running(create_app(llamarun.load(smol_path), "smollm2", parallel=4, ctx=512, api_key=KEY))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, **kw):
    return client.chat.completions.create(model="smollm2", **{"messages": ASK, "max_tokens": 40, **kw})


# ----------------------------------------------------------------------------------------------
# structured output

def test_response_format_json_schema_is_enforced(client):
    for seed in (1, 2):
        reply = chat(client, temperature=0.8, seed=seed, messages=[{"role": "user", "content": "Invent a person."}],
                     response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                             "strict": True}})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_and_llama_cpp_fields_on_completions(client, server):
    reply = chat(client, temperature=0.8, seed=3, response_format={"type": "json_object"}, max_tokens=60)
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:       # cut at max_tokens: still the start of an object
        assert reply.choices[0].message.content.lstrip().startswith("{")
    completion = client.completions.create(model="smollm2", prompt="Is the sky blue? Answer:", max_tokens=5,
                                           extra_body={"grammar": 'root ::= " yes" | " no"'})
    assert completion.choices[0].text in (" yes", " no") and completion.choices[0].finish_reason == "stop"
    completion = client.completions.create(model="smollm2", prompt="A person:", max_tokens=30, temperature=0.8,
                                           seed=4, extra_body={"json_schema": PERSON})
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


def test_constraints_that_do_not_compile_are_400(server):
    for body, param in [({"grammar": "root ::= missing_rule"}, "grammar"),
                        ({"response_format": {"type": "json_schema", "json_schema": {
                            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strung"}}}}}},
                         "response_format")]:
        response = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                              json={"messages": ASK, **body})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and "\n" not in error["message"], error
        assert error["type"] == "invalid_request_error"


def test_constrained_and_free_requests_share_the_batch(client):
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: chat(client, temperature=0.8, seed=i, max_tokens=24,
                                               **(schema if i % 2 else {})), range(4)))
    for i, reply in enumerate(replies):
        if i % 2:
            jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
        else:
            assert reply.choices[0].message.content


# ----------------------------------------------------------------------------------------------
# tool calls

def arguments_of(call, tool) -> dict:
    assert call.type == "function" and call.id and call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_required_tool_call_its_result_and_the_final_answer(client):
    reply = chat(client, tools=[WEATHER, TIME], tool_choice="required", temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        tool = WEATHER if call.function.name == "get_weather" else TIME
        arguments_of(call, tool)
    call = choice.message.tool_calls[0]
    messages = ASK + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    final = chat(client, messages=messages, tools=[WEATHER, TIME], tool_choice="none", temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length")


def test_named_function_and_parallel_tool_calls_false(client):
    reply = chat(client, tools=[WEATHER, TIME], temperature=0.8, seed=7, parallel_tool_calls=False,
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1 and reply.choices[0].finish_reason == "tool_calls"
    arguments_of(calls[0], TIME)


def test_auto_answers_or_calls(client):
    reply = chat(client, tools=[WEATHER], temperature=0)     # "auto"
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        arguments_of(choice.message.tool_calls[0], WEATHER)
    else:
        assert choice.message.content and not choice.message.content.lstrip().startswith("{")


def test_streamed_tool_calls(client):
    stream = chat(client, tools=[WEATHER], tool_choice="required", temperature=0.8, seed=11, stream=True)
    calls, finish, content = {}, None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            if part.function is not None:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and calls
    for call in calls.values():
        assert call["id"] and call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_tool_messages_render_in_the_generic_format(server):
    """SmolLM2's template knows no tools: the system message describes them (llama.cpp's generic
    format), the assistant's call is its JSON and the tool's result a user message."""
    from llamarun.tools import generic_messages
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Rome", "unit": "C"}'}}]
    messages = generic_messages(ASK + [{"role": "assistant", "content": None, "tool_calls": calls},
                                       {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
                                [WEATHER["function"]])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "get_weather" in messages[0]["content"] and '"tool_calls"' in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"tool_calls": [{"name": "get_weather",
                                                                  "arguments": {"city": "Rome", "unit": "C"}}]}
    assert json.loads(messages[3]["content"])["tool_response"] == {"tool_call_id": "call_1", "name": "get_weather",
                                                                   "content": "sunny"}


# ----------------------------------------------------------------------------------------------
# n > 1 choices

def prompt_tokens_run(server, fn):
    """fn() and the number of tokens of each forward the model ran meanwhile."""
    scheduler = server.app.state.server.scheduler
    forward, counted = scheduler.model.forward, []

    def counting(batch, cache, *args):
        counted.append(len(batch.tokens))
        return forward(batch, cache, *args)

    scheduler.model.forward = counting
    try:
        return fn(), counted
    finally:
        del scheduler.model.forward


def test_n_choices_share_the_prompt(server, client):
    question = [{"role": "user", "content": "Name a colour. Request n=3."}]
    reply, counted = prompt_tokens_run(server, lambda: chat(client, messages=question, n=3, max_tokens=6,
                                                            temperature=1.0, seed=5))
    assert [c.index for c in reply.choices] == [0, 1, 2]
    # the prompt ran once (less what the slot's cache held): every later forward is a decode row per choice
    assert counted[0] == reply.usage.prompt_tokens - reply.usage.prompt_tokens_details.cached_tokens, counted
    assert all(n <= 3 for n in counted[1:]), counted
    alone = chat(client, messages=question, n=1, max_tokens=6, temperature=1.0, seed=6)
    assert alone.choices[0].message.content == reply.choices[1].message.content     # choice 1: seed + 1


def test_n_choices_streamed_and_on_completions(client):
    stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=5, n=2,
                                       temperature=1.0, seed=8, stream=True, stream_options={"include_usage": True})
    texts, finished, usage = {0: "", 1: ""}, set(), None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert finished == {0, 1} and usage.completion_tokens == 10
    whole = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=5, n=2,
                                      temperature=1.0, seed=8)
    assert [c.text for c in whole.choices] == [texts[0], texts[1]]
