"""The steering admin key: where it comes from, and the dependency that guards mutating routes."""
from __future__ import annotations

import hmac
import logging
import os
import stat
from http import HTTPStatus
from pathlib import Path

from fastapi import Header, Request

from sae_steer.server.errors import HTTPError, error

logger = logging.getLogger("vllm.sae_steer")
ADMIN_KEY_ENV = "SAE_STEER_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "SAE_STEER_ADMIN_KEY_FILE"


def admin_key(args=None) -> str | None:
    """The admin key: from the file named by SAE_STEER_ADMIN_KEY_FILE (`--steering-admin-key-file`),
    else SAE_STEER_ADMIN_KEY (`--steering-admin-key` sets it). Surrounding whitespace is dropped."""
    path = os.environ.get(ADMIN_KEY_FILE_ENV)
    if path:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            key = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RuntimeError(f"cannot read the steering admin key file {path!r} ({ADMIN_KEY_FILE_ENV}): {e}") from None
        if not key:
            raise RuntimeError(f"the steering admin key file {path!r} ({ADMIN_KEY_FILE_ENV}) is empty")
        if mode & 0o077:
            logger.warning("sae-steer: the admin key file %s has mode %04o: other users can read it (chmod 600)",
                           path, mode)
        return key
    key = getattr(args, "steering_admin_key", None) or os.environ.get(ADMIN_KEY_ENV)
    return key.strip() if key and key.strip() else None


def require_admin(request: Request, authorization: str | None = Header(default=None),
                  x_steering_admin_key: str | None = Header(default=None)) -> None:
    """Mutating routes need the admin key (Authorization: Bearer KEY or X-Steering-Admin-Key: KEY)."""
    key = request.app.state.sae_steer.admin_key
    given = x_steering_admin_key or (authorization[7:] if authorization and authorization.startswith("Bearer ")
                                     else None)
    if not key:
        raise HTTPError(error("steering admin routes are disabled: start the server with "
                               f"--steering-admin-key-file, {ADMIN_KEY_FILE_ENV} or {ADMIN_KEY_ENV}",
                               status=HTTPStatus.FORBIDDEN))
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):  # constant time
        raise HTTPError(error("missing or wrong steering admin key (X-Steering-Admin-Key header)",
                               status=HTTPStatus.UNAUTHORIZED))
