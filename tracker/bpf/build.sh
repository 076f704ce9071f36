#!/usr/bin/env bash
# Rebuilds restrack.bpf.o from restrack.bpf.c (CO-RE: one object for every kernel
# with BTF). Needs the Debian packages clang, llvm and libbpf-dev (headers); the
# committed object makes them unnecessary at run time. The build is
# deterministic, so tests/test_bpf.py rebuilds it where clang exists and compares
# bytes, and checks restrack.bpf.o.sources (the sources' hashes) everywhere.
#   tracker/bpf/build.sh            rebuild the committed object and its stamp
#   tracker/bpf/build.sh OUTPUT     build to OUTPUT only
set -euo pipefail
out=$(realpath -m "${1:-$(dirname "$0")/restrack.bpf.o}")
cd "$(dirname "$0")"
arch_include=/usr/include/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I"$arch_include" \
    -fdebug-prefix-map="$PWD"=. -Wall -Werror -c restrack.bpf.c -o "$out.tmp"
llvm-strip -g "$out.tmp"   # DWARF out, BTF (needed for CO-RE) stays
mv "$out.tmp" "$out"
if [ $# -eq 0 ]; then
    sha256sum restrack.bpf.c build.sh > restrack.bpf.o.sources
fi
