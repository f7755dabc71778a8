/* interceptor-cni's front: the first thing the runtime executes for every CNI call.
 *
 * Starting Python costs ~20 ms and importing the plugin ~10 ms more, on every VERSION,
 * ADD and DEL. The node agent has all of it loaded, so this front hands the request
 * (the CNI_* and INTERCEPTOR_* environment and stdin) to the agent over its unix socket
 * and writes back what the agent's in-process plugin answered. Whenever the agent cannot
 * answer (no agent, a socket nobody listens on, an agent that dies or stalls mid-request,
 * a request for another pin root or run dir), the front runs the same plugin itself: it
 * executes the node's python on the zip appended to this very file, with the request's
 * stdin. So the plugin never depends on the agent being up, and never hangs on it longer
 * than REPLY_TIMEOUT_S. Every operation is idempotent under the node lock, so an ADD the
 * agent had begun when it died is simply done again.
 *
 * Wire format (interceptor/cni_server.py is the other end), integers little-endian u32:
 *   request:  "ICNI2\n", deadline (u64: CLOCK_MONOTONIC ns after which the front has
 *             given up), count, count x (length, "NAME=value"), length, stdin
 *   reply:    status (0 answered, 1 not mine: run it yourself), exit code, length, stdout,
 *             length, stderr
 *
 * Built static (`make` in setup, the image's build stage): the runtime runs it on the
 * host, whatever the agent's container has. INTERPRETER and SOCKET_NAME come from the
 * build (interceptor/cni_install.py holds both).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef INTERPRETER
#define INTERPRETER "/usr/bin/python3"
#endif
#ifndef SOCKET_NAME
#define SOCKET_NAME "cni.sock"
#endif
#define DEFAULT_RUN_DIR "/run/interceptor"
#define MAGIC "ICNI2\n"
#define REPLY_TIMEOUT_S 20          /* an agent that stalls longer is passed over */
#define MAX_REPLY_PART (16u << 20)

extern char **environ;

struct buf {
	char *data;
	size_t len, cap;
};

static int buf_add(struct buf *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < b->len + n)
			cap *= 2;
		char *d = realloc(b->data, cap);
		if (!d)
			return -1;
		b->data = d;
		b->cap = cap;
	}
	memcpy(b->data + b->len, p, n);
	b->len += n;
	return 0;
}

static int buf_u32(struct buf *b, uint32_t v)
{
	unsigned char le[4] = {v, v >> 8, v >> 16, v >> 24};
	return buf_add(b, le, 4);
}

static int buf_u64(struct buf *b, uint64_t v)
{
	return buf_u32(b, (uint32_t)v) || buf_u32(b, (uint32_t)(v >> 32));
}

/* All of stdin; -1 when it cannot be read (the plugin then reads what is left itself). */
static int read_stdin(struct buf *in)
{
	char chunk[65536];
	for (;;) {
		ssize_t n = read(0, chunk, sizeof(chunk));
		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EBADF ? 0 : -1;    /* no stdin at all: an empty one */
		}
		if (buf_add(in, chunk, n))
			return -1;
	}
}

static int forwarded(const char *var)
{
	return !strncmp(var, "CNI_", 4) || !strncmp(var, "INTERCEPTOR_", 12);
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= w;
	}
	return 0;
}

static int read_exact(int fd, void *p, size_t n)
{
	char *c = p;
	while (n) {
		ssize_t r = read(fd, c, n);
		if (r == 0)
			return -1;          /* the agent went away mid-reply */
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;          /* includes the receive timeout */
		}
		c += r;
		n -= r;
	}
	return 0;
}

static int read_u32(int fd, uint32_t *v)
{
	unsigned char le[4];
	if (read_exact(fd, le, 4))
		return -1;
	*v = le[0] | le[1] << 8 | (uint32_t)le[2] << 16 | (uint32_t)le[3] << 24;
	return 0;
}

static int read_part(int fd, struct buf *out)
{
	uint32_t n;
	if (read_u32(fd, &n) || n > MAX_REPLY_PART)
		return -1;
	if (!n)
		return 0;
	out->data = malloc(n);
	if (!out->data || read_exact(fd, out->data, n))
		return -1;
	out->len = out->cap = n;
	return 0;
}

