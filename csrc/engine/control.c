/* Control connections from tenant processes (one per guest thread).
 *
 * A connection's tenant is decided when it is accepted, from SO_PEERCRED and the network
 * namespace of that process, never from anything the process sends (DESIGN §D). A process
 * outside every tenant's namespace is refused. Requests are fixed-size and validated field by
 * field; a malformed request gets an error reply, a malformed stream closes the connection.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>

#include "engine.h"
#include "netkernel/preopt.h"

struct nk_ctl {
  int fd;
  int refused; /* -EMFILE: over the tenant's share; the first request learns it, then close */
  struct nk_tenant *t;
  struct nk_handle h;
  struct nk_ctl *next;
};
static struct nk_ctl *ctls;
static int ctl_listen_fd = -1;
static struct nk_handle h_ctl_listen = {NK_H_CTL_LISTEN, 0, NULL};

/* fd >= 0: a listening socket the daemon made and keeps, so that it outlives this engine
 * (tenants' sandboxes bind-mount the socket file: a new socket at the path would not reach
 * them) and connections made while no engine runs wait in its queue for the next one. */
int nk_control_listen(const char *path, int fd) {
  /* Tenant processes run as various users (nginx workers as www-data): the socket is open to
   * all, and the namespace check on each connection decides. */
  bool kept = fd >= 0;
  if (fd < 0) fd = nk_unix_listen(path, SOCK_SEQPACKET, 0666, 512);
  if (fd < 0) return fd;
  ctl_listen_fd = fd;
  if (!kept) nk_control_serve();
  return 0;
}

/* The daemon's socket is answered once the daemon has added every tenant back ("serve"):
 * a process whose tenant this engine does not know yet would be refused, not kept waiting. */
void nk_control_serve(void) {
  static bool serving;
  if (serving || ctl_listen_fd < 0) return;
  serving = true;
  nk_keep_finish();
  nk_epoll_add(ctl_listen_fd, EPOLLIN, &h_ctl_listen);
}

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#define NK_PIDFD_GET_NET_NAMESPACE _IO(0xFF, 4) /* linux/pidfd.h, Linux 6.11 */

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

/* The network namespace of the process at the other end of a Unix connection. With a pidfd
 * (Linux 6.5+ SO_PEERPIDFD) this names exactly the process that connected, even if its pid was
 * since reused: the namespace is asked from the pidfd (6.11+), or read from /proc/PID while
 * the pidfd is held and believed only if that process is still alive afterwards (a pid is not
 * reused while its process lives). Kernels without SO_PEERPIDFD get /proc/PID alone. */
uint64_t nk_peer_netns(int fd, struct ucred *cred) {
  socklen_t l = sizeof(*cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, &l) < 0) return 0;
  int pidfd = -1;
  l = sizeof(pidfd);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &l) < 0) pidfd = -1;
  if (pidfd >= 0) {
    int ns = ioctl(pidfd, NK_PIDFD_GET_NET_NAMESPACE, 0);
    if (ns >= 0) {
      close(pidfd);
      struct stat st;
      uint64_t ino = fstat(ns, &st) == 0 ? st.st_ino : 0;
      close(ns);
      return ino;
    }
    if (errno == ESRCH) { /* the process that connected is gone */
      close(pidfd);
      return 0;
    }
  }
  char p[64];
  snprintf(p, sizeof(p), "/proc/%d/ns/net", (int)cred->pid);
  struct stat st;
  uint64_t ino = stat(p, &st) == 0 ? st.st_ino : 0;
  if (pidfd >= 0) {
    if (syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0) < 0) ino = 0; /* gone: pid reusable */
    close(pidfd);
  }
  return ino;
}

static struct nk_ctl *dead_ctls;

/* Closed now, freed after the event batch (an event for it may still be queued). */
static void ctl_close(struct nk_ctl *c) {
  if (c->fd < 0) return;
  nk_epoll_del(c->fd);
  /* The tenant may have queued messages with descriptors on it: closing it releases them. */
  nk_close_later(c->fd);
  c->fd = -1;
  if (!c->refused) nk_fds_give(c->t, 1);
  else c->t->ctls_refused--;
  c->t->ctls--;
  for (struct nk_ctl **p = &ctls; *p; p = &(*p)->next)
    if (*p == c) {
      *p = c->next;
      break;
    }
  c->next = dead_ctls;
  dead_ctls = c;
}

/* A live upgrade: each tenant's control connection goes to the next engine, requests queued on
 * it included (each was answered before this engine took the next). A refused one is not: it
 * closes with this engine, and its process's next request goes again on a new connection. */
