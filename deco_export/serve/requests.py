"""The body of ``POST /v1/images/generations``: OpenAI's image request (``prompt``, ``n``,
``size`` "WxH", ``response_format``, ``stream``) with the bundle's own knobs as extra fields
(``class_label``, ``negative_prompt``, ``steps``, ``guidance_scale``, ``seed``, ``solver``),
read into the arguments of ``pipe.generate``.

Every problem is an `ApiError`: the HTTP status and one message that names the field and what
it accepts, raised before anything is queued.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from runtimes.errors import DecoError
from runtimes.sizes import SizeError

__all__ = ["FIELDS", "ApiError", "ImageRequest", "parse_request"]

RESPONSE_FORMATS = ("b64_json", "url")
# Field -> (the JSON types it takes, what the message says it must be).
FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "prompt": ((str,), "a string"),
    "class_label": ((int, str), "a class index or a class name"),
    "model": ((str,), "a string (the id /v1/models lists)"),
    "n": ((int,), "an integer"),
    "size": ((str,), 'a string "WIDTHxHEIGHT"'),
    "response_format": ((str,), f"one of {', '.join(RESPONSE_FORMATS)}"),
    "stream": ((bool,), "true or false"),
    "negative_prompt": ((str,), "a string"),
    "steps": ((int,), "an integer"),
    "guidance_scale": ((int, float), "a number"),
    "seed": ((int,), "an integer"),
    "solver": ((str,), "a solver name"),
    "user": ((str,), "a string"),
}


class ApiError(DecoError):
    """A request the server refuses: ``status`` (4xx), the message and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "rate_limit_error" if self.status == 429 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": None}}


@dataclass
class ImageRequest:
    """A checked request: ``kwargs`` for ``pipe.generate`` and how to answer."""

    kwargs: dict[str, Any]
    images: int
    response_format: str
    stream: bool
    parameters: dict[str, Any] = field(default_factory=dict)


def _typed(body: dict[str, Any], name: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    types, need = FIELDS[name]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ApiError(400, f"{name} must be {need}, got {json.dumps(value)[:60]}", name)
    return value


def _size(pipe: Any, text: str | None) -> tuple[int, int]:
    """(height, width) from OpenAI's "WIDTHxHEIGHT", inside the bundle's size range."""
    sizes = pipe.size_range()
    if text is None:
        default = sizes.default if sizes is not None else pipe.model_config.image_size
        return int(default[0]), int(default[1])
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ApiError(400, f'size must be "WIDTHxHEIGHT" such as "64x64", got {text!r}', "size")
    width, height = (int(p) for p in parts)
    try:
        if sizes is not None:
            return sizes.check(height, width, where="this server makes")
        return pipe._size(height, width, None)  # type: ignore[no-any-return]
    except SizeError as exc:
        raise ApiError(400, f"size {text}: {exc}", "size") from None


def parse_request(pipe: Any, body: Any, *, max_n: int, model_id: str) -> ImageRequest:
    """Check ``body`` against the bundle behind ``pipe``; an `ApiError` names the first
    problem."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object such as {\"prompt\": \"a red fox\"}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; this server takes "
                            f"{', '.join(FIELDS)}", unknown[0])
    values = {name: _typed(body, name) for name in FIELDS}
    if values["model"] is not None and values["model"] != model_id:
        raise ApiError(404, f"model {values['model']!r} is not served here; /v1/models lists "
                            f"{model_id!r}", "model")
    n = 1 if values["n"] is None else values["n"]
    if not 1 <= n <= max_n:
        raise ApiError(400, f"n must be between 1 and {max_n} (this server's limit), got {n}",
                       "n")
    response_format = values["response_format"] or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, "
                            f"got {response_format!r}", "response_format")
    height, width = _size(pipe, values["size"])
    seed = values["seed"] if values["seed"] is not None else secrets.randbelow(2**31)
    if not 0 <= seed < 2**63:
        raise ApiError(400, f"seed must be between 0 and 2**63 - 1, got {seed}", "seed")
    kwargs: dict[str, Any] = {"height": height, "width": width, "seed": seed,
                              "num_images_per_prompt": n, "output_type": "np"}
    if pipe.is_text_to_image:
        prompt = values["prompt"]
        if values["class_label"] is not None:
            raise ApiError(400, "this model draws from text: send prompt, not class_label",
                           "class_label")
        if prompt is None or not prompt.strip():
            raise ApiError(400, "prompt is empty: describe the image to draw", "prompt")
        if pipe.text_encoder is None:
            raise ApiError(400, "this bundle has no text encoder, so it cannot read prompts; "
                                "export it with its text encoder", "prompt")
        kwargs["prompt"] = prompt
        if values["negative_prompt"] is not None:
            kwargs["negative_prompt"] = values["negative_prompt"]
    else:
        label = values["class_label"]
        if values["prompt"] is not None or values["negative_prompt"] is not None:
            raise ApiError(400, "this model draws classes: send class_label (an index or a "
                                "name /v1/models lists), not a prompt", "prompt")
        if label is None:
            raise ApiError(400, "class_label is missing: send a class index or name", "class_label")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)  # "3" from a form field is class 3
        try:
            kwargs["class_labels"] = pipe.class_indices([label])
        except (DecoError, ValueError) as exc:
            raise ApiError(400, f"class_label: {exc}", "class_label") from None
    try:
        config = pipe.sampler_config(steps=values["steps"], guidance=values["guidance_scale"],
                                     solver=values["solver"])
    except (DecoError, ValueError) as exc:
        param = next((k for k in ("steps", "guidance_scale", "solver") if k in body),
                     None)
        raise ApiError(400, str(exc), param) from None
    kwargs.update(steps=config.num_steps, guidance=config.guidance, solver=config.solver)
    parameters = {k: v for k, v in kwargs.items() if k not in ("output_type",)}
    parameters["size"] = f"{width}x{height}"
    parameters["n"] = parameters.pop("num_images_per_prompt")
    if "class_labels" in parameters:
        parameters["class_label"] = parameters.pop("class_labels")[0]
    return ImageRequest(kwargs, n, response_format, bool(values["stream"]), parameters)
