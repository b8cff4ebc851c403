/* netkernel-relay: NetKernel's network for the programs of a tenant that GuestLib does not
 * reach — statically linked programs (busybox, musl builds), Go programs, anything that makes
 * its own system calls (DESIGN §H: "a static program in a namespace tenant gets its sockets
 * from NetKernel or not at all").
 *
 * Such a program's socket() makes a kernel socket in the tenant's namespace, which has only
 * `lo`. The daemon sets that namespace up so that every TCP connection such a socket makes to
 * an address that is not the tenant's own is redirected (nftables, `redirect`) to this relay's
 * listener on the tenant's loopback; the relay — itself a process of the tenant, in its
 * sandbox, with GuestLib preloaded — reads the original destination (SO_ORIGINAL_DST) and
 * connects there through NetKernel like any tenant program; once that connection is up, it
 * hands the program's end to the engine, which carries the bytes from then on (hand_off()).
 * The other way round, it watches the namespace's TCP listeners (sock_diag) and listens on
 * the same address and port through NetKernel; what it accepts there it connects, from the
 * client's own address and port (IP_FREEBIND), to the program's listener, so the program
 * sees its real peer. UDP, both ways, is in udp.c.
 *
 * So everything the engine knows of these connections comes through GuestLib, with the
 * engine's checks, the tenant's policy (rate limits, max_sockets) and its NSM, and the program
 * keeps the kernel's socket semantics (blocking or not, epoll, SO_ERROR, shutdown, options)
 * for its own end. What differs from a program GuestLib reaches is written down in
 * docs/architecture.md: a loopback hop per byte, and a connect() that succeeds before the
 * peer answers (a refused one shows as a reset).
 *
 * One process, one thread, edge-triggered epoll; a supervising parent restarts it if it dies.
 * It is part of the tenant: the tenant can kill it or feed it garbage, and hurts only itself.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <linux/filter.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "relay.h"

#define SO_ORIGINAL_DST      80 /* linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv6/ip6_tables.h */

#define BUF_SIZE (256 * 1024)
/* How often the namespace's listeners and UDP sockets are looked at: often while the tenant
 * is busy (for a minute after the relay starts, a connection or datagram is relayed, or a
 * listener comes or goes), seldom when it is idle, so that an idle tenant costs next to
 * nothing: a server that starts then is found within SCAN_IDLE_MS. */
#define SCAN_MS         200
#define SCAN_IDLE_MS    1000
#define BUSY_FOR_MS     60000
#define MAX_MIRRORS     1024
#define DEFAULT_PORT    61001 /* outside the ephemeral range: never a program's own port */
#define MIRROR_BACKLOG  4096
#define RESTART_DELAY_S 1
/* A program that refuses a connection its mirror accepted has just stopped listening: it
 * exited, or restarts (the scan has not seen the gap). The client is held this long, the
 * connect tried again at every scan, rather than reset at once. */
#define PROGRAM_WAIT_MS 5000

static FILE *logf;

void say(const char *fmt, ...) {
  if (!logf) return;
  va_list ap;
  va_start(ap, fmt);
  fprintf(logf, "netkernel-relay: ");
  vfprintf(logf, fmt, ap);
  fprintf(logf, "\n");
  va_end(ap);
  fflush(logf);
}

/* Kernel sockets (in the tenant's namespace) are made with the raw system call: GuestLib's
 * socket() would make them NetKernel's. Everything else GuestLib passes through for
 * descriptors it does not own. */
