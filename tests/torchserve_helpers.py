"""Calling a real TorchServe over HTTP in tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from cnnserve.torchserve import TorchServe

__all__ = ["post"]


def post(
    torchserve: TorchServe,
    model: str,
    data: bytes | dict[str, Any],
    content_type: str | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, Any]]:
    """POST /predictions/<model>; a dict is sent as JSON. Returns (status, decoded JSON body)."""
    if isinstance(data, dict):
        body, content_type = json.dumps(data).encode(), "application/json"
    else:
        body, content_type = data, content_type or "application/octet-stream"
    settings = torchserve.settings
    request = urllib.request.Request(
        f"{settings.url(settings.inference_port)}/predictions/{model}",
        data=body,
        headers={**torchserve.keys().header("inference"), "Content-Type": content_type},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
