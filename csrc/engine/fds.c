/* File descriptors at the trust boundary: those a tenant (or an external NSM) hands the engine,
 * the engine's own budget of descriptors, and each tenant's share of it.
 *
 * Closing a file can block: the last close() of a TCP socket with SO_LINGER waits for its
 * unsent data for up to the linger time, a file on a stuck FUSE mount waits for its daemon.
 * A descriptor a tenant passed in, and any socket a tenant can queue SCM_RIGHTS messages on
 * (closing it releases the descriptors still queued there, in the closer's context), is
 * therefore closed by a thread of its own, never by the engine's loop (nk_close_later). The
 * proxy ends refuse descriptors altogether where the kernel offers it (SO_PASSRIGHTS, 6.16);
 * everything read from them is read with room for every descriptor a message can carry and
 * for the credentials, pidfd and security label a tenant can ask the kernel to add (it made
 * the pair, so it may set SO_PASSCRED on our end), so the kernel never drops one (and closes
 * it) in the engine's context. The closer itself must not be stuck for good: before a socket
 * is closed its close is made abortive (SO_LINGER 0) and a UNIX socket is emptied of the
 * descriptors queued on it, which get the same treatment.
 *
 * Budget: the engine raises its descriptor limit to the hard limit at start. A tenant takes
 * what its sockets hold (the proxy end, and each endpoint's kernel socket) and one per control
 * connection. It may take all the engine has but a reserve kept for each other tenant
 * (NK_TENANT_FD_RESERVE, less when there are many), within what max_sockets allows; beyond
 * that it gets EMFILE, as a process gets at its descriptor limit. When the engine itself runs
 * short, ENFILE, as at the system's.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include "engine.h"

#ifndef SO_PASSRIGHTS
#define SO_PASSRIGHTS 83 /* Linux 6.16 */
#endif
#ifndef SO_PASSPIDFD
#define SO_PASSPIDFD 76 /* Linux 6.5 */
#endif
#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif

static pthread_mutex_t closer_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t closer_cv = PTHREAD_COND_INITIALIZER;
static int *closer_q; /* first in, first out: closer_q[closer_head .. closer_n) */
static size_t closer_head, closer_n, closer_cap;
static bool closer_up;

/* Read until nothing is queued. A read of 0 is the end of a stream; on a SEQPACKET or
 * datagram socket it is also an empty message (with descriptors, maybe), which the kernel
 * does not tell apart from the end: a run of them is taken for the end. */
static void drain(int fd, bool stream) {
  static char buf[65536]; /* the closer's own: one thread */
  for (int i = 0, empty = 0; i < 4096 && empty < 8; i++) {
    ssize_t n = nk_recv_untrusted(fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n < 0 || (n == 0 && stream)) break;
    empty = n == 0 ? empty + 1 : 0;
  }
}

/* What a close of fd could wait for, taken away first: a socket's linger (the close sends a
 * reset instead of waiting for unsent data) and, for a UNIX socket, the descriptors queued on
 * it or on connections waiting in its accept queue (released by the close, they would be
 * closed here as they are: each is queued to the closer instead). The budget bounds the work
 * one descriptor costs; what is left after it is released by the close. */
static void defuse(int fd) {
  struct linger l = {1, 0};
  if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l)) < 0) return; /* not a socket */
  int v = 0;
  socklen_t len = sizeof(v);
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &len) < 0 || v != AF_UNIX) return;
  int off = 0;
  setsockopt(fd, SOL_SOCKET, SO_PASSRIGHTS, &off, sizeof(off));
  len = sizeof(v);
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) == 0 && v) {
    /* Never blocks: O_NONBLOCK on the file (a tenant holding it too sees that: its doing). */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return;
    for (int i = 0; i < 1024; i++) {
      int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c < 0) break;
      nk_close_later(c);
    }
    return;
  }
  len = sizeof(v);
  drain(fd, getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &len) == 0 && v == SOCK_STREAM);
}

/* A proxy end a tenant made, as the engine checked it when it came (control.c proxy_fd_ok):
 * a connected AF_UNIX SOCK_SEQPACKET socket, which can neither linger nor listen, so only
 * what the tenant may have queued on it since is left to take. */
static void defuse_proxy(int fd) {
  int off = 0;
  setsockopt(fd, SOL_SOCKET, SO_PASSRIGHTS, &off, sizeof(off));
  drain(fd, false);
}

/* Descriptors queued to the closer or being closed: still the engine's until closed. */
static _Atomic uint64_t closer_pending;
/* A queue entry: the descriptor, with this bit for a proxy end (nk_close_later_proxy).
 * Descriptors stay below it: the kernel's most (fs.nr_open) is 2^20 by default. */
#define CLOSE_PROXY (1 << 30)