unsigned nk_control_hand_over(void) {
  unsigned n = 0;
  for (struct nk_ctl *c = ctls; c; c = c->next)
    if (c->fd >= 0 && !c->refused && c->t && nk_keep_ctl(c->t, c->fd)) n++;
  return n;
}

int nk_control_adopt(struct nk_tenant *t, int fd) {
  struct nk_ctl *c = calloc(1, sizeof(*c));
  if (!c) return -ENOMEM;
  if (nk_fds_take(t, 1) < 0) {
    free(c);
    return -EMFILE;
  }
  c->fd = fd;
  c->t = t;
  t->ctls++;
  c->h = (struct nk_handle){NK_H_CTL, 0, c};
  c->next = ctls;
  ctls = c;
  nk_epoll_add(fd, EPOLLIN | EPOLLRDHUP, &c->h);
  return 0;
}

void nk_control_reap(void) {
  while (dead_ctls) {
    struct nk_ctl *c = dead_ctls;
    dead_ctls = c->next;
    free(c);
  }
}

/* Forget tenant pointers of connections when a tenant goes away. */
void nk_control_forget_tenant(struct nk_tenant *t);
void nk_control_forget_tenant(struct nk_tenant *t) {
  struct nk_ctl *c = ctls;
  while (c) {
    struct nk_ctl *n = c->next;
    if (c->t == t) ctl_close(c);
    c = n;
  }
}

/* Up to 64 connections per event: more stay queued for the next round. */
static void accept_ctl(void) {
  for (int i = 0; i < 64; i++) {
    bool dropped;
    int fd = nk_accept_or_drop(ctl_listen_fd, NULL, NULL, &dropped);
    if (fd < 0) {
      if (dropped) {
        NK_INFO("refused a control connection: the engine is out of descriptors");
        continue;
      }
      return;
    }
    struct ucred cr = {0};
    struct nk_tenant *t = nk_tenant_by_ino(nk_peer_netns(fd, &cr));
    if (!t) {
      NK_INFO("refused a control connection from pid %d: not in a tenant namespace", (int)cr.pid);
      nk_close_later(fd);
      continue;
    }
    struct nk_ctl *c = calloc(1, sizeof(*c));
    if (!c) {
      nk_close_later(fd);
      continue;
    }
    c->fd = fd;
    c->t = t;
    c->refused = nk_fds_take(t, 1) < 0 ? -EMFILE : 0;
    if (c->refused) {
      /* Held until its first request, which is answered EMFILE (GuestLib's connect fails as
       * a process's socket() does at its limit). Those are outside every budget: a few at a
       * time, the rest are closed at once. */
      NK_LOG(1, "tenant %s: control connection over its share of descriptors", t->name);
      if (t->ctls_refused >= NK_CTL_REFUSED_HELD) {
        free(c);
        nk_close_later(fd);
        continue;
      }
      t->ctls_refused++;
    }
    t->ctls++;
    c->h = (struct nk_handle){NK_H_CTL, 0, c};
    c->next = ctls;
    ctls = c;
    nk_epoll_add(fd, EPOLLIN | EPOLLRDHUP, &c->h);
  }
}

static void reply(struct nk_ctl *c, struct nk_rep *rep, const int *fds, int nfds) {
  /* The guest waits for this reply; a full socket means a broken guest: drop it. */
  if (nk_send_with_fds(sendmsg, c->fd, rep, sizeof(*rep), fds, nfds, MSG_DONTWAIT | MSG_NOSIGNAL) !=
      sizeof(*rep))
    ctl_close(c);
}

/* One end of a connected AF_UNIX SOCK_SEQPACKET pair, as GuestLib makes: not a listening
 * socket (its EPOLLIN would never be consumed: a busy loop) nor an unconnected one. Two
 * calls, made for every socket a tenant opens: the type, then the peer, which only a
 * connected socket has and whose family is the socket's own. */
static bool proxy_fd_ok(int fd) {
  int v;
  socklen_t l = sizeof(v);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &l) < 0 || v != SOCK_SEQPACKET) return false;
  struct sockaddr_storage ss;
  l = sizeof(ss);
  return getpeername(fd, (struct sockaddr *)&ss, &l) == 0 && l >= sizeof(sa_family_t) &&
         ss.ss_family == AF_UNIX;
}

