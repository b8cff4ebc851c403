/* libFuzzer harness: what an external NSM writes into its ServiceLib queues (csrc/nsm/external.c).
 *
 * The harness is the NSM: each input it connects to the engine's socket for the NSM (as root in
 * the NSM's namespace, which here is the engine's own), maps the queues from the engine's HELLO
 * and serves a fresh tenant whose sockets live on that NSM: TCP connecting, connected (v4 and
 * v6), listening, UDP bound and connected, and sockets not yet bound. The engine's synchronous
 * requests (SOCKET, BIND, LISTEN, CONNECT) find their replies already queued: the engine waits
 * for them in its own thread, which is also the NSM's here, so the harness answers every tag
 * the engine can use next before it calls in (reply_for).
 *
 * The input is a sequence of: events with every field chosen (opcode, socket id, errno, byte
 * counts exact, off by one or anything, addresses), ACCEPTED for listeners and for anything,
 * datagrams through the incoming area with right and wrong positions and lengths, answers to
 * the engine's requests (SENT, RECVD, FREED, taking datagrams), garbage replies, stores into
 * the queues' indices and sleeping flags, the engine's doorbell, the tenant's side of its
 * rings, socket calls (shutdown, options, connect, close), the NSM hanging up, and rounds of
 * the engine's loop. An NSM that breaks the protocol is taken down: the harness then just
 * goes on (its later events go nowhere).
 *
 * Oracles: sanitizers; the engine's accounting (nk_fuzz.h); the credit the engine gives never
 * exceeds a ring; a neighbour tenant on a kernel NSM pings through the engine after the input
 * (the stall oracle); after the tenant is deleted and the NSM has hung up, no descriptor is left.
 *
 * Input format: a byte chooses the action (modulo ACT_COUNT), its arguments follow.
 */
#include <netinet/tcp.h>
#include <sys/mman.h>

#include "netkernel/servicelib.h"
#include "nk_fuzz.h"

enum {
  ACT_EVENT,  /* op, sock, arg, len, off, addr: one event */
  ACT_ACCEPT, /* listener, new id, family: ACCEPTED */
  ACT_DGRAM,  /* sock, len u16, flags, addr: a datagram through dg_in */
  ACT_ANSWER, /* n, how: answer the engine's requests in order */
  ACT_INDEX,  /* which, mode, value: a store into a queue index or flag */
  ACT_REPLY,  /* tag mode, fields: a reply nobody asked for */
  ACT_TICK,   /* n: rounds of the engine's loop */
  ACT_BELL,   /* the engine's doorbell (an eventfd write) */
  ACT_TENANT, /* slot, what, n: the application's side of a ring */
  ACT_CALL,   /* slot, what: socket calls that reach the NSM */
  ACT_HANGUP, /* b: the NSM process goes away (b even), or is the last to go (b odd) */
  ACT_COUNT
};

#define NSLOTS      32
#define RING        4096u
#define ACCEPT_BASE 60001u /* ids the harness gives accepted connections; SOCKET's are below */

static struct nk_nsm *nsm;
static struct nk_tenant *T;
static char sock_path[128], ns_path[64];
static int cfd = -1, nsm_bell = -1, engine_bell = -1;
static struct nk_sl_shared *sh; /* the harness's mapping of the engine's queues */
static uint32_t last_tag, next_accept;
static bool req_moved; /* the input stored into the request queue's indices */
static int gfd[NSLOTS];

/* Requests the engine posted that want an answer (SEND, RECV, CLOSE, SENDTO), in order. */
#define MAX_LOG 4096
static struct nk_nqe reqlog[MAX_LOG];
static uint32_t log_head, log_tail;

/* Socket ids the input picks from: every id the engine knows for the tenant's sockets. */
#define MAX_IDS 64
static uint32_t ids[MAX_IDS];
static int nids;

static void note_id(uint32_t id) {
  for (int i = 0; i < nids; i++)
    if (ids[i] == id) return;
  if (nids < MAX_IDS) ids[nids++] = id;
}

/* The reply the harness gives to the engine's synchronous request number tag, whatever it is:
 * SOCKET gets a fresh id (the tag's own), BIND a port, LISTEN and CONNECT success. */
