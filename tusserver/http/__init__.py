"""The aiohttp application: routes, middlewares, one handler per method, access log, demo page."""
