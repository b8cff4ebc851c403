/* Listeners: listen(), and the connections their stacks accept, each made into a socket of
 * the listener's tenant (a fresh proxy pair) and delivered to the application's accept() as a
 * NEWCONN record carrying the guest end.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/sockios.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include "engine.h"

#define PROXY_EVENTS EPOLLIN

static struct nk_slot *slot_of(struct nk_esock *es) { return &es->t->slots[es->slot]; }

/* Kernel memory one NEWCONN record (64 bytes and a descriptor) takes on a proxy's send queue,
 * measured at start (768 bytes on 6.x kernels): a listener's proxy can then be given a send
 * buffer that holds just its backlog of not-yet-accepted connections. */
void nk_sock_calibrate(void) {
  engine.record_size = 1024;
  int sv[2], pv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return;
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pv) == 0) {
    struct nk_newconn msg = {.type = NK_MSG_NEWCONN};
    int q = 0;
    if (nk_send_with_fds(sendmsg, sv[0], &msg, sizeof(msg), &pv[1], 1, MSG_DONTWAIT) ==
            sizeof(msg) &&
        ioctl(sv[0], SIOCOUTQ, &q) == 0 && q > 0)
      engine.record_size = (uint32_t)q;
    close(pv[0]);
    close(pv[1]);
  }
  close(sv[0]);
  close(sv[1]);
}

/* Linux queues up to backlog + 1 connections that nobody accepted yet (and clamps the backlog
 * to somaxconn); connections beyond wait in the kernel, retrying their SYN. The engine holds
 * the same number on the listener's proxy: its send buffer fits that many records, so a
 * delivery beyond them fails (EAGAIN) and the rest stay in the NSM's own accept queue. (The
 * kernel's smallest send buffer fits 6 records: tiny backlogs get up to 6.) */
static void proxy_fit_backlog(struct nk_esock *l, int backlog) {
  if (l->proxy < 0) return;
  uint64_t queued = (uint64_t)(backlog < 0 ? 0 : backlog > 65535 ? 65535 : backlog) + 1;
  /* A send succeeds while the queue holds less than the buffer, so queued records fit in
   * queued * size - 1 bytes and one more does not. The kernel doubles what it is given. */
  int half = (int)((queued * engine.record_size - 1) / 2);
  if (setsockopt(l->proxy, SOL_SOCKET, SO_SNDBUFFORCE, &half, sizeof(half)) < 0)
    setsockopt(l->proxy, SOL_SOCKET, SO_SNDBUF, &half, sizeof(half));
}

static bool deliver_conn(struct nk_esock *l, int gfd, struct nk_newconn *msg) {
  return nk_send_with_fds(sendmsg, l->proxy, msg, sizeof(*msg), &gfd, 1,
                          MSG_DONTWAIT | MSG_NOSIGNAL) == sizeof(*msg);
}

/* Is listener l's queue of connections its application has not accepted yet full? Then a new
 * one would be refused or held (see proxy_fit_backlog). */
bool nk_sock_accept_queue_full(struct nk_esock *l) { return l->pending_fd >= 0; }

/* While the queue is full the NSM's listening sockets are not watched: their connections wait
 * in the kernel's accept queue (a level-triggered EPOLLIN would wake the engine for nothing
 * until the application accepts). */
static void listen_watch(struct nk_esock *l, bool on) {
  for (int k = 0; k < l->ep_count; k++)
    if (l->ep[k].ops->watch) l->ep[k].ops->watch(l, k, on ? EPOLLIN : 0);
}

/* Hand the new connection es (guest end gfd, which this call closes or keeps) to listener l's
 * application; when its accept queue is full, hold it as the one pending connection.
 * False when one is already pending: the caller refuses the connection. */
