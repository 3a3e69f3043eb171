#!/usr/bin/env bash
# Run the whole test suite on a fresh machine.
#
# Installs the Debian packages the tests use when any is missing (real Samba, sshd,
# nfs-ganesha, qemu-img, filesystem tools...), creates .venv with the core, every plugin and
# the test dependencies, then runs pytest, slow generated-input tests included. Extra
# arguments go to pytest (e.g. scripts/test.sh tests/formats -x).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  samba smbclient openssh-server openssh-client nfs-ganesha nfs-ganesha-vfs rpcbind
  libnfs13 libnfs-utils libnfs-dev qemu-utils libvhdi-utils python3-libvhdi
  dosfstools mtools ntfs-3g exfatprogs exfat-fuse xfsprogs btrfs-progs e2fsprogs fdisk lvm2
  curl zstd gzip chromium
)

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
echo "== installing xobackup (core, plugins, test dependencies) into .venv"
PYTHON=.venv/bin/python scripts/install.sh --editable --test

echo "== running the test suite"
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
status=$?
set -e
# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
if [ "$status" -eq 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$status"