/* The agent's answer: 0 with *code, stdout and stderr filled in; -1 when the front must
 * run the plugin itself. */
static int ask_agent(const struct buf *in, int *code, struct buf *out, struct buf *err)
{
	const char *run_dir = getenv("INTERCEPTOR_RUN_DIR");
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (!run_dir || !*run_dir)
		run_dir = DEFAULT_RUN_DIR;
	if ((size_t)snprintf(addr.sun_path, sizeof(addr.sun_path), "%s/%s", run_dir, SOCKET_NAME) >=
	    sizeof(addr.sun_path))
		return -1;

	/* INTERCEPTOR_CNI_AGENT_TIMEOUT: seconds, for tests of a stalled agent */
	const char *t = getenv("INTERCEPTOR_CNI_AGENT_TIMEOUT");
	int timeout_s = t && atoi(t) > 0 ? atoi(t) : REPLY_TIMEOUT_S;
	/* the agent drops a request whose deadline has passed: one queued while it was
	 * stalled must not be carried out after the plugin has answered it itself (an ADD
	 * done after the runtime's DEL would leave the pod enrolled) */
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	uint64_t deadline = (uint64_t)now.tv_sec * 1000000000ull + now.tv_nsec +
			    (uint64_t)timeout_s * 1000000000ull;

	struct buf req = {0};
	uint32_t count = 0;
	for (char **e = environ; *e; e++)
		count += forwarded(*e);
	int bad = buf_add(&req, MAGIC, strlen(MAGIC)) || buf_u64(&req, deadline) || buf_u32(&req, count);
	for (char **e = environ; *e && !bad; e++)
		if (forwarded(*e))
			bad = buf_u32(&req, strlen(*e)) || buf_add(&req, *e, strlen(*e));
	bad = bad || buf_u32(&req, in->len) || buf_add(&req, in->data ? in->data : "", in->len);
	if (bad) {
		free(req.data);
		return -1;
	}

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		free(req.data);
		return -1;
	}
	struct timeval tv = {.tv_sec = timeout_s};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	uint32_t status, exit_code;
	int ok = connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0 &&
		 write_all(fd, req.data, req.len) == 0 &&
		 shutdown(fd, SHUT_WR) == 0 &&
		 read_u32(fd, &status) == 0 && status == 0 &&
		 read_u32(fd, &exit_code) == 0 &&
		 read_part(fd, out) == 0 && read_part(fd, err) == 0;
	close(fd);
	free(req.data);
	if (!ok)
		return -1;
	*code = (int)exit_code;
	return 0;
}

/* Run the plugin in this process's place: the node's python on the zip appended to this
 * file, stdin replaced by what was read of it (a memfd holds it). */
static int run_here(const struct buf *in, int read_failed)
{
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n <= 0)
		return -1;
	self[n] = '\0';
	if (!read_failed) {
		int mfd = memfd_create("cni-stdin", 0);
		if (mfd < 0 || write_all(mfd, in->data ? in->data : "", in->len) ||
		    lseek(mfd, 0, SEEK_SET) != 0 || dup2(mfd, 0) < 0)
			return -1;
		close(mfd);
	}
	char *argv[] = {INTERPRETER, "-S", self, NULL};
	execv(INTERPRETER, argv);
	return -1;
}

int main(void)
{
	struct buf in = {0}, out = {0}, err = {0};
	int read_failed = read_stdin(&in) != 0;
	int code;
	if (!read_failed && ask_agent(&in, &code, &out, &err) == 0) {
		if (write_all(1, out.data ? out.data : "", out.len) ||
		    write_all(2, err.data ? err.data : "", err.len))
			return 1;
		return code;
	}
	run_here(&in, read_failed);
	/* the plugin could not even be started: say so as the spec says, on stdout */
	printf("{\"cniVersion\": \"1.0.0\", \"code\": 999, \"msg\": \"interceptor-cni: cannot run %s: %s\"}\n",
	       INTERPRETER, strerror(errno));
	return 1;
}