static struct nk_nqe reply_for(uint32_t tag) {
  struct nk_nqe r = {.op = NK_SLR_DONE, .tag = tag, .sock = 1 + tag % (ACCEPT_BASE - 2)};
  r.addr.port = htons((uint16_t)(20000 + tag % 20000));
  return r;
}

/* The tag of the reply the harness last wrote at each position of the reply queue (only the
 * harness writes there). */
static uint32_t rep_tag[NK_SL_QUEUE_LEN];

static bool push_reply(const struct nk_nqe *r) {
  uint32_t head = atomic_load_explicit(&sh->rep.head.v, memory_order_relaxed);
  if (!nk_sl_push(&sh->rep, r)) return false;
  rep_tag[head & (NK_SL_QUEUE_LEN - 1)] = r->tag;
  return true;
}

/* Replies for the next PREQUEUED tags must stand in the queue in order, after the engine's
 * tail: while it waits for one tag the engine drops every reply before it (stale answers), so
 * a reply lost (the input moved an index, or pushed garbage) would make each later request
 * wait out its deadline. What is missing from the run is pushed again, in order, at the head.
 * More than one call's worth, in case the harness missed some requests (an input that moved
 * the request queue's indices hides them). */
#define PREQUEUED 32u

static void prequeue(void) {
  if (!sh) return;
  uint32_t tail = atomic_load(&sh->rep.tail.v), head = atomic_load(&sh->rep.head.v);
  uint32_t n = head - tail < NK_SL_QUEUE_LEN ? head - tail : 0, want = last_tag + 1;
  for (uint32_t i = 0; i < n && want <= last_tag + PREQUEUED; i++)
    if (rep_tag[(tail + i) & (NK_SL_QUEUE_LEN - 1)] == want) want++;
  for (; want <= last_tag + PREQUEUED; want++) {
    struct nk_nqe r = reply_for(want);
    if (!push_reply(&r)) break;
  }
}

/* The NSM's side of the request queue: sync requests move last_tag on, the rest are kept to be
 * answered by ACT_ANSWER. */
static void observe(void) {
  if (!sh) return;
  struct nk_nqe q;
  for (int i = 0; i < 8192 && nk_sl_pop(&sh->req, &q); i++) {
    if (q.op >= NK_SLQ_SOCKET && q.op <= NK_SLQ_CONNECT) {
      /* The engine's tags go up by one per request. Once the input has moved the request
       * queue's indices, an element read may be stale: only a tag close ahead is believed. */
      if (q.tag > last_tag && (!req_moved || q.tag - last_tag <= PREQUEUED)) last_tag = q.tag;
    } else if (q.op == NK_SLQ_SEND || q.op == NK_SLQ_RECV || q.op == NK_SLQ_CLOSE ||
               q.op == NK_SLQ_SENDTO) {
      if (log_head - log_tail < MAX_LOG) reqlog[log_head++ % MAX_LOG] = q;
    }
    if (q.op == NK_SLQ_SOCKET) note_id(reply_for(q.tag).sock);
  }
  prequeue();
}

/* The control connection: TENANT_ADD/DEL and their descriptors, read and closed. */
static void drain_ctl(void) {
  for (int i = 0; i < 64 && cfd >= 0; i++) {
    struct nk_sl_ctl m;
    union {
      char buf[CMSG_SPACE(sizeof(int) * 4)];
      struct cmsghdr align;
    } cm;
    struct iovec iov = {.iov_base = &m, .iov_len = sizeof(m)};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
    ssize_t n = recvmsg(cfd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n <= 0) return;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      for (int j = 0; j < k; j++) {
        int fd;
        memcpy(&fd, CMSG_DATA(c) + (size_t)j * sizeof(int), sizeof(int));
        close(fd);
      }
    }
  }
}

static void tick(void) {
  prequeue();
  nk_fuzz_tick();
  observe();
  drain_ctl();
  nk_fuzz_check_engine();
  /* The engine's credit never reaches beyond a ring: else the NSM could overwrite bytes the
   * application has not read, or send bytes it has not written. */
  for (uint32_t i = 0; T && i < T->nslots; i++) {
    struct nk_esock *es = T->socks[i];
    if (!es || !es->ext.attached || es->dead) continue;
    uint32_t tail = atomic_load(es->tx.tail), head = atomic_load(es->rx.head);
    NK_FUZZ_CHECK(es->ext.tx_off - tail <= es->tx.size, "slot %u: %u bytes offered to the NSM", i,
                  es->ext.tx_off - tail);
    NK_FUZZ_CHECK(es->ext.rx_credit - head <= es->rx.size, "slot %u: %u bytes of credit", i,
                  es->ext.rx_credit - head);
  }
}

