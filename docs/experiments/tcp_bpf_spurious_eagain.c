// Reproduction of the spurious EAGAIN that keeps `--accelerate local` off by default
// (docs/design-sk-msg.md, "Built", fact 3), without the agent: a blocking recv() on a TCP
// socket that has an sk_msg program (tcp_bpf) returns EAGAIN while another thread of the same
// process sends on that socket. Plain TCP blocks until data, EOF, its receive timeout or a
// signal, as POSIX says. docs/experiments/tcp_bpf_wait_again.patch is the kernel fix.
//
// Build and run (root, loopback only, about 12 s):
//   cc -O2 -static -pthread -o /tmp/spurious docs/experiments/tcp_bpf_spurious_eagain.c
//   /tmp/spurious            # all three modes
//   /tmp/spurious msg        # one mode: plain | msg | msg+verdict
// Exit status 1 if any blocking recv() answered wrongly, 0 if none did, 2 on setup errors.
// "msg" is the application socket of `--accelerate local` (tcp_bpf_recvmsg), "msg+verdict"
// adds a stream verdict program (tcp_bpf_recvmsg_parser), "plain" is no sockmap at all.
//
// Each round: the client socket is in a sockmap with a program that passes every message on
// unchanged (`return SK_PASS`), one thread writes 64 KiB blocks to a server that reads slowly
// and never answers, and the main thread blocks in recv() on the same socket. Three kinds of
// round, three of each: the server sends one byte and its FIN after ROUND_MS (recv() must
// return the byte, then EOF); SO_RCVTIMEO of WAIT_MS (EAGAIN, but not before WAIT_MS); a
// SIGALRM without SA_RESTART at WAIT_MS (EINTR).
#define _GNU_SOURCE
#include <errno.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum { ROUNDS = 3, ROUND_MS = 1000, BLOCK = 64 * 1024 };