/* The options GuestLib recorded in the slot while the socket had no kernel socket (abi.h
 * NK_PREOPT_*), applied in place of the setsockopt() requests they stand for. O2: taken before a
 * request and again after it, once the request has stored the socket's new state; pairs with
 * O1 in GuestLib (one recorded while a bind or connect was on its way is seen here or taken
 * back there). A tenant can only set options on its own sockets this way, as it could with
 * setsockopt(); bits that name no option are dropped. */
static void take_preopts(struct nk_esock *es) {
  struct nk_slot *s = nk_sock_slot(es);
  if (es->kind == NK_KIND_DGRAM || !atomic_load(&s->preopts)) return;
  uint32_t p = atomic_exchange(&s->preopts, 0);
  for (int i = 0; i < NK_PREOPT_COUNT; i++) {
    if (!(p & (1u << i))) continue;
    int v = (p >> (NK_PREOPT_VALUE + i)) & 1;
    (void)nk_sock_setopt_known(es, nk_preopts[i].level, nk_preopts[i].name, v);
  }
}

/* Linux lets a TCP socket whose connect failed connect again. Here the failure hung up its
 * proxy (the guest end reads POLLHUP, then POLLOUT), so the socket goes on as a
 * new one on the fresh proxy rfd, with the old one's options and bind; the old slot stays
 * reserved until its guest end is gone (GuestLib puts the new end in its place). */
static void renew(struct nk_tenant *t, const struct nk_req *req, int rfd, struct nk_rep *rep) {
  struct nk_esock *old = nk_esock_get(t, req->slot, req->gen);
  if (!old || old->closing || old->kind != NK_KIND_STREAM || !old->dead ||
      old->state != NK_ST_NEW) {
    rep->err = old ? -EINVAL : -EBADF;
  } else if (rfd < 0 || !proxy_fd_ok(rfd)) {
    rep->err = -EINVAL;
  } else {
    struct nk_esock *es = nk_esock_alloc(t, rfd, old->family, SOCK_STREAM, req->inode);
    if (!es) {
      rep->err = -errno;
    } else {
      rfd = -1;
      (void)nk_fd_refuse_rights(es->proxy, false);
      es->proxy_in_tenant_ns = true;
      nk_epoll_add(es->proxy, EPOLLIN, &es->h_proxy);
      nk_opts_share(es, old);
      es->sndbuf = old->sndbuf;
      es->rcvbuf = old->rcvbuf;
      es->linger = old->linger;
      es->linger0 = old->linger0;
      es->v6only = old->v6only;
      /* An explicit bind outlives the failed attempt, as Linux's does. */
      if (old->bound) {
        struct nk_addr b = old->bind_addr;
        int r = nk_sock_bind(es, &b);
        if (r < 0)
          NK_LOG(1, "tenant %s slot %u: bind again after a failed connect: %s", t->name, es->slot,
                 strerror(-r));
      }
      NK_LOG(1, "tenant %s slot %u renewed as slot %u after a failed connect", t->name, old->slot,
             es->slot);
      rep->slot = es->slot;
      rep->gen = es->gen;
    }
  }
  if (rfd >= 0) nk_close_later(rfd);
}