static void nsm_disconnect(void) {
  if (cfd >= 0) close(cfd);
  cfd = -1;
  nk_fuzz_tick(); /* the engine sees the hang-up: ext_down() */
  if (sh) munmap(sh, sizeof(*sh));
  sh = NULL;
  if (nsm_bell >= 0) close(nsm_bell);
  if (engine_bell >= 0) close(engine_bell);
  nsm_bell = engine_bell = -1;
}

static void nsm_connect(void) {
  cfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  snprintf(un.sun_path, sizeof(un.sun_path), "%s", sock_path);
  if (cfd < 0 || connect(cfd, (struct sockaddr *)&un, sizeof(un)) < 0)
    nk_fuzz_die("nsm connect: %s", strerror(errno));
  nk_fuzz_tick(); /* the engine accepts and says HELLO */
  struct nk_sl_ctl hello;
  int fds[3] = {-1, -1, -1};
  union {
    char buf[CMSG_SPACE(sizeof(int) * 3)];
    struct cmsghdr align;
  } cm;
  struct iovec iov = {.iov_base = &hello, .iov_len = sizeof(hello)};
  struct msghdr mh = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
  ssize_t n = recvmsg(cfd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  struct cmsghdr *c = n == sizeof(hello) ? CMSG_FIRSTHDR(&mh) : NULL;
  if (!c || c->cmsg_len != CMSG_LEN(sizeof(fds)) || hello.op != NK_SLC_HELLO)
    nk_fuzz_die("no HELLO from the engine (%zd bytes)", n);
  memcpy(fds, CMSG_DATA(c), sizeof(fds));
  sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
  if (sh == MAP_FAILED) nk_fuzz_die("mmap: %s", strerror(errno));
  close(fds[0]);
  nsm_bell = fds[1];
  engine_bell = fds[2];
  fcntl(cfd, F_SETFL, O_NONBLOCK);
  memset(rep_tag, 0, sizeof(rep_tag)); /* fresh queues */
  req_moved = false;
  log_head = log_tail = 0;
}

/* socket() as GuestLib makes it (see fuzz_region.c). */
static struct nk_esock *guest_socket(int family, int type) {
  int guest = -1;
  struct nk_esock *es = nk_fuzz_guest_socket(T, nk_fuzz_ns_tenant, family, type, &guest);
  if (es) gfd[es->slot] = guest;
  return es;
}

static void note_ids(void) {
  for (uint32_t i = 0; i < T->nslots; i++) {
    struct nk_esock *es = T->socks[i];
    for (int k = 0; es && k < es->ep_count; k++)
      if (es->ep[k].fd < 0 && es->ep[k].id != NK_EXT_LOST) note_id(es->ep[k].id);
  }
}

static struct nk_esock *connected(int family, const char *ip, uint16_t port, bool established) {
  struct nk_esock *es = guest_socket(family, SOCK_STREAM);
  if (!es) return NULL;
  struct nk_addr a = nk_fuzz_addr(ip, port);
  int inprog;
  prequeue();
  nk_sock_connect(es, &a, &inprog);
  observe();
  if (established && es->ep_count && es->ep[0].fd < 0 && sh) {
    struct nk_nqe e = {.op = NK_SLE_CONNECTED, .sock = es->ep[0].id, .addr = es->local};
    nk_sl_push(&sh->evt, &e);
  }
  return es;
}

static void setup(void) {
  memset(gfd, -1, sizeof(gfd));
  nids = 0;
  next_accept = 0;
  nsm_connect();
  int r = nk_tenant_add("fuzz", nk_fuzz_ns_tenant_path, "ext", NK_FUZZ_TENANT_V4, NK_FUZZ_TENANT_V6,
                        0, 0, &T);
  if (r < 0) nk_fuzz_die("tenant: %s", strerror(-r));
  drain_ctl();
  connected(AF_INET, NK_FUZZ_NSM_V4, 80, false);
  connected(AF_INET, NK_FUZZ_NSM_V4, 80, true);
  connected(AF_INET6, NK_FUZZ_NSM_V6, 443, true);
  struct nk_esock *l = guest_socket(AF_INET, SOCK_STREAM);
  prequeue();
  if (l) nk_sock_listen(l, 8);
  observe();
  struct nk_esock *u = guest_socket(AF_INET, SOCK_DGRAM);
  struct nk_addr any4 = {.family = AF_INET}, d6 = nk_fuzz_addr(NK_FUZZ_NSM_V6, 53);
  prequeue();
  if (u) nk_sock_bind(u, &any4);
  observe();
  u = guest_socket(AF_INET6, SOCK_DGRAM);
  int inprog;
  prequeue();
  if (u) nk_sock_connect(u, &d6, &inprog);
  observe();
  guest_socket(AF_INET, SOCK_STREAM);
  guest_socket(AF_INET, SOCK_DGRAM);
  tick();
  tick();
  note_ids();
}

/* The tenant is deleted while the NSM is up when the input asked for it (the engine then
 * forgets the ids it closed, a scan of every id per socket: slow, so not every time), else
 * after the NSM went away. */
static bool del_tenant_first;

static void teardown(void) {
  for (int i = 0; i < NSLOTS; i++)
    if (gfd[i] >= 0) close(gfd[i]);
  if (!del_tenant_first) nsm_disconnect();
  prequeue();
  nk_tenant_del(T);
  nk_esock_reap();
  T = NULL;
  observe();
  drain_ctl();
  if (del_tenant_first) nsm_disconnect();
  del_tenant_first = false;
  NK_FUZZ_CHECK(nk_fuzz_only_neighbour_left() && !engine.graveyard && engine.nzombies == 0,
                "engine: state left after the tenant was deleted");
}

/* ---- the input ---- */

static uint32_t pick_id(struct nk_fuzz_in *in) {
  uint8_t k = in_u8(in);
  if (k < 0xe0 && nids) return ids[k % nids];
  switch (k & 7) {
    case 0:
      return NK_SL_MAX_SOCKS;
    case 1:
      return NK_SL_MAX_SOCKS - 1;
    case 2:
      return 0;
    case 3:
      return UINT32_MAX;
    case 4:
      return ACCEPT_BASE + next_accept;
    default:
      return in_u32(in);
  }
}

static struct nk_esock *by_id(uint32_t id) {
  for (uint32_t i = 0; T && i < T->nslots; i++) {
    struct nk_esock *es = T->socks[i];
    for (int k = 0; es && k < es->ep_count; k++)
      if (es->ep[k].fd < 0 && es->ep[k].id == id) return es;
  }
  return NULL;
}

static struct nk_addr pick_addr(struct nk_fuzz_in *in) {
  static const char *const a[] = {NK_FUZZ_NSM_V4,
                                  NK_FUZZ_NSM_V6,
                                  NK_FUZZ_TENANT_V4,
                                  NK_FUZZ_TENANT_V6,
                                  "127.0.0.1",
                                  "::ffff:10.77.0.1",
                                  "::"};
  uint8_t k = in_u8(in);
  struct nk_addr r = {0};
  if (k >= 0xf0) in_bytes(in, &r, sizeof(r));
  else if (k < 0xe0) r = nk_fuzz_addr(a[k % 7], (uint16_t)(k * 257));
  return r;
}

static void act_event(struct nk_fuzz_in *in) {
  static const uint16_t ops[] = {NK_SLE_CONNECTED, NK_SLE_ACCEPTED,
                                 NK_SLE_SENT,      NK_SLE_RECVD,
                                 NK_SLE_FIN,       NK_SLE_ERROR,
                                 NK_SLE_FREED,     NK_SLE_DGRAM,
                                 NK_SLR_DONE,      0,
                                 NK_SLQ_SEND,      72};
  static const int32_t args[] = {0,    ECONNRESET, ECONNREFUSED, ETIMEDOUT, -1,
                                 4095, 4096,       INT32_MAX,    INT32_MIN, EFAULT};
  uint8_t o = in_u8(in);
  struct nk_nqe e = {.op = o >= 0xf0 ? in_u16(in) : ops[o % (sizeof(ops) / sizeof(ops[0]))]};
  e.sock = pick_id(in);
  uint8_t a = in_u8(in);
  e.arg = a >= 0xf0           ? (int32_t)in_u32(in)
          : a >= 0xc0 && nids ? (int32_t)ids[a % nids]
                              : args[a % (sizeof(args) / sizeof(args[0]))];
  /* Byte counts: exactly the credit the engine gave, one more, a little, or anything. */
  struct nk_esock *es = by_id(e.sock);
  uint8_t l = in_u8(in);
  uint32_t credit = 0;
  if (es && e.op == NK_SLE_SENT) credit = es->ext.tx_off - atomic_load(es->tx.tail);
  if (es && e.op == NK_SLE_RECVD) credit = es->ext.rx_credit - atomic_load(es->rx.head);
  switch (l % 5) {
    case 0:
      e.len = credit;
      break;
    case 1:
      e.len = credit + 1;
      break;
    case 2:
      e.len = l >> 3;
      break;
    case 3:
      e.len = credit / 2;
      break;
    default:
      e.len = in_u32(in);
  }
  e.off = in_u8(in) & 1 ? in_u64(in) : 0;
  e.addr = pick_addr(in);
  e.flags = in_u8(in) == 0xff ? 0xffff : 0;
  if (sh) nk_sl_push(&sh->evt, &e);
}

static void act_accept(struct nk_fuzz_in *in) {
  uint32_t lid = pick_id(in);
  uint8_t k = in_u8(in), fam = in_u8(in);
  uint32_t id = k < 0xc0 ? ACCEPT_BASE + next_accept++ : pick_id(in);
  struct nk_nqe e = {.op = NK_SLE_ACCEPTED, .sock = id, .arg = (int32_t)lid};
  e.addr = nk_fuzz_addr(fam & 1 ? NK_FUZZ_NSM_V6 : NK_FUZZ_NSM_V4, 5555);
  if (fam & 2) e.addr.family = fam;
  if (sh && nk_sl_push(&sh->evt, &e) && id >= ACCEPT_BASE && id < NK_SL_MAX_SOCKS) note_id(id);
}

static void act_dgram(struct nk_fuzz_in *in) {
  uint32_t id = pick_id(in);
  uint32_t len = in_u16(in);
  uint8_t flags = in_u8(in);
  struct nk_addr src = pick_addr(in);
  if (!sh) return;
  struct nk_sl_area *a = &sh->dg_in;
  if (!(flags & 8)) len %= 2048;
  uint32_t head = atomic_load(&a->head.v);
  uint32_t pub = flags & 1 ? len / 2 : len; /* published, maybe fewer than announced */
  if (pub <= NK_SL_AREA_SIZE) {
    static uint8_t payload[65536];
    nk_sl_area_copy_in(a, head, payload, pub > sizeof(payload) ? (uint32_t)sizeof(payload) : pub);
  }
  atomic_store(&a->head.v, head + pub);
  struct nk_nqe e = {.op = NK_SLE_DGRAM, .sock = id, .len = len, .addr = src};
  e.off = flags & 2 ? head + 1 : flags & 4 ? in_u64(in) : head;
  nk_sl_push(&sh->evt, &e);
}

static void act_answer(struct nk_fuzz_in *in) {
  uint8_t n = in_u8(in), how = in_u8(in);
  for (int i = 0; i < n % 16 + 1 && log_tail != log_head && sh; i++) {
    struct nk_nqe q = reqlog[log_tail++ % MAX_LOG];
    struct nk_nqe e = {.sock = q.sock, .len = q.len};
    if (how & 1) e.len = q.len / 2; /* a stack that takes or fills less */
    switch (q.op) {
      case NK_SLQ_SEND:
        e.op = NK_SLE_SENT;
        break;
      case NK_SLQ_RECV:
        e.op = NK_SLE_RECVD;
        break;
      case NK_SLQ_CLOSE:
        e.op = NK_SLE_FREED;
        break;
      case NK_SLQ_SENDTO: { /* the NSM takes the datagram (nk_sl_dgram_take) */
        struct nk_sl_area *a = &sh->dg_out;
        if (nk_sl_area_valid(a, q.off, q.len)) atomic_store(&a->tail.v, (uint32_t)q.off + q.len);
        continue;
      }
      default:
        continue;
    }
    nk_sl_push(&sh->evt, &e);
    if ((how & 2) && e.op != NK_SLE_FREED) { /* and then the peer's FIN, or a reset */
      struct nk_nqe f = {
          .op = how & 4 ? NK_SLE_ERROR : NK_SLE_FIN, .sock = q.sock, .arg = ECONNRESET};
      nk_sl_push(&sh->evt, &f);
    }
  }
}

static void act_index(struct nk_fuzz_in *in) {
  uint8_t which = in_u8(in), mode = in_u8(in);
  if (!sh) return;
  _Atomic uint32_t *idx[] = {&sh->evt.head.v,     &sh->evt.tail.v,     &sh->rep.head.v,
                             &sh->rep.tail.v,     &sh->req.tail.v,     &sh->req.head.v,
                             &sh->req.sleeping.v, &sh->evt.sleeping.v, &sh->dg_in.head.v,
                             &sh->dg_in.tail.v,   &sh->dg_out.tail.v,  &sh->dg_out.head.v};
  _Atomic uint32_t *p = idx[which % (sizeof(idx) / sizeof(idx[0]))];
  req_moved |= p == &sh->req.tail.v || p == &sh->req.head.v;
  uint32_t v = atomic_load(p);
  switch (mode % 4) {
    case 0:
      v += (uint32_t)(int32_t)(int16_t)in_u16(in);
      break;
    case 1:
      v += NK_SL_QUEUE_LEN;
      break;
    case 2:
      v -= 1;
      break;
    default:
      v = in_u32(in);
  }
  atomic_store(p, v);
  if (mode & 0x80) { /* and garbage in the element the engine reads next */
    struct nk_nqe g;
    in_bytes(in, &g, sizeof(g));
    sh->evt.e[atomic_load(&sh->evt.tail.v) & (NK_SL_QUEUE_LEN - 1)] = g;
  }
}

static void act_reply(struct nk_fuzz_in *in) {
  uint8_t m = in_u8(in);
  struct nk_nqe r = reply_for(last_tag + 1 + (m & 3));
  if (m & 4) r.tag = in_u32(in);
  if (m & 8) r.sock = pick_id(in);
  if (m & 16) r.arg = (int32_t)in_u32(in);
  if (m & 32) r.op = in_u16(in);
  if (sh) push_reply(&r);
}

static uint32_t pick_slot(struct nk_fuzz_in *in) {
  uint8_t sel = in_u8(in);
  if (sel & 0x80 || !T->nsocks) return (sel & 0x7f) % NSLOTS;
  uint32_t k = sel % T->nsocks;
  for (uint32_t i = 0; i < NSLOTS; i++)
    if (T->socks[i] && k-- == 0) return i;
  return 0;
}

static void doorbell(uint32_t i) {
  atomic_fetch_or(&T->rg->doorbell[i >> 6], 1ull << (i & 63));
  atomic_fetch_or(&T->rg->doorbell_summary, 1ull << ((i >> 6) & 63));
}

static void act_tenant(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  uint8_t what = in_u8(in);
  uint32_t n = in_u16(in);
  struct nk_slot *s = &T->slots[i];
  uint32_t head = atomic_load(&s->tx_head.v), tail = atomic_load(&s->tx_tail.v);
  switch (what % 4) {
    case 0: { /* the application sends: within the ring's room */
      uint32_t room = head - tail > RING ? 0 : RING - (head - tail);
      atomic_store(&s->tx_head.v, head + (n < room ? n : room));
      break;
    }
    case 1: { /* it reads */
      uint32_t rh = atomic_load(&s->rx_head.v), rt = atomic_load(&s->rx_tail.v);
      atomic_store(&s->rx_tail.v, rt + (n < rh - rt ? n : rh - rt));
      atomic_store(&s->kick, 1);
      break;
    }
    case 2: /* a head moved back: the engine resets the socket */
      atomic_store(&s->tx_head.v, head - 1 - n % 64);
      break;
    default: /* a datagram record: the engine hands it to the NSM through dg_out */
      if (T->socks[i] && T->socks[i]->kind == NK_KIND_DGRAM) {
        struct nk_dgram h = {.len = n % 1500, .addr = nk_fuzz_addr(NK_FUZZ_NSM_V4, 53)};
        if (what & 4) h.addr.family = 0;
        uint8_t *d = T->rings + (uint64_t)i * 2u * T->ring_size;
        for (uint32_t k = 0; k < sizeof(h); k++) d[(head + k) % RING] = ((uint8_t *)&h)[k];
        uint32_t need = (uint32_t)NK_DGRAM_SPACE(h.len);
        if (head - tail <= RING && RING - (head - tail) >= need)
          atomic_store(&s->tx_head.v, head + need);
      }
  }
  doorbell(i);
}

static void act_call(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  uint8_t what = in_u8(in);
  struct nk_esock *es = T->socks[i];
  if (what % 6 == 5) { /* a new connection: SOCKET, BIND, CONNECT */
    connected(what & 8 ? AF_INET6 : AF_INET, what & 8 ? NK_FUZZ_NSM_V6 : NK_FUZZ_NSM_V4, 80,
              what & 16);
    note_ids();
    return;
  }
  if (!es || es->closing) return;
  prequeue();
  switch (what % 6) {
    case 0:
      nk_sock_shutdown(es, (what >> 4) % 3);
      break;
    case 1: {
      int one = what >> 7;
      nk_sock_setopt(es, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      break;
    }
    case 2:
      if (gfd[i] >= 0) close(gfd[i]);
      gfd[i] = -1;
      break;
    case 3: {
      struct nk_addr a = nk_fuzz_addr(what & 16 ? NK_FUZZ_NSM_V6 : NK_FUZZ_NSM_V4, 80);
      int inprog;
      nk_sock_connect(es, &a, &inprog);
      break;
    }
    default:
      nk_sock_listen(es, 4);
  }
  observe();
  note_ids();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  setenv("NETKERNEL_SLOTS", "32", 1);
  setenv("NETKERNEL_RING_SIZE", "4096", 1);
  nk_fuzz_engine_init();
  snprintf(sock_path, sizeof(sock_path), "%s/nsm.sock", nk_fuzz_dir);
  snprintf(ns_path, sizeof(ns_path), "/proc/self/fd/%d", nk_fuzz_ns_engine);
  char type[160];
  snprintf(type, sizeof(type), "external:%s", sock_path);
  int r = nk_nsm_add("ext", ns_path, type);
  if (r < 0) nk_fuzz_die("nsm: %s", strerror(-r));
  nsm = nk_nsm_find("ext");
  /* The neighbour is on a kernel NSM of its own: what the external NSM does must not reach it. */
  if ((r = nk_nsm_add("kernel", nk_fuzz_ns_nsm_path, "kernel")) < 0)
    nk_fuzz_die("nsm: %s", strerror(-r));
  nk_fuzz_neighbour_init("kernel");
  /* One input's worth first: what the engine opens once is then open before every input. */
  setup();
  teardown();
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct nk_fuzz_in in = {data, size};
  nk_fuzz_fd_baseline();
  setup();
  for (int ops = 0; in.n && ops < 512; ops++) {
    switch (in_u8(&in) % ACT_COUNT) {
      case ACT_EVENT:
        act_event(&in);
        break;
      case ACT_ACCEPT:
        act_accept(&in);
        break;
      case ACT_DGRAM:
        act_dgram(&in);
        break;
      case ACT_ANSWER:
        act_answer(&in);
        break;
      case ACT_INDEX:
        act_index(&in);
        break;
      case ACT_REPLY:
        act_reply(&in);
        break;
      case ACT_TICK: {
        int n = in_u8(&in) % 3 + 1;
        for (int k = 0; k < n; k++) tick();
        break;
      }
      case ACT_BELL:
        if (engine_bell >= 0) {
          uint64_t one = 1;
          (void)!write(engine_bell, &one, sizeof(one));
        }
        break;
      case ACT_TENANT:
        act_tenant(&in);
        break;
      case ACT_CALL:
        act_call(&in);
        break;
      case ACT_HANGUP:
        if (in_u8(&in) & 1) {
          del_tenant_first = true;
          break;
        }
        if (cfd >= 0) close(cfd);
        cfd = -1; /* sh stays mapped here: later events go into a queue nobody reads */
        break;
    }
  }
  for (int k = 0; k < 4; k++) tick();
  nk_fuzz_sleep_cycle();
  nk_fuzz_neighbour_ping("after the input");
  teardown();
  nk_fuzz_fd_expect("after the input");
  return 0;
}
