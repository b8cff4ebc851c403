/* An NSM in another process (such as csrc/nsm/lwip): it has no kernel sockets to give the
 * engine; every endpoint on it is a ServiceLib socket id, driven by csrc/engine/ext.c. */
#include <errno.h>

#include "engine.h"

static int external_open_socket(struct nk_nsm *nsm, int domain, int type) {
  (void)nsm, (void)domain, (void)type;
  return -EOPNOTSUPP; /* sock.c opens its endpoints with nk_ext_socket() */
}

const struct nk_nsm_ops nk_nsm_external_ops = {
    .type = "external",
    .open_socket = external_open_socket,
};
