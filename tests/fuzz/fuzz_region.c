/* libFuzzer harness: what a tenant writes into its shared region.
 *
 * Each input gets a fresh tenant (a real sealed memfd region, its own namespace) with sockets
 * in the states a tenant's sockets are usually in, each with real kernel sockets behind it:
 * TCP connected over the NSM (v4, v6), a listener with a connection waiting, UDP bound and
 * connected, TCP over the tenant's loopback, a shared-memory pair, and sockets not yet bound.
 * The input is then a sequence of operations: stores of arbitrary values into slot headers,
 * ring indices, ring bytes, datagram records, doorbell words and the summary, readiness
 * counters; what GuestLib does (send, receive, acknowledge READY records, ring the doorbell,
 * blockers, closing its proxy end); what the network does (the peer sends, shuts, resets);
 * socket calls as the control path makes them; policy changes; and rounds of the engine's
 * loop. A neighbour tenant on the same NSM then pings through the engine (the stall oracle),
 * the tenant is deleted and the oracles in nk_fuzz.h run.
 *
 * Input format: a byte chooses the operation (modulo OP_COUNT), its arguments follow (see each
 * case below). tests/fuzz/gen_seeds.py writes the seed corpus in this format.
 */
#include "nk_fuzz.h"

#define NSLOTS        72 /* two doorbell words, the second partly beyond the slots */
#define RING          4096u
#define PORT_TCP      7000
#define PORT_UDP      7001
#define PORT_LOOP_TCP 7002
#define PORT_LOOP_UDP 7003

enum {
  OP_W32,        /* slot, word, mode, value: a 32-bit store into a slot header */
  OP_WHDR,       /* word, u64: a store into the region header (summary, doorbells, ...) */
  OP_RING,       /* slot, tx/rx, offset u16, len u8, bytes: into a ring's data */
  OP_TX_STREAM,  /* slot, n u16, honest: the guest sends n bytes */
  OP_TX_DGRAM,   /* slot, len u16, destination, flags: a datagram record as GuestLib writes it */
  OP_RX_READ,    /* slot, n u16, flags: the guest reads, takes back READY records, looks again */
  OP_BELL,       /* slot: doorbell bit and summary, the eventfd when the engine sleeps */
  OP_GUEST,      /* slot, what: blocker, garbage, a message with a descriptor, close, drain */
  OP_PEER,       /* peer, what, n u16: the network end sends, shuts down, resets */
  OP_PEER_DGRAM, /* target, len u16: a datagram to one of the tenant's UDP sockets */
  OP_CALL,       /* slot, what, arg: shutdown, connect, bind, listen as the control path */
  OP_POLICY,     /* what, value: rates, link bandwidth, limits, weight, the shm switch */
  OP_TICK,       /* n: rounds of the engine's loop */
  OP_SLEEP,      /* the engine's sleep path, zombie sweep and trim */
  OP_CONNECT_IN, /* where: a client connects to the tenant's listener (NSM or loopback) */
  OP_COUNT
};

static int srv_tcp = -1, srv_udp = -1, loop_tcp = -1, loop_udp = -1; /* the harness's servers */
static struct nk_nsm *nsm;
static struct nk_tenant *T;
static int gfd[NSLOTS]; /* guest end of each slot's proxy, as the application holds it */
#define NPEERS 16
static int peer[NPEERS]; /* the network's end of the tenant's connections */
static int npeers;
static uint16_t listen_port, udp_port, udp6_port, loop_udp_port;
static struct nk_addr udp4_local;

static struct nk_slot *slot(uint32_t i) { return &T->slots[i]; }
static uint8_t *ring_data(uint32_t i, int rx) {
  return T->rings + (uint64_t)i * 2u * T->ring_size + (rx ? T->ring_size : 0);
}