static void *closer_main(void *arg) {
  (void)arg;
  for (;;) {
    pthread_mutex_lock(&closer_mu);
    while (closer_head == closer_n) pthread_cond_wait(&closer_cv, &closer_mu);
    int entry = closer_q[closer_head++];
    if (closer_head == closer_n) closer_head = closer_n = 0;
    pthread_mutex_unlock(&closer_mu);
    int fd = entry & ~CLOSE_PROXY;
    if (entry & CLOSE_PROXY) defuse_proxy(fd);
    else defuse(fd);
    close(fd);
    atomic_fetch_sub(&closer_pending, 1);
  }
  return NULL;
}

static void close_later(int fd, int flags) {
  if (fd < 0) return;
  pthread_mutex_lock(&closer_mu);
  if (closer_up && closer_n == closer_cap && closer_head > 0) {
    memmove(closer_q, closer_q + closer_head, (closer_n - closer_head) * sizeof(int));
    closer_n -= closer_head;
    closer_head = 0;
  }
  if (closer_up && closer_n == closer_cap) {
    size_t cap = closer_cap ? 2 * closer_cap : 1024;
    int *q = realloc(closer_q, cap * sizeof(int));
    if (q) {
      closer_q = q;
      closer_cap = cap;
    }
  }
  bool queued = closer_up && closer_n < closer_cap;
  if (queued) {
    atomic_fetch_add(&closer_pending, 1);
    closer_q[closer_n++] = fd | flags;
    pthread_cond_signal(&closer_cv);
  }
  pthread_mutex_unlock(&closer_mu);
  if (!queued) {
    /* No closer (out of memory): a reset never lingers, which is the case that matters. */
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    close(fd);
  }
}

void nk_close_later(int fd) { close_later(fd, 0); }

void nk_close_later_proxy(int fd) { close_later(fd, CLOSE_PROXY); }

/* A proxy end refuses descriptors from now on, where the kernel can (true then). One the
 * tenant made (`fresh` false) may come with messages queued and with SO_PASSCRED,
 * SO_PASSPIDFD or SO_PASSSEC set: what is queued is read and dropped; the options are left,
 * since a tenant that kept a copy of this end could set them again at any time, and every
 * read from a proxy leaves room for the credentials, pidfd and label they add (fds.c, top).
 * One the engine has just made and not handed out has neither. */
bool nk_fd_refuse_rights(int fd, bool fresh) {
  int off = 0;
  bool refused = setsockopt(fd, SOL_SOCKET, SO_PASSRIGHTS, &off, sizeof(off)) == 0;
  if (fresh) return refused;
  char buf[NK_BLOCKER_SIZE];
  for (int i = 0; i < 64 && nk_recv_untrusted(fd, buf, sizeof(buf), MSG_DONTWAIT) >= 0; i++) {}
  return refused;
}

/* recv() for a socket a tenant writes to: descriptors that come along are taken and closed
 * by the closer (a recv without room for them would have the kernel close them here). */
ssize_t nk_recv_untrusted(int fd, void *buf, size_t len, int flags) {
  union {
    char buf[NK_UNTRUSTED_CMSG_SPACE];
    struct cmsghdr align;
  } cm;
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  struct msghdr mh = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
  ssize_t n = recvmsg(fd, &mh, flags | MSG_CMSG_CLOEXEC);
  if (n >= 0 && !(flags & MSG_PEEK)) nk_fds_from_cmsg(&mh, NULL, 0);
  return n;
}

/* The descriptors of a received message: the first `want` go to out[] (the rest of out[] is
 * -1), every other one to the closer; a pidfd a peer had the kernel add (SO_PASSPIDFD) is
 * closed. Returns how many SCM_RIGHTS descriptors there were. */
int nk_fds_from_cmsg(struct msghdr *mh, int *out, int want) {
  if (mh->msg_flags & MSG_CTRUNC)
    NK_LOG(1, "a message's control data did not all fit: the kernel closed what did not");
  for (struct cmsghdr *h = CMSG_FIRSTHDR(mh); h; h = CMSG_NXTHDR(mh, h)) {
    if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_PIDFD &&
        h->cmsg_len >= CMSG_LEN(sizeof(int))) {
      int pidfd; /* a descriptor too, but closing it is quick */
      memcpy(&pidfd, CMSG_DATA(h), sizeof(int));
      close(pidfd);
    }
  }
  return nk_take_fds(mh, out, want, nk_close_later);
}

/* ---- the budget ---- */