int kernel_socket(int family, int type) {
  return (int)syscall(SYS_socket, family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
}

static int nk_socket(int family) {
  return socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
}

socklen_t sa_len(const struct sockaddr_storage *ss) {
  return ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

void sa_str(const struct sockaddr_storage *ss, char *out, size_t n) {
  char a[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (ss->ss_family == AF_INET6) {
    const struct sockaddr_in6 *s6 = (const void *)ss;
    inet_ntop(AF_INET6, &s6->sin6_addr, a, sizeof(a));
    port = ntohs(s6->sin6_port);
    snprintf(out, n, "[%s]:%d", a, port);
  } else {
    const struct sockaddr_in *s4 = (const void *)ss;
    inet_ntop(AF_INET, &s4->sin_addr, a, sizeof(a));
    port = ntohs(s4->sin_port);
    snprintf(out, n, "%s:%d", a, port);
  }
}

static void nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Closing with a reset: what the side that was not reset sees of the side that was. */
static void close_reset(int fd) {
  struct linger l = {1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close(fd);
}

/* -- a relayed connection ------------------------------------------------------------------ */

struct pipe_buf {
  char *data;
  size_t off, len;
};

struct conn;
struct end {
  enum kind kind; /* K_END */
  struct conn *c;
  int fd;
  bool eof;     /* read 0 from it: nothing more will come */
  bool shut_wr; /* we shut down its writing side */
  /* Edge-triggered readiness, cached: may have data (cleared by EAGAIN, or by a short read
   * when no hangup was signalled: the next arrival is a new edge), may take data (cleared by
   * EAGAIN or a short write), a hangup was signalled (read on to the end). */
  bool rd, wr, hup;
};

struct conn {
  struct end a, b; /* a: the program's kernel socket; b: NetKernel's */
  struct end *connecting;
  struct pipe_buf a2b, b2a;
  bool dead;
  struct conn *next_dead;
  /* Inbound: a connects from `client` to the program at `to`; by_port: from the client's own
   * port, which a connection of the program's may still hold (below). */
  struct sockaddr_storage client, to;
  bool by_port;
  long wait_until;        /* inbound: how long a refusing program is waited for (ms) */
  struct conn *next_wait; /* on `waiting` while a has no socket */
};

int ep;
/* Closed connections, freed once the events of the current epoll batch are handled (a later
 * event in the batch may be for the other end of one). */
static struct conn *graveyard;

static void conn_close(struct conn *c, bool reset) {
  if (c->dead) return;
  for (struct end *e = &c->a; e; e = e == &c->a ? &c->b : NULL) {
    /* Out of the epoll set first: close() takes a descriptor out only when no other refers
     * to its file, and GuestLib may hold one for a while, which would leave events pointing
     * at this connection after it is freed. */
    epoll_ctl(ep, EPOLL_CTL_DEL, e->fd, NULL);
    if (reset) close_reset(e->fd);
    else close(e->fd);
  }
  c->dead = true;
  c->next_dead = graveyard;
  graveyard = c;
}

static void bury(void) {
  while (graveyard) {
    struct conn *c = graveyard;
    graveyard = c->next_dead;
    free(c->a2b.data);
    free(c->b2a.data);
    free(c);
  }
}

static struct conn *conn_new(int a, int b) {
  struct conn *c = calloc(1, sizeof(*c));
  if (!c) return NULL;
  c->a2b.data = malloc(BUF_SIZE);
  c->b2a.data = malloc(BUF_SIZE);
  if (!c->a2b.data || !c->b2a.data) {
    free(c->a2b.data);
    free(c->b2a.data);
    free(c);
    return NULL;
  }
  c->a = (struct end){K_END, c, a, false, false, true, true, false};
  c->b = (struct end){K_END, c, b, false, false, true, true, false};
  return c;
}

static bool watch(struct end *e) {
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = e};
  return epoll_ctl(ep, EPOLL_CTL_ADD, e->fd, &ev) == 0;
}

/* Moves what can be moved from `from` to `to` through `p`. Returns -1 when either end failed
 * (the connection is to be reset), 1 if anything moved, 0 otherwise. */
static int move(struct end *from, struct end *to, struct pipe_buf *p) {
  int moved = 0;
  for (;;) {
    if (p->len > 0) {
      if (!to->wr) break;
      ssize_t n = send(to->fd, p->data + p->off, p->len, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        to->wr = false;
        break;
      }
      p->off += (size_t)n;
      p->len -= (size_t)n;
      moved = 1;
      if (p->len > 0) {
        to->wr = false;
        break;
      }
      p->off = 0;
    }
    if (from->eof || !from->rd) break;
    ssize_t n = recv(from->fd, p->data, BUF_SIZE, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
      from->rd = false;
      break;
    }
    if (n == 0) {
      from->eof = true;
      break;
    }
    if ((size_t)n < BUF_SIZE && !from->hup) from->rd = false;
    p->len = (size_t)n;
    moved = 1;
  }
  /* The source ended and all it sent is delivered: pass the end of stream on. */
  if (from->eof && p->len == 0 && !to->shut_wr) {
    to->shut_wr = true;
    if (shutdown(to->fd, SHUT_WR) < 0 && errno != ENOTCONN) return -1;
  }
  return moved;
}

static int connect_as(const struct sockaddr_storage *peer, const struct sockaddr_storage *to,
                      bool any_port, bool *by_port);

/* The program refused a connection from the client's own port: a connection of its own from
 * that port may still be in TIME_WAIT (it closed first, then the client reused the port), and
 * a SYN that lands on it is answered with a reset. From any port of the client's address. */
static bool retry_any_port(struct conn *c) {
  bool by_port;
  int a = connect_as(&c->client, &c->to, true, &by_port);
  if (a < 0) return false;
  epoll_ctl(ep, EPOLL_CTL_DEL, c->a.fd, NULL);
  close(c->a.fd);
  c->a.fd = a;
  c->a.rd = c->a.wr = true;
  c->by_port = false;
  if (!watch(&c->a)) conn_close(c, true);
  return true;
}

static struct conn *waiting;

static bool wait_for_program(struct conn *c) {
  if (now_ms() >= c->wait_until) return false;
  epoll_ctl(ep, EPOLL_CTL_DEL, c->a.fd, NULL);
  close(c->a.fd);
  c->a.fd = -1;
  c->next_wait = waiting;
  waiting = c;
  return true;
}

/* At each scan: the held connections try the program again (the connect's end comes as an
 * event, and a refusal puts them back here until their time is up). */
static void retry_waiting(void) {
  struct conn *list = waiting;
  waiting = NULL;
  while (list) {
    struct conn *c = list;
    list = c->next_wait;
    if (c->dead) continue;
    bool by_port;
    c->a.fd = connect_as(&c->client, &c->to, true, &by_port);
    c->by_port = false;
    c->a.rd = c->a.wr = true;
    if (c->a.fd < 0 || !watch(&c->a)) conn_close(c, true); /* close(-1) does nothing */
  }
}

/* GuestLib's netkernel_attach(): the relay runs with GuestLib preloaded. */
static int (*attach)(int nk_fd, int kernel_fd);
static bool attach_looked_up;

/* Both ends connected, nothing read from either yet: the engine takes the program's end
 * (`a`) and carries the connection itself (csrc/engine/direct.c), reading it into the
 * NetKernel socket's rings and writing them out to it, so that its bytes no longer pass
 * through here: per request two copies, six system calls and two wake-ups less. The relay
 * lets go of both descriptors; the connection outlives it. False (the relay carries it
 * itself): no GuestLib, or the engine refused (one from before NK_OP_ATTACH). */
static bool hand_off(struct conn *c) {
  if (!attach_looked_up) {
    attach_looked_up = true;
    attach = (int (*)(int, int))dlsym(RTLD_DEFAULT, "netkernel_attach");
    say("carrying connections %s", attach ? "in the engine" : "through the relay");
  }
  if (!attach || attach(c->b.fd, c->a.fd) < 0) return false;
  for (struct end *e = &c->a; e; e = e == &c->a ? &c->b : NULL) {
    epoll_ctl(ep, EPOLL_CTL_DEL, e->fd, NULL); /* as in conn_close */
    close(e->fd);
  }
  c->dead = true;
  c->next_dead = graveyard;
  graveyard = c;
  return true;
}

/* Work on `c` after `events` on its end `e` (NULL, 0: just made). */
static void pump(struct conn *c, struct end *e, uint32_t events) {
  if (c->dead) return;
  if (e) {
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) e->rd = true;
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) e->hup = true;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) e->wr = true;
  }
  if (c->connecting) {
    /* Until the connect ends, only its end's events matter. */
    if (e && e != c->connecting) return;
    int err = 0;
    socklen_t l = sizeof(err);
    if (getsockopt(c->connecting->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0) err = errno;
    if (err == 0 && !(events & EPOLLOUT)) {
      /* Not told it is writable: connected shows as a peer. */
      struct sockaddr_storage ss;
      socklen_t sl = sizeof(ss);
      if (getpeername(c->connecting->fd, (struct sockaddr *)&ss, &sl) < 0) {
        if (errno == ENOTCONN) return;
        err = errno;
      }
    }
    if (err == ECONNREFUSED && c->connecting == &c->a && c->by_port && retry_any_port(c)) return;
    if (err == ECONNREFUSED && c->connecting == &c->a && wait_for_program(c)) return;
    if (err) {
      conn_close(c, true);
      return;
    }
    c->connecting = NULL;
    if (hand_off(c)) return;
  }
  int r1, r2;
  do {
    r1 = move(&c->a, &c->b, &c->a2b);
    r2 = r1 < 0 ? -1 : move(&c->b, &c->a, &c->b2a);
  } while (r1 > 0 || r2 > 0);
  if (r1 < 0 || r2 < 0) {
    conn_close(c, true);
    return;
  }
  if (c->a.shut_wr && c->b.shut_wr) conn_close(c, false);
}

/* Starts relaying between the accepted `a` and `b`, whose nonblocking connect() is under way
 * when `b_connecting` (or `a`'s, when `a_connecting`). */
static void relay(int a, int b, bool a_connecting, bool b_connecting,
                  const struct sockaddr_storage *client, const struct sockaddr_storage *to,
                  bool by_port) {
  busy();
  struct conn *c = conn_new(a, b);
  if (!c) {
    close_reset(a);
    close_reset(b);
    return;
  }
  c->connecting = a_connecting ? &c->a : b_connecting ? &c->b : NULL;
  if (client) {
    c->client = *client;
    c->to = *to;
    c->by_port = by_port;
    c->wait_until = now_ms() + PROGRAM_WAIT_MS;
  }
  if (!watch(&c->a) || !watch(&c->b)) {
    say("epoll: %s", strerror(errno));
    conn_close(c, true);
    return;
  }
  pump(c, NULL, 0);
}

/* A listener whose accept() failed for want of a resource (descriptors: EMFILE, ENFILE;
 * NetKernel's max_sockets or max_memory: EMFILE, ENOBUFS) stays readable: it is left out of
 * the epoll set until the next scan rather than retried in a loop. Its connections wait in
 * the backlog meanwhile. */
#define MAX_PAUSED 64
static struct {
  int fd;
  void *tag;
} paused[MAX_PAUSED];
static unsigned n_paused;

static void pause_listener(int fd, void *tag, const char *what) {
  say("%s: %s; accepting again in a moment", what, strerror(errno));
  struct epoll_event ev = {.events = 0, .data.ptr = tag};
  if (n_paused == MAX_PAUSED || epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) < 0) return;
  paused[n_paused].fd = fd;
  paused[n_paused].tag = tag;
  n_paused++;
}

