/* struct nk_addr (the ABI's family-independent address) to and from struct sockaddr, one
 * copy for GuestLib and the engine: the two sides must agree on every byte of the
 * conversion (v4-mapped rendering, scope ids, what a short sockaddr is).
 *
 * nk_addr_from_sockaddr() checks what an application passed, as the kernel would (EINVAL,
 * EAFNOSUPPORT). nk_addr_from_sa() takes what the kernel returned (getsockname, recvfrom,
 * accept) and unmaps ::ffff:a.b.c.d, since the engine keeps IPv4 peers as IPv4. */
#ifndef NETKERNEL_ADDR_H
#define NETKERNEL_ADDR_H

#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>

#include "abi.h"

static inline int nk_addr_from_sockaddr(struct nk_addr *a, const struct sockaddr *sa,
                                        socklen_t len) {
  memset(a, 0, sizeof(*a));
  if (!sa || len < sizeof(sa_family_t)) return -EINVAL;
  if (sa->sa_family == AF_INET) {
    if (len < sizeof(struct sockaddr_in)) return -EINVAL;
    const struct sockaddr_in *in = (const void *)sa;
    a->family = AF_INET;
    a->port = in->sin_port;
    memcpy(a->addr, &in->sin_addr, 4);
    return 0;
  }
  if (sa->sa_family == AF_INET6) {
    if (len < sizeof(struct sockaddr_in6)) return -EINVAL;
    const struct sockaddr_in6 *in6 = (const void *)sa;
    a->family = AF_INET6;
    a->port = in6->sin6_port;
    a->scope_id = in6->sin6_scope_id;
    memcpy(a->addr, &in6->sin6_addr, 16);
    return 0;
  }
  if (sa->sa_family == AF_UNSPEC) return 0;
  return -EAFNOSUPPORT;
}

/* a rendered for a socket of the given family: IPv4 becomes v4-mapped for AF_INET6. */
static inline socklen_t nk_addr_to_sockaddr(const struct nk_addr *a, int family,
                                            struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof(*ss));
  if (family == AF_INET) {
    struct sockaddr_in *in = (void *)ss;
    in->sin_family = AF_INET;
    in->sin_port = a->port;
    if (a->family == AF_INET) memcpy(&in->sin_addr, a->addr, 4);
    return sizeof(*in);
  }
  struct sockaddr_in6 *in6 = (void *)ss;
  in6->sin6_family = AF_INET6;
  in6->sin6_port = a->port;
  if (a->family == AF_INET) {
    in6->sin6_addr.s6_addr[10] = 0xff;
    in6->sin6_addr.s6_addr[11] = 0xff;
    memcpy(&in6->sin6_addr.s6_addr[12], a->addr, 4);
  } else if (a->family == AF_INET6) {
    memcpy(&in6->sin6_addr, a->addr, 16);
    in6->sin6_scope_id = a->scope_id;
  }
  return sizeof(*in6);
}

/* a in its own family, for a kernel socket of that family. */
static inline socklen_t nk_addr_to_sa(const struct nk_addr *a, struct sockaddr_storage *ss) {
  return nk_addr_to_sockaddr(a, a->family == AF_INET ? AF_INET : AF_INET6, ss);
}

static inline bool nk_addr_is_mapped(const struct nk_addr *a) {
  static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return a->family == AF_INET6 && memcmp(a->addr, prefix, 12) == 0;
}

/* ::ffff:a.b.c.d -> a.b.c.d */
static inline void nk_addr_unmap(struct nk_addr *a) {
  if (!nk_addr_is_mapped(a)) return;
  uint8_t v4[4];
  memcpy(v4, a->addr + 12, 4);
  memset(a->addr, 0, 16);
  memcpy(a->addr, v4, 4);
  a->family = AF_INET;
  a->scope_id = 0;
}

/* An address the kernel wrote into a struct sockaddr_storage. */
static inline void nk_addr_from_sa(struct nk_addr *a, const struct sockaddr_storage *ss) {
  (void)nk_addr_from_sockaddr(a, (const struct sockaddr *)ss, sizeof(*ss));
  nk_addr_unmap(a);
}

static inline bool nk_addr_is_any(const struct nk_addr *a) {
  static const uint8_t zero[16];
  if (a->family == AF_INET) return memcmp(a->addr, zero, 4) == 0;
  if (a->family == AF_INET6) return memcmp(a->addr, zero, 16) == 0;
  return true;
}

static inline bool nk_addr_is_loopback(const struct nk_addr *a) {
  static const uint8_t v6lo[16] = {[15] = 1};
  if (a->family == AF_INET) return a->addr[0] == 127;
  if (a->family == AF_INET6) {
    if (nk_addr_is_mapped(a)) return a->addr[12] == 127;
    return memcmp(a->addr, v6lo, 16) == 0;
  }
  return false;
}

static inline bool nk_addr_eq_ip(const struct nk_addr *a, const struct nk_addr *b) {
  if (a->family != b->family) return false;
  return memcmp(a->addr, b->addr, a->family == AF_INET ? 4 : 16) == 0;
}

#endif
