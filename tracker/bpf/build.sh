#!/usr/bin/env bash
# Rebuilds restrack.bpf.o from restrack.bpf.c (CO-RE: one object for every kernel
# with BTF). Needs the Debian packages clang, llvm and libbpf-dev; the committed
# object makes them unnecessary at run time. The build is deterministic, so
# tests/test_bpf.py rebuilds it where clang exists and compares bytes.
#   tracker/bpf/build.sh [OUTPUT]     (default: tracker/bpf/restrack.bpf.o)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-restrack.bpf.o}
arch_include=/usr/include/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I"$arch_include" \
    -Wall -Werror -c restrack.bpf.c -o "$out.tmp"
llvm-strip -g "$out.tmp"   # DWARF out, BTF (needed for CO-RE) stays
mv "$out.tmp" "$out"
