#!/usr/bin/env bash
# `make test` only (the demo needs no browser): the playground's browser tests (tests/browser/) drive Debian's
# chromium through its chromedriver. Installed when running as root with apt; otherwise, or if apt fails,
# those tests skip, saying what is missing. Never fails the caller.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] chromium + chromium-driver (Debian packages, for tests/browser/)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null; } || echo "[setup] could not install chromium: tests/browser/ will skip"
else
  echo "[setup] no chromium/chromedriver (not root): tests/browser/ will skip (apt-get install chromium chromium-driver)"
fi
exit 0
