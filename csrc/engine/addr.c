/* Address helpers for struct nk_addr (the ABI's family-independent address). */
#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

#include "engine.h"

int nk_addr_parse(const char *s, struct nk_addr *a) {
  memset(a, 0, sizeof(*a));
  if (inet_pton(AF_INET, s, a->addr) == 1) {
    a->family = AF_INET;
    return 0;
  }
  if (inet_pton(AF_INET6, s, a->addr) == 1) {
    a->family = AF_INET6;
    return 0;
  }
  return -EINVAL;
}

void nk_addr_fmt(const struct nk_addr *a, char *buf, size_t len) {
  char ip[INET6_ADDRSTRLEN] = "-";
  if (a->family == AF_INET || a->family == AF_INET6)
    inet_ntop(a->family, a->addr, ip, sizeof(ip));
  if (a->family == AF_INET6) snprintf(buf, len, "[%s]:%u", ip, ntohs(a->port));
  else snprintf(buf, len, "%s:%u", ip, ntohs(a->port));
}

socklen_t nk_addr_to_sa(const struct nk_addr *a, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof(*ss));
  if (a->family == AF_INET) {
    struct sockaddr_in *in = (void *)ss;
    in->sin_family = AF_INET;
    in->sin_port = a->port;
    memcpy(&in->sin_addr, a->addr, 4);
    return sizeof(*in);
  }
  struct sockaddr_in6 *in6 = (void *)ss;
  in6->sin6_family = AF_INET6;
  in6->sin6_port = a->port;
  in6->sin6_scope_id = a->scope_id;
  memcpy(&in6->sin6_addr, a->addr, 16);
  return sizeof(*in6);
}

void nk_addr_from_sa(struct nk_addr *a, const struct sockaddr *sa) {
  memset(a, 0, sizeof(*a));
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const void *)sa;
    a->family = AF_INET;
    a->port = in->sin_port;
    memcpy(a->addr, &in->sin_addr, 4);
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const void *)sa;
    a->family = AF_INET6;
    a->port = in6->sin6_port;
    a->scope_id = in6->sin6_scope_id;
    memcpy(a->addr, &in6->sin6_addr, 16);
    nk_addr_unmap(a);
  }
}

static const uint8_t mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

bool nk_addr_is_mapped(const struct nk_addr *a) {
  return a->family == AF_INET6 && memcmp(a->addr, mapped_prefix, 12) == 0;
}

void nk_addr_unmap(struct nk_addr *a) {
  if (!nk_addr_is_mapped(a)) return;
  uint8_t v4[4];
  memcpy(v4, a->addr + 12, 4);
  memset(a->addr, 0, 16);
  memcpy(a->addr, v4, 4);
  a->family = AF_INET;
  a->scope_id = 0;
}

bool nk_addr_is_any(const struct nk_addr *a) {
  static const uint8_t zero[16];
  if (a->family == AF_INET) return memcmp(a->addr, zero, 4) == 0;
  if (a->family == AF_INET6) return memcmp(a->addr, zero, 16) == 0;
  return true;
}

bool nk_addr_is_loopback(const struct nk_addr *a) {
  static const uint8_t v6lo[16] = {[15] = 1};
  if (a->family == AF_INET) return a->addr[0] == 127;
  if (a->family == AF_INET6) {
    if (nk_addr_is_mapped(a)) return a->addr[12] == 127;
    return memcmp(a->addr, v6lo, 16) == 0;
  }
  return false;
}

bool nk_addr_eq_ip(const struct nk_addr *a, const struct nk_addr *b) {
  if (a->family != b->family) return false;
  return memcmp(a->addr, b->addr, a->family == AF_INET ? 4 : 16) == 0;
}