/* A listener closed while paused: forgotten, so that its number, reused, is not touched. */
static void unpause(int fd) {
  for (unsigned i = 0; i < n_paused; i++)
    if (paused[i].fd == fd) paused[i--] = paused[--n_paused];
}

static void resume_listeners(void) {
  for (unsigned i = 0; i < n_paused; i++) {
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = paused[i].tag};
    epoll_ctl(ep, EPOLL_CTL_MOD, paused[i].fd, &ev); /* fails harmlessly if it was closed */
  }
  n_paused = 0;
}

static bool accept_failed(int fd, void *tag, const char *what) {
  if (errno == EINTR || errno == ECONNABORTED) return false; /* try the next one */
  if (errno != EAGAIN && errno != EWOULDBLOCK) pause_listener(fd, tag, what);
  return true;
}

/* -- out: programs' connections to the world ---------------------------------------------- */

/* The listeners that redirected connections arrive at, one per family. */
static struct out_listener {
  enum kind kind; /* K_OUT_LISTENER */
  int fd, family;
} out4 = {K_OUT_LISTENER, -1, AF_INET}, out6 = {K_OUT_LISTENER, -1, AF_INET6};

static int listen_kernel(int family, const char *addr, int port) {
  int fd = kernel_socket(family, SOCK_STREAM);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  struct sockaddr_storage ss = {0};
  if (family == AF_INET6) {
    struct sockaddr_in6 *s6 = (void *)&ss;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(port);
    inet_pton(AF_INET6, addr, &s6->sin6_addr);
  } else {
    struct sockaddr_in *s4 = (void *)&ss;
    s4->sin_family = AF_INET;
    s4->sin_port = htons(port);
    inet_pton(AF_INET, addr, &s4->sin_addr);
  }
  if (bind(fd, (struct sockaddr *)&ss, sa_len(&ss)) < 0 || listen(fd, MIRROR_BACKLOG) < 0) {
    say("listen on %s port %d: %s", addr, port, strerror(errno));
    close(fd);
    return -1;
  }
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = family == AF_INET6 ? &out6 : &out4};
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  return fd;
}

