#!/usr/bin/env bash
# The project's test command: install the Debian packages the integration tests need, then run
# rustfmt, clippy and the whole test suite (release build, so the data-heavy tests are fast).
#
#   sudo scripts/test.sh        (or, as root: scripts/test.sh)
#
# Extra arguments are passed to `cargo test` (e.g. `scripts/test.sh -- nbdcopy`).
set -euo pipefail

cd "$(dirname "$0")/.."

# Debian package -> the commands the tests run from it. libssl-dev and pkg-config are build
# dependencies (the openssl crate behind `--tls-psk`); gnutls-bin brings certtool, psktool and
# gnutls-cli, openssl its command line, for the TLS tests.
packages=(qemu-utils libnbd-bin python3-libnbd fio nbdkit fdisk gnutls-bin openssl libssl-dev pkg-config util-linux)
tools=(qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdsh fio nbdkit sfdisk /usr/bin/python3 certtool psktool
       gnutls-cli openssl pkg-config prlimit sh mkfifo dd truncate stat)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "test.sh: installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "test.sh: installing packages needs root: run 'sudo scripts/test.sh'" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Every tool must now be there; never skip a test for lack of one.
PATH="/usr/bin:/usr/sbin:/bin:/sbin:$PATH"
export PATH
fail=0
for t in "${tools[@]}"; do
    if ! command -v "$t" >/dev/null 2>&1; then
        echo "test.sh: required tool '$t' is missing after installation" >&2
        fail=1
    fi
done
if ! /usr/bin/python3 -c 'import nbd' 2>/dev/null; then
    echo "test.sh: /usr/bin/python3 cannot import the nbd module (python3-libnbd)" >&2
    fail=1
fi
if ! fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd'; then
    echo "test.sh: fio lacks the nbd ioengine" >&2
    fail=1
fi
((fail == 0)) || exit 1

start=$(date +%s)
echo "test.sh: cargo fmt --check"
cargo fmt --all -- --check
echo "test.sh: cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "test.sh: cargo test (release)"
cargo test --workspace --release "$@"
# The io_uring-less fallback must pass the same suite: every server the integration tests start
# runs again with --io=pool (unless a test picked its IO path itself).
echo "test.sh: the integration tests again with --io=pool"
BLOCKSMITH_TEST_IO=pool cargo test --release --test '*' "$@"
echo "test.sh: all checks passed in $(($(date +%s) - start)) s"
