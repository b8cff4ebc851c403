/* Serving a socket: its stack moves its bytes (endpoint ops), then the readiness mirror is
 * brought up to date; and the two ends of a stream, shutdown() and close().
 */
#include <errno.h>
#include <sys/socket.h>

#include "engine.h"

/* A stack with TCP's close (the kernel's, an external NSM's): unread received data at close
 * makes Linux send a reset, and so do we; otherwise the last bytes go first, then the FIN.
 * False while bytes wait for room in the stack (its progress brings the socket back). */
bool nk_sock_finish_stream(struct nk_esock *es) {
  bool rst = es->linger0 || nk_ring_fill_checked(&es->rx) != 0;
  if (!rst && nk_ring_fill_checked(&es->tx) > 0) return false;
  nk_ep_close_all(es, rst);
  return true;
}

static void finish_close(struct nk_esock *es) {
  if (es->kind == NK_KIND_STREAM && !es->dead && es->ep_count && es->ep[0].ops->finish &&
      !es->ep[0].ops->finish(es))
    return;
  if (es->ep_held) return; /* a stack may still touch its rings: it brings us back */
  nk_esock_free(es);
}

/* The caller has unlinked es from its tenant's active list (run_active), or it is not on it
 * or stays on it (the proxy hang-up path): es->active is left alone here, because a socket
 * still linked but marked inactive would be linked a second time by nk_sock_activate, which
 * cuts the list and strands the sockets after it (they stay "active" and are never served:
 * seen as sockets that outlive their processes). */
void nk_sock_service(struct nk_esock *es) {
  struct nk_slot *s = nk_sock_slot(es);
  /* Relaxed: kick publishes nothing, and the engine never reads it (doorbell bits wake us). */
  atomic_store_explicit(&s->kick, 0, memory_order_relaxed);
  if (!es->dead) {
    if (es->kind == NK_KIND_LISTENER) {
      nk_listener_service(es);
    } else if (es->kind == NK_KIND_DGRAM) {
      nk_dgram_service(es);
    } else if (es->state == NK_ST_CONNECTED && es->ep_count) {
      const struct nk_ep_ops *ops = es->ep[0].ops;
      nk_direct_in(es);
      ops->transmit(es);
      nk_direct_in(es); /* what the transmit made room for */
      if (!es->dead && ops->receive) ops->receive(es);
    }
  }
  nk_direct_out(es);
  if (es->closing) {
    finish_close(es);
    return;
  }
  nk_sock_release_blocker(es);
  if (es->kind != NK_KIND_LISTENER) nk_sock_maybe_ready(es);
}

/* The write side is shut by the stack's transmit once the ring is flushed (shut_wr_pending). */
int nk_sock_shutdown(struct nk_esock *es, int how) {
  struct nk_slot *s = nk_sock_slot(es);
  if (es->kind == NK_KIND_LISTENER) {
    /* Linux lets shutdown() wake a listener's accept(); the socket then accepts no more. */
    return -ENOTCONN;
  }
  if (es->state != NK_ST_CONNECTED || es->dead) return -ENOTCONN;
  if (how == SHUT_WR || how == SHUT_RDWR) {
    atomic_store(&s->tx_closed, EPIPE);
    es->shut_wr_pending = true;
    es->guest_shut_wr = true;
  }
  if (how == SHUT_RD || how == SHUT_RDWR) {
    if (es->ep_count && es->ep[0].ops->shutdown_rd) es->ep[0].ops->shutdown_rd(es);
    atomic_store(&s->rx_eof, 1);
  }
  if (atomic_load(&s->rx_eof)) {
    if (es->guest_shut_wr) nk_sock_hang_up(es);
    else nk_sock_proxy_shutdown(es);
  }
  nk_sock_activate(es);
  return 0;
}