static void accept_out(struct out_listener *l) {
  for (;;) {
    int a = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (a < 0) {
      if (accept_failed(l->fd, l, "accepting a program's connection")) return;
      continue;
    }
    struct sockaddr_storage dst = {0};
    socklen_t dl = sizeof(dst);
    int r = l->family == AF_INET6 ? getsockopt(a, SOL_IPV6, IP6T_SO_ORIGINAL_DST, &dst, &dl)
                                  : getsockopt(a, SOL_IP, SO_ORIGINAL_DST, &dst, &dl);
    if (r < 0) { /* a program that connected to the relay itself: nowhere to go */
      close_reset(a);
      continue;
    }
    nodelay(a);
    int b = nk_socket(dst.ss_family);
    if (b < 0) { /* EMFILE at max_sockets, ENOBUFS at max_memory: the program sees a reset */
      char d[80];
      sa_str(&dst, d, sizeof(d));
      say("connection to %s refused by NetKernel: %s", d, strerror(errno));
      close_reset(a);
      continue;
    }
    nodelay(b);
    if (connect(b, (struct sockaddr *)&dst, sa_len(&dst)) < 0 && errno != EINPROGRESS) {
      close_reset(a);
      close(b);
      continue;
    }
    relay(a, b, false, true, NULL, NULL, false);
  }
}

/* -- in: the world's connections to programs' listeners ----------------------------------- */

/* A listener of a program (family, address, port, v6only), mirrored on NetKernel. The mirror
 * listens on the tenant's own addresses, not on wildcards: a wildcard bind through NetKernel
 * also listens on the tenant's loopback — this namespace's kernel — where the program itself
 * is. So 0.0.0.0 maps to the tenant's IPv4 address, [::] to its IPv6 one (and its IPv4 one
 * unless v6only). */
struct mirror;
struct mirror_fd {
  enum kind kind; /* K_MIRROR */
  int fd;         /* -1: not listening (yet), retried every scan */
  bool wanted;    /* this address is one the mirror listens on */
  bool said;      /* its failure is in the log */
  struct sockaddr_storage addr;
};
struct mirror {
  int family;
  uint8_t addr[16];
  uint16_t port; /* host order */
  bool v6only;
  bool seen; /* in the last scan */
  struct mirror_fd fds[2];
};
static struct mirror *mirrors[MAX_MIRRORS];
static unsigned n_mirrors;
struct sockaddr_storage tenant4, tenant6;

