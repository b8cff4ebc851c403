#include "port.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int nk_vm_proxies_init(struct nk_vm_proxies *t) {
  t->guest = calloc(NK_VMNET_IDS, sizeof(*t->guest));
  t->host = calloc(NK_VMNET_IDS, sizeof(*t->host));
  if (!t->guest || !t->host) return -ENOMEM;
  for (uint32_t i = 0; i < NK_VMNET_IDS; i++) t->guest[i].fd = t->host[i].fd = -1;
  return 0;
}

struct nk_vm_proxy *nk_vm_proxy(struct nk_vm_proxies *t, uint32_t id) {
  struct nk_vm_proxy *side = id & NK_VMNET_HOSTID ? t->host : t->guest;
  id &= ~NK_VMNET_HOSTID;
  return id && id < NK_VMNET_IDS ? &side[id] : NULL;
}

bool nk_vm_put(int port, uint16_t type, uint32_t a, uint32_t b, const void *p, uint32_t len) {
  struct nk_vmnet h = {.len = len, .type = type, .a = a, .b = b};
  char buf[sizeof(h) + NK_VMNET_MAX];
  if (len > NK_VMNET_MAX) return true; /* never sent: the other side would stop */
  memcpy(buf, &h, sizeof(h));
  if (len) memcpy(buf + sizeof(h), p, len);
  size_t n = sizeof(h) + len, off = 0;
  while (off < n) {
    ssize_t w = write(port, buf + off, n - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    off += (size_t)w;
  }
  return true;
}

int nk_vm_read(int port, struct nk_vm_reader *r, void (*on_frame)(struct nk_vmnet *h, char *p)) {
  ssize_t n = read(port, r->in + r->have, sizeof(r->in) - r->have);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
  if (n <= 0) return 0;
  r->have += (size_t)n;
  for (;;) {
    struct nk_vmnet h;
    if (r->have < sizeof(h)) return 1;
    memcpy(&h, r->in, sizeof(h));
    if (h.len > NK_VMNET_MAX) return -1;
    if (r->have < sizeof(h) + h.len) return 1;
    on_frame(&h, r->in + sizeof(h));
    r->have -= sizeof(h) + h.len;
    memmove(r->in, r->in + sizeof(h) + h.len, r->have);
  }
}
