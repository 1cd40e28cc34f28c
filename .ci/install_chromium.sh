#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver for the report's headless-browser test (tests/test_report.py) when
# missing. Needs root (or sudo) and the Debian package mirror; the Makefile's `browser` target (a prerequisite of
# `make test`) runs it.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver
chromium --version
chromedriver --version
