#!/usr/bin/env bash
# Debian packages: dataset-fashion-mnist (the demo data, MIT). As root it is installed with apt-get;
# otherwise the .deb is downloaded and unpacked into data/debian/ inside the project.
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
LOCAL_DIR=data/debian/usr/share/datasets/fashion-mnist
have() { [ -s "$1/train-images-idx3-ubyte.gz" ] && [ -s "$1/t10k-labels-idx1-ubyte.gz" ]; }
if have "$SYSTEM_DIR" || have "$LOCAL_DIR"; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
elif command -v apt-get >/dev/null; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download dataset-fashion-mnist)
  mkdir -p data/debian
  dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb data/debian
  rm -rf "$tmp"
else
  echo "install_system_deps: cannot install dataset-fashion-mnist (no apt-get); put the four Fashion-MNIST" \
       "idx .gz files in $SYSTEM_DIR or $LOCAL_DIR" >&2
  exit 1
fi
have "$SYSTEM_DIR" || have "$LOCAL_DIR" || { echo "install_system_deps: Fashion-MNIST files still missing" >&2; exit 1; }
echo "install_system_deps: dataset-fashion-mnist installed"