/* A slot chosen by the input: mostly one with a socket, sometimes any. */
static uint32_t pick_slot(struct nk_fuzz_in *in) {
  uint8_t sel = in_u8(in);
  if (sel & 0x80 || T->nsocks == 0) return (uint32_t)(sel & 0x7f) % NSLOTS;
  uint32_t k = sel % T->nsocks;
  for (uint32_t i = 0; i < NSLOTS; i++)
    if (T->socks[i] && k-- == 0) return i;
  return 0;
}

static void add_peer(int fd) {
  if (fd < 0) return;
  if (npeers == NPEERS) {
    nk_fuzz_close_rst(fd);
    return;
  }
  peer[npeers++] = fd;
}

/* socket() as GuestLib makes it, in the tenant's namespace (nk_fuzz_guest_socket). */
static struct nk_esock *guest_socket(int family, int type) {
  int guest = -1;
  struct nk_esock *es = nk_fuzz_guest_socket(T, nk_fuzz_ns_tenant, family, type, &guest);
  if (es) gfd[es->slot] = guest;
  return es;
}

static void connect_to(struct nk_esock *es, const char *ip, uint16_t port) {
  struct nk_addr a = nk_fuzz_addr(ip, port);
  int inprog;
  if (es) nk_sock_connect(es, &a, &inprog);
}

static void accept_all(int lfd) {
  for (;;) {
    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c < 0) return;
    add_peer(c);
  }
}

static int client_to(int ns, const struct nk_addr *dst) {
  int fd = nk_fuzz_socket_in(ns, dst->family, SOCK_STREAM, NULL, 0);
  struct sockaddr_storage ss;
  socklen_t l = nk_addr_to_sa(dst, &ss);
  connect(fd, (struct sockaddr *)&ss, l);
  return fd;
}

static void setup(void) {
  memset(gfd, -1, sizeof(gfd));
  npeers = 0;
  nk_fuzz_drain_server(srv_tcp, true);
  nk_fuzz_drain_server(loop_tcp, true);
  nk_fuzz_drain_server(srv_udp, false);
  nk_fuzz_drain_server(loop_udp, false);
  nk_nsm_set_bandwidth(nsm, 0);
  int r = nk_tenant_add("fuzz", nk_fuzz_ns_tenant_path, "nsm", NK_FUZZ_TENANT_V4, NK_FUZZ_TENANT_V6,
                        0, 0, &T);
  if (r < 0) nk_fuzz_die("tenant: %s", strerror(-r));
  int inprog;

  connect_to(guest_socket(AF_INET, SOCK_STREAM), NK_FUZZ_NSM_V4, PORT_TCP);
  connect_to(guest_socket(AF_INET6, SOCK_STREAM), NK_FUZZ_NSM_V6, PORT_TCP);
  struct nk_esock *l = guest_socket(AF_INET, SOCK_STREAM);
  listen_port = 0;
  if (l && nk_sock_listen(l, 4) == 0) listen_port = l->bind_addr.port;
  struct nk_esock *u = guest_socket(AF_INET, SOCK_DGRAM);
  struct nk_addr any4 = {.family = AF_INET}, lo6 = nk_fuzz_addr("::1", 0);
  udp_port = 0;
  if (u && nk_sock_bind(u, &any4) == 0) udp_port = u->bind_addr.port;
  udp4_local = nk_fuzz_addr(NK_FUZZ_TENANT_V4, 0);
  udp4_local.port = udp_port;
  u = guest_socket(AF_INET6, SOCK_DGRAM);
  udp6_port = 0;
  struct nk_addr d6 = nk_fuzz_addr(NK_FUZZ_NSM_V6, PORT_UDP);
  if (u && nk_sock_connect(u, &d6, &inprog) == 0) udp6_port = u->local.port;
  connect_to(guest_socket(AF_INET, SOCK_STREAM), "127.0.0.1", PORT_LOOP_TCP);
  if (listen_port)
    connect_to(guest_socket(AF_INET, SOCK_STREAM), NK_FUZZ_TENANT_V4, ntohs(listen_port));
  guest_socket(AF_INET6, SOCK_STREAM);
  guest_socket(AF_INET, SOCK_DGRAM);
  u = guest_socket(AF_INET6, SOCK_DGRAM);
  loop_udp_port = 0;
  if (u && nk_sock_bind(u, &lo6) == 0) loop_udp_port = u->bind_addr.port;
  if (listen_port) {
    struct nk_addr a = nk_fuzz_addr(NK_FUZZ_TENANT_V4, ntohs(listen_port));
    add_peer(client_to(nk_fuzz_ns_nsm, &a));
  }
  /* The handshakes are local: a few rounds finish the connects. */
  for (int i = 0; i < 3; i++) {
    nk_fuzz_tick();
    accept_all(srv_tcp);
    accept_all(loop_tcp);
  }
}

