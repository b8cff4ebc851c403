/* NetKernel sockets as seen by the guest: the proxy fd for readiness and lifetime
 * (DESIGN §A), the shared rings for bytes (§B), control requests for everything else.
 *
 * Readiness protocol (the engine side is in csrc/engine/readiness.c):
 *  - readable: the engine queues one READY record on the proxy fd whenever the receive ring is
 *    non-empty, at EOF or on error, and no record is outstanding (ready_sent == rx_ack in its
 *    private count). We consume records only when the ring is empty and no EOF/error is
 *    pending, bump rx_ack, then look at the ring again; if something arrived in between we
 *    "kick" the engine so it re-evaluates and queues a fresh record. No wake-up is lost.
 *  - writable: when the transmit ring is full we queue a blocker record on the proxy fd, whose
 *    size makes the kernel report our end unwritable; the engine consumes it when space frees.
 *
 * Memory order: each pair is labelled at both ends (R1/R2, D1/D2...); docs/abi.md lists them.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>

#include "guest.h"
#include "netkernel/preopt.h"

struct nk_slot *nk_slot_at(int slot) {
  return &nk_g.slots[slot];
}

/* A ring's size as the engine set it in the slot (abi.h: 0 is the region's ring size). The
 * engine sets a stream socket's before the state that lets bytes move: callers look at the
 * state first. Checked all the same, so that a scribbled slot keeps its rings in place. */
static uint32_t ring_size(uint32_t size) {
  return size && size <= nk_g.ring_size && !(size & (size - 1)) ? size : nk_g.ring_size;
}

void nk_slot_rings(int slot, struct nk_ring *tx, struct nk_ring *rx) {
  struct nk_slot *s = nk_slot_at(slot);
  uint8_t *base = nk_g.rings + (uint64_t)slot * 2u * nk_g.ring_size;
  if (tx) nk_ring_init(tx, base, ring_size(s->tx_size), &s->tx_head, &s->tx_tail);
  if (rx) nk_ring_init(rx, base + nk_g.ring_size, ring_size(s->rx_size), &s->rx_head, &s->rx_tail);
}

/* ---- small helpers ---- */

/* tx_lock serialises a slot's senders, rx_lock its receivers, across threads and processes.
 * L2: acquire; pairs with L1 in unlock(): the next holder sees the ring as the last one left
 * it (bytes and index). */
static void lock(_Atomic uint32_t *l) {
  for (int spins = 0;; spins++) {
    uint32_t z = 0;
    if (atomic_compare_exchange_weak_explicit(l, &z, 1, memory_order_acquire, memory_order_relaxed))
      return;
    if (spins > 100) sched_yield();
  }
}
/* L1: release; pairs with L2 in lock(). */
static void unlock(_Atomic uint32_t *l) { atomic_store_explicit(l, 0, memory_order_release); }

/* Tell the engine that this slot needs attention; wake it only when it sleeps. */
static void doorbell(int slot) {
  struct nk_region *rg = nk_g.region;
  uint64_t bit = 1ull << (slot & 63);
  /* D1: the bits are set (seq_cst) before engine_sleeping is loaded (seq_cst); pairs with D2 in
   * the engine's main() (store engine_sleeping, fence, scan the bits): either its last scan
   * finds our bit or we find it asleep and write the eventfd. The bit also publishes our
   * earlier ring stores: the engine takes it with an exchange before it looks at the ring. */
  atomic_fetch_or(&rg->doorbell[slot >> 6], bit);
  atomic_fetch_or(&rg->doorbell_summary, 1ull << ((slot >> 6) & 63));
  if (atomic_load(&rg->engine_sleeping) && atomic_exchange(&rg->engine_sleeping, 0)) {
    uint64_t one = 1;
    int saved = errno;
    if (nk_libc.write(nk_g.doorbell_fd, &one, sizeof(one)) < 0) { /* counter full: it is awake */
    }
    errno = saved;
  }
}

/* The doorbell bit is what the engine acts on; kick only marks the slot (the engine clears it
 * when it serves the socket and reads it nowhere). */
static void kick(int slot) {
  atomic_store(&nk_slot_at(slot)->kick, 1);
  doorbell(slot);
}

/* O_NONBLOCK belongs to the open file description, which every copy of the proxy fd (dup,
 * fork, exec, SCM_RIGHTS) shares, as they share the slot: so the slot mirrors it, kept up to
 * date by socket(), accept4(), fcntl(F_SETFL) and ioctl(FIONBIO). No system call per read.
 * Relaxed: the flag publishes nothing, and a call racing with fcntl() may see either value. */
static bool is_nonblock(int fd, int flags) {
  (void)fd;
  return (flags & MSG_DONTWAIT) ||
         atomic_load_explicit(&nk_slot_at(nk_fd_slot(fd))->nonblock, memory_order_relaxed);
}

void nk_note_nonblock(int slot, bool on) { atomic_store(&nk_slot_at(slot)->nonblock, on); }

/* Waits for events on the proxy fd. Returns 1 ready, 2 hung up, 0 timeout, -errno. A hang-up
 * means the engine shut the socket (reset, failed connect) or is gone: callers look at the
 * slot once more for the reason and otherwise report ECONNRESET. */
static int wait_fd(int fd, short events, uint32_t timeout_ms) {
  struct pollfd p = {.fd = fd, .events = events};
  int r = poll(&p, 1, timeout_ms ? (int)timeout_ms : -1);
  if (r < 0) return -errno;
  if (r == 0) return 0;
  if (p.revents & (POLLHUP | POLLERR | POLLNVAL)) return 2;
  return 1;
}

/* Queue a blocker so the proxy fd reads as unwritable; skip it when one is already queued. */
static void send_blocker(int fd) {
  static const char blocker[NK_BLOCKER_SIZE];
  struct pollfd p = {.fd = fd, .events = POLLOUT};
  if (poll(&p, 1, 0) == 1 && (p.revents & POLLOUT))
    (void)nk_libc.send(fd, blocker, sizeof(blocker), MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* Reads up to want READY records, 64 per system call. */
static uint32_t eat_ready(int fd, uint32_t want) {
  enum { BATCH = 64 };
  char bufs[BATCH][8];
  struct iovec iov[BATCH];
  struct mmsghdr m[BATCH];
  uint32_t n = 0;
  while (n < want) {
    unsigned k = want - n < BATCH ? want - n : BATCH;
    for (unsigned i = 0; i < k; i++) {
      iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = sizeof(bufs[i])};
      m[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &iov[i], .msg_iovlen = 1}};
    }
    int r = k == 1 ? (int)(nk_libc.recv(fd, bufs[0], sizeof(bufs[0]), MSG_DONTWAIT) > 0)
                   : nk_libc.recvmmsg(fd, m, k, MSG_DONTWAIT, NULL);
    if (r <= 0) break;
    n += (uint32_t)r;
    if ((unsigned)r < k) break;
  }
  return n;
}

