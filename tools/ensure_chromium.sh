#!/bin/sh
# Debian's chromium for the browser test of the Voila app (tests/test_app.py, driven by playwright's Python package
# with executable_path=/usr/bin/chromium: never `playwright install`). Installs only when /usr/bin/chromium is
# missing, so it is safe to run before every test run. Needs root (or sudo) and the Debian package registry.
set -eu
if [ -x /usr/bin/chromium ]; then
    echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "ensure_chromium: not root and no sudo: run 'apt-get install -y chromium' as root" >&2; exit 1; }
    SUDO=sudo
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
test -x /usr/bin/chromium && echo "installed $(/usr/bin/chromium --version 2>/dev/null)"