static void teardown(void) {
  for (int i = 0; i < npeers; i++) nk_fuzz_close_rst(peer[i]);
  npeers = 0;
  for (int i = 0; i < NSLOTS; i++)
    if (gfd[i] >= 0) close(gfd[i]);
  nk_tenant_del(T);
  nk_esock_reap();
  T = NULL;
  nk_fuzz_drain_server(srv_tcp, true);
  nk_fuzz_drain_server(loop_tcp, true);
  NK_FUZZ_CHECK(nk_fuzz_only_neighbour_left() && !engine.graveyard && engine.nzombies == 0 &&
                    (!engine.active_tenants || engine.active_tenants == nk_fuzz_nbr.t),
                "engine: state left after the tenant was deleted");
  NK_FUZZ_CHECK(!engine.throttled ||
                    (engine.throttled->t == nk_fuzz_nbr.t && !engine.throttled->next_throttled),
                "engine: a deleted tenant's socket is still throttled");
}

/* ---- what the guest does ---- */

static void doorbell(uint32_t i) { nk_fuzz_ring_bell(T, i); }

/* The guest's side of the proxy: READY records (dropped) and NEWCONN records, whose new guest
 * end it keeps for the slot named (as GuestLib's accept() does). */
static void guest_drain(uint32_t i) {
  for (int k = 0; k < 64 && gfd[i] >= 0; k++) {
    struct nk_newconn msg;
    union {
      char buf[CMSG_SPACE(sizeof(int) * 4)];
      struct cmsghdr align;
    } cm;
    struct iovec iov = {.iov_base = &msg, .iov_len = sizeof(msg)};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
    ssize_t n = recvmsg(gfd[i], &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n <= 0) return;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      for (int j = 0; j < nfd; j++) {
        int fd;
        memcpy(&fd, CMSG_DATA(c) + (size_t)j * sizeof(int), sizeof(int));
        if (n == sizeof(msg) && msg.type == NK_MSG_NEWCONN && msg.slot < NSLOTS &&
            gfd[msg.slot] < 0) {
          fcntl(fd, F_SETFL, O_NONBLOCK);
          gfd[msg.slot] = fd;
        } else {
          close(fd);
        }
      }
    }
  }
}

static uint32_t interesting32(uint8_t k, uint32_t cur) {
  static const uint32_t v[] = {0,
                               1,
                               7,
                               8,
                               31,
                               32,
                               33,
                               RING - 1,
                               RING,
                               RING + 1,
                               2 * RING,
                               0x7fffffff,
                               0x80000000,
                               0xfffffff0,
                               0xffffffff,
                               NK_DGRAM_MAX,
                               NK_DGRAM_MAX + 1,
                               NK_BLOCKER_SIZE};
  if (k & 0x80) return cur + v[k % (sizeof(v) / sizeof(v[0]))];
  return v[k % (sizeof(v) / sizeof(v[0]))];
}

/* Words of struct nk_slot the engine reads or writes, so that stores land there often. */
static const uint8_t slot_words[] = {32 /* tx_head */,
                                     48 /* tx_tail */,
                                     64 /* rx_head */,
                                     80 /* rx_tail */,
                                     96 /* rx_eof */,
                                     97 /* rx_err */,
                                     98 /* so_error */,
                                     99 /* tx_closed */,
                                     100 /* rx_stalled */,
                                     101 /* ready_sent */,
                                     112 /* rx_ack */,
                                     113 /* kick */,
                                     116 /* async_connect */,
                                     120 /* nonblock */,
                                     121 /* rx_seen */,
                                     122 /* preopts */,
                                     0,
                                     2 /* gen */,
                                     3 /* kind */,
                                     4 /* state */,
                                     5 /* family */};

