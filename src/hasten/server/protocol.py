"""The OpenAI wire format: checking request fields, and shaping answers, chunks and errors.

Requests are checked by hand (not by a schema library) so every mistake gets OpenAI's error
shape with the offending field named: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..drafters import DRAFTERS as DRAFT_NAMES
MAX_STOP_SEQUENCES = 16
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI fields that change the output in ways we do not implement: accepted only at the value
# that changes nothing, refused with a 400 naming them otherwise (never silently ignored).
NEUTRAL_DEFAULTS = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "best_of": 1,
                    "suffix": "", "top_logprobs": 0}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _wrong_type(key: str, want: str, value) -> APIError:
    return APIError(400, f"'{key}' must be {want}, got {_type_name(value)}", param=key,
                    code="invalid_type")


def get_int(body: dict, key: str, default=None, lo: int | None = None, hi: int | None = None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(key, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise APIError(400, f"'{key}' must be {bounds}, got {value}", param=key, code="invalid_value")
    return value


def get_number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(key, "a number", value)
    if not lo <= value <= hi:  # also refuses NaN
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {value}", param=key,
                       code="invalid_value")
    return float(value)


def get_bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong_type(key, "a boolean", value)
    return value


def get_stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
        raise APIError(400, f"'stop' takes 1 to {MAX_STOP_SEQUENCES} non-empty strings",
                       param="stop", code="invalid_value")
    return stops


def get_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects",
                       param="messages", code="invalid_type" if not isinstance(messages, list)
                       else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages.[{i}]"
        if not isinstance(m, dict):
            raise _wrong_type(where, "an object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                           param=f"{where}.role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"'{where}.content' parts must be text parts "
                               "({\"type\": \"text\", \"text\": ...})", param=f"{where}.content",
                               code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _wrong_type(f"{where}.content", "a string", content)
        out.append({"role": CHAT_ROLES[role], "content": content})
    return out


def get_prompt(body: dict) -> str | list[int]:
    """A completions prompt: a string, a one-string array, or an array of token ids."""
    value = body.get("prompt")
    if value is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in value):
        return value
    if isinstance(value, list) and len(value) > 1:
        raise APIError(400, "only one prompt per request is supported (batch prompts are not)",
                       param="prompt", code="invalid_value")
    raise _wrong_type("prompt", "a string or an array of token ids", value)


@dataclass
class Options:
    """The generation fields shared by both endpoints."""
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    draft: str | None
    tree_size: int | None


def get_options(body: dict, chat: bool, max_positions: int) -> Options:
    n = get_int(body, "n", 1)
    if n != 1:
        raise APIError(400, f"only n=1 is supported, got {n}", param="n", code="invalid_value")
    if chat and body.get("logprobs") or not chat and body.get("logprobs") is not None:
        raise APIError(400, "'logprobs' is not supported", param="logprobs", code="unsupported_parameter")
    if not chat and get_bool(body, "echo"):
        raise APIError(400, "'echo' is not supported", param="echo", code="unsupported_parameter")
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise APIError(400, f"'{unsupported}' (tool calling) is not supported",
                           param=unsupported, code="unsupported_parameter")
    for name, harmless in NEUTRAL_DEFAULTS.items():  # fields we cannot honour unless neutral
        value = body.get(name)
        if value is not None and value != harmless:
            raise APIError(400, f"'{name}' is not supported (only {harmless!r}); remove it",
                           param=name, code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise APIError(400, "only 'response_format': {\"type\": \"text\"} is supported",
                       param="response_format", code="unsupported_parameter")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get_int(body, key, None, lo=1, hi=max_positions)
    top_p = get_number(body, "top_p", 1.0, 0.0, 1.0)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _wrong_type("stream_options", "an object", stream_options)
    draft = body.get("draft")
    if draft is not None and draft not in DRAFT_NAMES:
        if not isinstance(draft, str):
            raise _wrong_type("draft", "a string", draft)
        raise APIError(400, f"unknown drafter {draft!r}; choose one of {', '.join(DRAFT_NAMES)}",
                       param="draft", code="invalid_value")
    return Options(
        max_tokens=max_tokens,
        temperature=get_number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default: 1
        top_p=top_p or 1e-9,  # top_p=0 keeps only the most likely token
        top_k=get_int(body, "top_k", 0, lo=0),
        seed=get_int(body, "seed", None, lo=-2 ** 63, hi=2 ** 63 - 1),
        stop=get_stop(body),
        stream=get_bool(body, "stream"),
        include_usage=get_bool(stream_options or {}, "include_usage"),
        draft=draft,
        tree_size=get_int(body, "tree_size", None, lo=0, hi=256),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(chat: bool, rid: str, created: int, model: str, text: str, finish: str,
               usage_: dict, stats: dict) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice], "usage": usage_,
            "hasten": stats}


def chunk(chat: bool, rid: str, created: int, model: str, text: str | None = None,
          finish: str | None = None, first: bool = False, **extra) -> dict:
    if chat:
        delta = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": choices, **extra}
