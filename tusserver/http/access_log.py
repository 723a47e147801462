"""The access log: one line per request, without its query string (tokens live there)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from tusserver.http.keys import ERROR_REASON, REQUEST_ID, UPLOAD_ID
from tusserver.http.metrics import Metrics

_TEXT_LINE = (
    "%(method)s %(path)s %(status)s in=%(bytes_in)s out=%(bytes_out)s "
    "%(ms)sms %(upload_id)s rid=%(request_id)s"
)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path without its query (tokens live there), status,
    bytes, milliseconds, upload id, request id (X-Request-Id). JSON when --log-json."""

    json_lines = False
    # The app's metrics (`counting`): every answered request is counted here, the ones the
    # HTTP parser refused too (those have no route, hence no app to ask).
    metrics: Metrics | None = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_s: float) -> None:
        """Log one line; also for a request the HTTP parser refused, which has no route and
        may have no readable Content-Length."""
        if self.metrics is not None:
            reason = request.get(ERROR_REASON, "")
            self.metrics.count_request(request.method, response.status, time_s, reason)
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes_in": _bytes_in(request),
            "bytes_out": response.body_length,
            "ms": round(time_s * 1000, 1),
            "upload_id": request.get(UPLOAD_ID, ""),
            "request_id": request.get(REQUEST_ID, ""),
        }
        args: Mapping[str, object] | tuple[()] = fields
        message = _TEXT_LINE
        if self.json_lines:  # a JSON text is the message as it is, never %-formatted
            message, args = json.dumps({"time": time.time(), **fields}), ()
        # logger.info would also look up the caller's file and line, which no line shows
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, message, args, None))


def _bytes_in(request: web.BaseRequest) -> int:
    try:
        return request.content_length or 0
    except ValueError:  # a Content-Length the parser refused
        return 0


def counting(access_log_class: type[AccessLogger], metrics: Metrics) -> type[AccessLogger]:
    """`access_log_class`, also counting each request in `metrics`."""
    return type(access_log_class.__name__, (access_log_class,), {"metrics": metrics})


class JsonAccessLogger(AccessLogger):
    json_lines = True