static void op_w32(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  uint8_t w = in_u8(in), mode = in_u8(in);
  uint32_t word = w < 64 ? slot_words[w % sizeof(slot_words)] : w % 128u;
  _Atomic uint32_t *p = (_Atomic uint32_t *)((uint8_t *)slot(i) + word * 4u);
  uint32_t cur = atomic_load(p);
  uint32_t v;
  switch (mode % 4) {
    case 0:
      v = in_u32(in);
      break;
    case 1:
      v = cur + (uint32_t)(int32_t)(int16_t)in_u16(in);
      break;
    case 2:
      v = interesting32(in_u8(in), cur);
      break;
    default: { /* relative to another word of the slot: head = tail + n and the like */
      uint8_t o = in_u8(in);
      uint32_t other = slot_words[o % sizeof(slot_words)];
      v = atomic_load((_Atomic uint32_t *)((uint8_t *)slot(i) + other * 4u)) +
          (uint32_t)(int32_t)(int16_t)in_u16(in);
    }
  }
  atomic_store(p, v);
}

static void op_whdr(struct nk_fuzz_in *in) {
  uint32_t words = (uint32_t)(offsetof(struct nk_region, doorbell) / 8u + T->words);
  uint32_t w = in_u8(in) % words;
  uint64_t v = in_u64(in);
  atomic_store((_Atomic uint64_t *)((uint8_t *)T->rg + w * 8u), v);
}

static void op_ring(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  int rx = in_u8(in) & 1;
  uint32_t off = in_u16(in) % RING;
  uint8_t len = in_u8(in);
  uint8_t buf[256];
  in_bytes(in, buf, len);
  uint8_t *d = ring_data(i, rx);
  for (uint32_t k = 0; k < len; k++) d[(off + k) % RING] = buf[k];
}

static void op_tx_stream(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  uint32_t n = in_u16(in);
  bool honest = !(in_u8(in) & 1);
  struct nk_slot *s = slot(i);
  uint32_t head = atomic_load(&s->tx_head.v), tail = atomic_load(&s->tx_tail.v);
  if (honest) {
    uint32_t space = head - tail > RING ? 0 : RING - (head - tail);
    if (n > space) n = space;
    uint8_t *d = ring_data(i, 0);
    for (uint32_t k = 0; k < n; k++) d[(head + k) % RING] = (uint8_t)(head + k);
  }
  atomic_store(&s->tx_head.v, head + n);
  doorbell(i);
}

static const char *const dsts[] = {
    NK_FUZZ_NSM_V4,    NK_FUZZ_NSM_V6,     "127.0.0.1",        "::1",     NK_FUZZ_TENANT_V4,
    NK_FUZZ_TENANT_V6, "::ffff:10.77.0.1", "::ffff:127.0.0.1", "0.0.0.0", "::",
    "224.0.0.1",       "ff02::1"};

