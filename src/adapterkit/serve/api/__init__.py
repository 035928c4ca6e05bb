"""OpenAI-compatible HTTP API: router.py (routes), protocol.py (pydantic bodies, response shapes),
service.py (logic, no web framework), errors.py (exception -> HTTP status, in one place), metrics.py
(Prometheus text)."""

from .app import create_app
from .service import ApiSettings, OpenAIService

__all__ = ["create_app", "ApiSettings", "OpenAIService"]
