#!/usr/bin/env bash
# The test suite, with its own set-up: installs the system packages the tests need when they
# are absent, then runs ruff and pytest (arguments go to pytest: scripts/test.sh -k report -x).
#   chromium  the report test opens the HTML report in it (Debian package, driven by Playwright)
#   ffmpeg    FFmpeg's shared libraries (libavcodec, libavformat, ...) for torchcodec
# As root (CI) it installs them with apt-get; otherwise with sudo when that needs no password,
# else it names what to install and stops. EVL_TEST_DRY_RUN=1 prints the commands instead of
# running them. Exits with ruff's or pytest's status (pytest's 5, no tests collected, fails).
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(chromium ffmpeg) # each provides the command of the same name

run() {
    if [[ "${EVL_TEST_DRY_RUN:-0}" == 1 ]]; then
        echo "+ $*" >&2
    else
        "$@"
    fi
}

missing=()
for package in "${SYSTEM_PACKAGES[@]}"; do
    command -v "$package" >/dev/null 2>&1 || missing+=("$package")
done

if ((${#missing[@]})); then
    if [[ "$(id -u)" == 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo)
    else
        sudo=(none)
    fi
    if [[ "${sudo[*]}" == none ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "error: the tests need ${missing[*]}: install them (Debian/Ubuntu:" \
            "sudo apt-get install -y --no-install-recommends ${missing[*]}) and rerun" >&2
        exit 1
    fi
    echo "installing the Debian packages ${missing[*]} (apt-get)"
    wait_lock=(-o DPkg::Lock::Timeout=300) # another apt-get may hold the lock a while
    run "${sudo[@]}" apt-get "${wait_lock[@]}" update -qq
    run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get "${wait_lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

run ruff check .
run ruff format --check .
run pytest "$@"
