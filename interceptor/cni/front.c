/* interceptor-cni as the node agent installs it: a static executable that needs nothing
 * from the host (no Python, no libraries), the first thing the runtime executes for every
 * CNI call.
 *
 * It hands the request (the CNI_* and INTERCEPTOR_* environment and stdin) to the node
 * agent over its unix socket and writes back what the agent's in-process plugin answered.
 * When the agent cannot answer (not running, a socket nobody listens on, an agent that
 * dies or stalls past REPLY_TIMEOUT_S, or one serving another pin root or run dir), the
 * front answers itself, failing closed:
 *   ADD     CNI error 11 (try again later): the kubelet retries the sandbox, so no pod
 *           starts uncaptured on a node where the plugin is chained
 *   CHECK   error 11, saying the agent is not ready
 *   STATUS  error 50 (the plugin is not available)
 *   DEL, GC success: a pod can always be deleted; the agent's reconcile removes the
 *           records of pods whose network namespace is gone once it is back
 *   VERSION answered here, from the versions the plugin supports (built in)
 * Every operation is idempotent under the node lock, so an ADD the agent had begun when
 * it died is simply done again by the kubelet's retry. A node set up by hand, without an
 * agent, installs the plugin that runs itself instead (`interceptor cni install --runner
 * python`); this front never looks for an interpreter.
 *
 * Wire format (interceptor/cni/server.py is the other end), integers little-endian u32:
 *   request:  "ICNI2\n", deadline (u64: CLOCK_MONOTONIC ns after which the front has
 *             given up), count, count x (length, "NAME=value"), length, stdin
 *   reply:    status (0 answered, 1 not mine), exit code, length, stdout, length, stderr
 *
 * Built static by `python -m interceptor.cni.front` (setup, the image's build stage),
 * which passes SOCKET_NAME, SUPPORTED_VERSIONS and LATEST_VERSION from the modules that
 * own them (cni/server.py, cni/plugin.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef SOCKET_NAME
#define SOCKET_NAME "cni.sock"
#endif
#ifndef SUPPORTED_VERSIONS          /* a C list of strings */
#define SUPPORTED_VERSIONS "1.0.0"
#endif
#ifndef LATEST_VERSION
#define LATEST_VERSION "1.0.0"
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

/* All of stdin; -1 when it cannot be read. */
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

enum unanswered { ANSWERED = 0, NO_AGENT, NO_REPLY, NOT_MINE, FRONT_FAILED };

static const char *why(enum unanswered u)
{
	switch (u) {
	case NO_AGENT:
		return "no node agent listens on its socket";
	case NO_REPLY:
		return "the node agent did not answer in time";
	case NOT_MINE:
		return "the node agent serves another pin root or run dir than this configuration";
	default:
		return "the request could not be handed to the node agent";
	}
}

/* The agent's answer: ANSWERED with *code, stdout and stderr filled in; else why not. */
static enum unanswered ask_agent(const struct buf *in, int *code, struct buf *out, struct buf *err,
				 char *socket_path, size_t socket_path_len)
{
	const char *run_dir = getenv("INTERCEPTOR_RUN_DIR");
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (!run_dir || !*run_dir)
		run_dir = DEFAULT_RUN_DIR;
	if ((size_t)snprintf(addr.sun_path, sizeof(addr.sun_path), "%s/%s", run_dir, SOCKET_NAME) >=
	    sizeof(addr.sun_path))
		return FRONT_FAILED;
	snprintf(socket_path, socket_path_len, "%s", addr.sun_path);

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
		return FRONT_FAILED;
	}

	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		free(req.data);
		return FRONT_FAILED;
	}
	struct timeval tv = {.tv_sec = timeout_s};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	uint32_t status, exit_code;
	enum unanswered result = NO_REPLY;
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		result = NO_AGENT;
	else if (write_all(fd, req.data, req.len) == 0 && shutdown(fd, SHUT_WR) == 0 &&
		 read_u32(fd, &status) == 0) {
		if (status != 0)
			result = NOT_MINE;
		else if (read_u32(fd, &exit_code) == 0 && read_part(fd, out) == 0 && read_part(fd, err) == 0)
			result = ANSWERED;
	}
	close(fd);
	free(req.data);
	if (result == ANSWERED)
		*code = (int)exit_code;
	return result;
}

