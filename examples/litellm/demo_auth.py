"""The demo's `custom_auth`: API keys and their ids from RESEED_DEMO_KEYS (JSON), no database.

In production LiteLLM's own auth (its DB) fills UserAPIKeyAuth; the hook reads the same
fields. RESEED_DEMO_KEYS maps an API key to UserAPIKeyAuth fields, e.g.
{"sk-demo": {"team_id": "t", "user_id": "u", "org_id": "o", "max_budget": 1.0}}.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import HTTPException
from litellm.proxy._types import UserAPIKeyAuth

_KEYS: dict[str, dict[str, Any]] = json.loads(os.environ.get("RESEED_DEMO_KEYS", "{}"))


async def user_api_key_auth(request: Any, api_key: str) -> UserAPIKeyAuth:
    fields = _KEYS.get(api_key)
    if fields is None:
        raise HTTPException(status_code=401, detail="unknown API key")
    return UserAPIKeyAuth(api_key=api_key, **fields)
