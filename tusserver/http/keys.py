"""Typed keys of the application's and requests' state (aiohttp `AppKey`/`RequestKey`)."""

from __future__ import annotations

from aiohttp import web

from tusserver.auth import Grant
from tusserver.draft import Version
from tusserver.events.parent import PreCreateCheck
from tusserver.http.metrics import Metrics
from tusserver.settings import Settings
from tusserver.uploads.service import Uploads

SETTINGS = web.AppKey("settings", Settings)
REDIS_URL = web.AppKey("redis_url", str)
UPLOADS = web.AppKey("uploads", Uploads)
PRE_CREATE = web.AppKey("pre_create", PreCreateCheck)
# This process's metrics; absent under --no-metrics.
METRICS = web.AppKey("metrics", Metrics)
GRANT = web.RequestKey("grant", Grant)
# The upload a request is about, once routing named one (for the access log).
UPLOAD_ID = web.RequestKey("upload_id", str)
# The resumable-upload draft version a request speaks (absent: tus 1.0.0).
DRAFT = web.RequestKey("draft", Version)
# A plain multipart/form-data POST to the collection (no Tus-Resumable): form_handlers.
FORM = web.RequestKey("form", bool)
# The request's id: the client's X-Request-Id when safe, else a new one (logs, answers).
REQUEST_ID = web.RequestKey("request_id", str)
# Why a request was refused (metrics.reason_of), for the errors counted by the access log.
ERROR_REASON = web.RequestKey("error_reason", str)
