#!/usr/bin/env bash
# Rebuilds every *.bpf.o from its *.bpf.c (CO-RE: one object for every kernel
# with BTF). Needs the Debian packages clang, llvm and libbpf-dev (headers); the
# committed objects make them unnecessary at run time. The build is
# deterministic, so tests/test_bpf.py rebuilds them where clang exists and
# compares bytes, and checks *.bpf.o.sources everywhere: the hashes of the
# source, of each header it includes with #include "..." (the structs shared
# with user space) and of this script.
#   tracker/backends/bpf/build.sh            rebuild the committed objects and their stamps
#   tracker/backends/bpf/build.sh DIR        build the objects into DIR only
set -euo pipefail
here=$(dirname "$0")
dest=$(realpath -m "${1:-$here}")
cd "$here"
arch_include=/usr/include/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
for source in *.bpf.c; do
    out="$dest/${source%.c}.o"
    clang -O2 -g -target bpf -mcpu=v3 -D__TARGET_ARCH_x86 -I"$arch_include" \
        -fdebug-prefix-map="$PWD"=. -Wall -Werror -c "$source" -o "$out.tmp"
    llvm-strip -g "$out.tmp"   # DWARF out, BTF (needed for CO-RE) stays
    mv "$out.tmp" "$out"
    if [ $# -eq 0 ]; then
        headers=$(sed -n 's/^#include "\(.*\)"$/\1/p' "$source")
        # shellcheck disable=SC2086  # one word per header
        sha256sum "$source" $headers build.sh > "${source%.c}.o.sources"
    fi
done