static const char *const supported[] = {SUPPORTED_VERSIONS};

/* The request's cniVersion when the plugin supports it, else the latest: what the
 * plugin itself answers with. A string search, not a JSON parser: the front only
 * echoes a version it knows. */
static const char *request_version(const struct buf *in)
{
	static char v[16];
	const char *key = "\"cniVersion\"";
	const char *end = in->data ? in->data + in->len : NULL;
	const char *p = in->data ? memmem(in->data, in->len, key, strlen(key)) : NULL;
	if (p) {
		p += strlen(key);
		while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ':'))
			p++;
		if (p < end && *p == '"') {
			size_t n = 0;
			for (p++; p < end && *p != '"' && n < sizeof(v) - 1; p++)
				v[n++] = *p;
			v[n] = '\0';
			for (size_t i = 0; i < sizeof(supported) / sizeof(supported[0]); i++)
				if (!strcmp(v, supported[i]))
					return supported[i];
		}
	}
	return LATEST_VERSION;
}

/* s as the inside of a JSON string (the details name a path from the environment) */
static void print_json_text(const char *s)
{
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			printf("\\%c", *s);
		else if ((unsigned char)*s < 0x20)
			printf("\\u%04x", (unsigned char)*s);
		else
			putchar(*s);
	}
}

static int fail(const struct buf *in, int code, const char *msg, const char *details)
{
	printf("{\"cniVersion\": \"%s\", \"code\": %d, \"msg\": \"interceptor-cni: %s\", \"details\": \"",
	       request_version(in), code, msg);
	print_json_text(details);
	printf("\"}\n");
	return 1;
}

/* What the front answers while the agent cannot: see the top of this file. */
static int answer_without_agent(const struct buf *in, enum unanswered u, const char *socket_path)
{
	const char *command = getenv("CNI_COMMAND");
	char details[PATH_MAX + 160];
	snprintf(details, sizeof(details), "%s (%s)", why(u), socket_path);
	if (!command || !*command)
		return fail(in, 4, "CNI_COMMAND is not set", details);
	if (!strcmp(command, "VERSION")) {
		printf("{\"cniVersion\": \"%s\", \"supportedVersions\": [", request_version(in));
		for (size_t i = 0; i < sizeof(supported) / sizeof(supported[0]); i++)
			printf("%s\"%s\"", i ? ", " : "", supported[i]);
		printf("]}\n");
		return 0;
	}
	if (!strcmp(command, "DEL") || !strcmp(command, "GC")) {
		fprintf(stderr, "interceptor-cni: %s: %s, left to the agent's reconcile once it is back\n",
			command, details);
		return 0;
	}
	if (!strcmp(command, "STATUS"))
		return fail(in, 50, "the node agent is not ready", details);
	if (!strcmp(command, "ADD") || !strcmp(command, "CHECK"))
		return fail(in, 11, "the node agent is not ready: try again later", details);
	return fail(in, 4, "unknown CNI_COMMAND", details);
}

int main(void)
{
	struct buf in = {0}, out = {0}, err = {0};
	char socket_path[PATH_MAX] = "";
	int code;
	enum unanswered u = FRONT_FAILED;
	if (read_stdin(&in) == 0)
		u = ask_agent(&in, &code, &out, &err, socket_path, sizeof(socket_path));
	if (u == ANSWERED) {
		if (write_all(1, out.data ? out.data : "", out.len) ||
		    write_all(2, err.data ? err.data : "", err.len))
			return 1;
		return code;
	}
	return answer_without_agent(&in, u, socket_path);
}