bool is_loopback(int family, const uint8_t *a) {
  if (family == AF_INET) return a[0] == 127;
  static const uint8_t lo6[16] = {[15] = 1};
  static const uint8_t mapped[12] = {[10] = 0xff, [11] = 0xff};
  return !memcmp(a, lo6, 16) || (!memcmp(a, mapped, 12) && a[12] == 127);
}

bool is_any(int family, const uint8_t *a) {
  static const uint8_t zero[16];
  return !memcmp(a, zero, family == AF_INET6 ? 16 : 4);
}

/* The tenant's own addresses: those on `lo` that are not loopback. */
static void find_tenant_addresses(void) {
  struct ifaddrs *ifa = NULL;
  if (getifaddrs(&ifa) < 0) return;
  for (struct ifaddrs *i = ifa; i; i = i->ifa_next) {
    if (!i->ifa_addr) continue;
    int fam = i->ifa_addr->sa_family;
    if (fam == AF_INET && !tenant4.ss_family) {
      struct sockaddr_in *s4 = (void *)i->ifa_addr;
      if (!is_loopback(AF_INET, (uint8_t *)&s4->sin_addr)) memcpy(&tenant4, s4, sizeof(*s4));
    } else if (fam == AF_INET6 && !tenant6.ss_family) {
      struct sockaddr_in6 *s6 = (void *)i->ifa_addr;
      if (!is_loopback(AF_INET6, s6->sin6_addr.s6_addr) && !IN6_IS_ADDR_LINKLOCAL(&s6->sin6_addr))
        memcpy(&tenant6, s6, sizeof(*s6));
    }
  }
  freeifaddrs(ifa);
}

void set_port(struct sockaddr_storage *ss, uint16_t port) {
  if (ss->ss_family == AF_INET6) ((struct sockaddr_in6 *)ss)->sin6_port = htons(port);
  else ((struct sockaddr_in *)ss)->sin_port = htons(port);
}

/* Listens through NetKernel on mf's address; returns the descriptor or -1 (said in the log
 * the first time: a listener the engine still holds, say of a program that just went, makes
 * it fail for a moment, and it is tried again at every scan). */
static int mirror_listen(struct mirror_fd *mf) {
  struct sockaddr_storage *ss = &mf->addr;
  char s[80];
  sa_str(ss, s, sizeof(s));
  int fd = nk_socket(ss->ss_family);
  int one = 1;
  if (fd >= 0) {
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (ss->ss_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
  }
  if (fd < 0 || bind(fd, (struct sockaddr *)ss, sa_len(ss)) < 0 || listen(fd, MIRROR_BACKLOG) < 0) {
    if (!mf->said)
      say("cannot listen on %s through NetKernel for a program's listener (trying again): %s", s,
          strerror(errno));
    mf->said = true;
    if (fd >= 0) close(fd);
    return -1;
  }
  mf->fd = fd;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = mf};
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  say("listening on %s for a program's listener", s);
  return fd;
}

static void mirror_open(int family, const uint8_t *addr, uint16_t port, bool v6only) {
  if (n_mirrors == MAX_MIRRORS) return;
  struct mirror *m = calloc(1, sizeof(*m));
  if (!m) return;
  m->family = family;
  m->port = port;
  m->v6only = v6only;
  m->seen = true;
  for (int i = 0; i < 2; i++) m->fds[i] = (struct mirror_fd){.kind = K_MIRROR, .fd = -1};
  memcpy(m->addr, addr, family == AF_INET6 ? 16 : 4);
  struct sockaddr_storage want[2] = {0};
  int n = 0;
  if (is_any(family, addr)) {
    if (family == AF_INET6 && tenant6.ss_family) want[n++] = tenant6;
    if ((family == AF_INET || !v6only) && tenant4.ss_family) want[n++] = tenant4;
  } else if (family == AF_INET6) {
    struct sockaddr_in6 *s6 = (void *)&want[n++];
    s6->sin6_family = AF_INET6;
    memcpy(&s6->sin6_addr, addr, 16);
    /* A v4-mapped address is the IPv4 one. */
    if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
      struct sockaddr_in *s4 = (void *)&want[n - 1];
      uint8_t a4[4];
      memcpy(a4, addr + 12, 4);
      memset(&want[n - 1], 0, sizeof(want[0]));
      s4->sin_family = AF_INET;
      memcpy(&s4->sin_addr, a4, 4);
    }
  } else {
    struct sockaddr_in *s4 = (void *)&want[n++];
    s4->sin_family = AF_INET;
    memcpy(&s4->sin_addr, addr, 4);
  }
  for (int i = 0; i < n; i++) {
    set_port(&want[i], port);
    m->fds[i].addr = want[i];
    m->fds[i].wanted = true;
    mirror_listen(&m->fds[i]);
  }
  mirrors[n_mirrors++] = m;
  busy();
}