/* Tell the engine we looked at the receive ring. Linux raises a new EPOLLIN edge for every
 * arrival of data, also while unread data is queued, and nginx counts on it: it reads the
 * FIONREAD amount, then waits for the next edge. The engine queues an extra READY record for
 * data it pushes after we looked. E1: the bump, then a fence, comes before the caller loads
 * the ring's fill; pairs with E2 in the engine's nk_sock_maybe_ready() (ring stores, fence,
 * load rx_seen): either we see its new bytes or it sees the bump and queues a fresh record.
 * The fence is what C11 needs: it does not order a seq_cst RMW before a later acquire load of
 * another object (x86-64 and AArch64 would; docs/abi.md). */
static void seen(struct nk_slot *s) {
  atomic_fetch_add(&s->rx_seen, 1);
  atomic_thread_fence(memory_order_seq_cst);
}

/* R2: give back `eaten` READY records, published before the caller looks at the ring again;
 * pairs with R1 in the engine's nk_sock_maybe_ready() (ring stores, fence, load rx_ack):
 * either it sees the ack and queues a fresh record for what arrived, or the caller sees the
 * bytes and kicks. The fence, as in seen(). */
static void ack_records(struct nk_slot *s, uint32_t eaten) {
  atomic_fetch_add(&s->rx_ack, eaten);
  atomic_thread_fence(memory_order_seq_cst);
}

/* Takes back the READY records the engine announced (ready_sent - rx_ack): one recv() per
 * record and none when there is none, so a read costs no extra system call on a quiet
 * socket. A record announced but not here yet is being sent right now, or is about to be
 * retracted (R3 in the engine): wait for either, briefly; left behind, it would make the
 * socket read as readable with nothing to read. Returns how many were taken; the caller
 * adds them to rx_ack. R4: the fence orders the caller's ring accesses (its tail store) before
 * the loads of ready_sent; pairs with R3 in the engine's send_ready() (store ready_sent,
 * fence, look at the ring): either it sees the ring we emptied and retracts, or we see the
 * record it announced. */
static uint32_t take_records(int fd, struct nk_slot *s) {
  atomic_thread_fence(memory_order_seq_cst);
  uint32_t sent = atomic_load(&s->ready_sent), ack = atomic_load(&s->rx_ack);
  if (sent == ack) return 0;
  uint32_t eaten = eat_ready(fd, sent - ack);
  for (int tries = 0; eaten < sent - ack && tries < 20; tries++) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 1) == 1) eaten += eat_ready(fd, sent - ack - eaten);
    sent = atomic_load(&s->ready_sent);
  }
  return eaten;
}

/* After a read emptied the receive ring: take back the READY record now, so that a
 * level-triggered poller does not see the socket readable with nothing to read (Linux never
 * reports that). Called with rx_lock held. Skipped when no record is outstanding. */
static void drained(int fd, int slot, struct nk_ring *rx, bool dgram) {
  struct nk_slot *s = nk_slot_at(slot);
  if (atomic_load(&s->rx_eof) || atomic_load(&s->rx_err)) return;
  uint32_t eaten = take_records(fd, s);
  if (!eaten) return;
  ack_records(s, eaten); /* R2: data that raced in gets a fresh record from the engine */
  uint32_t fill = nk_ring_fill(rx);
  if ((dgram ? fill >= sizeof(struct nk_dgram) : fill > 0) || atomic_load(&s->rx_eof)) kick(slot);
}

/* The engine stopped reading the NSM because the ring was full: tell it there is room.
 * S2: the fence orders our tail store (C1) before the load of rx_stalled; pairs with S1 in the
 * engine's nk_sock_rx_stall(): either it sees the room or we see the flag and kick. */
static void after_consume(int slot) {
  atomic_thread_fence(memory_order_seq_cst);
  if (atomic_load(&nk_slot_at(slot)->rx_stalled)) kick(slot);
}

static int epipe(int flags) {
  if (!(flags & MSG_NOSIGNAL)) raise(SIGPIPE);
  return -EPIPE;
}

/* ---- addresses ---- */

static void copy_out_addr(const struct sockaddr_storage *ss, socklen_t sl, struct sockaddr *sa,
                          socklen_t *len) {
  if (!sa || !len) return;
  socklen_t n = *len < sl ? *len : sl;
  memcpy(sa, ss, n);
  *len = sl;
}

/* ---- socket lifecycle ---- */

/* A request that brings a new proxy (NK_OP_SOCKET, NK_OP_RENEW): a socketpair made, its
 * engine end sent with the guest end's inode. The guest end, or -errno. */
