"""Errors in OpenAI's shape, and an exception that carries one out of a dependency."""
from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse


def error(message: str, param: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
            404: "NotFoundError", 409: "ConflictError"}.get(status.value, status.phrase)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status.value}},
                        status_code=status.value)


class HTTPError(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response
