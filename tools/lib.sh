# Shared by tools/bootstrap and tools/cloud: the Debian packages this
# project builds and runs with, and how they are installed.
# shellcheck shell=bash

BASE_APT_PACKAGES=(build-essential python3-dev python3-venv qemu-system-x86
                   iproute2 libzstd-dev libssl-dev)
# The test command also builds the libFuzzer targets (tools/fuzz).
FUZZ_APT_PACKAGES=(clang)

log() { printf '==> %s\n' "$*" >&2; }

# install_apt PACKAGE...: install those that are missing (needs root).
install_apt() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) != 0 ]]; then
            log "missing Debian packages: ${missing[*]} (run as root to install)"
            exit 1
        fi
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}