static bool deliver(struct nk_esock *l, struct nk_esock *es, int gfd) {
  struct nk_newconn msg = {.type = NK_MSG_NEWCONN,
                           .slot = es->slot,
                           .gen = es->gen,
                           .peer = es->peer,
                           .local = es->local};
  if (l->pending_fd < 0 && deliver_conn(l, gfd, &msg)) {
    close(gfd);
    return true;
  }
  if (l->pending_fd >= 0) return false;
  l->pending_fd = gfd;
  l->pending_msg = msg;
  l->pending_listen_out = true;
  nk_epoll_mod(l->proxy, PROXY_EVENTS | EPOLLOUT, &l->h_proxy);
  listen_watch(l, false);
  return true;
}

void nk_sock_accept_forget(struct nk_esock *l) {
  for (struct nk_esock **p = &l->t->refused_listeners; *p; p = &(*p)->next_refused)
    if (*p == l) {
      *p = l->next_refused;
      break;
    }
  l->accept_refused = false;
}

/* May listener l take one more connection off its stack's queue? Linux's accept() fails with
 * EMFILE at the descriptor limit and leaves the connection queued: the same here. When the
 * tenant may not open another socket, the connections stay in the stack's accept queue, the
 * slot's accept_err says why and a READY record makes the listener readable, so that accept()
 * reports it. GuestLib rings the doorbell when it does, and freeing any of the tenant's
 * sockets looks again (nk_sock_accept_retry). */
bool nk_sock_may_accept(struct nk_esock *l) {
  struct nk_slot *s = slot_of(l);
  int r = nk_tenant_admissible(l->t);
  if (r == 0) {
    if (l->accept_refused) {
      nk_sock_accept_forget(l);
      atomic_store(&s->accept_err, 0);
      listen_watch(l, true);
    }
    return true;
  }
  bool first = !l->accept_refused;
  if (first) {
    l->accept_refused = true;
    l->next_refused = l->t->refused_listeners;
    l->t->refused_listeners = l;
    listen_watch(l, false); /* the queue stays in the stack, as Linux's stays in the kernel */
    NK_EVENT("accept_refused", "tenant=%s port=%u errno=%s sockets=%u", l->t->name,
             ntohs(l->bind_addr.port), strerrorname_np(-r), l->t->nsocks);
  }
  atomic_store(&s->accept_err, -r);
  int q = 0;
  char rec = NK_MSG_READY;
  /* One record at a time: the next once accept() has taken this one (it rings the doorbell,
   * which brings the engine back here). The first goes even behind connections not yet taken:
   * once the guest has taken them its accept() must not wait for a record never sent. */
  if (l->proxy >= 0 && (first || (ioctl(l->proxy, SIOCOUTQ, &q) == 0 && q == 0)))
    send(l->proxy, &rec, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
  return false;
}

/* A socket of t went: its listeners refused for a limit may take connections again. */
void nk_sock_accept_retry(struct nk_tenant *t) {
  for (struct nk_esock *l = t->refused_listeners; l; l = l->next_refused) nk_sock_activate(l);
}

/* A new connection's engine side in listener l's tenant, as accept() makes it: a fresh proxy
 * pair (the guest end, to deliver, in *gfd), the listener's options inherited as in Linux.
 * NULL with nothing left open when the tenant is at its limits. */
static struct nk_esock *accepted_end(struct nk_esock *l, int *gfd) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return NULL;
  int one = 1;
  setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
  struct stat st;
  fstat(sv[1], &st);
  struct nk_esock *es = nk_esock_alloc(l->t, sv[0], l->family, SOCK_STREAM, st.st_ino);
  if (!es) {
    close(sv[0]);
    close(sv[1]);
    return NULL;
  }
  es->proxy_rights_refused = nk_fd_refuse_rights(sv[0], true);
  nk_opts_share(es, l);
  es->sndbuf = l->sndbuf; /* inherited, as the kernel's accepted socket inherits them */
  es->rcvbuf = l->rcvbuf;
  nk_sock_size_rings(es);
  es->linger = l->linger;
  es->linger0 = l->linger0;
  es->state = NK_ST_CONNECTED;
  atomic_store(&slot_of(es)->state, NK_ST_CONNECTED);
  es->can_read = es->can_write = true;
  nk_epoll_add(es->proxy, PROXY_EVENTS, &es->h_proxy);
  *gfd = sv[1];
  return es;
}

