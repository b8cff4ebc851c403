/* Listeners across NSMs: a tenant moving to another NSM listens on both until the daemon has
 * steered new traffic away from the old one; an NSM process that died and came back gets its
 * listeners again. Connections stay on the endpoint they were made on.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

#include "engine.h"

/* Give listener es listening endpoints on NSM m as well, on the same addresses and port, so
 * new connections arriving at m find it. */
int nk_sock_listen_on(struct nk_esock *es, struct nk_nsm *m) {
  int n = es->ep_count, added = 0;
  for (int k = 0; k < n; k++) {
    if (es->ep[k].loop || es->ep[k].nsm == m) continue;
    bool have = false;
    for (int j = 0; j < es->ep_count; j++)
      if (es->ep[j].nsm == m && es->ep[j].family == es->ep[k].family) have = true;
    if (have) continue;
    int j = nk_ep_open(es, es->ep[k].family, m);
    if (j < 0) return j;
    int r = nk_ep_listen_on_port(es, j);
    if (r < 0) {
      nk_ep_drop_last(es);
      return r;
    }
    added++;
  }
  return added;
}

/* Accept what is still queued on listeners outside keep (and loopback), then close them. */
void nk_sock_drop_listeners_off(struct nk_esock *es, struct nk_nsm *keep) {
  nk_listener_service(es);
  int w = 0;
  for (int k = 0; k < es->ep_count; k++) {
    if (es->ep[k].loop || es->ep[k].nsm == keep) {
      if (w != k) nk_ep_move(es, w, k, nk_sock_accept_queue_full(es) ? 0 : EPOLLIN);
      w++;
      continue;
    }
    nk_ep_close(es, k, false);
  }
  es->ep_count = w;
}

/* Endpoint k's stack came back (a new NSM process): listen there again. */
void nk_sock_relisten(struct nk_esock *es, int k) {
  struct nk_nsm *m = es->ep[k].nsm;
  int r = nk_ep_reopen(es, k);
  if (r == 0) {
    r = nk_ep_listen_on_port(es, k);
    if (r < 0) es->ep[k].ops->close(es, k, false);
  }
  if (r < 0)
    NK_INFO("tenant %s: listener on port %u not restored on nsm %s: %s", es->t->name,
            ntohs(es->bind_addr.port), m->name, strerror(-r));
  else
    NK_EVENT("listener_restored", "tenant=%s nsm=%s port=%u", es->t->name, m->name,
             ntohs(es->bind_addr.port));
}
