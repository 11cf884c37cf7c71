/* recvmmsg/sendmmsg for Python: one system call for a batch of datagrams.
 *
 * Python's socket module has recvfrom and sendto only; a UDP server in
 * Python pays a system call and the call's overhead per datagram, which is
 * most of what the lab DNS costs per cached answer. This is the optional
 * helper sipdrill.dns.server uses when it is installed (pip install
 * ext/mmsg); without it the server reads and answers one datagram a call.
 *
 *   recv(fd, count, size) -> [(data, address), ...]
 *       up to count datagrams of at most size bytes, without blocking;
 *       [] when none is waiting. address as socket.recvfrom gives it.
 *   send(fd, [(data, address), ...]) -> number sent
 *       the first n went out; n < len: the next one would block or failed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_BATCH 256

static PyObject *address(const struct sockaddr_storage *sa)
{
    char host[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        if (!inet_ntop(AF_INET, &in->sin_addr, host, sizeof host))
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, ntohs(in->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (!inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host))
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, ntohs(in6->sin6_port),
                             ntohl(in6->sin6_flowinfo), in6->sin6_scope_id);
    }
    PyErr_SetString(PyExc_OSError, "not an IPv4 or IPv6 address");
    return NULL;
}

static int sockaddr_of(PyObject *addr, struct sockaddr_storage *sa, socklen_t *len)
{
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    if (!PyTuple_Check(addr) ||
        !PyArg_ParseTuple(addr, "si|II", &host, &port, &flowinfo, &scope_id))
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    memset(sa, 0, sizeof *sa);
    if (PyTuple_GET_SIZE(addr) == 2) {
        struct sockaddr_in *in = (struct sockaddr_in *)sa;
        if (inet_pton(AF_INET, host, &in->sin_addr) == 1) {
            in->sin_family = AF_INET;
            in->sin_port = htons((unsigned short)port);
            *len = sizeof *in;
            return 0;
        }
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)port);
        in6->sin6_flowinfo = htonl(flowinfo);
        in6->sin6_scope_id = scope_id;
        *len = sizeof *in6;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "not a numeric IP address: %s", host);
    return -1;
}

static PyObject *mmsg_recv(PyObject *self, PyObject *args)
{
    int fd, count, n;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "iin", &fd, &count, &size))
        return NULL;
    if (count < 1 || count > MAX_BATCH || size < 1 || size > 65535) {
        PyErr_SetString(PyExc_ValueError, "count must be 1-256, size 1-65535");
        return NULL;
    }
    /* One buffer for the module, reused: a fresh 4 MiB one per call was an
     * mmap, page faults and a munmap per batch. Safe because the GIL is held
     * throughout (the call never blocks: MSG_DONTWAIT). */
    static char *buffers = NULL;
    static size_t capacity = 0;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    struct sockaddr_storage names[MAX_BATCH];
    size_t need = (size_t)count * (size_t)size;
    if (need > capacity) {
        char *grown = PyMem_Realloc(buffers, need);
        if (!grown)
            return PyErr_NoMemory();
        buffers = grown;
        capacity = need;
    }
    memset(msgs, 0, sizeof(struct mmsghdr) * (size_t)count);
    for (int i = 0; i < count; i++) {
        iovs[i].iov_base = buffers + (size_t)i * (size_t)size;
        iovs[i].iov_len = (size_t)size;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof names[i];
    }
    n = recvmmsg(fd, msgs, (unsigned int)count, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(n);
    for (int i = 0; out && i < n; i++) {
        PyObject *addr = address(&names[i]);
        PyObject *item = addr ? Py_BuildValue("(y#N)", (char *)iovs[i].iov_base,
                                              (Py_ssize_t)msgs[i].msg_len, addr)
                              : NULL;
        if (!item) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static PyObject *mmsg_send(PyObject *self, PyObject *args)
{
    int fd;
    PyObject *batch;
    if (!PyArg_ParseTuple(args, "iO!", &fd, &PyList_Type, &batch))
        return NULL;
    Py_ssize_t total = PyList_GET_SIZE(batch), done = 0;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    struct sockaddr_storage names[MAX_BATCH];
    while (done < total) {
        int count = (int)(total - done > MAX_BATCH ? MAX_BATCH : total - done), n;
        memset(msgs, 0, sizeof(struct mmsghdr) * (size_t)count);
        for (int i = 0; i < count; i++) {
            PyObject *item = PyList_GET_ITEM(batch, done + i);
            char *data;
            Py_ssize_t len;
            socklen_t namelen;
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
                PyErr_SetString(PyExc_TypeError, "expected (bytes, address) pairs");
                return NULL;
            }
            if (PyBytes_AsStringAndSize(PyTuple_GET_ITEM(item, 0), &data, &len) < 0 ||
                sockaddr_of(PyTuple_GET_ITEM(item, 1), &names[i], &namelen) < 0)
                return NULL;
            iovs[i].iov_base = data;
            iovs[i].iov_len = (size_t)len;
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &names[i];
            msgs[i].msg_hdr.msg_namelen = namelen;
        }
        Py_BEGIN_ALLOW_THREADS
        n = sendmmsg(fd, msgs, (unsigned int)count, MSG_DONTWAIT);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || done > 0)
                break;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        done += n;
        if (n < count)
            break;
    }
    return PyLong_FromSsize_t(done);
}

static PyMethodDef methods[] = {
    {"recv", mmsg_recv, METH_VARARGS, "recv(fd, count, size) -> [(data, address), ...]"},
    {"send", mmsg_send, METH_VARARGS, "send(fd, [(data, address), ...]) -> number sent"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipdrill_mmsg", "recvmmsg/sendmmsg for sipdrill's UDP servers.",
    -1, methods,
};

PyMODINIT_FUNC PyInit_sipdrill_mmsg(void) { return PyModule_Create(&module); }
