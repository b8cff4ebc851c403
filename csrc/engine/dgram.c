/* Datagram sockets: each datagram in the transmit ring is a record (struct nk_dgram, then
 * the payload) naming its destination; the engine picks the endpoint that reaches it, opening
 * one on first use as Linux binds an unbound socket on its first send, and the stack sends it.
 * Received datagrams come back as records with their source.
 */
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include "engine.h"

/* Datagrams per service, each way: the ring is the tenant's to refill, and datagrams to its
 * loopback cost no tokens, so without a bound the engine would never leave. */
#define NK_DGRAMS_PER_SERVICE 256

static int endpoint_for(struct nk_esock *es, const struct nk_addr *dst) {
  int k = nk_ep_find(es, dst);
  if (k >= 0) return k;
  /* First send without bind: a socket bound to the tenant's address. */
  bool loop = nk_addr_is_loopback(dst);
  k = nk_ep_open_here(es, loop ? es->family : dst->family, loop);
  if (k < 0) return k;
  struct nk_endpoint *e = &es->ep[k];
  if (!loop) {
    struct nk_addr src = dst->family == AF_INET ? es->t->ipv4 : es->t->ipv6;
    int r = e->ops->bind(es, k, &src, false);
    if (r < 0) {
      nk_ep_drop_last(es);
      return r;
    }
  }
  struct nk_addr local;
  nk_ep_local(es, k, &local);
  nk_sock_set_local(es, &local);
  if (e->ops->watch) e->ops->watch(es, k, NK_EP_DATA_EVENTS);
  return k;
}

/* Control messages a datagram may be sent with, checked as the kernel checks them: a record
 * that carries anything else, or a value out of range (GuestLib refuses those with EINVAL
 * before they reach the ring), is the tenant's garbage. */
bool nk_dgram_cmsgs_ok(const void *ctl, size_t len) {
  const unsigned char *p = ctl;
  size_t off = 0;
  while (off < len) {
    struct cmsghdr c;
    if (len - off < sizeof(c)) return false;
    memcpy(&c, p + off, sizeof(c));
    if (c.cmsg_len != CMSG_LEN(sizeof(int)) || c.cmsg_len > len - off) return false;
    int v;
    memcpy(&v, p + off + CMSG_LEN(0), sizeof(v));
    if (c.cmsg_level == IPPROTO_IP && c.cmsg_type == IP_TTL) {
      if (v < 1 || v > 255) return false;
    } else if (c.cmsg_level == IPPROTO_IP && c.cmsg_type == IP_TOS) {
      if (v < 0 || v > 255) return false;
    } else if (c.cmsg_level == IPPROTO_IPV6 &&
               (c.cmsg_type == IPV6_HOPLIMIT || c.cmsg_type == IPV6_TCLASS)) {
      if (v < -1 || v > 255) return false;
    } else {
      return false;
    }
    off += CMSG_SPACE(sizeof(int));
  }
  return true;
}

static void transmit(struct nk_esock *es) {
  uint64_t budget = engine.service_bytes;
  for (int sent = 0;; sent++) {
    int64_t fill = nk_ring_fill_checked(&es->tx);
    if (fill == 0) return;
    if (fill < (int64_t)sizeof(struct nk_dgram)) { /* broken, or a record cut short */
      nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
      return;
    }
    if (sent == NK_DGRAMS_PER_SERVICE || budget == 0) { /* the rest in a later round */
      nk_sock_activate(es);
      return;
    }
    struct nk_dgram h;
    uint32_t tail = atomic_load_explicit(es->tx.tail, memory_order_relaxed);
    nk_ring_copy_out(&es->tx, tail, &h, sizeof(h)); /* read once, then validate the copy */
    if (h.len > NK_DGRAM_MAX || h.cmsg_len > NK_DGRAM_CMSG_MAX ||
        (int64_t)NK_DGRAM_SPACE_CMSG(h.len, h.cmsg_len) > fill) {
      nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
      return;
    }
    _Alignas(struct cmsghdr) unsigned char ctl[NK_DGRAM_CMSG_MAX];
    uint32_t clen = h.cmsg_len, payload = tail + sizeof(h) + ((clen + 7u) & ~7u);
    if (clen) nk_ring_copy_out(&es->tx, tail + sizeof(h), ctl, clen);
    if (clen && !nk_dgram_cmsgs_ok(ctl, clen)) {
      nk_sock_fail(es, ECONNRESET, NK_END_BROKEN);
      return;
    }
    budget -= budget < h.len ? budget : h.len;
    struct nk_addr dst = h.addr;
    nk_addr_unmap(&dst);
    int k;
    if (dst.family == 0) {
      k = es->ep_count ? 0 : -EDESTADDRREQ; /* connected socket */
    } else if (dst.family != AF_INET && dst.family != AF_INET6) {
      k = -EAFNOSUPPORT;
    } else {
      k = endpoint_for(es, &dst);
    }
    if (k >= 0) {
      struct nk_endpoint *e = &es->ep[k];
      if (!nk_policy_dgram(es, e->nsm, NK_TX, h.len)) return;
      int n = e->ops->send_dgram(es, k, dst.family ? &dst : NULL, payload, h.len, ctl, clen);
      if (n == -EAGAIN) {
        es->can_write = false;
        return; /* the stack says when it has room */
      }
      if (n >= 0) {
        nk_sock_count(es, NK_TX, (uint64_t)n);
        nk_policy_charge_dgram(es, e->nsm, NK_TX, (uint32_t)n);
      }
      /* Other errors drop the datagram, as UDP would. */
    }
    nk_ring_consume(&es->tx, (uint32_t)NK_DGRAM_SPACE_CMSG(h.len, clen));
  }
}

void nk_dgram_service(struct nk_esock *es) {
  transmit(es);
  for (int k = 0; k < es->ep_count && !es->dead; k++)
    if (es->ep[k].ops->recv_dgrams) es->ep[k].ops->recv_dgrams(es, k);
}
