/* Name resolution for tenants (DESIGN §E). glibc's resolver opens its sockets internally, out of
 * LD_PRELOAD's reach, so each tenant gets a DNS stub on 127.0.0.53:53 inside its own namespace
 * (its resolv.conf points there). The engine relays each query through the tenant's NSM, from
 * the tenant's address, to the configured upstream, and the answer back. UDP only: answers
 * that need TCP come back truncated and glibc reports the failure. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "engine.h"

/* Queries a tenant may have relayed: a steady rate and a burst (a page load resolves a few
 * dozen names at once). A tenant that asks faster has the rest dropped, as a busy resolver
 * would; the stub is a path to the daemon's responder, which every tenant shares. */
#define NK_DNS_RATE  200.0
#define NK_DNS_BURST 400.0

static bool dns_admit(struct nk_tenant *t) {
  uint64_t now = nk_now_ns();
  struct nk_bucket *b = &t->dns_bucket;
  if (!b->last_ns) b->tokens = NK_DNS_BURST;
  else b->tokens += (double)(now - b->last_ns) * NK_DNS_RATE / 1e9;
  if (b->tokens > NK_DNS_BURST) b->tokens = NK_DNS_BURST;
  b->last_ns = now;
  if (b->tokens < 1.0) return false;
  b->tokens -= 1.0;
  return true;
}

/* A free entry for a query, or one whose answer never came (glibc gave up on it after 5 s
 * long before); -1 when all are waiting for answers. */
#define NK_DNS_STALE_NS 10000000000ull
static int dns_entry(struct nk_tenant *t) {
  uint64_t now = nk_now_ns();
  for (unsigned k = 0; k < NK_DNS_PENDING; k++) {
    unsigned idx = (t->dns_next + k) % NK_DNS_PENDING;
    struct nk_dns_query *q = &t->dns_pending[idx];
    if (!q->used || now - q->sent_ns > NK_DNS_STALE_NS) {
      t->dns_next = idx + 1;
      return (int)idx;
    }
  }
  return -1;
}

int nk_dns_open(struct nk_tenant *t) {
  int fd = nk_in_netns(t->netns_fd, AF_INET, SOCK_DGRAM);
  if (fd < 0) return fd;
  struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons(53)};
  inet_pton(AF_INET, "127.0.0.53", &in.sin_addr);
  if (bind(fd, (struct sockaddr *)&in, sizeof(in)) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  t->dns_fd = fd;
  t->h_dns = (struct nk_handle){NK_H_DNS, 0, t};
  nk_epoll_add(fd, EPOLLIN, &t->h_dns);
  int r = nk_dns_reopen_upstream(t);
  if (r < 0) {
    nk_dns_close(t);
    return r;
  }
  return 0;
}

/* The relay socket lives on the tenant's NSM and sends from the tenant's address. */
int nk_dns_reopen_upstream(struct nk_tenant *t) {
  /* An NSM without kernel sockets has none to lend: its tenants' queries leave from the
   * engine's own namespace, which reaches the daemon's resolver on the bridge directly. */
  bool ext = !t->nsm->type->kernel_sockets;
  int up = ext ? socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
               : nk_in_netns(t->nsm->netns_fd, AF_INET, SOCK_DGRAM);
  if (up < 0) return ext ? -errno : up;
  struct sockaddr_storage ss;
  socklen_t l = nk_addr_to_sa(&t->ipv4, &ss);
  if (!ext) bind(up, (struct sockaddr *)&ss, l);
  if (t->dns_up_fd >= 0) {
    nk_epoll_del(t->dns_up_fd);
    close(t->dns_up_fd);
  }
  t->dns_up_fd = up;
  t->h_dns_up = (struct nk_handle){NK_H_DNS_UP, 0, t};
  nk_epoll_add(up, EPOLLIN, &t->h_dns_up);
  return 0;
}

void nk_dns_close(struct nk_tenant *t) {
  if (t->dns_fd >= 0) {
    nk_epoll_del(t->dns_fd);
    close(t->dns_fd);
  }
  if (t->dns_up_fd >= 0) {
    nk_epoll_del(t->dns_up_fd);
    close(t->dns_up_fd);
  }
  t->dns_fd = t->dns_up_fd = -1;
}

void nk_dns_event(struct nk_tenant *t, bool upstream) {
  uint8_t buf[4096];
  for (int i = 0; i < 64; i++) {
    struct sockaddr_storage from;
    socklen_t fl = sizeof(from);
    ssize_t n = recvfrom(upstream ? t->dns_up_fd : t->dns_fd, buf, sizeof(buf), MSG_DONTWAIT,
                         (struct sockaddr *)&from, &fl);
    if (n < 0) return;
    if (n < 12) continue; /* shorter than a DNS header */
    uint16_t id = (uint16_t)(buf[0] << 8 | buf[1]);
    if (!upstream) {
      if (!engine.dns_upstream.family) continue;
      int idx = dns_entry(t);
      if (idx < 0 || !dns_admit(t)) {
        t->dns_dropped++;
        continue;
      }
      t->dns_relayed++;
      struct nk_dns_query *q = &t->dns_pending[idx];
      q->id = id;
      /* The high byte random: an answer that guesses the id of a pending query is harder. */
      q->up_id = (uint16_t)((arc4random() & 0xff) << 8 | (unsigned)idx);
      q->used = true;
      q->sent_ns = nk_now_ns();
      q->client = from;
      q->len = fl;
      buf[0] = (uint8_t)(q->up_id >> 8);
      buf[1] = (uint8_t)q->up_id;
      struct sockaddr_storage ss;
      socklen_t l = nk_addr_to_sa(&engine.dns_upstream, &ss);
      sendto(t->dns_up_fd, buf, (size_t)n, MSG_DONTWAIT, (struct sockaddr *)&ss, l);
    } else {
      /* Only answers from the upstream, for a query we relayed. */
      struct nk_addr src;
      nk_addr_from_sa(&src, &from);
      if (!nk_addr_eq_ip(&src, &engine.dns_upstream) || src.port != engine.dns_upstream.port)
        continue;
      struct nk_dns_query *q = &t->dns_pending[id & (NK_DNS_PENDING - 1)];
      if (!q->used || q->up_id != id) continue;
      q->used = false;
      buf[0] = (uint8_t)(q->id >> 8);
      buf[1] = (uint8_t)q->id;
      int idx = (int)(q - t->dns_pending);
      sendto(t->dns_fd, buf, (size_t)n, MSG_DONTWAIT,
             (struct sockaddr *)&t->dns_pending[idx].client, t->dns_pending[idx].len);
    }
  }
}