struct nk_esock *nk_sock_accepted(struct nk_esock *l, const struct nk_endpoint *e,
                                  const struct nk_addr *local, const struct nk_addr *peer) {
  int gfd;
  if (l->proxy < 0 || nk_sock_accept_queue_full(l)) return NULL;
  struct nk_esock *es = accepted_end(l, &gfd);
  if (!es) return NULL;
  nk_ep_set(es, 0, e);
  es->ep_count = 1;
  nk_ep_replay_opts(es, 0); /* inherited from the listener, as in Linux */
  struct nk_addr a;
  if (local) {
    a = *local;
  } else if (e->loop) {
    nk_ep_local(es, 0, &a); /* any 127/8 address: ask the stack */
  } else {
    a = e->family == AF_INET ? l->t->ipv4 : l->t->ipv6; /* the NSM listener's */
    a.port = l->bind_addr.port;
  }
  nk_sock_set_local(es, &a);
  struct nk_addr p = *peer;
  p.scope_id = 0;
  nk_sock_set_peer(es, &p);
  if (e->ops->watch) e->ops->watch(es, 0, NK_EP_DATA_EVENTS);
  deliver(l, es, gfd); /* delivered, or held until the queue drains */
  nk_sock_activate(es);
  return es;
}

/* Connections per service of a listener: a flood of them waits for the next round. */
#define NK_ACCEPTS_PER_SERVICE 64

void nk_listener_service(struct nk_esock *l) {
  if (l->pending_fd >= 0) {
    if (!deliver_conn(l, l->pending_fd, &l->pending_msg)) return;
    close(l->pending_fd);
    l->pending_fd = -1;
    if (l->pending_listen_out) {
      l->pending_listen_out = false;
      nk_epoll_mod(l->proxy, PROXY_EVENTS, &l->h_proxy);
    }
    listen_watch(l, true);
  }
  int budget = NK_ACCEPTS_PER_SERVICE;
  for (int k = 0; k < l->ep_count && budget >= 0; k++)
    if (l->ep[k].ops->accept) l->ep[k].ops->accept(l, k, &budget);
}

int nk_sock_listen(struct nk_esock *es, int backlog) {
  if (es->type != SOCK_STREAM) return -EOPNOTSUPP;
  if (es->kind == NK_KIND_LISTENER) { /* again: a new backlog */
    for (int k = 0; k < es->ep_count; k++) es->ep[k].ops->listen(es, k, backlog);
    es->backlog = backlog;
    proxy_fit_backlog(es, backlog);
    nk_keep_listener(es);
    return 0;
  }
  if (es->state != NK_ST_NEW && es->state != NK_ST_BOUND) return -EINVAL;
  if (!es->bound) {
    struct nk_addr any = {.family = (uint16_t)es->family};
    int r = nk_sock_bind(es, &any);
    if (r < 0) return r;
  }
  for (int k = 0; k < es->ep_count; k++) {
    int r = es->ep[k].ops->listen(es, k, backlog);
    if (r < 0) return r;
    es->ep[k].listening = true;
  }
  es->backlog = backlog;
  proxy_fit_backlog(es, backlog);
  es->kind = NK_KIND_LISTENER;
  es->state = NK_ST_LISTEN;
  nk_sock_size_rings(es);
  struct nk_slot *s = slot_of(es);
  s->kind = NK_KIND_LISTENER;
  atomic_store(&s->state, NK_ST_LISTEN);
  listen_watch(es, true);
  nk_shm_listener_add(es);
  nk_keep_listener(es);
  return 0;
}
