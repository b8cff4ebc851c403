/* A NetKernel socket's endpoints: the sockets it has on stacks (an NSM, its tenant's
 * loopback, the shared-memory path). Everything here goes through the endpoint's ops
 * (engine.h, struct nk_ep_ops); which kind of stack holds an endpoint is the ops' business.
 */
#include <errno.h>
#include <string.h>

#include "engine.h"

struct nk_slot *nk_sock_slot(struct nk_esock *es) {
  return &es->t->slots[es->slot];
}

/* The NSM a connected or connecting socket's traffic goes through (NULL: loopback, or the
 * shared-memory path, which no NSM carries). */
struct nk_nsm *nk_sock_nsm(const struct nk_esock *es) {
  return es->ep_count ? es->ep[0].nsm : NULL;
}

void nk_sock_count(struct nk_esock *es, int dir, uint64_t n) {
  if (dir == NK_TX) {
    es->tx_bytes += n;
    es->t->tx_bytes += n;
  } else {
    es->rx_bytes += n;
    es->t->rx_bytes += n;
  }
  if (!es->on_bulk && es->tx_bytes + es->rx_bytes - es->bytes_at_shrink > NK_TRIM_BYTES)
    nk_tenant_bulk_add(es);
}

/* The options the application set before endpoint k existed: as Linux applies them to the
 * one socket it has, every endpoint gets them. */
void nk_ep_replay_opts(struct nk_esock *es, int k) {
  const struct nk_ep_ops *ops = es->ep[k].ops;
  for (int i = 0; es->opts && i < es->opts->n && ops->setopt; i++) {
    const struct nk_opt *o = &es->opts->o[i];
    ops->setopt(es, k, o->level, o->name, o->val, o->len);
  }
}

/* Endpoint k takes e's kind and handles (its epoll handle stays k's). */
void nk_ep_set(struct nk_esock *es, int k, const struct nk_endpoint *e) {
  struct nk_handle h = es->ep[k].h;
  es->ep[k] = *e;
  es->ep[k].h = h;
}

static const struct nk_ep_ops *ops_for(struct nk_nsm *m) {
  return m ? m->type->ep : &nk_kernel_ep_ops;
}

int nk_ep_open(struct nk_esock *es, int family, struct nk_nsm *m) {
  if (es->ep_count >= NK_MAX_EP) return -EMFILE;
  int k = es->ep_count;
  /* The first endpoint's descriptor came with the socket (NK_SOCK_FDS); more are taken as
   * they open and kept until the socket is freed. */
  if (k + 1 > (int)es->ep_fds + 1) {
    int r = nk_fds_take(es->t, 1);
    if (r < 0) return r;
    es->ep_fds++;
  }
  nk_ep_set(es, k,
            &(struct nk_endpoint){.ops = ops_for(m),
                                  .nsm = m,
                                  .family = family,
                                  .loop = m == NULL,
                                  .fd = -1,
                                  .id = NK_EXT_LOST});
  int r = es->ep[k].ops->open(es, k);
  if (r < 0) {
    es->ep[k].ops = NULL;
    return r;
  }
  es->ep_count++;
  nk_ep_replay_opts(es, k);
  return k;
}

/* On the tenant's NSM of the moment (new sockets follow a move), or its own loopback. */
int nk_ep_open_here(struct nk_esock *es, int family, bool loop) {
  return nk_ep_open(es, family, loop ? NULL : es->t->nsm);
}

int nk_ep_reopen(struct nk_esock *es, int k) {
  es->ep[k].listening = false;
  int r = es->ep[k].ops->open(es, k);
  if (r == 0) nk_ep_replay_opts(es, k);
  return r;
}

/* The endpoint that reaches dst: loopback stays in the tenant's namespace (a v6 socket there
 * reaches 127/8 too), the rest leaves through the NSM in dst's family. */
int nk_ep_find(const struct nk_esock *es, const struct nk_addr *dst) {
  bool loop = nk_addr_is_loopback(dst);
  for (int k = 0; k < es->ep_count; k++) {
    const struct nk_endpoint *e = &es->ep[k];
    if (e->loop == loop && (e->family == dst->family || (loop && e->family == AF_INET6))) return k;
  }
  return -1;
}

void nk_ep_close(struct nk_esock *es, int k, bool rst) {
  struct nk_endpoint *e = &es->ep[k];
  if (e->ops) e->ops->close(es, k, rst);
  e->ops = NULL;
  e->fd = -1;
  e->nsm = NULL;
}

void nk_ep_drop_last(struct nk_esock *es) {
  nk_ep_close(es, es->ep_count - 1, false);
  es->ep_count--;
}

void nk_ep_close_all(struct nk_esock *es, bool rst) {
  for (int k = 0; k < es->ep_count; k++) nk_ep_close(es, k, rst);
  es->ep_count = 0;
}

/* Endpoint `from` becomes endpoint `to` (to < from, to's own closed or moved already); its
 * events must now name `to`. */
void nk_ep_move(struct nk_esock *es, int to, int from, uint32_t events) {
  nk_ep_set(es, to, &es->ep[from]);
  es->ep[from].ops = NULL;
  es->ep[from].fd = -1;
  es->ep[from].nsm = NULL;
  if (es->ep[to].ops->watch) es->ep[to].ops->watch(es, to, events);
}

/* Keep only endpoint k, as endpoint 0 (connect picked one of a wildcard bind's). */
void nk_ep_keep_only(struct nk_esock *es, int k) {
  for (int i = 0; i < es->ep_count; i++)
    if (i != k) nk_ep_close(es, i, false);
  if (k != 0) nk_ep_move(es, 0, k, NK_EP_DATA_EVENTS);
  es->ep_count = 1;
}

/* Endpoint k's local address: the stack's word for it, else the tenant's address in its
 * family and the port the stack gave. */
void nk_ep_local(struct nk_esock *es, int k, struct nk_addr *out) {
  struct nk_endpoint *e = &es->ep[k];
  if (e->ops->address && e->ops->address(es, k, false, out)) return;
  *out = e->family == AF_INET ? es->t->ipv4 : es->t->ipv6;
  out->port = e->ops->port ? e->ops->port(es, k) : 0;
}

/* Endpoint k, open, listens on the tenant's address in its family at es's port (a listener
 * on one more NSM, or again on one that came back). */
int nk_ep_listen_on_port(struct nk_esock *es, int k) {
  struct nk_endpoint *e = &es->ep[k];
  struct nk_addr a = e->family == AF_INET ? es->t->ipv4 : es->t->ipv6;
  a.port = es->bind_addr.port;
  int r = e->ops->bind(es, k, &a, false);
  if (r == 0) r = e->ops->listen(es, k, es->backlog);
  e->listening = r == 0;
  if (r == 0 && e->ops->watch) e->ops->watch(es, k, nk_sock_accept_queue_full(es) ? 0 : EPOLLIN);
  return r;
}
