/* Shared scaffolding for the Linux-semantics probe programs in this folder.
 *
 * Each program pins one piece of the kernel's socket behaviour. It runs natively first
 * (tests/semantics/test_native.py), later unchanged inside a NetKernel tenant through the
 * LD_PRELOAD shim, and must give the same answer both times. Contract of every program:
 *   usage: PROG HOST PORT     HOST an IPv4 or IPv6 literal, PORT 0 = let the kernel pick
 *   prints "OK <name>" and exits 0 on the Linux behaviour; prints "FAIL <name>: ..." with
 *   the call, the line and both values, and exits 1 otherwise.
 * A watchdog alarm (also re-armed in every forked child) turns a hang into a failure, and
 * children die with their parent (PR_SET_PDEATHSIG), so nothing outlives a run.
 * Single-threaded; header-only so each program stays one compile unit.
 */
#ifndef NK_SEM_H
#define NK_SEM_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SEM_TIMEOUT 20 /* seconds before the watchdog fails the program */

static const char *sem_name = "?";
static struct sockaddr_storage sem_addr; /* HOST with PORT (0 = pick) */
static int sem_family;

static inline void sem_fail(int line, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));
static inline void sem_fail(int line, const char *fmt, ...) {
  va_list ap;
  printf("FAIL %s (pid %d, line %d): ", sem_name, (int)getpid(), line);
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  printf("\n");
  fflush(stdout);
  _exit(1);
}

/* CHECK(cond, fmt, ...): fail with a message when cond is false. */
#define CHECK(cond, ...)                          \
  do {                                            \
    if (!(cond)) sem_fail(__LINE__, __VA_ARGS__); \
  } while (0)

/* SYS(call): the call must not return -1; on failure print it with errno. */
#define SYS(call)                                                                    \
  ({                                                                                 \
    errno = 0;                                                                       \
    long sem__r = (long)(call);                                                      \
    if (sem__r == -1)                                                                \
      sem_fail(__LINE__, "%s failed: %s (errno %d)", #call, strerror(errno), errno); \
    sem__r;                                                                          \
  })

/* EXPECT_EQ(a, b): both are integers; print both on mismatch. */
#define EXPECT_EQ(a, b)                                                                \
  do {                                                                                 \
    long long sem__a = (long long)(a), sem__b = (long long)(b);                        \
    if (sem__a != sem__b)                                                              \
      sem_fail(__LINE__, "%s == %s: got %lld, expected %lld", #a, #b, sem__a, sem__b); \
  } while (0)

/* EXPECT_ERR(call, err): the call must fail with -1 and errno err. */
#define EXPECT_ERR(call, err)                                                                   \
  do {                                                                                          \
    errno = 0;                                                                                  \
    long sem__r = (long)(call);                                                                 \
    int sem__e = errno;                                                                         \
    if (sem__r != -1 || sem__e != (err))                                                        \
      sem_fail(__LINE__, "%s: got %ld errno %s (%d), expected -1 errno %s (%d)", #call, sem__r, \
               sem__r == -1 ? strerror(sem__e) : "-", sem__r == -1 ? sem__e : 0, strerror(err), \
               err);                                                                            \
  } while (0)

static inline void sem_on_alarm(int sig) {
  (void)sig;
  static const char msg[] = "FAIL: watchdog timeout (a call hung)\n";
  ssize_t r = write(1, msg, sizeof msg - 1);
  (void)r;
  _exit(1);
}

static inline void sem_watchdog(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = sem_on_alarm;
  sigaction(SIGALRM, &sa, NULL);
  alarm(SEM_TIMEOUT);
}

/* Parse HOST PORT from argv, arm the watchdog, ignore SIGPIPE; call first in main. */
static inline void sem_init(const char *name, int argc, char **argv) {
  sem_name = name;
  setvbuf(stdout, NULL, _IOLBF, 0);
  signal(SIGPIPE, SIG_IGN);
  sem_watchdog();
  if (argc < 3) {
    fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
    exit(2);
  }
  struct addrinfo hints, *ai;
  memset(&hints, 0, sizeof hints);
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  hints.ai_socktype = SOCK_STREAM;
  int rc = getaddrinfo(argv[1], argv[2], &hints, &ai);
  if (rc != 0) {
    fprintf(stderr, "%s: bad address %s %s: %s\n", argv[0], argv[1], argv[2], gai_strerror(rc));
    exit(2);
  }
  memcpy(&sem_addr, ai->ai_addr, ai->ai_addrlen);
  sem_family = ai->ai_family;
  freeaddrinfo(ai);
}

static inline void sem_ok(void) {
  printf("OK %s\n", sem_name);
  fflush(stdout);
  exit(0);
}

/* fork() whose child keeps the watchdog and dies with its parent. */
static inline pid_t sem_fork(void) {
  fflush(stdout);
  pid_t ppid = getpid();
  pid_t pid = SYS(fork());
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != ppid) _exit(1);
    sem_watchdog();
  }
  return pid;
}

/* Wait for a child and require exit status 0. */
static inline void sem_wait_child(pid_t pid) {
  int st;
  while (waitpid(pid, &st, 0) < 0) CHECK(errno == EINTR, "waitpid: %s", strerror(errno));
  CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child %d failed: status 0x%x", (int)pid, st);
}

static inline uint16_t sem_port(const struct sockaddr_storage *a) {
  return ntohs(a->ss_family == AF_INET ? ((const struct sockaddr_in *)a)->sin_port
                                       : ((const struct sockaddr_in6 *)a)->sin6_port);
}