int nk_fds_init(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    if (rl.rlim_cur < rl.rlim_max) {
      rl.rlim_cur = rl.rlim_max;
      setrlimit(RLIMIT_NOFILE, &rl);
      getrlimit(RLIMIT_NOFILE, &rl);
    }
    engine.fd_limit = rl.rlim_cur > (rlim_t)INT32_MAX ? INT32_MAX : (uint64_t)rl.rlim_cur;
  } else {
    engine.fd_limit = 1024;
  }
  nk_fds_recount();
  /* One descriptor kept spare: a listener whose accept() fails for lack of descriptors stays
   * readable, and the engine would spin on it; with the spare it takes the connection off the
   * queue and refuses it. */
  engine.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  pthread_t th;
  pthread_attr_t at;
  pthread_attr_init(&at);
  pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&at, 64 * 1024);
  int r = pthread_create(&th, &at, closer_main, NULL);
  pthread_attr_destroy(&at);
  if (r != 0) return -r;
  pthread_mutex_lock(&closer_mu);
  closer_up = true;
  pthread_mutex_unlock(&closer_mu);
  return 0;
}

/* accept4() that never leaves a connection queued for lack of descriptors. */
int nk_accept_or_drop(int lfd, struct sockaddr *sa, socklen_t *len, bool *dropped) {
  *dropped = false;
  int fd = accept4(lfd, sa, len, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd >= 0 || (errno != EMFILE && errno != ENFILE) || engine.spare_fd < 0) return fd;
  int e = errno;
  close(engine.spare_fd);
  fd = accept4(lfd, sa, len, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd >= 0) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l)); /* a TCP peer gets a reset */
    nk_close_later(fd);
    *dropped = true;
  }
  engine.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  errno = e;
  return -1;
}

/* Descriptors the engine can hand out to tenants: its limit less what it needs for itself
 * (listeners, epoll, each tenant's doorbell, DNS and sock_diag sockets, each NSM's), and the
 * part of them kept for each tenant however busy the others are. Recomputed when tenants or
 * NSMs come and go, so that taking a descriptor stays O(1). */
void nk_fds_recount(void) {
  uint64_t own = 128, tenants = 0;
  for (struct nk_tenant *t = engine.tenants; t; t = t->next) own += 4, tenants++;
  for (struct nk_nsm *m = engine.nsms; m; m = m->next) own += 8;
  engine.fd_headroom = engine.fd_limit > own ? engine.fd_limit - own : 0;
  /* At most half of the headroom is kept back in all, whatever the number of tenants. */
  uint64_t reserve = NK_TENANT_FD_RESERVE;
  if (tenants && reserve > engine.fd_headroom / (2 * tenants))
    reserve = engine.fd_headroom / (2 * tenants);
  engine.fd_reserve = reserve;
  engine.fds_committed = 0;
  for (struct nk_tenant *t = engine.tenants; t; t = t->next)
    engine.fds_committed += t->fds > reserve ? t->fds : reserve;
}

static uint64_t committed(uint32_t fds) {
  return fds > engine.fd_reserve ? fds : engine.fd_reserve;
}

/* What max_sockets allows t: each socket's proxy end and endpoints, and its control
 * connections; unlimited without max_sockets. */
static uint64_t tenant_cap(const struct nk_tenant *t) {
  return t->max_sockets ? (uint64_t)t->max_sockets * (NK_MAX_EP + 1) + NK_CTL_FDS : UINT64_MAX;
}

/* The most descriptors t could hold now: its cap, and what the others' reserves leave. */
uint64_t nk_tenant_fd_limit(const struct nk_tenant *t) {
  uint64_t others = engine.fds_committed - committed(t->fds);
  uint64_t free = engine.fd_headroom > others ? engine.fd_headroom - others : 0;
  uint64_t cap = tenant_cap(t);
  return cap < free ? cap : free;
}

/* May t take n descriptors of its budget? 0, -EMFILE (t's share is used up: its cap, or
 * what the other tenants' reserves leave) or -ENFILE (the engine's). */
int nk_fds_may_take(const struct nk_tenant *t, uint32_t n) {
  if (t->fds + (uint64_t)n > tenant_cap(t)) return -EMFILE;
  /* What the closer has yet to close is not given out again: if it falls behind, tenants
   * get ENFILE before the engine itself runs out. */
  uint64_t pending = atomic_load(&closer_pending);
  if (engine.fds_taken + pending + n > engine.fd_headroom) return -ENFILE;
  uint64_t after = engine.fds_committed - committed(t->fds) + committed(t->fds + n);
  return after + pending > engine.fd_headroom ? -EMFILE : 0;
}

int nk_fds_take(struct nk_tenant *t, uint32_t n) {
  int r = nk_fds_may_take(t, n);
  if (r < 0) return r;
  engine.fds_committed += committed(t->fds + n) - committed(t->fds);
  t->fds += n;
  engine.fds_taken += n;
  return 0;
}

void nk_fds_give(struct nk_tenant *t, uint32_t n) {
  engine.fds_committed -= committed(t->fds);
  t->fds -= n;
  engine.fds_committed += committed(t->fds);
  engine.fds_taken -= n;
}