static int proxy_req(struct nk_req *req, struct nk_rep *rep) {
  int sv[2];
  if (nk_libc.socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return -errno;
  /* The smallest send buffer makes one blocker record enough to read as unwritable. */
  int one = 1;
  nk_libc.setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
  struct stat st;
  fstat(sv[0], &st);
  req->inode = st.st_ino;
  int r = nk_ctl_call(req, sv[1], rep);
  nk_libc.close(sv[1]);
  if (r == 0) r = rep->err;
  if (r == 0 && rep->slot >= nk_g.nslots) r = -EIO;
  if (r < 0) {
    nk_libc.close(sv[0]); /* the engine frees a socket it made when this end goes */
    return r;
  }
  return sv[0];
}

int nk_socket(int domain, int type, int protocol) {
  int base = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
  int r = nk_ensure_registered();
  if (r < 0) return r;
  struct nk_req req = {.op = NK_OP_SOCKET, .arg0 = domain, .arg1 = base, .arg2 = protocol};
  struct nk_rep rep;
  int fd = proxy_req(&req, &rep);
  if (fd < 0) return fd;
  if (!(type & SOCK_CLOEXEC)) nk_libc.fcntl(fd, F_SETFD, 0);
  if (type & SOCK_NONBLOCK) nk_libc.fcntl(fd, F_SETFL, O_NONBLOCK);
  nk_note_nonblock((int)rep.slot, type & SOCK_NONBLOCK);
  nk_fd_set(fd, (int)rep.slot);
  NK_LOG(2, "socket(%d,%d,%d) = fd %d slot %u", domain, base, protocol, fd, rep.slot);
  return fd;
}

static int simple_req(int slot, uint32_t op, int32_t arg0, const struct nk_addr *addr,
                      struct nk_rep *rep) {
  struct nk_req req = {
      .op = op, .slot = (uint32_t)slot, .gen = nk_slot_at(slot)->gen, .arg0 = arg0};
  if (addr) req.addr = *addr;
  int r = nk_ctl_call(&req, -1, rep);
  return r < 0 ? r : rep->err;
}

/* A stream socket whose connect failed: the engine hung up its proxy (the application saw
 * POLLHUP and POLLOUT there, as it waited for the connect), and Linux lets the socket be used
 * again. A fresh proxy takes the old one's place at fd, with its descriptor and file flags;
 * the engine makes it a new socket with the old one's options and bind (NK_OP_RENEW). Other
 * descriptors of the old proxy (a dup(), a fork's) stay with the failed socket. */
static int renew(int fd, int *slot) {
  struct nk_slot *old = nk_slot_at(*slot);
  struct nk_req req = {.op = NK_OP_RENEW, .slot = (uint32_t)*slot, .gen = old->gen};
  struct nk_rep rep;
  int g = proxy_req(&req, &rep);
  if (g < 0) return g;
  int fdfl = nk_libc.fcntl(fd, F_GETFD);
  int fl = nk_libc.fcntl(fd, F_GETFL);
  int r = nk_libc.dup3(g, fd, fdfl > 0 && (fdfl & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0 ? -errno : 0;
  nk_libc.close(g); /* on failure, the engine frees the new socket on this hang-up */
  if (r < 0) return r;
  bool nonblock = fl >= 0 && (fl & O_NONBLOCK);
  if (nonblock) nk_libc.fcntl(fd, F_SETFL, O_NONBLOCK);
  struct nk_slot *s = nk_slot_at((int)rep.slot);
  s->rcvtimeo_ms = old->rcvtimeo_ms;
  s->sndtimeo_ms = old->sndtimeo_ms;
  s->rcvlowat = old->rcvlowat;
  nk_note_nonblock((int)rep.slot, nonblock);
  nk_fd_set(fd, (int)rep.slot);
  NK_LOG(2, "fd %d: slot %d renewed as slot %u after a failed connect", fd, *slot, rep.slot);
  *slot = (int)rep.slot;
  return 0;
}

/* The tenant's relay hands a program's connection to the engine (NK_OP_ATTACH): kfd, the
 * relay's end of it, is carried by the engine from now on, and fd may be closed. */
int nk_attach(int fd, int slot, int kfd) {
  (void)fd;
  struct nk_req req = {.op = NK_OP_ATTACH, .slot = (uint32_t)slot, .gen = nk_slot_at(slot)->gen};
  struct nk_rep rep;
  int r = nk_ctl_call(&req, kfd, &rep);
  return r < 0 ? r : rep.err;
}

int nk_bind(int fd, int slot, const struct sockaddr *sa, socklen_t len) {
  struct nk_addr a;
  int r = nk_addr_from_sockaddr(&a, sa, len);
  if (r < 0) return r;
  if (atomic_load(&nk_slot_at(slot)->renew)) {
    atomic_store(&nk_slot_at(slot)->async_connect, 0);
    if ((r = renew(fd, &slot)) < 0) return r;
  }
  struct nk_rep rep;
  return simple_req(slot, NK_OP_BIND, 0, &a, &rep);
}

int nk_listen(int fd, int slot, int backlog) {
  if (atomic_load(&nk_slot_at(slot)->renew)) {
    atomic_store(&nk_slot_at(slot)->async_connect, 0);
    int r = renew(fd, &slot);
    if (r < 0) return r;
  }
  struct nk_rep rep;
  return simple_req(slot, NK_OP_LISTEN, backlog, NULL, &rep);
}

int nk_accept4(int fd, int slot, struct sockaddr *sa, socklen_t *len, int flags) {
  struct nk_slot *s = nk_slot_at(slot);
  if (s->kind != NK_KIND_LISTENER) return -EINVAL;
  for (;;) {
    struct nk_newconn nc;
    union {
      char buf[CMSG_SPACE(sizeof(int))];
      struct cmsghdr align;
    } cm;
    struct iovec iov = {.iov_base = &nc, .iov_len = sizeof(nc)};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
    ssize_t n = nk_libc.recvmsg(fd, &mh, (flags & SOCK_CLOEXEC) ? MSG_CMSG_CLOEXEC : 0);
    if (n < 0) return -errno;
    if (n == 0) return -ECONNABORTED; /* engine end gone */
    int nfd;
    nk_take_fds(&mh, &nfd, 1, nk_libc_close);
    if (n == 1 && nfd < 0 && *(char *)&nc == NK_MSG_READY) {
      /* The tenant is at a limit and connections wait in the stack: Linux's accept() reports
       * EMFILE then. The doorbell has the engine look again. */
      int err = atomic_load(&s->accept_err);
      if (err > 0 && err < 4096) {
        kick(slot);
        return -err;
      }
      continue;
    }
    if (n != sizeof(nc) || nc.type != NK_MSG_NEWCONN || nc.slot >= nk_g.nslots) {
      if (nfd >= 0) nk_libc.close(nfd);
      continue;
    }
    if (nfd < 0) return (mh.msg_flags & MSG_CTRUNC) ? -EMFILE : -ECONNABORTED;
    if (flags & SOCK_NONBLOCK) nk_libc.fcntl(nfd, F_SETFL, O_NONBLOCK);
    nk_note_nonblock((int)nc.slot, flags & SOCK_NONBLOCK);
    nk_fd_set(nfd, (int)nc.slot);
    struct sockaddr_storage ss;
    socklen_t sl = nk_addr_to_sockaddr(&nc.peer, (int)s->family, &ss);
    copy_out_addr(&ss, sl, sa, len);
    NK_LOG(2, "accept fd %d -> fd %d slot %u", fd, nfd, nc.slot);
    return nfd;
  }
}

static int take_error(struct nk_slot *s);

int nk_connect(int fd, int slot, const struct sockaddr *sa, socklen_t len) {
  struct nk_slot *s = nk_slot_at(slot);
  struct nk_addr a;
  int r = nk_addr_from_sockaddr(&a, sa, len);
  if (r < 0) return r;
  if (s->kind == NK_KIND_STREAM) {
    uint32_t st = atomic_load(&s->state);
    /* Linux: the first connect() after an asynchronous completion returns 0. */
    if (st == NK_ST_CONNECTED) return atomic_exchange(&s->async_connect, 0) ? 0 : -EISCONN;
    if (st == NK_ST_CONNECTING) return -EALREADY;
    if (a.family == 0) return -EAFNOSUPPORT;
    if (atomic_load(&s->renew)) {
      /* Linux: a connect that failed after EINPROGRESS ends on the next connect(), which
       * reports the error unless SO_ERROR took it; the one after that starts afresh. */
      if (atomic_exchange(&s->async_connect, 0)) {
        int err = take_error(s);
        return err ? -err : -ECONNABORTED;
      }
      if ((r = renew(fd, &slot)) < 0) return r;
      s = nk_slot_at(slot);
    }
  }
  struct nk_rep rep;
  r = simple_req(slot, NK_OP_CONNECT, 0, &a, &rep);
  if (r < 0 || s->kind != NK_KIND_STREAM || rep.val == 0) return r;
  /* In progress: unwritable until established. The blocker goes out before connect()
   * returns, so the application never sees the socket writable too early; the engine holds
   * it while connecting and lets it go at once if the connection already finished. */
  send_blocker(fd);
  if (is_nonblock(fd, 0)) {
    atomic_store(&s->async_connect, 1);
    return -EINPROGRESS;
  }
  for (;;) {
    int w = wait_fd(fd, POLLOUT, s->sndtimeo_ms);
    if (w == 0) return -ETIMEDOUT;
    if (w == -EINTR) return -EINTR;
    if (w < 0) return w;
    if (atomic_load(&s->state) != NK_ST_CONNECTING) break;
    /* Hung up while connecting, with no outcome recorded: the engine died under the
     * connect (it records one before it hangs up). As Linux reports a host that restarted. */
    if (w == 2) return -ECONNREFUSED;
  }
  /* T2: the state was loaded first; pairs with T1 in the engine (so_error, then the state). */
  int err = atomic_exchange(&s->so_error, 0);
  return err ? -err : 0;
}

int nk_shutdown(int fd, int slot, int how) {
  (void)fd;
  if (how < SHUT_RD || how > SHUT_RDWR) return -EINVAL;
  struct nk_rep rep;
  return simple_req(slot, NK_OP_SHUTDOWN, how, NULL, &rep);
}

/* ---- data path: stream ---- */

static size_t iov_total(const struct iovec *iov, size_t n) {
  size_t t = 0;
  for (size_t i = 0; i < n; i++) t += iov[i].iov_len;
  return t;
}

/* Copies len bytes between the caller's iovecs (from iov[*vi] + *voff, advanced as it goes)
 * and the ring at position at: into the ring when in, out of it otherwise. */
static void iov_copy(struct nk_ring *r, uint32_t at, const struct iovec *iov, size_t *vi,
                     size_t *voff, uint32_t len, bool in) {
  while (len) {
    size_t avail = iov[*vi].iov_len - *voff;
    if (avail == 0) {
      (*vi)++;
      *voff = 0;
      continue;
    }
    uint32_t n = avail < len ? (uint32_t)avail : len;
    uint8_t *p = (uint8_t *)iov[*vi].iov_base + *voff;
    if (in) nk_ring_copy_in(r, at, p, n);
    else nk_ring_copy_out(r, at, p, n);
    at += n;
    *voff += n;
    len -= n;
  }
}

static void gather_in(struct nk_ring *r, uint32_t at, const struct iovec *iov, size_t *vi,
                      size_t *voff, uint32_t len) {
  iov_copy(r, at, iov, vi, voff, len, true);
}

static void scatter_out(struct nk_ring *r, uint32_t at, const struct iovec *iov, size_t *vi,
                        size_t *voff, uint32_t len) {
  iov_copy(r, at, iov, vi, voff, len, false);
}

/* Wait until the transmit ring has space, or fail. Called with tx_lock released. */
static int wait_tx(int fd, int slot, struct nk_ring *tx, int flags, bool nonblock) {
  struct nk_slot *s = nk_slot_at(slot);
  send_blocker(fd);
  if (nk_ring_space(tx) > 0 || atomic_load(&s->tx_closed)) return 0; /* raced with the engine */
  if (nonblock) return -EAGAIN;
  int w = wait_fd(fd, POLLOUT, s->sndtimeo_ms);
  (void)flags;
  if (w == 0) return -EAGAIN;
  if (w < 0) return w;
  if (w == 2 && !atomic_load(&s->tx_closed)) return -ECONNRESET;
  return 0;
}

/* Linux keeps one pending error per socket (sk_err): whichever call meets it first reports
 * it and clears it. The engine writes it twice (rx_err for recv, so_error for SO_ERROR);
 * taking it from one side takes it from the other. */
static int take_error(struct nk_slot *s) {
  int rx = atomic_exchange(&s->rx_err, 0);
  int so = atomic_exchange(&s->so_error, 0);
  return rx ? rx : so;
}

/* The proxy hung up and the slot records no end: the engine died under the socket. The end
 * is recorded as a reset's is, so that the calls that follow show what Linux shows after one
 * (EOF, EPIPE); the next engine records the same. Returns the reset's errno. */
static int orphaned(struct nk_slot *s) {
  uint32_t open = 0;
  atomic_compare_exchange_strong(&s->tx_closed, &open, EPIPE);
  atomic_store(&s->rx_eof, 1);
  return ECONNRESET;
}

/* The engine died under a connecting or connected socket: its proxy hung up, and no outcome is
 * in the slot (the engine records one before it hangs up; the next engine records a reset,
 * but may not have yet). What Linux reports for a connection whose peer host restarted. */
static int orphan_error(int fd, struct nk_slot *s) {
  uint32_t st = atomic_load(&s->state);
  if (st != NK_ST_CONNECTING && st != NK_ST_CONNECTED) return 0;
  struct pollfd p = {.fd = fd, .events = 0};
  if (poll(&p, 1, 0) != 1 || !(p.revents & POLLHUP)) return 0;
  if (atomic_load(&s->state) != st || atomic_load(&s->so_error) || atomic_load(&s->rx_err) ||
      atomic_load(&s->tx_closed) || atomic_load(&s->rx_eof))
    return 0;
  return st == NK_ST_CONNECTING ? ECONNREFUSED : ECONNRESET;
}

static ssize_t stream_send(int fd, int slot, const struct iovec *iov, size_t iovcnt, int flags) {
  struct nk_slot *s = nk_slot_at(slot);
  size_t total = iov_total(iov, iovcnt), done = 0, vi = 0, voff = 0;
  bool nonblock = is_nonblock(fd, flags);
  struct nk_ring tx;
  for (;;) {
    uint32_t closed = atomic_load(&s->tx_closed);
    if (closed) {
      if (done) return (ssize_t)done;
      /* After a reset the first send reports it (ECONNRESET, no SIGPIPE), later ones EPIPE. */
      int err = take_error(s);
      if (err && err != EPIPE) return -err;
      return closed == EPIPE ? epipe(flags) : -(int)closed;
    }
    uint32_t st = atomic_load(&s->state);
    if (st != NK_ST_CONNECTED) {
      if (st == NK_ST_CONNECTING) {
        if (nonblock) return done ? (ssize_t)done : -EAGAIN;
        int w = wait_fd(fd, POLLOUT, s->sndtimeo_ms);
        if (w <= 0) return done ? (ssize_t)done : (w == 0 ? -EAGAIN : w);
        if (w == 2 && atomic_load(&s->state) == NK_ST_CONNECTING) return -ECONNREFUSED;
        continue;
      }
      return done ? (ssize_t)done : epipe(flags);
    }
    if (done == total) return (ssize_t)done;
    nk_slot_rings(slot, &tx, NULL); /* after the state: a connect may have sized the ring */
    lock(&s->tx_lock);
    uint32_t space = nk_ring_space(&tx);
    uint32_t n = total - done < space ? (uint32_t)(total - done) : space;
    if (n) {
      gather_in(&tx, atomic_load_explicit(tx.head, memory_order_relaxed), iov, &vi, &voff, n);
      nk_ring_produce(&tx, n);
      done += n;
    }
    unlock(&s->tx_lock);
    if (n) doorbell(slot);
    if (done == total) return (ssize_t)done;
    if (nonblock && done) {
      /* A short write tells the caller the socket is full; an edge-triggered poller (nginx)
       * then waits for EPOLLOUT. So the proxy fd must turn unwritable now, and writable
       * again when the engine has made room, or that edge never comes. */
      send_blocker(fd);
      return (ssize_t)done;
    }
    int r = wait_tx(fd, slot, &tx, flags, nonblock);
    if (r < 0) {
      if (r == -ECONNRESET && done == 0) return epipe(flags);
      return done ? (ssize_t)done : r;
    }
  }
}

static ssize_t stream_recv(int fd, int slot, const struct iovec *iov, size_t iovcnt, int flags) {
  struct nk_slot *s = nk_slot_at(slot);
  size_t total = iov_total(iov, iovcnt), got = 0, vi = 0, voff = 0;
  bool nonblock = is_nonblock(fd, flags);
  bool peek = flags & MSG_PEEK, waitall = (flags & MSG_WAITALL) && !peek, hup = false;
  struct nk_ring rx;
  uint32_t st = atomic_load(&s->state);
  while (st == NK_ST_CONNECTING) { /* Linux waits for the handshake, or says EAGAIN */
    if (nonblock) return -EAGAIN;
    int w = wait_fd(fd, POLLOUT, s->rcvtimeo_ms);
    if (w <= 0) return w == 0 ? -EAGAIN : w;
    st = atomic_load(&s->state);
    if (w == 2 && st == NK_ST_CONNECTING) return -ECONNREFUSED;
  }
  if (st != NK_ST_CONNECTED && st != NK_ST_CLOSED) return -ENOTCONN;
  if (total == 0) return 0;
  nk_slot_rings(slot, NULL, &rx); /* after the state: a connect may have sized the ring */
  for (;;) {
    lock(&s->rx_lock);
    seen(s);
    uint32_t fill = nk_ring_fill(&rx);
    if (fill) {
      uint32_t n = total - got < fill ? (uint32_t)(total - got) : fill;
      scatter_out(&rx, atomic_load_explicit(rx.tail, memory_order_relaxed), iov, &vi, &voff, n);
      if (!peek) nk_ring_consume(&rx, n);
      got += n;
      if (!peek && n == fill) drained(fd, slot, &rx, false);
      unlock(&s->rx_lock);
      if (!peek) after_consume(slot);
      if (got == total || !waitall) return (ssize_t)got;
      continue;
    }
    /* Empty. Errors and EOF stay readable: never eat the record for them. The engine sets
     * them after the last bytes before them are in the ring, so they may have landed between
     * our look at the ring and this one (a reply and its FIN together): those bytes come
     * first, as Linux returns queued data before EOF or a reset. X2: the flag's load comes
     * before the ring's (C0); pairs with X1 in the engine (its head store, then the flag). */
    if ((atomic_load(&s->rx_err) || atomic_load(&s->rx_eof)) && nk_ring_fill(&rx)) {
      unlock(&s->rx_lock);
      continue;
    }
    /* X3: the end flag first, then the error. The engine stores the error before the flag
     * (nk_sock_fail), so with the flag seen the error is too; the other way round, a reset
     * landing between the two loads read as a clean EOF (seen once in ~400 runs of
     * linger_zero_reset under load). */
    bool eof = atomic_load(&s->rx_eof);
    int err = atomic_load(&s->rx_err);
    if (err && !peek) err = take_error(s);
    if (err) {
      unlock(&s->rx_lock);
      return got ? (ssize_t)got : -err;
    }
    if (eof) {
      unlock(&s->rx_lock);
      NK_LOG(2, "fd %d slot %d: EOF after %zu (want %zu)", fd, slot, got, total);
      return (ssize_t)got;
    }
    uint32_t eaten = take_records(fd, s);
    if (eaten) ack_records(s, eaten); /* R2 */
    bool more = nk_ring_fill(&rx) || atomic_load(&s->rx_eof) || atomic_load(&s->rx_err);
    unlock(&s->rx_lock);
    if (more) {
      if (eaten) kick(slot);
      continue;
    }
    if (got && !waitall) return (ssize_t)got;
    if (nonblock) return got ? (ssize_t)got : -EAGAIN;
    if (hup) return got ? (ssize_t)got : -orphaned(s);
    int w = wait_fd(fd, POLLIN, s->rcvtimeo_ms);
    if (w == 0) return got ? (ssize_t)got : -EAGAIN;
    if (w < 0) return got ? (ssize_t)got : w;
    hup = w == 2;
  }
}

/* ---- data path: datagrams ---- */

/* The control messages of sendmsg() that set a datagram's TTL / hop limit and TOS / traffic
 * class, checked as the kernel checks them (ip_cmsg_send, ip6_datagram_send_ctl) and written
 * as int-sized messages into out (abi.h); packet info (the source address, which is the
 * tenant's anyway) and other levels are passed over, as a socket of the other family passes
 * them over. Returns the bytes written, or -EINVAL. */
static int dgram_cmsgs(const struct msghdr *msg, int family, unsigned char *out) {
  if (!msg->msg_control || msg->msg_controllen < sizeof(struct cmsghdr)) return 0;
  size_t used = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR((struct msghdr *)msg); c;
       c = CMSG_NXTHDR((struct msghdr *)msg, c)) {
    if (c->cmsg_len < CMSG_LEN(0)) return -EINVAL;
    int v = 0, level = c->cmsg_level, type = c->cmsg_type;
    bool int_sized = c->cmsg_len == CMSG_LEN(sizeof(int));
    if (int_sized) memcpy(&v, CMSG_DATA(c), sizeof(v));
    if (level == IPPROTO_IP && family == AF_INET) {
      if (type == IP_PKTINFO || type == IP_RETOPTS) continue;
      if (type == IP_TTL) {
        if (!int_sized || v < 1 || v > 255) return -EINVAL;
      } else if (type == IP_TOS) {
        if (c->cmsg_len == CMSG_LEN(sizeof(uint8_t))) v = *CMSG_DATA(c);
        else if (!int_sized) return -EINVAL;
        if (v < 0 || v > 255) return -EINVAL;
      } else {
        return -EINVAL;
      }
    } else if (level == IPPROTO_IPV6 && family == AF_INET6) {
      if (type == IPV6_PKTINFO) continue;
      if (type != IPV6_HOPLIMIT && type != IPV6_TCLASS) return -EINVAL;
      if (!int_sized || v < -1 || v > 255) return -EINVAL;
    } else {
      continue;
    }
    if (used + CMSG_SPACE(sizeof(int)) > NK_DGRAM_CMSG_MAX) return -EINVAL;
    struct cmsghdr o = {.cmsg_len = CMSG_LEN(sizeof(int)), .cmsg_level = level, .cmsg_type = type};
    memset(out + used, 0, CMSG_SPACE(sizeof(int)));
    memcpy(out + used, &o, sizeof(o));
    memcpy(out + used + CMSG_LEN(0), &v, sizeof(v));
    used += CMSG_SPACE(sizeof(int));
  }
  return (int)used;
}

/* The received datagram's control messages (in the ring at `at`, clen bytes) into the
 * application's buffer: those that fit whole, and MSG_CTRUNC if any did not, as the kernel
 * does (put_cmsg). */
static void dgram_cmsgs_out(struct nk_ring *rx, uint32_t at, uint32_t clen, struct msghdr *msg) {
  _Alignas(struct cmsghdr) unsigned char in[NK_DGRAM_CMSG_MAX];
  size_t room = msg->msg_control ? msg->msg_controllen : 0, used = 0;
  msg->msg_controllen = 0;
  if (clen > sizeof(in)) return;
  nk_ring_copy_out(rx, at, in, clen);
  for (size_t off = 0; off + sizeof(struct cmsghdr) <= clen;) {
    struct cmsghdr c;
    memcpy(&c, in + off, sizeof(c));
    if (c.cmsg_len < CMSG_LEN(0) || c.cmsg_len > clen - off) break;
    size_t space = CMSG_SPACE(c.cmsg_len - CMSG_LEN(0));
    if (room - used < sizeof(struct cmsghdr)) {
      msg->msg_flags |= MSG_CTRUNC;
      break;
    }
    char *to = (char *)msg->msg_control + used;
    if (room - used < c.cmsg_len) { /* as much as fits, its length saying so */
      c.cmsg_len = room - used;
      memcpy(to, &c, sizeof(c));
      memcpy(to + sizeof(c), in + off + sizeof(c), c.cmsg_len - sizeof(c));
      msg->msg_flags |= MSG_CTRUNC;
      used = room;
      break;
    }
    memcpy(to, in + off, c.cmsg_len);
    used += space < room - used ? space : room - used;
    off += space;
  }
  msg->msg_controllen = used;
}

static ssize_t dgram_send(int fd, int slot, const struct msghdr *msg, int flags) {
  struct nk_slot *s = nk_slot_at(slot);
  size_t len = iov_total(msg->msg_iov, msg->msg_iovlen);
  struct nk_dgram h = {.len = (uint32_t)len};
  _Alignas(struct cmsghdr) unsigned char ctl[NK_DGRAM_CMSG_MAX];
  int clen = dgram_cmsgs(msg, (int)s->family, ctl);
  if (clen < 0) return clen;
  h.cmsg_len = (uint16_t)clen;
  if (msg->msg_name && msg->msg_namelen) {
    int r = nk_addr_from_sockaddr(&h.addr, msg->msg_name, msg->msg_namelen);
    if (r < 0) return r;
  } else if (atomic_load(&s->state) != NK_ST_CONNECTED) {
    return -EDESTADDRREQ;
  }
  if (len > NK_DGRAM_MAX || NK_DGRAM_SPACE_CMSG(len, clen) > nk_g.ring_size) return -EMSGSIZE;
  bool nonblock = is_nonblock(fd, flags);
  struct nk_ring tx;
  nk_slot_rings(slot, &tx, NULL);
  uint32_t need = (uint32_t)NK_DGRAM_SPACE_CMSG(len, clen);
  uint32_t cspace = ((uint32_t)clen + 7u) & ~7u;
  for (;;) {
    lock(&s->tx_lock);
    if (nk_ring_space(&tx) >= need) {
      uint32_t at = atomic_load_explicit(tx.head, memory_order_relaxed);
      nk_ring_copy_in(&tx, at, &h, sizeof(h));
      if (clen) nk_ring_copy_in(&tx, at + sizeof(h), ctl, (uint32_t)clen);
      size_t vi = 0, voff = 0;
      gather_in(&tx, at + sizeof(h) + cspace, msg->msg_iov, &vi, &voff, (uint32_t)len);
      nk_ring_produce(&tx, need);
      unlock(&s->tx_lock);
      doorbell(slot);
      return (ssize_t)len;
    }
    unlock(&s->tx_lock);
    int r = wait_tx(fd, slot, &tx, flags, nonblock);
    if (r < 0) return r;
  }
}

static ssize_t dgram_recv(int fd, int slot, struct msghdr *msg, int flags) {
  struct nk_slot *s = nk_slot_at(slot);
  bool nonblock = is_nonblock(fd, flags), hup = false;
  struct nk_ring rx;
  nk_slot_rings(slot, NULL, &rx);
  for (;;) {
    lock(&s->rx_lock);
    seen(s);
    if (nk_ring_fill(&rx) >= sizeof(struct nk_dgram)) {
      uint32_t at = atomic_load_explicit(rx.tail, memory_order_relaxed);
      struct nk_dgram h;
      nk_ring_copy_out(&rx, at, &h, sizeof(h));
      uint32_t cspace = ((uint32_t)h.cmsg_len + 7u) & ~7u;
      size_t cap = iov_total(msg->msg_iov, msg->msg_iovlen);
      uint32_t n = h.len < cap ? h.len : (uint32_t)cap;
      size_t vi = 0, voff = 0;
      scatter_out(&rx, at + sizeof(h) + cspace, msg->msg_iov, &vi, &voff, n);
      msg->msg_flags = h.len > cap ? MSG_TRUNC : 0;
      dgram_cmsgs_out(&rx, at + sizeof(h), h.cmsg_len, msg);
      if (!(flags & MSG_PEEK)) {
        nk_ring_consume(&rx, (uint32_t)NK_DGRAM_SPACE_CMSG(h.len, h.cmsg_len));
        drained(fd, slot, &rx, true);
      }
      unlock(&s->rx_lock);
      if (!(flags & MSG_PEEK)) after_consume(slot);
      if (msg->msg_name) {
        struct sockaddr_storage ss;
        socklen_t sl = nk_addr_to_sockaddr(&h.addr, (int)s->family, &ss);
        copy_out_addr(&ss, sl, msg->msg_name, &msg->msg_namelen);
      }
      return (flags & MSG_TRUNC) ? (ssize_t)h.len : (ssize_t)n;
    }
    int err = atomic_exchange(&s->rx_err, 0);
    if (err) {
      unlock(&s->rx_lock);
      return -err;
    }
    uint32_t eaten = take_records(fd, s);
    if (eaten) ack_records(s, eaten); /* R2 */
    bool more = nk_ring_fill(&rx) >= sizeof(struct nk_dgram) || atomic_load(&s->rx_err);
    unlock(&s->rx_lock);
    if (more) {
      if (eaten) kick(slot);
      continue;
    }
    if (nonblock) return -EAGAIN;
    if (hup) return -ECONNRESET;
    int w = wait_fd(fd, POLLIN, s->rcvtimeo_ms);
    if (w == 0) return -EAGAIN;
    if (w < 0) return w;
    hup = w == 2;
  }
}

/* ---- entry points used by interpose.c ---- */

ssize_t nk_sendmsg(int fd, int slot, const struct msghdr *msg, int flags) {
  struct nk_slot *s = nk_slot_at(slot);
  if (s->kind == NK_KIND_DGRAM) return dgram_send(fd, slot, msg, flags);
  if (s->kind == NK_KIND_LISTENER) return epipe(flags);
  /* A destination address on a connected stream socket is ignored, as Linux does. */
  return stream_send(fd, slot, msg->msg_iov, msg->msg_iovlen, flags);
}

ssize_t nk_recvmsg(int fd, int slot, struct msghdr *msg, int flags) {
  struct nk_slot *s = nk_slot_at(slot);
  if (s->kind == NK_KIND_DGRAM) return dgram_recv(fd, slot, msg, flags);
  if (s->kind == NK_KIND_LISTENER) return -ENOTCONN;
  msg->msg_controllen = 0;
  msg->msg_flags = 0;
  if (msg->msg_name) {
    struct sockaddr_storage ss;
    socklen_t sl = nk_addr_to_sockaddr(&s->peer, (int)s->family, &ss);
    copy_out_addr(&ss, sl, msg->msg_name, &msg->msg_namelen);
  }
  return stream_recv(fd, slot, msg->msg_iov, msg->msg_iovlen, flags);
}

/* sendfile into a NetKernel socket: read the file straight into the transmit ring. */
ssize_t nk_sendfile(int out_fd, int slot, int in_fd, off_t *offset, size_t count) {
  struct nk_slot *s = nk_slot_at(slot);
  if (s->kind != NK_KIND_STREAM) return -EINVAL;
  bool nonblock = is_nonblock(out_fd, 0);
  struct nk_ring tx;
  off_t pos = offset ? *offset : 0;
  size_t done = 0;
  while (done < count) {
    uint32_t closed = atomic_load(&s->tx_closed);
    if (closed || atomic_load(&s->state) != NK_ST_CONNECTED) {
      if (done) break;
      return epipe(0);
    }
    nk_slot_rings(slot, &tx, NULL); /* after the state (see stream_send) */
    lock(&s->tx_lock);
    uint32_t space = nk_ring_space(&tx);
    uint32_t want = count - done < space ? (uint32_t)(count - done) : space;
    ssize_t n = 0;
    if (want) {
      struct iovec iov[2];
      int cnt = nk_ring_iov(&tx, atomic_load_explicit(tx.head, memory_order_relaxed), want, iov);
      n = offset ? preadv(in_fd, iov, cnt, pos) : nk_libc.readv(in_fd, iov, cnt);
      if (n > 0) nk_ring_produce(&tx, (uint32_t)n);
    }
    unlock(&s->tx_lock);
    if (n < 0) {
      if (done) break;
      return -errno;
    }
    if (n > 0) {
      doorbell(slot);
      done += (size_t)n;
      pos += n;
      continue;
    }
    if (want) break; /* end of file */
    if (nonblock && done) {
      send_blocker(out_fd); /* short: unwritable until the engine makes room (see stream_send) */
      break;
    }
    int r = wait_tx(out_fd, slot, &tx, 0, nonblock);
    if (r < 0) {
      if (done) break;
      return r;
    }
  }
  if (offset) *offset = pos;
  return (ssize_t)done;
}

int nk_getname(int fd, int slot, struct sockaddr *sa, socklen_t *len, bool peer) {
  (void)fd;
  struct nk_slot *s = nk_slot_at(slot);
  if (!len) return -EFAULT;
  if (peer) {
    /* T2: the state before the addresses; pairs with T1 (the engine writes them first). */
    uint32_t st = atomic_load(&s->state);
    if (st != NK_ST_CONNECTED && !(s->kind == NK_KIND_DGRAM && s->peer.family)) return -ENOTCONN;
    if (st == NK_ST_CONNECTED && !s->peer.family) return -ENOTCONN;
  }
  struct nk_addr a = peer ? s->peer : s->local;
  struct sockaddr_storage ss;
  socklen_t sl = nk_addr_to_sockaddr(&a, (int)s->family, &ss);
  copy_out_addr(&ss, sl, sa, len);
  return 0;
}

static int opt_int(const void *val, socklen_t len) {
  int v = 0;
  memcpy(&v, val, len < sizeof(int) ? len : sizeof(int));
  return v;
}

static int put_int(void *val, socklen_t *len, int v) {
  if (!val || !len || *len < sizeof(int)) return -EINVAL;
  memcpy(val, &v, sizeof(int));
  *len = sizeof(int);
  return 0;
}

static uint32_t tv_ms(const void *val, socklen_t len) {
  struct timeval tv = {0};
  memcpy(&tv, val, len < sizeof(tv) ? len : sizeof(tv));
  uint64_t ms = (uint64_t)tv.tv_sec * 1000u + (uint64_t)(tv.tv_usec + 999) / 1000u;
  return ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms;
}

/* An option for a stream socket that has no kernel socket yet goes into the slot, for the
 * engine to take with the socket's next request (its bind, connect or listen): no round trip.
 * O1: record it, then look at the state again; pairs with O2 in the engine (state stored,
 * then preopts taken). If a request moved the socket on meanwhile, either the engine saw the
 * record or the record is taken back here and sent the usual way. */
static bool defer_option(struct nk_slot *s, int level, int name, const void *val, socklen_t len) {
  int i = nk_preopt_index(level, name);
  if (i < 0 || len < sizeof(int) || s->kind != NK_KIND_STREAM ||
      atomic_load(&s->state) != NK_ST_NEW)
    return false;
  uint32_t bit = 1u << i, value = (opt_int(val, len) ? bit : 0) << NK_PREOPT_VALUE;
  uint32_t cur = atomic_load(&s->preopts), want;
  do want = (cur & ~(bit << NK_PREOPT_VALUE)) | bit | value;
  while (!atomic_compare_exchange_weak(&s->preopts, &cur, want));
  if (atomic_load(&s->state) == NK_ST_NEW) return true;
  uint32_t mine = bit | (bit << NK_PREOPT_VALUE);
  cur = want;
  while ((cur & mine) == (want & mine))
    if (atomic_compare_exchange_weak(&s->preopts, &cur, cur & ~mine)) return false; /* taken back */
  return true; /* the engine took it (it clears the whole word) */
}

int nk_setsockopt(int fd, int slot, int level, int name, const void *val, socklen_t len) {
  struct nk_slot *s = nk_slot_at(slot);
  if (!val && len) return -EFAULT;
  if (level == SOL_SOCKET && (name == SO_RCVTIMEO || name == SO_SNDTIMEO)) {
    if (len < sizeof(struct timeval)) return -EINVAL;
    uint32_t ms = tv_ms(val, len);
    if (name == SO_RCVTIMEO) s->rcvtimeo_ms = ms;
    else s->sndtimeo_ms = ms;
    /* The proxy fd itself is waited on by accept(): give it the same timeout. */
    nk_libc.setsockopt(fd, level, name, val, len);
    return 0;
  }
  if (level == SOL_SOCKET && name == SO_RCVLOWAT) {
    s->rcvlowat = (uint32_t)opt_int(val, len);
    return 0;
  }
  if (defer_option(s, level, name, val, len)) return 0;
  if (len > NK_OPT_MAX) return -EINVAL;
  struct nk_req req = {.op = NK_OP_SETSOCKOPT,
                       .slot = (uint32_t)slot,
                       .gen = s->gen,
                       .arg0 = level,
                       .arg1 = name,
                       .optlen = len};
  memcpy(req.optval, val, len);
  struct nk_rep rep;
  int r = nk_ctl_call(&req, -1, &rep);
  return r < 0 ? r : rep.err;
}

int nk_getsockopt(int fd, int slot, int level, int name, void *val, socklen_t *len) {
  struct nk_slot *s = nk_slot_at(slot);
  int r;
  if (!len) return -EFAULT;
  if (level == SOL_SOCKET) {
    switch (name) {
      case SO_ERROR:
        if (s->kind == NK_KIND_DGRAM) return put_int(val, len, atomic_exchange(&s->so_error, 0));
        /* Again after the orphan check: a next engine that adopted the socket meanwhile has
         * stored the error before the state the check found changed (T1). */
        if ((r = take_error(s)) == 0 && (r = orphan_error(fd, s)) == 0) r = take_error(s);
        return put_int(val, len, r);
      case SO_TYPE:
        return put_int(val, len, s->kind == NK_KIND_DGRAM ? SOCK_DGRAM : SOCK_STREAM);
      case SO_DOMAIN:
        return put_int(val, len, (int)s->family);
      case SO_PROTOCOL:
        return put_int(val, len, s->kind == NK_KIND_DGRAM ? IPPROTO_UDP : IPPROTO_TCP);
      case SO_ACCEPTCONN:
        return put_int(val, len, s->kind == NK_KIND_LISTENER);
      case SO_RCVLOWAT:
        return put_int(val, len, s->rcvlowat ? (int)s->rcvlowat : 1);
      case SO_RCVTIMEO:
      case SO_SNDTIMEO: {
        uint32_t ms = name == SO_RCVTIMEO ? s->rcvtimeo_ms : s->sndtimeo_ms;
        struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
        if (!val || *len < sizeof(tv)) return -EINVAL;
        memcpy(val, &tv, sizeof(tv));
        *len = sizeof(tv);
        return 0;
      }
    }
  }
  struct nk_req req = {.op = NK_OP_GETSOCKOPT,
                       .slot = (uint32_t)slot,
                       .gen = s->gen,
                       .arg0 = level,
                       .arg1 = name,
                       .optlen = *len > NK_OPT_MAX ? NK_OPT_MAX : *len};
  struct nk_rep rep;
  r = nk_ctl_call(&req, -1, &rep);
  if (r < 0) return r;
  if (rep.err) return rep.err;
  socklen_t n = rep.optlen < *len ? rep.optlen : *len;
  if (val) memcpy(val, rep.optval, n);
  *len = rep.optlen;
  return 0;
}

int nk_ioctl(int fd, int slot, unsigned long req, void *arg) {
  struct nk_slot *s = nk_slot_at(slot);
  if (req == FIONREAD) {
    struct nk_ring rx;
    nk_slot_rings(slot, NULL, &rx);
    int v = 0;
    seen(s);
    uint32_t fill = nk_ring_fill(&rx);
    if (s->kind == NK_KIND_DGRAM) {
      if (fill >= sizeof(struct nk_dgram)) {
        struct nk_dgram h;
        nk_ring_copy_out(&rx, atomic_load_explicit(rx.tail, memory_order_relaxed), &h, sizeof(h));
        v = (int)h.len;
      }
    } else {
      v = (int)fill;
    }
    if (!arg) return -EFAULT;
    memcpy(arg, &v, sizeof(v));
    return 0;
  }
  if (req == TIOCOUTQ) {
    struct nk_ring tx;
    nk_slot_rings(slot, &tx, NULL);
    int v = (int)nk_ring_fill(&tx);
    if (!arg) return -EFAULT;
    memcpy(arg, &v, sizeof(v));
    return 0;
  }
  /* FIONBIO and friends act on the proxy fd itself, which carries O_NONBLOCK. */
  int r = nk_libc.ioctl(fd, req, arg);
  if (r < 0) return -errno;
  if (req == FIONBIO && arg) nk_note_nonblock(slot, *(int *)arg != 0);
  return r;
}