static void op_tx_dgram(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  uint32_t len = in_u16(in);
  uint8_t d = in_u8(in), flags = in_u8(in);
  struct nk_dgram h = {.len = len};
  if (d < 0xf0) {
    size_t nd = sizeof(dsts) / sizeof(dsts[0]);
    h.addr = nk_fuzz_addr(dsts[d % nd], d & 0x40 ? PORT_LOOP_UDP : PORT_UDP);
    if (d % nd == 2 || d % nd == 3 || d % nd == 7) h.addr.port = htons(PORT_LOOP_UDP);
  } else if (d < 0xf8) {
    h.addr.family = 0; /* the connected peer */
  } else {
    in_bytes(in, &h.addr, sizeof(h.addr)); /* anything */
  }
  struct nk_slot *s = slot(i);
  uint32_t head = atomic_load(&s->tx_head.v);
  if (len > 2048 && !(flags & 4)) h.len = len = len % 2048; /* mostly datagrams that fit */
  /* Control messages: anything (mostly shorter than the most the engine takes). */
  uint8_t ctl[256] = {0};
  if (flags & 8) {
    h.cmsg_len = in_u16(in) % (flags & 16 ? 65536 : 256);
    in_bytes(in, ctl, h.cmsg_len < sizeof(ctl) ? h.cmsg_len : sizeof(ctl));
  }
  uint32_t space = (uint32_t)NK_DGRAM_SPACE_CMSG(len, h.cmsg_len);
  if (flags & 1) space = in_u16(in); /* a head that disagrees with the record */
  uint8_t *data = ring_data(i, 0);
  const uint8_t *hb = (const uint8_t *)&h;
  for (uint32_t k = 0; k < sizeof(h); k++) data[(head + k) % RING] = hb[k];
  for (uint32_t k = 0; k < h.cmsg_len && k < sizeof(ctl); k++)
    data[(head + sizeof(h) + k) % RING] = ctl[k];
  if (flags & 2) head += 4; /* a record that does not start at the head */
  atomic_store(&s->tx_head.v, head + space);
  doorbell(i);
}

static void op_rx_read(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  uint32_t n = in_u16(in);
  uint8_t flags = in_u8(in);
  struct nk_slot *s = slot(i);
  uint32_t head = atomic_load(&s->rx_head.v), tail = atomic_load(&s->rx_tail.v);
  uint32_t fill = head - tail;
  if (!(flags & 1) && n > fill) n = fill;
  if (flags & 2) { /* as a datagram reader: one whole record */
    struct nk_dgram h;
    uint8_t *d = ring_data(i, 1);
    for (uint32_t k = 0; k < sizeof(h); k++) ((uint8_t *)&h)[k] = d[(tail + k) % RING];
    n = fill >= sizeof(h) ? (uint32_t)NK_DGRAM_SPACE_CMSG(h.len > RING ? 0 : h.len, h.cmsg_len) : 0;
  }
  atomic_store(&s->rx_tail.v, tail + n);
  guest_drain(i);
  if (!(flags & 4)) atomic_store(&s->rx_ack, atomic_load(&s->ready_sent));
  atomic_fetch_add(&s->rx_seen, 1);
  if (atomic_load(&s->rx_stalled) || (flags & 8)) {
    atomic_store(&s->kick, 1);
    doorbell(i);
  }
}

static void op_guest(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  uint8_t what = in_u8(in);
  if (gfd[i] < 0) return;
  static const char blocker[NK_BLOCKER_SIZE];
  switch (what % 6) {
    case 0: /* the blocker GuestLib queues while the socket cannot take data */
      send(gfd[i], blocker, sizeof(blocker), MSG_DONTWAIT | MSG_NOSIGNAL);
      break;
    case 1: { /* anything else a hostile guest writes there */
      uint8_t len = in_u8(in);
      send(gfd[i], blocker, len, MSG_DONTWAIT | MSG_NOSIGNAL);
      break;
    }
    case 2: { /* a message carrying descriptors: the engine must not keep or lose them */
      int p[2];
      if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) break;
      union {
        char buf[CMSG_SPACE(sizeof(int) * 2)];
        struct cmsghdr align;
      } cm;
      memset(&cm, 0, sizeof(cm));
      struct iovec iov = {.iov_base = (void *)blocker,
                          .iov_len = in_u8(in) & 1 ? sizeof(blocker) : 1};
      struct msghdr mh = {.msg_iov = &iov,
                          .msg_iovlen = 1,
                          .msg_control = cm.buf,
                          .msg_controllen = sizeof(cm.buf)};
      struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * 2);
      memcpy(CMSG_DATA(c), p, sizeof(p));
      sendmsg(gfd[i], &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
      close(p[0]);
      close(p[1]);
      break;
    }
    case 3: /* the application closes its last reference */
      close(gfd[i]);
      gfd[i] = -1;
      break;
    case 4:
      guest_drain(i);
      break;
    default: /* shutdown of the guest end: the engine end reads EOF */
      shutdown(gfd[i], in_u8(in) % 3);
  }
}

