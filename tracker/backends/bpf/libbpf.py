"""The few libbpf.so.1 calls the loader needs, through ctypes.

No Python binding of libbpf is maintained (pylibbpf is pre-alpha, bcc needs
kernel headers), and the system library is on every machine with `libbpf1`:
declaring the dozen functions used keeps the whole binding on one page.
Functions returning pointers give None on failure with errno set (libbpf 1.x).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import CFUNCTYPE, POINTER, c_char_p, c_int, c_size_t, c_uint, c_void_p

PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)
LIBBPF_INFO = 1  # libbpf_print_level: WARN 0, INFO 1, DEBUG 2
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "libbpf_set_print": (c_void_p, [PRINT_FN]),
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_map__set_pin_path": (c_int, [c_void_p, c_char_p]),
    "bpf_map__unpin": (c_int, [c_void_p, c_char_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__attach": (c_void_p, [c_void_p]),
    "bpf_program__attach_tracepoint": (c_void_p, [c_void_p, c_char_p, c_char_p]),
    "bpf_link__open": (c_void_p, [c_char_p]),
    "bpf_link__pin": (c_int, [c_void_p, c_char_p]),
    "bpf_link__unpin": (c_int, [c_void_p]),
    "bpf_link__destroy": (c_int, [c_void_p]),
    "bpf_link__fd": (c_int, [c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_prog_get_fd_by_id": (c_int, [c_uint]),
    "bpf_link_get_fd_by_id": (c_int, [c_uint]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, POINTER(c_uint)]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "ring_buffer__new": (c_void_p, [c_int, SAMPLE_FN, c_void_p, c_void_p]),
    "ring_buffer__epoll_fd": (c_int, [c_void_p]),
    "ring_buffer__consume": (c_int, [c_void_p]),
    "ring_buffer__free": (None, [c_void_p]),
    "bpf_prog_test_run_opts": (c_int, [c_int, c_void_p]),
}


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.x), for running a SEC("syscall") program."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint),
        ("data_size_out", c_uint),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint),
        ("ctx_size_out", c_uint),
        ("retval", c_uint),
        ("repeat", c_int),
        ("duration", c_uint),
        ("flags", c_uint),
        ("cpu", c_uint),
        ("batch_size", c_uint),
    ]


def run_syscall_program(lib: ctypes.CDLL, prog_fd: int, context: ctypes.Array | None = None) -> int:
    """Run a SEC("syscall") program once with `context` (a ctypes buffer, which the
    kernel copies back as the program left it) as its argument; its return value.
    OSError if the kernel refuses the run."""
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts))
    if context is not None:
        opts.ctx_in = ctypes.cast(context, c_void_p)
        opts.ctx_size_in = ctypes.sizeof(context)
    error = lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if error:
        errno = errno_of(error)
        raise OSError(errno, os.strerror(errno))
    return ctypes.c_int32(opts.retval).value


def load() -> ctypes.CDLL:
    """libbpf.so.1 with the signatures above; OSError when it is not installed."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_libc.mount.argtypes = [c_char_p, c_char_p, c_char_p, ctypes.c_ulong, c_void_p]


def format_va(fmt: bytes, args: int | None) -> str:
    """A libbpf log line: printf-format it with the callback's va_list."""
    buffer = ctypes.create_string_buffer(1024)
    _libc.vsnprintf(buffer, len(buffer), fmt, args)
    return buffer.value.decode(errors="replace")


def mount(source: str, target: str, fstype: str, options: str = "") -> None:
    data = options.encode() if options else None
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount -t {fstype} {target}: {os.strerror(error)}")


def errno_of(result: int) -> int:
    """libbpf returns -errno from int functions and sets errno for pointer ones."""
    return -result if result < 0 else ctypes.get_errno()
