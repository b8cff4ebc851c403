/* A fourth kind of NSM, for tests only: "refuse:ERRNO" refuses every connection with ERRNO
 * and drops every datagram. It exists to show that an NSM is one file that registers itself:
 * tests/nsm/test_fourth_nsm.py links it into a test build of the engine, and nothing in
 * csrc/engine/ knows it is there.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "engine.h"

static int refused(struct nk_esock *es, int k) { return (int)(intptr_t)es->ep[k].nsm->priv; }

static int refuse_open(struct nk_esock *es, int k) {
  es->ep[k].fd = -1;
  es->ep[k].port = htons((uint16_t)(40000 + es->slot)); /* any port: nothing is sent */
  return 0;
}

static int refuse_bind(struct nk_esock *es, int k, const struct nk_addr *a, bool source) {
  (void)source;
  if (a->port) es->ep[k].port = a->port;
  return 0;
}

static uint16_t refuse_port(struct nk_esock *es, int k) { return es->ep[k].port; }

static int refuse_listen(struct nk_esock *es, int k, int backlog) {
  (void)backlog;
  return -refused(es, k);
}

static int refuse_connect(struct nk_esock *es, const struct nk_addr *dst) {
  (void)dst;
  return -refused(es, 0);
}

static void refuse_transmit(struct nk_esock *es) { (void)es; }

static int refuse_send_dgram(struct nk_esock *es, int k, const struct nk_addr *dst, uint32_t pos,
                             uint32_t len, const void *ctl, size_t ctl_len) {
  (void)dst, (void)pos, (void)len, (void)ctl, (void)ctl_len;
  return -refused(es, k);
}

static void refuse_close(struct nk_esock *es, int k, bool rst) { (void)es, (void)k, (void)rst; }

static const struct nk_ep_ops refuse_ep_ops = {
    .name = "refuse",
    .open = refuse_open,
    .bind = refuse_bind,
    .port = refuse_port,
    .listen = refuse_listen,
    .connect = refuse_connect,
    .transmit = refuse_transmit,
    .send_dgram = refuse_send_dgram,
    .close = refuse_close,
};

static int refuse_init(struct nk_nsm *m, const char *arg) {
  long err = arg ? strtol(arg, NULL, 10) : 0;
  if (err <= 0 || err > 4095) return -EINVAL;
  m->priv = (void *)(intptr_t)err;
  return 0;
}

static struct nk_nsm_type refuse_type = {
    .type = "refuse",
    .ep = &refuse_ep_ops,
    .init = refuse_init,
};
NK_NSM_TYPE(refuse_type)