static void op_peer(struct nk_fuzz_in *in) {
  uint8_t p = in_u8(in), what = in_u8(in);
  uint32_t n = in_u16(in);
  if (!npeers) return;
  int *fd = &peer[p % npeers];
  if (*fd < 0) return;
  static uint8_t buf[65536];
  switch (what % 4) {
    case 0:
    case 1:
      send(*fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
      break;
    case 2:
      shutdown(*fd, SHUT_WR);
      break;
    default:
      nk_fuzz_close_rst(*fd);
      *fd = -1;
  }
}

static void op_peer_dgram(struct nk_fuzz_in *in) {
  uint8_t target = in_u8(in);
  uint32_t len = in_u16(in) % 2048;
  static uint8_t buf[2048];
  struct nk_addr a;
  int fd;
  switch (target % 4) {
    case 0:
      fd = srv_udp, a = udp4_local;
      break;
    case 1:
      fd = srv_udp, a = nk_fuzz_addr(NK_FUZZ_TENANT_V6, 0), a.port = udp6_port;
      break;
    case 2:
      fd = loop_udp, a = nk_fuzz_addr("127.0.0.1", 0), a.port = udp_port;
      break;
    default:
      fd = loop_udp, a = nk_fuzz_addr("::1", 0), a.port = loop_udp_port;
  }
  if (!a.port) return;
  struct sockaddr_storage ss;
  socklen_t l = nk_addr_to_sa(&a, &ss);
  sendto(fd, buf, len, MSG_DONTWAIT, (struct sockaddr *)&ss, l);
}

/* A socket call as handle_req() makes it: only on a socket that exists and is not closing. */
static void op_call(struct nk_fuzz_in *in) {
  uint32_t i = pick_slot(in);
  uint8_t what = in_u8(in), arg = in_u8(in);
  struct nk_esock *es = T->socks[i];
  if (!es || es->closing) return;
  int inprog;
  size_t nd = sizeof(dsts) / sizeof(dsts[0]);
  struct nk_addr a = nk_fuzz_addr(dsts[arg % nd], arg & 0x80 ? PORT_TCP : 0);
  if (arg % nd == 2 || arg % nd == 3) a.port = htons(PORT_LOOP_TCP);
  switch (what % 5) {
    case 0:
      nk_sock_shutdown(es, arg % 4);
      break;
    case 1:
      nk_sock_connect(es, &a, &inprog);
      break;
    case 2:
      if (arg & 0x40) a.family = 0;
      nk_sock_bind(es, &a);
      break;
    case 3:
      nk_sock_listen(es, (int8_t)arg);
      break;
    default: {
      struct linger lg = {1, 0};
      nk_sock_setopt(es, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
  }
}

static void op_policy(struct nk_fuzz_in *in) {
  uint8_t what = in_u8(in), v = in_u8(in);
  static const uint64_t rates[] = {0, 8000, 800000, 80000000, 8000000000ull};
  uint64_t rate = rates[v % 5];
  switch (what % 7) {
    case 0:
      nk_tenant_set_rate(T, NK_TX, rate);
      break;
    case 1:
      nk_tenant_set_rate(T, NK_RX, rate);
      break;
    case 2:
      nk_nsm_set_bandwidth(nsm, rate);
      break;
    case 3:
      T->max_memory = (uint64_t)(v % 4) * 4u * RING;
      break;
    case 4:
      T->max_sockets = v % 4 ? T->nsocks + v % 4 - 2 : 0;
      break;
    case 5:
      T->weight = v ? v : 1;
      break;
    default:
      T->shm = v & 1;
  }
}

static void op_connect_in(struct nk_fuzz_in *in) {
  uint8_t where = in_u8(in);
  if (!listen_port) return;
  struct nk_addr a = nk_fuzz_addr(where & 1 ? "127.0.0.1" : NK_FUZZ_TENANT_V4, ntohs(listen_port));
  add_peer(client_to(where & 1 ? nk_fuzz_ns_tenant : nk_fuzz_ns_nsm, &a));
}

static void run(struct nk_fuzz_in *in) {
  for (int ops = 0; in->n && ops < 512; ops++) {
    switch (in_u8(in) % OP_COUNT) {
      case OP_W32:
        op_w32(in);
        break;
      case OP_WHDR:
        op_whdr(in);
        break;
      case OP_RING:
        op_ring(in);
        break;
      case OP_TX_STREAM:
        op_tx_stream(in);
        break;
      case OP_TX_DGRAM:
        op_tx_dgram(in);
        break;
      case OP_RX_READ:
        op_rx_read(in);
        break;
      case OP_BELL:
        doorbell(pick_slot(in));
        break;
      case OP_GUEST:
        op_guest(in);
        break;
      case OP_PEER:
        op_peer(in);
        break;
      case OP_PEER_DGRAM:
        op_peer_dgram(in);
        break;
      case OP_CALL:
        op_call(in);
        break;
      case OP_POLICY:
        op_policy(in);
        break;
      case OP_TICK: {
        int n = in_u8(in) % 4 + 1;
        for (int k = 0; k < n; k++) {
          nk_fuzz_tick();
          nk_fuzz_check_engine();
        }
        break;
      }
      case OP_SLEEP:
        nk_fuzz_sleep_cycle();
        break;
      case OP_CONNECT_IN:
        op_connect_in(in);
        break;
    }
  }
  /* Whatever the input left pending: the loop must come to rest, not crash. */
  for (int k = 0; k < 4; k++) {
    nk_fuzz_tick();
    nk_fuzz_check_engine();
  }
  nk_fuzz_sleep_cycle();
  nk_fuzz_check_engine();
  /* The link is shared with the neighbour: unlimited again, so its ping needs no tokens. */
  nk_nsm_set_bandwidth(nsm, 0);
  nk_fuzz_neighbour_ping("after the input");
  nk_fuzz_check_engine();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  setenv("NETKERNEL_SLOTS", "72", 1);
  setenv("NETKERNEL_RING_SIZE", "4096", 1);
  nk_fuzz_engine_init();
  int r = nk_nsm_add("nsm", nk_fuzz_ns_nsm_path, "kernel");
  if (r < 0) nk_fuzz_die("nsm: %s", strerror(-r));
  nsm = nk_nsm_find("nsm");
  srv_tcp = nk_fuzz_socket_in(nk_fuzz_ns_nsm, AF_INET6, SOCK_STREAM, "::", PORT_TCP);
  srv_udp = nk_fuzz_socket_in(nk_fuzz_ns_nsm, AF_INET6, SOCK_DGRAM, "::", PORT_UDP);
  loop_tcp = nk_fuzz_socket_in(nk_fuzz_ns_tenant, AF_INET6, SOCK_STREAM, "::", PORT_LOOP_TCP);
  loop_udp = nk_fuzz_socket_in(nk_fuzz_ns_tenant, AF_INET6, SOCK_DGRAM, "::", PORT_LOOP_UDP);
  if (listen(srv_tcp, 1024) < 0 || listen(loop_tcp, 1024) < 0)
    nk_fuzz_die("listen: %s", strerror(errno));
  nk_fuzz_neighbour_init("nsm");
  /* One input's worth first: whatever the engine opens once and keeps (diag.c's netlink
   * socket for the engine's namespace) is then open before every input. */
  setup();
  teardown();
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct nk_fuzz_in in = {data, size};
  nk_fuzz_fd_baseline();
  setup();
  nk_fuzz_check_engine();
  run(&in);
  teardown();
  nk_fuzz_fd_expect("after the input");
  return 0;
}
