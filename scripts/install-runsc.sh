#!/usr/bin/env bash
# Install a runsc that can checkpoint a live ipykernel: Debian trixie's 2024-07 build (package `runsc`,
# statically linked), fetched from the host's own Debian mirror without touching the system's apt set-up.
# Bookworm's 2022 build runs kernels but panics checkpointing one, so it does not count.
# Usage: scripts/install-runsc.sh [DEST]   (default /usr/local/bin/runsc; needs root)
set -euo pipefail
VERSION="0.0~20240729.0-4+b7"
WANT=20240729
DEST="${1:-/usr/local/bin/runsc}"

have=$(command -v runsc || true)
if [ -n "$have" ]; then
  date=$("$have" --version 2>/dev/null | sed -n 's/^runsc version [^0-9]*\(0\.0~\)\{0,1\}\([0-9]\{8\}\).*/\2/p')
  if [ -n "$date" ] && [ "$date" -ge "$WANT" ]; then
    exit 0
  fi
fi
if [ "$(id -u)" != 0 ]; then
  echo "snapkernel: no runsc that can snapshot kernels here; as root, run: scripts/install-runsc.sh" >&2
  echo "snapkernel: (until then kernels use the process runtime, without gVisor isolation)" >&2
  exit 0
fi
mirror=$(grep -rhoE '^(URIs:|deb) +\S+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
         | grep -oE 'https?://\S+/debian/?' | head -n1 || true)
mirror="${mirror:-http://deb.debian.org/debian}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$tmp/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache::Archives=$tmp/archives" -o APT::Sandbox::User=root)
echo "snapkernel: installing runsc $VERSION (Debian trixie) as $DEST"
apt-get "${apt_opts[@]}" -q update >/dev/null
(cd "$tmp" && apt-get "${apt_opts[@]}" -q download "runsc=$VERSION" >/dev/null)
dpkg -x "$tmp"/runsc_*.deb "$tmp/x"
install -m 0755 "$tmp/x/usr/bin/runsc" "$DEST"
"$DEST" --version | head -n1
