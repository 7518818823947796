"""The OpenAI and Azure API surface: what a request must carry and the errors it gets.

Validated the way OpenAI does for the fields the simulator models, so a client bug shows up
against the simulator as it would against the real service.
"""

import json
from typing import Any

from pools.simulator.responders import ChatRequest
from pools.simulator.wire import HTTPError, Request

__all__ = [
    "allow",
    "bad_param",
    "chat_request",
    "check_auth",
    "deployment_not_found",
    "model_entry",
    "model_not_found",
    "parse_json_object",
    "presented_key",
    "require_api_version",
]

_MODEL_CREATED = 1_715_367_049
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})


def presented_key(req: Request) -> str:
    """The API key a request presents (Azure's api-key, else the Bearer token, else '')."""
    azure_key = req.headers.get("api-key")
    if azure_key:
        return azure_key
    auth = req.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else auth


def allow(req: Request, method: str) -> None:
    if req.method != method:
        raise HTTPError(
            405,
            f"Method {req.method} not allowed for {req.path}; use {method}.",
            code="method_not_allowed",
            headers=[("allow", method)],
        )


def check_auth(req: Request, expected: str | None) -> None:
    """401 unless the request presents `expected` (no check when it is None)."""
    if expected is None:
        return
    auth = req.headers.get("authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    azure_key = req.headers.get("api-key")
    if expected in (bearer, azure_key):
        return
    given = bearer or azure_key
    if not given:
        message = (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
            "or in an api-key header."
        )
    else:
        shown = given[:3] + "*" * 8 + given[-4:] if len(given) > 10 else "*" * 8
        message = f"Incorrect API key provided: {shown}."
    raise HTTPError(401, message, code="invalid_api_key")


def require_api_version(req: Request) -> None:
    if not req.query.get("api-version", [""])[0]:
        raise HTTPError(
            400,
            "Missing required query parameter 'api-version' (e.g. ?api-version=2024-10-21).",
            code="missing_api_version",
            param="api-version",
        )


def model_entry(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _MODEL_CREATED, "owned_by": "carlos"}


def model_not_found(model: str) -> HTTPError:
    return HTTPError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        ) from exc
    if not isinstance(payload, dict):
        raise HTTPError(400, "The request body must be a JSON object.", code="invalid_json")
    return payload


def bad_param(param: str, message: str, code: str = "invalid_value") -> HTTPError:
    return HTTPError(400, message, code=code, param=param)


def chat_request(body: dict[str, Any], deployment: str | None) -> ChatRequest:
    """Validate a chat-completions body the way OpenAI does for the fields we model."""
    model = body.get("model")
    if deployment is None:
        if model is None:
            raise bad_param(
                "model", "Missing required parameter: 'model'.", "missing_required_parameter"
            )
        if not isinstance(model, str) or not model:
            raise bad_param("model", "'model' must be a non-empty string.", "invalid_type")
    messages = body.get("messages")
    if messages is None:
        raise bad_param(
            "messages", "Missing required parameter: 'messages'.", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "'messages' must be a non-empty array.", "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_param(f"messages[{i}]", f"messages[{i}] must be an object.", "invalid_type")
        if message.get("role") not in _ROLES:
            raise bad_param(
                f"messages[{i}].role",
                f"Invalid value for messages[{i}].role: {json.dumps(message.get('role'))}. "
                f"Supported values are: {', '.join(sorted(_ROLES))}.",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_param(
                f"messages[{i}].content",
                f"messages[{i}].content must be a string or an array of parts.",
                "invalid_type",
            )

    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise bad_param("temperature", "'temperature' must be a number.", "invalid_type")
        if not 0 <= temperature <= 2:
            raise bad_param(
                "temperature",
                f"{temperature} is not a valid temperature; it must be between 0 and 2.",
            )
        temperature = float(temperature)

    max_tokens: int | None = None
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_param(key, f"'{key}' must be an integer >= 1.")
        max_tokens = value
        break

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_param("stream", "'stream' must be a boolean.", "invalid_type")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise bad_param(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            )
        if not isinstance(stream_options, dict):
            raise bad_param("stream_options", "'stream_options' must be an object.")
    include_usage = bool((stream_options or {}).get("include_usage", False))

    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict)
        or response_format.get("type") not in _RESPONSE_FORMATS
    ):
        raise bad_param(
            "response_format",
            "'response_format' must be an object whose type is one of: "
            f"{', '.join(sorted(_RESPONSE_FORMATS))}.",
        )

    return ChatRequest(
        model=deployment if deployment is not None else model,
        messages=messages,
        temperature=temperature,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        response_format=response_format,
        deployment=deployment,
        body=body,
    )


def deployment_not_found() -> HTTPError:
    """Azure's 404 for a deployment the resource does not have."""
    return HTTPError(
        404,
        "The API deployment for this resource does not exist. If you created the "
        "deployment within the last 5 minutes, please wait a moment and try again.",
        code="DeploymentNotFound",
    )