static long bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static int load_pass_program(enum bpf_prog_type type)
{
	// r0 = 1 (SK_PASS); exit
	struct bpf_insn insns[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 1 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	char log[4096] = "";
	union bpf_attr attr = {
		.prog_type = type,
		.insns = (unsigned long)insns,
		.insn_cnt = 2,
		.license = (unsigned long)"GPL",
		.log_buf = (unsigned long)log,
		.log_size = sizeof(log),
		.log_level = 1,
	};
	int fd = bpf(BPF_PROG_LOAD, &attr);
	if (fd < 0)
		fprintf(stderr, "BPF_PROG_LOAD type %d: %s\n%s", type, strerror(errno), log);
	return fd;
}

static int attach(int prog, int map, enum bpf_attach_type type)
{
	union bpf_attr attr = {
		.target_fd = map,
		.attach_bpf_fd = prog,
		.attach_type = type,
	};
	if (bpf(BPF_PROG_ATTACH, &attr) < 0) {
		fprintf(stderr, "BPF_PROG_ATTACH %d: %s\n", type, strerror(errno));
		return -1;
	}
	return 0;
}

// A sockmap with the mode's programs attached; -1 on error, 0 for "plain" (no map).
static int make_sockmap(const char *mode)
{
	if (!strcmp(mode, "plain"))
		return 0;
	union bpf_attr attr = {
		.map_type = BPF_MAP_TYPE_SOCKMAP,
		.key_size = 4,
		.value_size = 4,
		.max_entries = 1,
	};
	int map = bpf(BPF_MAP_CREATE, &attr);
	if (map < 0) {
		fprintf(stderr, "BPF_MAP_CREATE: %s\n", strerror(errno));
		return -1;
	}
	int msg = load_pass_program(BPF_PROG_TYPE_SK_MSG);
	if (msg < 0 || attach(msg, map, BPF_SK_MSG_VERDICT) < 0)
		return -1;
	if (!strcmp(mode, "msg+verdict")) {
		int verdict = load_pass_program(BPF_PROG_TYPE_SK_SKB);
		if (verdict < 0 || attach(verdict, map, BPF_SK_SKB_STREAM_VERDICT) < 0)
			return -1;
	}
	return map;
}

static int add_to_sockmap(int map, int sock)
{
	int key = 0;
	union bpf_attr attr = {
		.map_fd = map,
		.key = (unsigned long)&key,
		.value = (unsigned long)&sock,
		.flags = BPF_ANY,
	};
	if (bpf(BPF_MAP_UPDATE_ELEM, &attr) < 0) {
		fprintf(stderr, "BPF_MAP_UPDATE_ELEM: %s\n", strerror(errno));
		return -1;
	}
	return 0;
}

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct round {
	int client, server;
	atomic_int done;
	long sends;
};

// Writes until the round is over (or the connection fails): blocking sends, so the writer
// sleeps on a full send buffer and is woken by the peer's ACKs on the socket's wait queue,
// the queue the blocked reader sleeps on too.
static void *writer(void *arg)
{
	struct round *r = arg;
	static char block[BLOCK];
	while (!atomic_load(&r->done)) {
		if (send(r->client, block, sizeof(block), MSG_NOSIGNAL) < 0)
			break;
		r->sends++;
	}
	return NULL;
}

// Reads slowly for ROUND_MS without answering, then sends one byte ('x') and its FIN, and
// drains until the writer has stopped.
static void *slow_server(void *arg)
{
	struct round *r = arg;
	static char buf[16 * 1024];
	long end = now_ms() + ROUND_MS;
	while (now_ms() < end) {
		if (recv(r->server, buf, sizeof(buf), 0) <= 0)
			break;
		usleep(200);
	}
	send(r->server, "x", 1, MSG_NOSIGNAL);
	shutdown(r->server, SHUT_WR);
	struct timeval tv = { .tv_sec = 0, .tv_usec = 100000 };
	setsockopt(r->server, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	while (!atomic_load(&r->done) && recv(r->server, buf, sizeof(buf), 0) > 0)
		;
	return NULL;
}

static int connected_pair(int *client, int *server)
{
	struct sockaddr_in addr = { .sin_family = AF_INET,
				    .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(addr);
	int listener = socket(AF_INET, SOCK_STREAM, 0);
	if (listener < 0 || bind(listener, (void *)&addr, sizeof(addr)) < 0 ||
	    listen(listener, 1) < 0 || getsockname(listener, (void *)&addr, &len) < 0)
		return -1;
	*client = socket(AF_INET, SOCK_STREAM, 0);
	if (*client < 0 || connect(*client, (void *)&addr, sizeof(addr)) < 0)
		return -1;
	*server = accept(listener, NULL, NULL);
	close(listener);
	return *server < 0 ? -1 : 0;
}

enum expect { DATA_THEN_EOF, RCVTIMEO, SIGNAL };
static const char *expect_name[] = { "data, then EOF", "SO_RCVTIMEO", "signal" };
enum { WAIT_MS = 200 };

static void on_alarm(int sig)
{
	(void)sig;
}

// Arms what ends the main thread's wait in this round: the server's byte and FIN (sent by
// slow_server at the end of the round), a receive timeout, or a signal without SA_RESTART.
static void arm(enum expect expect, int client)
{
	if (expect == RCVTIMEO) {
		struct timeval tv = { .tv_sec = 0, .tv_usec = WAIT_MS * 1000 };
		setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	} else if (expect == SIGNAL) {
		struct sigaction sa = { .sa_handler = on_alarm }; // no SA_RESTART
		sigaction(SIGALRM, &sa, NULL);
		struct itimerval it = { .it_value = { .tv_sec = 0, .tv_usec = WAIT_MS * 1000 } };
		setitimer(ITIMER_REAL, &it, NULL);
	}
}

// What the blocked recv() calls answered, as one line; 1 if that is wrong for `expect`.
static int judge(enum expect expect, ssize_t first, int first_err, char byte, ssize_t second,
		 long elapsed_ms, char *line, size_t size)
{
	if (first < 0 && (first_err == EAGAIN || first_err == EWOULDBLOCK) && expect != RCVTIMEO) {
		snprintf(line, size, "EAGAIN after %ld ms (wrong: nothing ended the wait)", elapsed_ms);
		return 1;
	}
	switch (expect) {
	case DATA_THEN_EOF:
		snprintf(line, size, "%s, then %s", first == 1 && byte == 'x' ? "the byte" : "no byte",
			 second == 0 ? "EOF" : "no EOF");
		return !(first == 1 && byte == 'x' && second == 0);
	case RCVTIMEO:
		snprintf(line, size, "%s after %ld ms (SO_RCVTIMEO %d ms)",
			 first < 0 ? strerror(first_err) : "data", elapsed_ms, WAIT_MS);
		return !(first < 0 && first_err == EAGAIN && elapsed_ms >= WAIT_MS - 10);
	case SIGNAL:
		snprintf(line, size, "%s after %ld ms (SIGALRM at %d ms)",
			 first < 0 ? strerror(first_err) : "data", elapsed_ms, WAIT_MS);
		return !(first < 0 && first_err == EINTR);
	}
	return 1;
}

// 1 if the blocking recv() answered wrongly (EAGAIN while nothing ended the wait), 0 if
// right, -1 on setup errors.
static int run_round(int map, enum expect expect)
{
	struct round r = { 0 };
	if (connected_pair(&r.client, &r.server) < 0) {
		perror("loopback connection");
		return -1;
	}
	if (map > 0 && add_to_sockmap(map, r.client) < 0)
		return -1;
	pthread_t w, s;
	pthread_create(&s, NULL, slow_server, &r);
	pthread_create(&w, NULL, writer, &r);
	arm(expect, r.client);
	long start = now_ms();
	char byte = 0;
	ssize_t first = recv(r.client, &byte, 1, 0);
	int first_err = errno;
	long elapsed_ms = now_ms() - start;
	ssize_t second = -1;
	if (first == 1) {
		char next;
		second = recv(r.client, &next, 1, 0);
	}
	atomic_store(&r.done, 1);
	shutdown(r.client, SHUT_RDWR);
	pthread_join(w, NULL);
	pthread_join(s, NULL);
	close(r.client);
	close(r.server);
	char line[160];
	int wrong = judge(expect, first, first_err, byte, second, elapsed_ms, line, sizeof(line));
	printf("  %-15s %s after %ld sends: %s\n", expect_name[expect], wrong ? "WRONG" : "right",
	       r.sends, line);
	return wrong;
}

static int run_mode(const char *mode)
{
	int map = make_sockmap(mode);
	if (map < 0)
		return -1;
	int wrong = 0, rounds = 0;
	printf("%s:\n", mode);
	for (enum expect expect = DATA_THEN_EOF; expect <= SIGNAL; expect++) {
		for (int i = 0; i < ROUNDS; i++, rounds++) {
			int result = run_round(map, expect);
			if (result < 0)
				return -1;
			wrong += result;
		}
	}
	printf("%s: %d of %d blocking recv() calls answered wrongly\n", mode, wrong, rounds);
	if (map > 0)
		close(map);
	return wrong;
}

int main(int argc, char **argv)
{
	const char *all[] = { "plain", "msg", "msg+verdict" };
	const char **modes = argc > 1 ? (const char **)&argv[1] : all;
	int count = argc > 1 ? argc - 1 : 3;
	int failed = 0;
	for (int i = 0; i < count; i++) {
		int result = run_mode(modes[i]);
		if (result < 0)
			return 2;
		failed |= result > 0;
	}
	return failed;
}
