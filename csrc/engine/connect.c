/* bind() and connect(): the application's addresses mapped onto the tenant's, and the
 * endpoints that carry them opened on the tenant's NSM or its loopback (or, for connect, the
 * shared-memory path to a listener on this host).
 */
#include <errno.h>
#include <poll.h>
#include <string.h>

#include "engine.h"

static int bind_one(struct nk_esock *es, int family, bool loop, const struct nk_addr *a,
                    uint16_t port) {
  int k = nk_ep_open_here(es, family, loop);
  if (k < 0) return k;
  struct nk_addr b = *a;
  b.port = port;
  int r = es->ep[k].ops->bind(es, k, &b, false);
  return r < 0 ? r : k;
}

static uint16_t port_of(struct nk_esock *es, int k) {
  return es->ep[k].ops->port ? es->ep[k].ops->port(es, k) : 0;
}

/* Binding maps the application's address onto the tenant's: a wildcard means the tenant's
 * addresses on its NSM plus its own loopback; loopback stays in the tenant's namespace. */
static int bind_once(struct nk_esock *es, const struct nk_addr *req) {
  if (es->bound || es->ep_count) return -EINVAL;
  struct nk_tenant *t = es->t;
  struct nk_addr a = *req;
  if (a.family == 0) a.family = (uint16_t)es->family;
  if (a.family != es->family) return -EAFNOSUPPORT;
  struct nk_addr ip = a;
  nk_addr_unmap(&ip);
  uint16_t port = a.port;
  int r;
  struct nk_addr any4 = {.family = AF_INET}, any6 = {.family = AF_INET6};
  if (nk_addr_is_any(&a)) {
    if (es->family == AF_INET) {
      if ((r = bind_one(es, AF_INET, false, &t->ipv4, port)) < 0) goto fail;
      port = port_of(es, r);
      if ((r = bind_one(es, AF_INET, true, &any4, port)) < 0) goto fail;
    } else {
      if ((r = bind_one(es, AF_INET6, false, &t->ipv6, port)) < 0) goto fail;
      port = port_of(es, r);
      if (!es->v6only && (r = bind_one(es, AF_INET, false, &t->ipv4, port)) < 0) goto fail;
      if ((r = bind_one(es, AF_INET6, true, &any6, port)) < 0) goto fail;
    }
  } else if (nk_addr_is_loopback(&ip)) {
    if ((r = bind_one(es, es->family, true, &a, port)) < 0) goto fail;
    port = port_of(es, r);
  } else if (nk_addr_eq_ip(&ip, &t->ipv4) && !(es->family == AF_INET6 && es->v6only)) {
    if ((r = bind_one(es, AF_INET, false, &t->ipv4, port)) < 0) goto fail;
    port = port_of(es, r);
  } else if (nk_addr_eq_ip(&ip, &t->ipv6)) {
    if ((r = bind_one(es, AF_INET6, false, &t->ipv6, port)) < 0) goto fail;
    port = port_of(es, r);
  } else {
    return -EADDRNOTAVAIL;
  }
  es->bound = true;
  es->bind_addr = a;
  es->bind_addr.port = port;
  nk_sock_set_local(es, &es->bind_addr);
  es->state = NK_ST_BOUND;
  atomic_store(&nk_sock_slot(es)->state, NK_ST_BOUND);
  if (es->kind == NK_KIND_DGRAM)
    for (int k = 0; k < es->ep_count; k++)
      if (es->ep[k].ops->watch) es->ep[k].ops->watch(es, k, NK_EP_DATA_EVENTS);
  return 0;
fail:
  nk_ep_close_all(es, false);
  return r;
}

/* Listeners of t on port whose every guest reference is gone, their hang-up not seen yet, are
 * closed now; true if there was one. Linux's close() frees a listener's port before it
 * returns; here the engine learns of the close from the proxy's hang-up, in the same event
 * batch as, or after, a bind that the program made right after it (iperf3 opens a new
 * listener at once after a failed test, and exited on the EADDRINUSE: found by the soak). */
static bool reap_closed_listeners(struct nk_tenant *t, uint16_t port) {
  bool any = false;
  for (uint32_t i = 0; i < t->hwm; i++) {
    struct nk_esock *l = t->socks[i];
    if (!l || l->kind != NK_KIND_LISTENER || l->closing || l->freed || l->proxy < 0 ||
        l->bind_addr.port != port)
      continue;
    struct pollfd p = {.fd = l->proxy};
    if (poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR))) {
      nk_sock_proxy_event(l, EPOLLHUP);
      any = true;
    }
  }
  return any;
}