static void mirror_close(struct mirror *m) {
  for (int i = 0; i < 2; i++)
    if (m->fds[i].fd >= 0) {
      unpause(m->fds[i].fd);
      epoll_ctl(ep, EPOLL_CTL_DEL, m->fds[i].fd, NULL); /* as in conn_close */
      close(m->fds[i].fd);
    }
  free(m);
}

/* A kernel socket connecting (non-blocking) to the program's listener at `to`, from the
 * client's own address and port, so that the program sees its real peer: the namespace
 * routes every address to `lo`, and IP_FREEBIND lets us bind one we do not hold. If that
 * port cannot be used here (taken, or its last connection to `to` in TIME_WAIT), or
 * `any_port`, any port of the client's address will do; *by_port says which. -1: failed. */
static int connect_as(const struct sockaddr_storage *peer, const struct sockaddr_storage *to,
                      bool any_port, bool *by_port) {
  for (int attempt = any_port; attempt < 2; attempt++) {
    struct sockaddr_storage from = *peer;
    if (attempt) set_port(&from, 0);
    int a = kernel_socket(peer->ss_family, SOCK_STREAM);
    if (a < 0) return -1;
    int one = 1;
    if (peer->ss_family == AF_INET6) setsockopt(a, IPPROTO_IPV6, IPV6_FREEBIND, &one, sizeof(one));
    else setsockopt(a, IPPROTO_IP, IP_FREEBIND, &one, sizeof(one));
    setsockopt(a, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    nodelay(a);
    if (bind(a, (const struct sockaddr *)&from, sa_len(&from)) == 0 &&
        (connect(a, (const struct sockaddr *)to, sa_len(to)) == 0 || errno == EINPROGRESS)) {
      *by_port = attempt == 0;
      return a;
    }
    close(a);
  }
  return -1;
}

static void accept_in(struct mirror_fd *m) {
  for (;;) {
    struct sockaddr_storage peer = {0}, me = {0};
    socklen_t pl = sizeof(peer), ml = sizeof(me);
    int b = accept4(m->fd, (struct sockaddr *)&peer, &pl, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (b < 0) {
      if (accept_failed(m->fd, m, "accepting through NetKernel for a program's listener")) return;
      continue;
    }
    nodelay(b);
    getsockname(b, (struct sockaddr *)&me, &ml);
    bool by_port;
    int a = connect_as(&peer, &me, false, &by_port);
    if (a < 0) {
      close_reset(b);
      continue;
    }
    relay(a, b, true, false, &peer, &me, by_port);
  }
}

long busy_until;

void busy(void) { busy_until = now_ms() + BUSY_FOR_MS; }

long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int diag_fd = -1;

/* Sockets NetKernel made in the namespace — the engine's loopback half of a preloaded
 * program's socket, the launcher's TPROXY sockets — belong to root, whom the tenant's user
 * namespace does not map: sock_diag shows them with the overflow uid. They are not a
 * program's to mirror (the engine already listens for a preloaded one). A program's own
 * socket made as its uid 65534 (nobody) looks the same: it is told apart by a process of the
 * tenant holding it (preloaded programs are not dumpable, so theirs are not looked into).
 * Answers are kept for the sockets seen in the last scans. */
#define OVERFLOW_UID 65534u
#define HELD_CACHE   256
static struct {
  uint32_t ino;
  bool held;
  long seen;
} held_cache[HELD_CACHE];
static long scan_gen;

static bool inode_in_proc(uint32_t ino) {
  char want[32];
  snprintf(want, sizeof(want), "socket:[%u]", ino);
  DIR *proc = opendir("/proc");
  if (!proc) return false;
  bool found = false;
  for (struct dirent *p; !found && (p = readdir(proc));) {
    if (p->d_name[0] < '1' || p->d_name[0] > '9') continue;
    char path[300];
    snprintf(path, sizeof(path), "/proc/%s/fd", p->d_name);
    DIR *fds = opendir(path);
    if (!fds) continue;
    for (struct dirent *f; !found && (f = readdir(fds));) {
      char link[600], target[64];
      if (f->d_name[0] == '.') continue;
      snprintf(link, sizeof(link), "%s/%s", path, f->d_name);
      ssize_t n = readlink(link, target, sizeof(target) - 1);
      if (n > 0) {
        target[n] = 0;
        found = !strcmp(target, want);
      }
    }
    closedir(fds);
  }
  closedir(proc);
  return found;
}

static bool held_by_a_program(uint32_t ino) {
  int free_slot = -1;
  for (int i = 0; i < HELD_CACHE; i++) {
    if (held_cache[i].ino == ino && held_cache[i].seen >= scan_gen - 1) {
      held_cache[i].seen = scan_gen;
      return held_cache[i].held;
    }
    if (free_slot < 0 && (!held_cache[i].ino || held_cache[i].seen < scan_gen - 1)) free_slot = i;
  }
  bool held = inode_in_proc(ino);
  if (free_slot >= 0) held_cache[free_slot] = (typeof(held_cache[0])){ino, held, scan_gen};
  return held;
}

/* One sock_diag dump of `family`'s TCP listeners (UDP: unconnected sockets), each passed to
 * `found` with its address, port and v6only. */
static void scan_family(int family, int protocol,
                        void (*found)(int family, const uint8_t *addr, uint16_t port,
                                      bool v6only)) {
  struct {
    struct nlmsghdr nh;
    struct inet_diag_req_v2 r;
  } req = {
      .nh = {.nlmsg_len = sizeof(req),
             .nlmsg_type = SOCK_DIAG_BY_FAMILY,
             .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP},
      .r = {.sdiag_family = (uint8_t)family,
            .sdiag_protocol = (uint8_t)protocol,
            .idiag_states = protocol == IPPROTO_UDP ? 1u << 7 /* TCP_CLOSE */
                                                    : 1u << 10 /* TCP_LISTEN */},
  };
  if (send(diag_fd, &req, sizeof(req), 0) < 0) return;
  static char buf[32768] __attribute__((aligned(8)));
  for (;;) {
    ssize_t n = recv(diag_fd, buf, sizeof(buf), 0);
    if (n <= 0) return;
    for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
      if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR) return;
      if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY) continue;
      if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg))) continue;
      struct inet_diag_msg *d = NLMSG_DATA(h);
      uint8_t addr[16] = {0};
      memcpy(addr, d->id.idiag_src, family == AF_INET6 ? 16 : 4);
      uint16_t port = ntohs(d->id.idiag_sport);
      if (is_loopback(family, addr) || port == 0) continue;
      bool v6only = false;
      int alen = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*d)));
      for (struct rtattr *at = (void *)(d + 1); RTA_OK(at, alen); at = RTA_NEXT(at, alen))
        if (at->rta_type == INET_DIAG_SKV6ONLY && RTA_PAYLOAD(at) >= 1)
          v6only = *(uint8_t *)RTA_DATA(at) != 0;
      /* Only the tenant's own addresses and wildcards: the relay's own sockets are bound to
       * loopback or to peers' addresses. */
      bool own = is_any(family, addr) ||
                 (family == AF_INET && tenant4.ss_family &&
                  !memcmp(addr, &((struct sockaddr_in *)&tenant4)->sin_addr, 4)) ||
                 (family == AF_INET6 && tenant6.ss_family &&
                  !memcmp(addr, &((struct sockaddr_in6 *)&tenant6)->sin6_addr, 16));
      if (own && (d->idiag_uid != OVERFLOW_UID || held_by_a_program(d->idiag_inode)))
        found(family, addr, port, v6only);
    }
  }
}