static inline void sem_set_port(struct sockaddr_storage *a, uint16_t port) {
  if (a->ss_family == AF_INET) ((struct sockaddr_in *)a)->sin_port = htons(port);
  else ((struct sockaddr_in6 *)a)->sin6_port = htons(port);
}

/* Same family, address and port (IPv6 scope ignored). */
static inline int sem_addr_eq(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
  if (a->ss_family != b->ss_family) return 0;
  if (a->ss_family == AF_INET) {
    const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
    return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
  }
  const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
  return x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, 16);
}

static inline const char *sem_fmt(const struct sockaddr_storage *a) {
  static char bufs[4][INET6_ADDRSTRLEN + 16];
  static int n;
  char *b = bufs[n++ & 3];
  char host[INET6_ADDRSTRLEN] = "?";
  if (a->ss_family == AF_INET)
    inet_ntop(AF_INET, &((const struct sockaddr_in *)a)->sin_addr, host, sizeof host);
  else if (a->ss_family == AF_INET6)
    inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)a)->sin6_addr, host, sizeof host);
  snprintf(b, INET6_ADDRSTRLEN + 16, a->ss_family == AF_INET6 ? "[%s]:%u" : "%s:%u", host,
           sem_port(a));
  return b;
}

static inline struct sockaddr_storage sem_local(int fd) {
  struct sockaddr_storage a;
  socklen_t l = sizeof a;
  memset(&a, 0, sizeof a);
  SYS(getsockname(fd, (struct sockaddr *)&a, &l));
  return a;
}

static inline struct sockaddr_storage sem_peer(int fd) {
  struct sockaddr_storage a;
  socklen_t l = sizeof a;
  memset(&a, 0, sizeof a);
  SYS(getpeername(fd, (struct sockaddr *)&a, &l));
  return a;
}

/* An int socket option, read back (its length checked) or set; any failure fails the probe. */
static inline int sem_get_int(int fd, int level, int name) {
  int v = -12345;
  socklen_t l = sizeof v;
  SYS(getsockopt(fd, level, name, &v, &l));
  EXPECT_EQ(l, sizeof v);
  return v;
}

static inline void sem_set_int(int fd, int level, int name, int v) {
  SYS(setsockopt(fd, level, name, &v, sizeof v));
}

static inline socklen_t sem_len(const struct sockaddr_storage *a) {
  return a->ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
}

/* A socket of type (with flags) bound to HOST:port. */
static inline int sem_bound(int type, uint16_t port) {
  int fd = (int)SYS(socket(sem_family, type, 0));
  int one = 1;
  SYS(setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one));
  struct sockaddr_storage a = sem_addr;
  sem_set_port(&a, port);
  SYS(bind(fd, (struct sockaddr *)&a, sem_len(&a)));
  return fd;
}

/* A TCP listener on HOST:PORT (the PORT given on the command line); *out = its address. */
static inline int sem_listener(int type_flags, struct sockaddr_storage *out) {
  int fd = sem_bound(SOCK_STREAM | type_flags, sem_port(&sem_addr));
  SYS(listen(fd, 512));
  *out = sem_local(fd);
  return fd;
}

/* A blocking TCP client connected to a. */
static inline int sem_connect(const struct sockaddr_storage *a) {
  int fd = (int)SYS(socket(a->ss_family, SOCK_STREAM, 0));
  SYS(connect(fd, (const struct sockaddr *)a, sem_len(a)));
  return fd;
}

/* Connected pair over loopback-ish HOST: *cli is the connect()ed end, *srv the accept()ed. */
static inline void sem_pair(int *cli, int *srv) {
  struct sockaddr_storage la;
  int l = sem_listener(0, &la);
  *cli = sem_connect(&la);
  *srv = (int)SYS(accept(l, NULL, NULL));
  close(l);
}

static inline void sem_write_all(int fd, const void *buf, size_t len) {
  const char *p = buf;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    CHECK(n > 0, "write(%d, %zu) = %zd: %s", fd, len, n, strerror(errno));
    p += n;
    len -= (size_t)n;
  }
}

/* Read exactly len bytes; fail on EOF or error. */
static inline void sem_read_all(int fd, void *buf, size_t len) {
  char *p = buf;
  while (len > 0) {
    ssize_t n = read(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    CHECK(n > 0, "read(%d, %zu) = %zd: %s", fd, len, n, n < 0 ? strerror(errno) : "EOF");
    p += n;
    len -= (size_t)n;
  }
}

/* Wait until fd reports one of events, up to ms; returns revents (0 on timeout). */
static inline int sem_poll(int fd, short events, int ms) {
  struct pollfd p = {fd, events, 0};
  int n;
  do n = poll(&p, 1, ms);
  while (n < 0 && errno == EINTR);
  CHECK(n >= 0, "poll: %s", strerror(errno));
  return n ? p.revents : 0;
}

static inline double sem_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* 64-bit FNV-1a, for payload checks. */
static inline uint64_t sem_fnv(uint64_t h, const void *p, size_t n) {
  const uint8_t *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}
#define SEM_FNV_INIT 14695981039346656037ull

/* Deterministic stream content: byte at stream offset i. */
static inline uint8_t sem_byte(uint64_t i) { return (uint8_t)((i * 2654435761u) >> 13 ^ i); }

#endif
