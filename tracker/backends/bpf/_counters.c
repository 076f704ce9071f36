/* tracker.backends.bpf._counters: BPF_PROG_TEST_RUN of counters.bpf.c's data_vm.
 *
 * The read of PID/heapsize is the hot path of the mount, and most reads come
 * after an idle spell, when every code path is cold. Called through ctypes,
 * the run cost 2.1 us back to back and ~33 us 2 ms after the last one; called
 * from here, 1.3 and ~11 us (the kernel's own part, from C: 1.7 and 9 us).
 * Two functions over one run, no state: data_vm_pages for heapsize, usage
 * (the name too) for stat and metrics. The program's fd comes from libbpf's
 * loader (counters.py), the query layout from counters_shared.h, which
 * counters.bpf.c includes too.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <linux/bpf.h>
#include <stddef.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "counters_shared.h"

/* Runs the program for (pid, ino) from the 3 arguments: 1 with `query` filled, 0
 * when the program cannot say (no such task, no address space), -1 with an
 * exception set. */
static int run(PyObject *const *args, Py_ssize_t nargs, const char *usage, struct query *query) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s takes 3 arguments", usage);
        return -1;
    }
    long prog_fd = PyLong_AsLong(args[0]);
    long pid = PyLong_AsLong(args[1]);
    unsigned long long ino = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred()) return -1;
    if (prog_fd < 0 || prog_fd > INT_MAX || pid < 1 || pid > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "prog_fd or pid out of range");
        return -1;
    }
    memset(query, 0, sizeof *query);
    query->pid = (__s32)pid;
    query->ino = ino;
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.test.prog_fd = (unsigned int)prog_fd;
    attr.test.ctx_in = (unsigned long long)(unsigned long)query;
    attr.test.ctx_size_in = sizeof *query;
    /* The GIL stays held: the program never sleeps, and giving the GIL back
     * and taking it again would cost more than the run. */
    if (syscall(SYS_bpf, BPF_PROG_TEST_RUN, &attr, sizeof attr) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return attr.test.retval == 0; /* else -ESRCH or -ENODATA */
}

/* data_vm_pages(prog_fd, pid, ino) -> int | None
 *
 * The pages of mm->data_vm of the process numbered pid whose pidfd's st_ino
 * is ino; None when the program answers that it cannot say (no such task, no
 * address space); OSError when the kernel refuses the run. */
static PyObject *data_vm_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    struct query query;
    int found = run(args, nargs, "data_vm_pages(prog_fd, pid, ino)", &query);
    if (found < 0) return NULL;
    if (!found) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(query.data_vm_pages);
}

/* usage(prog_fd, pid, ino) -> (int, bytes) | None
 *
 * The same run: (data_vm pages, comm) of that process, comm as the kernel
 * holds it (status's Name, unescaped); None and OSError as above. */
static PyObject *usage(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    struct query query;
    int found = run(args, nargs, "usage(prog_fd, pid, ino)", &query);
    if (found < 0) return NULL;
    if (!found) Py_RETURN_NONE;
    return Py_BuildValue("(Ky#)", query.data_vm_pages, query.comm,
                         (Py_ssize_t)strnlen(query.comm, sizeof query.comm));
}

static PyMethodDef methods[] = {
    {"data_vm_pages", (PyCFunction)(void (*)(void))data_vm_pages, METH_FASTCALL,
     "data_vm_pages(prog_fd, pid, ino) -> pages of mm->data_vm, or None"},
    {"usage", (PyCFunction)(void (*)(void))usage, METH_FASTCALL,
     "usage(prog_fd, pid, ino) -> (pages of mm->data_vm, comm), or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_counters", "BPF_PROG_TEST_RUN of counters.bpf.c's data_vm.",
    -1, methods,
};

/* QUERY_LAYOUT: (size, ((member, offset), ...)) of struct query as this extension
 * was compiled, for the test that compares it with counters.bpf.o's BTF. */
static PyObject *query_layout(void) {
    return Py_BuildValue("(n((sn)(sn)(sn)(sn)(sn)))", (Py_ssize_t)sizeof(struct query),
                         "pid", (Py_ssize_t)offsetof(struct query, pid),
                         "pad", (Py_ssize_t)offsetof(struct query, pad),
                         "ino", (Py_ssize_t)offsetof(struct query, ino),
                         "data_vm_pages", (Py_ssize_t)offsetof(struct query, data_vm_pages),
                         "comm", (Py_ssize_t)offsetof(struct query, comm));
}

PyMODINIT_FUNC PyInit__counters(void) {
    PyObject *self = PyModule_Create(&module);
    if (self == NULL) return NULL;
    PyObject *layout = query_layout();
    if (layout == NULL || PyModule_AddObject(self, "QUERY_LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(self);
        return NULL;
    }
    return self;
}