static void tcp_listener_found(int family, const uint8_t *addr, uint16_t port, bool v6only) {
  for (unsigned i = 0; i < n_mirrors; i++) {
    struct mirror *m = mirrors[i];
    if (m->family == family && m->port == port && m->v6only == v6only &&
        !memcmp(m->addr, addr, family == AF_INET6 ? 16 : 4)) {
      m->seen = true;
      for (int k = 0; k < 2; k++)
        if (m->fds[k].wanted && m->fds[k].fd < 0) mirror_listen(&m->fds[k]);
      return;
    }
  }
  mirror_open(family, addr, port, v6only);
}

static void scan(void) {
  resume_listeners();
  retry_waiting();
  if (diag_fd < 0) {
    diag_fd = (int)syscall(SYS_socket, AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (diag_fd < 0) return;
  }
  for (unsigned i = 0; i < n_mirrors; i++) mirrors[i]->seen = false;
  scan_gen++;
  scan_family(AF_INET, IPPROTO_TCP, tcp_listener_found);
  scan_family(AF_INET6, IPPROTO_TCP, tcp_listener_found);
  udp_scan_begin();
  scan_family(AF_INET, IPPROTO_UDP, udp_socket_found);
  scan_family(AF_INET6, IPPROTO_UDP, udp_socket_found);
  udp_scan_end(now_ms());
  /* A program's listener that is gone: its mirror goes too (connections already accepted
   * stay). */
  for (unsigned i = 0; i < n_mirrors;) {
    struct mirror *m = mirrors[i];
    if (m->seen) {
      i++;
      continue;
    }
    mirror_close(m);
    mirrors[i] = mirrors[--n_mirrors];
    busy();
  }
}

/* A program's listener that closes is seen at once, not at the next scan: its mirror would
 * otherwise hold the port for up to a scan's interval, and a program started on that port
 * with GuestLib meanwhile would find it taken (EADDRINUSE). The kernel announces each TCP
 * socket of the namespace as it is destroyed (sock_diag's destroy groups); a filter keeps
 * all but the listeners' announcements from waking us. Unavailable (an older kernel): the
 * scans alone. */
static struct {
  enum kind kind; /* K_GONE */
  int fd;
} gone = {K_GONE, -1};

static void watch_listeners_go(void) {
  int fd = (int)syscall(SYS_socket, AF_NETLINK, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        NETLINK_SOCK_DIAG);
  if (fd < 0) return;
  /* Accept a message whose inet_diag_msg (after the 16-byte nlmsghdr) has idiag_state
   * TCP_LISTEN; drop the rest. */
  struct sock_filter code[] = {
      BPF_STMT(BPF_LD | BPF_B | BPF_ABS,
               NLMSG_HDRLEN + offsetof(struct inet_diag_msg, idiag_state)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 10 /* TCP_LISTEN */, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, 0xffff),
      BPF_STMT(BPF_RET | BPF_K, 0),
  };
  struct sock_fprog prog = {.len = sizeof(code) / sizeof(code[0]), .filter = code};
  int groups[] = {SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY};
  bool ok = setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog)) == 0;
  for (int i = 0; ok && i < 2; i++)
    ok = setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &groups[i], sizeof(int)) == 0;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &gone};
  if (!ok || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
    say("listeners that close are found by the scans only: %s", strerror(errno));
    close(fd);
    return;
  }
  gone.fd = fd;
}