static void handle_req(struct nk_ctl *c, struct nk_req *req, int rfd) {
  struct nk_rep rep;
  memset(&rep, 0, sizeof(rep));
  struct nk_tenant *t = c->t;
  if (c->refused) {
    if (rfd >= 0) nk_close_later(rfd);
    rep.err = c->refused;
    reply(c, &rep, NULL, 0);
    ctl_close(c);
    return;
  }
  if (req->op == NK_OP_REGISTER) {
    /* REGISTER takes no descriptor. One sent along anyway would otherwise stay open in the
     * engine for good, outside every budget: a tenant repeating that would fill the engine's
     * descriptor table (found by tests/fuzz/fuzz_control.c). */
    if (rfd >= 0) nk_close_later(rfd);
    struct nk_reginfo info = {
        .region_size = t->size, .tenant_id = t->id, .ipv4 = t->ipv4, .ipv6 = t->ipv6};
    memcpy(rep.optval, &info, sizeof(info));
    int fds[2] = {t->memfd, t->doorbell_fd};
    reply(c, &rep, fds, 2);
    return;
  }
  if (req->op == NK_OP_SOCKET) {
    int domain = req->arg0, type = req->arg1;
    if (rfd < 0 || !proxy_fd_ok(rfd)) {
      rep.err = -EINVAL;
    } else if (domain != AF_INET && domain != AF_INET6) {
      rep.err = -EAFNOSUPPORT;
    } else if (type != SOCK_STREAM && type != SOCK_DGRAM) {
      rep.err = -EPROTONOSUPPORT;
    } else {
      struct nk_esock *es = nk_esock_alloc(t, rfd, domain, type, req->inode);
      if (!es) {
        rep.err = -errno; /* EMFILE / ENOBUFS from the tenant's limits, logged there */
      } else {
        rfd = -1; /* owned by the socket now */
        /* The tenant made this pair and may keep a copy of our end, on which it can allow
         * descriptors again and queue them: its close goes to the closer all the same. */
        (void)nk_fd_refuse_rights(es->proxy, false);
        es->proxy_rights_refused = false;
        es->proxy_in_tenant_ns = true;
        nk_epoll_add(es->proxy, EPOLLIN, &es->h_proxy);
        rep.slot = es->slot;
        rep.gen = es->gen;
      }
    }
    if (rfd >= 0) nk_close_later(rfd);
    reply(c, &rep, NULL, 0);
    return;
  }
  if (req->op == NK_OP_ATTACH) {
    struct nk_esock *es = nk_esock_get(t, req->slot, req->gen);
    if (!es || es->closing) rep.err = -EBADF;
    else if (rfd < 0) rep.err = -EINVAL;
    else if ((rep.err = nk_direct_attach(es, rfd)) == 0) rfd = -1; /* the socket's now */
    if (rfd >= 0) nk_close_later(rfd);
    reply(c, &rep, NULL, 0);
    return;
  }
  if (req->op == NK_OP_RENEW) {
    renew(t, req, rfd, &rep);
    reply(c, &rep, NULL, 0);
    return;
  }
  if (rfd >= 0) nk_close_later(rfd);
  struct nk_esock *es = nk_esock_get(t, req->slot, req->gen);
  if (!es || es->closing) {
    rep.err = -EBADF;
    reply(c, &rep, NULL, 0);
    return;
  }
  uint32_t optlen = req->optlen > NK_OPT_MAX ? NK_OPT_MAX : req->optlen;
  take_preopts(es);
  switch (req->op) {
    case NK_OP_BIND:
      rep.err = nk_sock_bind(es, &req->addr);
      break;
    case NK_OP_LISTEN:
      rep.err = nk_sock_listen(es, req->arg0);
      break;
    case NK_OP_CONNECT: {
      int inprog = 0;
      rep.err = nk_sock_connect(es, &req->addr, &inprog);
      rep.val = inprog;
      break;
    }
    case NK_OP_SHUTDOWN:
      rep.err = nk_sock_shutdown(es, req->arg0);
      break;
    case NK_OP_SETSOCKOPT:
      rep.err = nk_sock_setopt(es, req->arg0, req->arg1, req->optval, optlen);
      break;
    case NK_OP_GETSOCKOPT: {
      socklen_t l = optlen;
      rep.err = nk_sock_getopt(es, req->arg0, req->arg1, rep.optval, &l);
      rep.optlen = l;
      break;
    }
    default:
      rep.err = -EOPNOTSUPP;
  }
  take_preopts(es);
  reply(c, &rep, NULL, 0);
}

static void read_ctl(struct nk_ctl *c) {
  for (int i = 0; i < 16; i++) {
    struct nk_req req;
    /* Room for every descriptor a message can carry: those that do not fit would be closed
     * by the kernel right here, in the engine's thread (see fds.c). */
    union {
      char buf[NK_UNTRUSTED_CMSG_SPACE];
      struct cmsghdr align;
    } cm;
    struct iovec iov = {.iov_base = &req, .iov_len = sizeof(req)};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
    ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EAGAIN) return;
    int rfd = -1;
    /* Also at n == 0: a message of no bytes may still carry descriptors (the kernel installs
     * them whatever the length), which would otherwise stay open in the engine unseen
     * (found by tests/fuzz/fuzz_control.c). At EOF there is no control message. */
    if (n >= 0) nk_fds_from_cmsg(&mh, &rfd, 1); /* one is asked for; more go to the closer */
    if (n != sizeof(req)) {
      if (rfd >= 0) nk_close_later(rfd);
      ctl_close(c); /* EOF, error or a malformed message */
      return;
    }
    handle_req(c, &req, rfd);
    if (c->fd < 0) return; /* closed on a failed reply */
  }
}

void nk_control_event(struct nk_handle *h, uint32_t ev) {
  if (h->type == NK_H_CTL_LISTEN) {
    accept_ctl();
    return;
  }
  struct nk_ctl *c = h->obj;
  if (c->fd < 0) return; /* closed earlier in this batch */
  if (ev & EPOLLIN) {
    read_ctl(c);
    return;
  }
  if (ev & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) ctl_close(c);
}