int nk_sock_bind(struct nk_esock *es, const struct nk_addr *req) {
  int r = bind_once(es, req);
  if (r == -EADDRINUSE && req->port && reap_closed_listeners(es->t, req->port))
    r = bind_once(es, req);
  return r;
}

/* A stack's answer to a connect that was under way (err 0: established). */
void nk_sock_connected(struct nk_esock *es, int err) {
  if (err) {
    nk_sock_fail(es, err, NK_END_REFUSED);
    return;
  }
  es->state = NK_ST_CONNECTED;
  struct nk_addr a;
  nk_ep_local(es, 0, &a);
  nk_sock_set_local(es, &a);
  if (es->ep[0].ops->address && es->ep[0].ops->address(es, 0, true, &a)) nk_sock_set_peer(es, &a);
  atomic_store(&nk_sock_slot(es)->state, NK_ST_CONNECTED); /* T1: after the addresses */
  nk_sock_activate(es);
}

int nk_sock_connect(struct nk_esock *es, const struct nk_addr *req, int *in_progress) {
  struct nk_slot *s = nk_sock_slot(es);
  *in_progress = 0;
  if (es->kind == NK_KIND_LISTENER) return -EISCONN;
  if (es->dead) return -ECONNABORTED;
  struct nk_addr dst = *req;
  if (dst.family == 0 && es->kind == NK_KIND_DGRAM) { /* AF_UNSPEC: dissolve the association */
    struct nk_addr none = {0};
    nk_sock_set_peer(es, &none);
    es->state = es->bound ? NK_ST_BOUND : NK_ST_NEW;
    atomic_store(&s->state, es->state);
    return 0;
  }
  if (dst.family == AF_INET6 && es->family == AF_INET) return -EAFNOSUPPORT;
  nk_addr_unmap(&dst);
  if (dst.family == AF_INET && es->family == AF_INET6 && es->v6only) return -ENETUNREACH;
  if (es->kind == NK_KIND_STREAM && es->state == NK_ST_CONNECTED) return -EISCONN;
  if (es->kind == NK_KIND_STREAM) {
    nk_sock_size_rings(es);
    /* A listener of a tenant on this host (or of this one) takes it over shared memory. */
    int r = nk_shm_connect(es, &dst);
    if (r < 0) return r;
    if (r > 0) {
      /* Established already. A non-blocking caller still gets EINPROGRESS, as from Linux TCP
       * (the guest's blocker is let go at once); a blocking one gets 0 without a round trip. */
      *in_progress = atomic_load(&s->nonblock) != 0;
      return 0;
    }
  }
  bool loop = nk_addr_is_loopback(&dst);
  int k = nk_ep_find(es, &dst);
  if (es->ep_count && k < 0) return es->bound ? -EADDRNOTAVAIL : -EINVAL;
  if (k < 0) {
    k = nk_ep_open_here(es, loop ? (es->family == AF_INET6 ? AF_INET6 : AF_INET) : dst.family,
                        loop);
    if (k < 0) return k;
    if (!loop) {
      /* Connections leave with the tenant's own source address (DESIGN §F). */
      struct nk_addr src = dst.family == AF_INET ? es->t->ipv4 : es->t->ipv6;
      int r = es->ep[k].ops->bind(es, k, &src, true);
      if (r < 0) {
        nk_ep_close_all(es, false);
        return r;
      }
    }
  }
  nk_ep_keep_only(es, k);
  const struct nk_ep_ops *ops = es->ep[0].ops;
  int r = ops->connect(es, &dst);
  if (r < 0) {
    if (es->kind == NK_KIND_STREAM) {
      nk_ep_close_all(es, false);
      es->bound = false;
    }
    return r;
  }
  if (es->kind == NK_KIND_DGRAM) { /* connected at once, as a kernel UDP socket */
    struct nk_addr local;
    nk_sock_set_peer(es, &dst);
    nk_ep_local(es, 0, &local);
    nk_sock_set_local(es, &local);
    es->state = NK_ST_CONNECTED;
    atomic_store(&s->state, NK_ST_CONNECTED);
    if (!es->bound && ops->watch) ops->watch(es, 0, NK_EP_DATA_EVENTS);
    es->bound = true;
    return 0;
  }
  es->can_read = es->can_write = true;
  if (ops->watch) ops->watch(es, 0, NK_EP_DATA_EVENTS);
  es->state = NK_ST_CONNECTING;
  nk_sock_set_peer(es, &dst);
  if (r == 0) {
    nk_sock_connected(es, 0);
    return 0;
  }
  atomic_store(&s->state, NK_ST_CONNECTING);
  struct nk_addr local;
  nk_ep_local(es, 0, &local);
  nk_sock_set_local(es, &local);
  *in_progress = 1;
  nk_sock_activate(es);
  return 0;
}