/* A listener went: its announcements read (ENOBUFS: some were lost, which the scan that
 * follows makes up for). */
static void listener_gone(void) {
  static char buf[8192] __attribute__((aligned(8)));
  for (;;) {
    ssize_t n = recv(gone.fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 && errno == ENOBUFS) continue;
    if (n <= 0) return;
  }
}

/* -- main ------------------------------------------------------------------------------------ */

static int serve(int port, int udp4, int udp6) {
  /* Two descriptors per relayed connection: as many as the sandbox lets us have. */
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return 1;
  out4.fd = listen_kernel(AF_INET, "127.0.0.1", port);
  out6.fd = listen_kernel(AF_INET6, "::1", port);
  if (out4.fd < 0 && out6.fd < 0) return 1;
  find_tenant_addresses();
  udp_init(udp4, udp6);
  watch_listeners_go();
  say("relaying on port %d", port);
  long next_scan = 0;
  busy_until = now_ms() + BUSY_FOR_MS;
  struct epoll_event evs[64];
  for (;;) {
    long now = now_ms();
    if (now >= next_scan) {
      scan();
      next_scan = now + (now < busy_until ? SCAN_MS : SCAN_IDLE_MS);
    }
    int n = epoll_wait(ep, evs, 64, (int)(next_scan - now));
    for (int i = 0; i < n; i++) {
      enum kind k = *(enum kind *)evs[i].data.ptr;
      if (k == K_OUT_LISTENER) {
        accept_out(evs[i].data.ptr);
      } else if (k == K_MIRROR) {
        accept_in(evs[i].data.ptr);
      } else if (k == K_GONE) {
        listener_gone();
        next_scan = 0; /* its mirror goes now */
      } else if (k != K_END) {
        udp_event(evs[i].data.ptr);
      } else {
        struct end *e = evs[i].data.ptr;
        pump(e->c, e, evs[i].events);
      }
    }
    bury();
    udp_bury();
  }
}

int main(int argc, char **argv) {
  int port = DEFAULT_PORT, udp4 = -1, udp6 = -1;
  const char *log_path = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--log") && i + 1 < argc) log_path = argv[++i];
    else if (!strcmp(argv[i], "--udp4-fd") && i + 1 < argc) udp4 = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--udp6-fd") && i + 1 < argc) udp6 = atoi(argv[++i]);
    else {
      fprintf(stderr,
              "usage: netkernel-relay [--port N] [--log FILE] [--udp4-fd FD] [--udp6-fd FD]\n");
      return 2;
    }
  }
  if (port <= 0 || port > 65535) {
    fprintf(stderr, "netkernel-relay: --port must be 1..65535\n");
    return 2;
  }
  if (log_path) logf = fopen(log_path, "ae");
  signal(SIGPIPE, SIG_IGN);
  /* The parent only restarts the relay if it dies; it makes no sockets. */
  for (;;) {
    pid_t pid = fork();
    if (pid == 0) {
      /* The parent is what keeps the tenant's namespaces up (the holder's init waits for
       * all its children): if it is killed, the worker goes too and the namespaces end. */
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() == 1) _exit(1);
      _exit(serve(port, udp4, udp6));
    }
    if (pid < 0) {
      sleep(RESTART_DELAY_S);
      continue;
    }
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    say("relay exited (%s %d); restarting", WIFSIGNALED(st) ? "signal" : "status",
        WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    sleep(RESTART_DELAY_S);
  }
}
