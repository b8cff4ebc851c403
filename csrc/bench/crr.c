/* netkernel-crr: TCP connection rate for `netkernel bench` (connect, one request, close).
 *
 *   netkernel-crr server ADDR PORT
 *   netkernel-crr client ADDR PORT SECONDS THREADS
 *
 * The server answers each connection's 64-byte request with 64 bytes and closes. The client
 * runs THREADS loops of connect / write 64 B / read 64 B / close for SECONDS and prints
 * "connections/s N" and "errors N". Written in C so that the figure is the stack's, not an
 * interpreter's; plain blocking calls, as an unmodified program would make them. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG 64

static struct sockaddr_storage target;
static socklen_t target_len;
static double stop_at;
static atomic_ulong done, errors;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int resolve(const char *addr, const char *port) {
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST}, *ai;
  int rc = getaddrinfo(addr, port, &hints, &ai);
  if (rc) {
    fprintf(stderr, "netkernel-crr: %s port %s: %s\n", addr, port, gai_strerror(rc));
    return -1;
  }
  memcpy(&target, ai->ai_addr, ai->ai_addrlen);
  target_len = ai->ai_addrlen;
  freeaddrinfo(ai);
  return 0;
}

static int full_io(int fd, char *buf, int n, int writing) {
  for (int off = 0; off < n;) {
    ssize_t r =
        writing ? write(fd, buf + off, (size_t)(n - off)) : read(fd, buf + off, (size_t)(n - off));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    off += (int)r;
  }
  return 0;
}

/* The first few failures are printed with the step and errno: a count alone says nothing
 * about which stack call misbehaved. */
static void failed(const char *step, int err) {
  if (atomic_fetch_add(&errors, 1) < 5)
    fprintf(stderr, "netkernel-crr: %s: %s\n", step, err ? strerror(err) : "end of stream");
}

static void *client_loop(void *arg) {
  (void)arg;
  char buf[MSG];
  memset(buf, 'q', sizeof(buf));
  while (now() < stop_at) {
    int fd = socket(target.ss_family, SOCK_STREAM, 0);
    if (fd < 0) {
      failed("socket", errno);
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    errno = 0;
    if (connect(fd, (struct sockaddr *)&target, target_len) < 0) failed("connect", errno);
    else if (full_io(fd, buf, MSG, 1) < 0) failed("write", errno);
    else if ((errno = 0, full_io(fd, buf, MSG, 0)) < 0) failed("read", errno);
    else atomic_fetch_add(&done, 1);
    close(fd);
  }
  return NULL;
}

static int client(int seconds, int threads) {
  pthread_t tid[256];
  if (threads < 1 || threads > 256 || seconds < 1) {
    fprintf(stderr, "netkernel-crr: SECONDS >= 1 and 1 <= THREADS <= 256\n");
    return 2;
  }
  double start = now();
  stop_at = start + seconds;
  int started = 0;
  while (started < threads && pthread_create(&tid[started], NULL, client_loop, NULL) == 0)
    started++;
  for (int i = 0; i < started; i++) pthread_join(tid[i], NULL);
  if (started < threads) {
    fprintf(stderr, "netkernel-crr: could only start %d of %d threads\n", started, threads);
    return 1;
  }
  double elapsed = now() - start;
  printf("connections/s %.1f\nconnections %lu\nerrors %lu\n", (double)atomic_load(&done) / elapsed,
         atomic_load(&done), atomic_load(&errors));
  return atomic_load(&done) ? 0 : 1;
}

/* Per connection: how much of the request has arrived. */
struct conn {
  int fd;
  int got;
};

static int server(void) {
  int ls = socket(target.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  if (ls >= 0) setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (ls < 0 || bind(ls, (struct sockaddr *)&target, target_len) || listen(ls, 4096)) {
    perror("netkernel-crr: listen");
    return 1;
  }
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  printf("READY\n");
  fflush(stdout);
  char buf[MSG];
  memset(buf, 'r', sizeof(buf));
  for (;;) {
    struct epoll_event evs[64];
    int n = epoll_wait(ep, evs, 64, -1);
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (!c) {
        int fd;
        while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          struct conn *nc = calloc(1, sizeof(*nc));
          if (!nc) {
            close(fd);
            continue;
          }
          nc->fd = fd;
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = nc};
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
        }
        continue;
      }
      char in[MSG];
      ssize_t r = read(c->fd, in, (size_t)(MSG - c->got));
      if (r > 0) c->got += (int)r;
      if (r > 0 && c->got < MSG) continue;
      if (r < 0 && errno == EAGAIN) continue;
      /* Whole request: answer (64 bytes always fit the socket buffer) and close. EOF or an
       * error: just close. A failed answer shows as an error in the client. */
      if (c->got == MSG) {
        ssize_t w = write(c->fd, buf, MSG);
        (void)w;
      }
      close(c->fd);
      free(c);
    }
  }
}

int main(int argc, char **argv) {
  if (argc == 4 && !strcmp(argv[1], "server")) {
    if (resolve(argv[2], argv[3])) return 2;
    return server();
  }
  if (argc == 6 && !strcmp(argv[1], "client")) {
    if (resolve(argv[2], argv[3])) return 2;
    return client(atoi(argv[4]), atoi(argv[5]));
  }
  fprintf(stderr,
          "usage: netkernel-crr server ADDR PORT\n"
          "       netkernel-crr client ADDR PORT SECONDS THREADS\n");
  return 2;
}
