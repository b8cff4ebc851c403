/* Text forms of struct nk_addr; conversions to and from sockaddr are in netkernel/addr.h,
 * shared with GuestLib. */
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
  if (a->family == AF_INET || a->family == AF_INET6) inet_ntop(a->family, a->addr, ip, sizeof(ip));
  if (a->family == AF_INET6) snprintf(buf, len, "[%s]:%u", ip, ntohs(a->port));
  else snprintf(buf, len, "%s:%u", ip, ntohs(a->port));
}
