#!/usr/bin/env bash
# Tools that the end-to-end tests need and pip cannot install: Debian's Chromium and
# ChromeDriver (tests/test_browser.py), strace (tests/test_durability.py), nginx
# (tests/test_nginx.py runs deploy/nginx.conf in front of tusserver), Node.js, and the
# Node packages locked in tests/js/package-lock.json (tus-js-client, playwright-core). Idempotent: apt-get runs only
# for what is missing; `npm ci` puts exactly the locked versions into tests/js/node_modules.
# playwright-core drives /usr/bin/chromium: it never downloads a browser of its own.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
fi

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "playwright-core needs Node.js 20 or newer; this machine has $(node --version)" >&2
  exit 1
fi

(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
echo "tools: $(/usr/bin/chromium --version 2>/dev/null), node $(node --version)," \
  "$(cd tests/js && node -p "'tus-js-client ' + require('tus-js-client/package.json').version")"
