#!/usr/bin/env bash
# The Debian tools that `aigc infra up`, the rule tests and the `aigc top` test need beside the jars:
# prometheus and promtool (package prometheus, 2.42 on bookworm), tmux, and chromium with chromium-driver
# (the gateway console's browser test). `make setup` runs this every time; when the tools are on PATH it
# returns at once.
#
# As root (our machines and CI): apt-get install. The package ships a service for a system Prometheus on
# :9090; nothing here uses it, and a policy-rc.d that denies starting services is put in place for the
# install (unless the machine has one already) so a host with an init system does not start it either.
# Not root: prometheus and promtool are unpacked from the package into infra/tools/ (git-ignored), where the
# launcher and the tests look after PATH; tmux must then be installed by someone who can.
set -euo pipefail
cd "$(dirname "$0")"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "tools/usr/bin/$1" ]; }

missing=()
if ! have prometheus || ! have promtool; then missing+=(prometheus); fi
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
# The gateway's console test drives Debian's headless Chromium through its chromedriver (Selenium).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    echo "installing ${missing[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi

if [[ " ${missing[*]} " == *" prometheus "* ]]; then
    echo "not root: unpacking Debian's prometheus package into infra/tools/"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download prometheus >/dev/null)
    dpkg-deb -x "$work"/prometheus_*.deb tools
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "chromium/chromium-driver are missing (the console's browser test needs them): install them as root" >&2
fi
if ! command -v tmux >/dev/null 2>&1; then
    echo "tmux is missing (the \`aigc top\` test needs it): install it with apt-get install tmux as root" >&2
fi
