/* tracker.bpf._counters: one BPF_PROG_TEST_RUN of counters.bpf.c's data_vm.
 *
 * The read of PID/heapsize is the hot path of the mount, and most reads come
 * after an idle spell, when every code path is cold. Called through ctypes,
 * the run cost 2.1 us back to back and ~33 us 2 ms after the last one; called
 * from here, 1.3 and ~11 us (the kernel's own part, from C: 1.7 and 9 us).
 * One function, no state: the program's fd comes from libbpf's loader
 * (counters.py), the query layout from counters.bpf.c's struct query.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <linux/bpf.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct query { /* counters.bpf.c: in pid and ino, out data_vm_pages */
    int pid;
    unsigned int pad;
    unsigned long long ino;
    unsigned long long data_vm_pages;
};

/* data_vm_pages(prog_fd, pid, ino) -> int | None
 *
 * The pages of mm->data_vm of the process numbered pid whose pidfd's st_ino
 * is ino; None when the program answers that it cannot say (no such task, no
 * address space); OSError when the kernel refuses the run. */
static PyObject *data_vm_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "data_vm_pages(prog_fd, pid, ino) takes 3 arguments");
        return NULL;
    }
    long prog_fd = PyLong_AsLong(args[0]);
    long pid = PyLong_AsLong(args[1]);
    unsigned long long ino = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (prog_fd < 0 || prog_fd > INT_MAX || pid < 1 || pid > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "prog_fd or pid out of range");
        return NULL;
    }
    struct query query = {(int)pid, 0, ino, 0};
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.test.prog_fd = (unsigned int)prog_fd;
    attr.test.ctx_in = (unsigned long long)(unsigned long)&query;
    attr.test.ctx_size_in = sizeof query;
    /* The GIL stays held: the program never sleeps, and giving the GIL back
     * and taking it again would cost more than the run. */
    if (syscall(SYS_bpf, BPF_PROG_TEST_RUN, &attr, sizeof attr) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (attr.test.retval != 0) Py_RETURN_NONE; /* -ESRCH or -ENODATA */
    return PyLong_FromUnsignedLongLong(query.data_vm_pages);
}

static PyMethodDef methods[] = {
    {"data_vm_pages", (PyCFunction)(void (*)(void))data_vm_pages, METH_FASTCALL,
     "data_vm_pages(prog_fd, pid, ino) -> pages of mm->data_vm, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_counters", "One BPF_PROG_TEST_RUN of counters.bpf.c's data_vm.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__counters(void) { return PyModule_Create(&module); }
