/* hop: the control for the relay path's request rate (scripts/hop_control.sh).
 *
 * A minimal TCP forwarder: one thread, edge-triggered epoll, each accepted connection joined
 * to a connection of its own to BACKEND, bytes moved with recv() and send() as they come
 * (buffered per direction when the other side is full). It does the data movement the
 * engine does for a static program's connection (csrc/engine/direct.c) — one more kernel TCP
 * connection per client connection, a process between them — and nothing else: no rings, no
 * policy, no NSM.
 *
 *   hop LISTEN_PORT BACKEND_IPV4 BACKEND_PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF (64 * 1024)

struct side {
  int fd;
  bool dead;
  struct side *other, *next_dead;
  char buf[BUF]; /* what came from `other` and this side has not taken yet */
  size_t off, len;
};

static int ep;
static struct side *dead; /* freed after the epoll batch: later events may name them */

static void drop(struct side *s) {
  if (s->dead) return;
  struct side *first = s < s->other ? s : s->other; /* both halves are one allocation */
  first->dead = first->other->dead = true;
  close(first->fd);
  close(first->other->fd);
  first->next_dead = dead;
  dead = first;
}

/* Moves what `from` has to `to`; false when the connection is over. */
static bool flow(struct side *from, struct side *to) {
  for (;;) {
    while (to->len) {
      ssize_t n = send(to->fd, to->buf + to->off, to->len, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) return errno == EAGAIN; /* the rest when `to` signals room */
      to->off += (size_t)n;
      to->len -= (size_t)n;
    }
    to->off = 0;
    ssize_t n = recv(from->fd, to->buf, BUF, MSG_DONTWAIT);
    if (n == 0) return false;
    if (n < 0) return errno == EAGAIN;
    to->len = (size_t)n;
  }
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: hop LISTEN_PORT BACKEND_IPV4 BACKEND_PORT\n");
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
  struct sockaddr_in be = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[3]))};
  if (inet_pton(AF_INET, argv[2], &be.sin_addr) != 1) {
    fprintf(stderr, "hop: bad backend address %s\n", argv[2]);
    return 2;
  }
  int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(l, (struct sockaddr *)&me, sizeof(me)) < 0 || listen(l, 1024) < 0) {
    perror("hop: listen");
    return 1;
  }
  ep = epoll_create1(0);
  struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, l, &lev);
  printf("READY\n");
  fflush(stdout);
  struct epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(ep, evs, 64, -1);
    for (int i = 0; i < n; i++) {
      struct side *s = evs[i].data.ptr;
      if (!s) {
        int c;
        while ((c = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          /* A blocking connect to the backend (local: a round trip on loopback); every
           * call after it is non-blocking (MSG_DONTWAIT). */
          int b = socket(AF_INET, SOCK_STREAM, 0);
          struct side *pair = calloc(2, sizeof(struct side));
          if (!pair || connect(b, (struct sockaddr *)&be, sizeof(be)) < 0) {
            close(c);
            close(b);
            free(pair);
            continue;
          }
          setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          pair[0] = (struct side){.fd = c, .other = &pair[1]};
          pair[1] = (struct side){.fd = b, .other = &pair[0]};
          for (int k = 0; k < 2; k++) {
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = &pair[k]};
            epoll_ctl(ep, EPOLL_CTL_ADD, pair[k].fd, &ev);
          }
        }
        continue;
      }
      if (s->dead) continue;
      /* Either way: s's bytes to its other side, and what waits for s to it. */
      if (!flow(s, s->other) || !flow(s->other, s)) drop(s);
    }
    while (dead) {
      struct side *d = dead;
      dead = d->next_dead;
      free(d);
    }
  }
}
