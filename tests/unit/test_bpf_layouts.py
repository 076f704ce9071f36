"""The BPF objects against their sources and the user-space layouts against their BTF:
no kernel program loaded, only the committed objects read."""

from __future__ import annotations

import ctypes
import hashlib
import re
import struct
from pathlib import Path

from tracker.backends.bpf import counters, loader

BPF_DIR = Path(loader.__file__).parent


def test_object_sources_match_stamp() -> None:
    """Every *.bpf.o was built from the committed source (tracker/backends/bpf/build.sh)."""
    objects = sorted(BPF_DIR.glob("*.bpf.c"))
    assert [source.name for source in objects] == ["counters.bpf.c", "restrack.bpf.c"]
    for source in objects:
        stamp = source.with_suffix(".o.sources")
        names = []
        for line in stamp.read_text().splitlines():
            digest, name = line.split()
            names.append(name)
            assert hashlib.sha256((BPF_DIR / name).read_bytes()).hexdigest() == digest, (
                f"{name} changed since {source.stem}.o was built: run tracker/backends/bpf/build.sh"
            )
        headers = re.findall(r'^#include "(.*)"$', source.read_text(), re.MULTILINE)
        assert headers == [source.name.replace(".bpf.c", "_shared.h")]
        assert names == [source.name, *headers, "build.sh"]


def _btf_structs(obj: Path, names: list[str]) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """(size, [(member, byte offset)]) of each struct in the object's BTF, by libbpf."""
    lib = loader.library()
    lib.btf__parse.restype = ctypes.c_void_p
    lib.btf__parse.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
    lib.btf__type_by_id.restype = ctypes.c_void_p
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.btf__free.argtypes = [ctypes.c_void_p]
    btf = lib.btf__parse(str(obj).encode(), None)
    assert btf, f"no BTF in {obj}"
    found = {}
    try:
        for name in names:
            type_id = lib.btf__find_by_name_kind(btf, name.encode(), 4)  # BTF_KIND_STRUCT
            assert type_id > 0, f"struct {name} not in {obj.name}'s BTF"
            address = lib.btf__type_by_id(btf, type_id)
            _, info, size = struct.unpack("<3I", ctypes.string_at(address, 12))
            members = []
            for index in range(info & 0xFFFF):
                raw = ctypes.string_at(address + 12 + 12 * index, 12)
                name_off, _, offset_bits = struct.unpack("<3I", raw)
                members.append((lib.btf__name_by_offset(btf, name_off).decode(), offset_bits // 8))
            found[name] = (size, members)
    finally:
        lib.btf__free(btf)
    return found


def test_user_space_layouts_match_the_kernel_structs() -> None:
    """Every struct of restrack_shared.h (map values, events, the syscall programs'
    contexts) has, in loader.LAYOUTS, the members, offsets and size of its BTF."""
    header = (BPF_DIR / "restrack_shared.h").read_text()
    assert sorted(re.findall(r"^struct (\w+) \{", header, re.MULTILINE)) == sorted(loader.LAYOUTS)
    kernel = _btf_structs(loader.OBJECT, list(loader.LAYOUTS))
    for name, fields in loader.LAYOUTS.items():
        ours, offset = [], 0
        for member, code in fields:
            ours.append((member, offset))
            offset += struct.calcsize("<" + code)
        assert kernel[name] == (loader.layout(name).size, ours), name


def test_the_extension_query_matches_the_kernel_struct() -> None:
    """struct query as _counters.c was compiled (gcc) is counters.bpf.o's (clang)."""
    from tracker.backends.bpf import _counters  # built by scripts/setup

    size, members = _counters.QUERY_LAYOUT
    assert _btf_structs(counters.OBJECT, ["query"])["query"] == (size, list(members))


def _header_enum(header: str, name: str) -> dict[str, int]:
    body = re.search(rf"^enum {name} \{{(.*?)\}};", header, re.MULTILINE | re.DOTALL)
    assert body, f"enum {name} not in restrack_shared.h"
    return {k: int(v) for k, v in re.findall(r"(\w+) = (\d+)", body[1])}


def test_user_space_enums_match_the_header() -> None:
    """The numbers user space reads in the structs are restrack_shared.h's."""
    header = (BPF_DIR / "restrack_shared.h").read_text()
    prefixes = {"action": "ACT_", "kind": "EV_", "which": "W_", "flag": "F_"}
    ours = {
        "action": {m.name: m.value for m in loader.KernelAction},
        "kind": {m.name: m.value for m in loader.Kind},
        "which": {m.name: m.value for m in loader.Which},
        "flag": {"HEAP_OVER": loader.FLAG_HEAP_OVER, "FILES_OVER": loader.FLAG_FILES_OVER,
                 "KILLED": loader.FLAG_KILLED, "KILL_FAILED": loader.FLAG_KILL_FAILED,
                 "LOST": loader.FLAG_LOST, "HEAP_WARNED": loader.FLAG_HEAP_WARNED,
                 "FILES_WARNED": loader.FLAG_FILES_WARNED},
    }  # fmt: skip
    for enum, prefix in prefixes.items():
        theirs = {k.removeprefix(prefix): v for k, v in _header_enum(header, enum).items()}
        assert theirs == ours[enum], enum
    defines = dict(re.findall(r"^#define (\w+) (\S+)", header, re.MULTILINE))
    assert int(defines["WATCHED_MAX"]) == loader.WATCHED_MAX
    assert defines["NONE"] == "(~0ULL)" and loader.NONE == (1 << 64) - 1
