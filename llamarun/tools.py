"""Tool calls (OpenAI's `tools`): how a model is told about tools, what its calls look like, and
reading them back from what it wrote.

A model whose chat template takes `tools` (it renders them: Qwen 2.5, Llama 3.1, ...) gets them
there, with earlier calls and their results as the template lays them out. Any other model gets
llama.cpp's generic format: a system message describing the tools and the one shape a call takes,

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}

(one object, one or more calls: with parallel_tool_calls false, exactly one), its earlier calls
written back as that JSON, and tool results as user messages {"tool_response": {...}}.

What the model writes is held to that shape by a grammar: with tool_choice "required" or a named
function, a JSON schema of a call to the listed functions whose arguments satisfy each one's
`parameters` (`call_schema`); with "auto", either free text (which does not start with "{") or such
a call (`auto_grammar`, a Lark grammar around the schema). The output is read back with
`parse_calls`, whatever template the model has.
"""
from __future__ import annotations

import json
import secrets

GENERIC_INTRO = ("You can call the following tools. To call tools, answer with one JSON object and nothing else, "
                 "in this shape:\n{example}\nThe tools, with the JSON schema of each one's arguments:\n{tools}")
CALL_EXAMPLE = '{"tool_calls": [{"name": "<the tool\'s name>", "arguments": {<its arguments>}}]}'
ONE_CALL = "Call at most one tool at a time."


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def call_schema(functions: list[dict], parallel: bool = True) -> dict:
    """The JSON schema of the object that calls tools: a list of calls (exactly one unless
    `parallel`), each naming one of `functions` (OpenAI's function objects: name, parameters) with
    arguments that satisfy its parameters."""
    calls = [{"type": "object",
              "properties": {"name": {"const": f["name"]},
                             "arguments": f.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"],
            "additionalProperties": False}


def auto_grammar(functions: list[dict], parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) for tool_choice "auto": an answer in free text, which
    does not open with "{", or a call as `call_schema` has it."""
    return ("start: TEXT | call\n"
            "TEXT: /[^{\\s](.|\\n)*/\n"
            f"call: %json {json.dumps(call_schema(functions, parallel))}\n")


def parse_calls(text: str) -> list[dict] | None:
    """[{name, arguments}] when `text` is a tool-calling object (the grammar's shape), else None."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        data = json.loads(stripped)
    except ValueError:
        return None
    calls = data.get("tool_calls") if isinstance(data, dict) else None
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        return None
    return [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


def maybe_call(text: str) -> bool:
    """Could `text`, the start of an answer, become a call? (Streams hold such text back.)"""
    stripped = text.lstrip()
    return not stripped or stripped.startswith("{")


def openai_calls(calls: list[dict]) -> list[dict]:
    """Calls as OpenAI's message.tool_calls: each with an id, and its arguments as a JSON string."""
    return [{"id": call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


# ----------------------------------------------------------------------------------------------
# the conversation as the template sees it

def arguments_object(arguments: str):
    """A call's arguments as templates read them (an object), from OpenAI's JSON string; the string
    itself when it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def native_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that takes tools: calls' arguments as objects, content "" for none
    (templates add content to strings)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"],
                                                  "arguments": arguments_object(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def generic_messages(messages: list[dict], functions: list[dict] | None, parallel: bool = True) -> list[dict]:
    """Messages for a template that knows nothing of tools (llama.cpp's generic format): the tools
    described in the system message, calls written as the JSON the model is to write, and tool
    results (consecutive ones together) as a user message of {"tool_response": ...} objects."""
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            response = {"tool_response": {"tool_call_id": m.get("tool_call_id"),
                                          "name": names.get(m.get("tool_call_id"), m.get("name")),
                                          "content": m["content"]}}
            text = json.dumps(response, ensure_ascii=False)
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "tool_results": True})
        elif m.get("tool_calls"):
            call = {"tool_calls": [{"name": c["function"]["name"],
                                    "arguments": arguments_object(c["function"]["arguments"])}
                                   for c in m["tool_calls"]]}
            content = (m.get("content") or "").strip()
            out.append({"role": "assistant", "content": (content + "\n" if content else "") +
                        json.dumps(call, ensure_ascii=False)})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if functions:
        intro = GENERIC_INTRO.format(example=CALL_EXAMPLE, tools=json.dumps(functions, ensure_ascii=False, indent=1))
        if not parallel:
            intro += "\n" + ONE_CALL
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + intro}
        else:
            out.insert(0, {"role": "system", "content": intro})
    return out
