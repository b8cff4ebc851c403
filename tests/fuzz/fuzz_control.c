/* libFuzzer harness: a tenant's control connection (csrc/engine/control.c).
 *
 * Each input gets a fresh tenant and a real control connection to the engine's listening
 * socket, accepted by the engine's own accept path: the harness's thread stands in the
 * tenant's namespace while it connects and the engine accepts, so the SO_PEERCRED / pidfd
 * namespace check sees a tenant process. The input is then a sequence of requests (struct
 * nk_req, every field chosen by the input, often from tables of meaningful values) sent with
 * descriptors of every kind a tenant can pass: none, a proper proxy end, a listening or
 * unconnected SEQPACKET socket, a TCP socket unconnected or established, a pipe, a regular file, an eventfd, a memfd, a
 * stream socketpair, the control connection itself, another socket's proxy, a proxy with
 * descriptors queued on it, and several or 253 at once; messages of the wrong size; rounds of
 * the engine's loop; reconnects and hang-ups. Replies are read as GuestLib would and the
 * slot/gen of each socket created feeds later requests.
 *
 * Oracles (nk_fuzz.h): sanitizers, the engine's accounting, a neighbour tenant's ping through
 * the engine after the input (the stall oracle), and after the tenant is deleted every
 * descriptor the tenant passed is closed (by the engine or its closer thread).
 *
 * Input format: a byte chooses the action (modulo ACT_COUNT), its arguments follow.
 */
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

#include "nk_fuzz.h"

void nk_control_forget_tenant(struct nk_tenant *t); /* control.c, for admin.c */

enum {
  ACT_REQ,         /* a request; see send_req for its fields */
  ACT_TICK,        /* n: rounds of the engine's loop, then read the replies */
  ACT_RECONNECT,   /* a new control connection (the old one is closed) */
  ACT_CLOSE_GUEST, /* which: the application closes a socket's proxy end */
  ACT_HANGUP,      /* how: shutdown of the control connection */
  ACT_COUNT
};

static struct nk_nsm *nsm;
static struct nk_tenant *T;
static char ctl_path[128], file_path[128];
static struct nk_handle h_listen = {NK_H_CTL_LISTEN, 0, NULL};
static int client = -1;

#define MAX_KEEP 256
static int keep[MAX_KEEP]; /* the harness's descriptors that live until the input ends */
static int nkeep;
struct known {
  uint32_t slot, gen;
  int gfd;
};
#define MAX_KNOWN 64
static struct known known[MAX_KNOWN]; /* sockets the engine created for this input */
static int nknown;
/* Requests sent and not answered yet, in order: the SOCKET ones carry the guest end. */
#define MAX_PENDING 1024
static struct {
  uint32_t op;
  int gfd;
} pending[MAX_PENDING];
static int npending, pending_head;

static void keep_fd(int fd) {
  if (fd < 0) return;
  if (nkeep == MAX_KEEP) {
    close(fd);
    return;
  }
  keep[nkeep++] = fd;
}

static void ctl_connect(void) {
  if (client >= 0) close(client);
  npending = pending_head = 0;
  nk_fuzz_setns(nk_fuzz_ns_tenant);
  client = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  snprintf(un.sun_path, sizeof(un.sun_path), "%s", ctl_path);
  if (client < 0 || connect(client, (struct sockaddr *)&un, sizeof(un)) < 0)
    nk_fuzz_die("control connect: %s", strerror(errno));
  /* The engine's accept path, while this process is in the tenant's namespace. */
  nk_control_event(&h_listen, EPOLLIN);
  nk_fuzz_setns(nk_fuzz_ns_engine);
}

/* GuestLib's reading of replies: REGISTER's descriptors are closed, SOCKET's slot/gen kept. */
static void read_replies(void) {
  for (int i = 0; i < 256 && client >= 0; i++) {
    struct nk_rep rep;
    union {
      char buf[CMSG_SPACE(sizeof(int) * 8)];
      struct cmsghdr align;
    } cm;
    struct iovec iov = {.iov_base = &rep, .iov_len = sizeof(rep)};
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
    ssize_t n = recvmsg(client, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EAGAIN) return;
    for (struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&mh) : NULL; c; c = CMSG_NXTHDR(&mh, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      for (int j = 0; j < k; j++) {
        int fd;
        memcpy(&fd, CMSG_DATA(c) + (size_t)j * sizeof(int), sizeof(int));
        close(fd);
      }
    }
    if (n <= 0) { /* the engine closed the connection */
      close(client);
      client = -1;
      return;
    }
    NK_FUZZ_CHECK(n == sizeof(rep), "a reply of %zd bytes", n);
    NK_FUZZ_CHECK(rep.err <= 0 && rep.err > -4096, "a reply with err %d", rep.err);
    NK_FUZZ_CHECK(rep.optlen <= NK_OPT_MAX, "a reply with optlen %u", rep.optlen);
    if (pending_head < npending) {
      uint32_t op = pending[pending_head].op;
      pending_head++;
      if (op == NK_OP_SOCKET && rep.err == 0 && nknown < MAX_KNOWN)
        known[nknown++] = (struct known){rep.slot, rep.gen, pending[pending_head - 1].gfd};
    }
  }
}

/* ---- descriptors a tenant can pass ---- */

static int proxy_pair(int *guest) {
  int sv[2];
  nk_fuzz_setns(nk_fuzz_ns_tenant);
  int r = socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv);
  nk_fuzz_setns(nk_fuzz_ns_engine);
  if (r < 0) return -1;
  int one = 1;
  setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
  fcntl(sv[0], F_SETFL, O_NONBLOCK);
  *guest = sv[0];
  return sv[1];
}

/* A loopback TCP connection's one end, with 100 bytes and the end of the stream waiting. */
static int tcp_established(void) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t al = sizeof(a);
  int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), c = -1, s = -1;
  if (l >= 0 && bind(l, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(l, 1) == 0 &&
      getsockname(l, (struct sockaddr *)&a, &al) == 0) {
    c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c >= 0 && connect(c, (struct sockaddr *)&a, sizeof(a)) == 0)
      s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
  }
  if (s >= 0) {
    char b[100] = {0};
    (void)!write(s, b, sizeof(b));
    close(s);
  }
  if (l >= 0) close(l);
  if (s < 0 && c >= 0) {
    close(c);
    c = -1;
  }
  return c;
}

/* One descriptor of the given kind to pass; *guest gets the proxy's guest end, if any. Every
 * descriptor returned is the harness's to close after sending. */
static int make_fd(int kind, int *guest) {
  int fd = -1, sv[2];
  switch (kind) {
    case 0:
      return proxy_pair(guest);
    case 1: { /* a listening SEQPACKET socket: its EPOLLIN would never be consumed */
      fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
      struct sockaddr_un un = {.sun_family = AF_UNIX};
      if (fd >= 0 &&
          (bind(fd, (struct sockaddr *)&un, sizeof(sa_family_t)) < 0 || listen(fd, 1) < 0)) {
        close(fd);
        return -1;
      }
      return fd;
    }
    case 2:
      return socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    case 3:
      if (pipe2(sv, O_CLOEXEC) < 0) return -1;
      close(sv[1]);
      return sv[0];
    case 4:
      return open(file_path, O_RDWR | O_CLOEXEC);
    case 5:
      return eventfd(0, EFD_CLOEXEC);
    case 6:
      return socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0); /* not connected */
    case 7:
      if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return -1;
      close(sv[0]);
      return sv[1];
    case 8: /* the control connection itself: the engine would write READY records into it */
      return client >= 0 ? dup(client) : -1;
    case 9: /* another socket's proxy end (the guest's): both ends then at the engine */
      return nknown && known[nknown - 1].gfd >= 0 ? dup(known[nknown - 1].gfd) : -1;
    case 10: { /* a proxy whose guest end is gone already */
      int g;
      fd = proxy_pair(&g);
      close(g);
      return fd;
    }
    case 11: { /* a proxy with messages queued towards the engine, one carrying a pipe */
      int g;
      fd = proxy_pair(&g);
      if (fd < 0) return -1;
      int p[2];
      if (pipe2(p, O_CLOEXEC) == 0) {
        union {
          char buf[CMSG_SPACE(sizeof(int) * 2)];
          struct cmsghdr align;
        } cm;
        memset(&cm, 0, sizeof(cm));
        char b = 'x';
        struct iovec iov = {.iov_base = &b, .iov_len = 1};
        struct msghdr mh = {.msg_iov = &iov,
                            .msg_iovlen = 1,
                            .msg_control = cm.buf,
                            .msg_controllen = sizeof(cm.buf)};
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * 2);
        memcpy(CMSG_DATA(c), p, sizeof(p));
        sendmsg(g, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        close(p[0]);
        close(p[1]);
      }
      *guest = g;
      return fd;
    }
    case 12:
      return memfd_create("nk-fuzz", MFD_CLOEXEC);
    case 13:
      return epoll_create1(EPOLL_CLOEXEC);
    case 14: /* the tenant's region, as REGISTER handed it out */
      return T ? dup(T->memfd) : -1;
    case 15: /* an established TCP connection (ATTACH's kind), bytes and the peer's FIN
              * waiting on it */
      return tcp_established();
    default:
      return open("/dev/null", O_RDONLY | O_CLOEXEC);
  }
}

/* ---- requests ---- */

static const struct {
  int level, name;
} opts[] = {
    {SOL_SOCKET, SO_REUSEADDR},
    {SOL_SOCKET, SO_KEEPALIVE},
    {SOL_SOCKET, SO_SNDBUF},
    {SOL_SOCKET, SO_RCVBUF},
    {SOL_SOCKET, SO_LINGER},
    {SOL_SOCKET, SO_MARK},
    {SOL_SOCKET, SO_PRIORITY},
    {SOL_SOCKET, SO_BINDTODEVICE},
    {SOL_SOCKET, SO_RCVTIMEO_NEW},
    {SOL_SOCKET, SO_ATTACH_FILTER},
    {SOL_SOCKET, SO_ERROR},
    {SOL_SOCKET, SO_TYPE},
    {SOL_SOCKET, SO_SNDBUFFORCE},
    {SOL_SOCKET, SO_ZEROCOPY},
    {SOL_SOCKET, SO_TXTIME},
    {IPPROTO_TCP, TCP_NODELAY},
    {IPPROTO_TCP, TCP_MAXSEG},
    {IPPROTO_TCP, TCP_CONGESTION},
    {IPPROTO_TCP, TCP_ULP},
    {IPPROTO_TCP, TCP_MD5SIG},
    {IPPROTO_TCP, TCP_REPAIR},
    {IPPROTO_TCP, TCP_ZEROCOPY_RECEIVE},
    {IPPROTO_TCP, TCP_INFO},
    {IPPROTO_TCP, TCP_FASTOPEN},
    {IPPROTO_IP, IP_TOS},
    {IPPROTO_IP, IP_OPTIONS},
    {IPPROTO_IP, IP_ADD_MEMBERSHIP},
    {IPPROTO_IP, IP_FREEBIND},
    {IPPROTO_IP, IP_TRANSPARENT},
    {IPPROTO_IP, MCAST_JOIN_GROUP},
    {IPPROTO_IPV6, IPV6_V6ONLY},
    {IPPROTO_IPV6, IPV6_JOIN_GROUP},
    {IPPROTO_IPV6, IPV6_HOPOPTS},
    {IPPROTO_IPV6, IPV6_RTHDR},
    {IPPROTO_UDP, UDP_SEGMENT},
    {IPPROTO_UDP, UDP_CORK},
    {SOL_IP, IP_PKTINFO},
    {-1, 0},
    {1000, 1000},
};

static const char *const addrs[] = {NK_FUZZ_NSM_V4,     NK_FUZZ_NSM_V6,     "127.0.0.1", "::1",
                                    NK_FUZZ_TENANT_V4,  NK_FUZZ_TENANT_V6,  "0.0.0.0",   "::",
                                    "::ffff:127.0.0.1", "::ffff:10.77.0.2", "10.77.0.3", "fe80::1"};

static int32_t pick_i32(struct nk_fuzz_in *in, const int32_t *table, size_t n) {
  uint8_t k = in_u8(in);
  if (k >= 0xf0) return (int32_t)in_u32(in);
  return table[k % n];
}

static void send_req(struct nk_fuzz_in *in) {
  static const uint32_t ops[] = {NK_OP_REGISTER,
                                 NK_OP_SOCKET,
                                 NK_OP_BIND,
                                 NK_OP_LISTEN,
                                 NK_OP_CONNECT,
                                 NK_OP_SHUTDOWN,
                                 NK_OP_SETSOCKOPT,
                                 NK_OP_GETSOCKOPT,
                                 NK_OP_LINGER_CLOSE,
                                 NK_OP_RENEW,
                                 NK_OP_ATTACH,
                                 0,
                                 12,
                                 0xffffffffu};
  static const int32_t domains[] = {AF_INET, AF_INET6, AF_UNIX, 0, -1, AF_PACKET, AF_NETLINK};
  static const int32_t types[] = {
      SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET, SOCK_STREAM | SOCK_NONBLOCK, 0, -1};
  static const int32_t smalls[] = {0, 1, 2, 3, -1, 4, 128, 4096, INT32_MAX, INT32_MIN, 65535};
  static const uint32_t lens[] = {4, 0, 1, 8, 16, 24, 64, 65, 255, 256, 257, 0xffffffffu};
  struct nk_req req;
  memset(&req, 0, sizeof(req));
  uint8_t o = in_u8(in);
  req.op = o >= 0xf0 ? in_u32(in) : ops[o % (sizeof(ops) / sizeof(ops[0]))];
  uint8_t target = in_u8(in);
  if (target < 0xc0 && nknown) {
    struct known *k = &known[target % nknown];
    req.slot = k->slot;
    req.gen = k->gen + (target & 0x40 ? 1 : 0);
  } else {
    req.slot = target & 1 ? in_u32(in) : in_u8(in);
    req.gen = in_u32(in);
  }
  if (req.op == NK_OP_SOCKET) {
    req.arg0 = pick_i32(in, domains, sizeof(domains) / sizeof(domains[0]));
    req.arg1 = pick_i32(in, types, sizeof(types) / sizeof(types[0]));
    req.arg2 = pick_i32(in, smalls, sizeof(smalls) / sizeof(smalls[0]));
  } else if (req.op == NK_OP_SETSOCKOPT || req.op == NK_OP_GETSOCKOPT) {
    uint8_t k = in_u8(in);
    if (k >= 0xf0) {
      req.arg0 = (int32_t)in_u32(in);
      req.arg1 = (int32_t)in_u32(in);
    } else {
      req.arg0 = opts[k % (sizeof(opts) / sizeof(opts[0]))].level;
      req.arg1 = opts[k % (sizeof(opts) / sizeof(opts[0]))].name;
    }
  } else {
    req.arg0 = pick_i32(in, smalls, sizeof(smalls) / sizeof(smalls[0]));
  }
  uint8_t l = in_u8(in);
  req.optlen = l >= 0xf0 ? in_u32(in) : lens[l % (sizeof(lens) / sizeof(lens[0]))];
  uint8_t v = in_u8(in);
  if (v & 0x80) {
    in_bytes(in, req.optval, v & 0x3f);
  } else {
    int32_t iv = smalls[v % (sizeof(smalls) / sizeof(smalls[0]))];
    memcpy(req.optval, &iv, sizeof(iv));
    memcpy(req.optval + 4, &iv, sizeof(iv)); /* SO_LINGER's l_linger, a timeval's usec */
  }
  uint8_t a = in_u8(in);
  if (a >= 0xf0) {
    in_bytes(in, &req.addr, sizeof(req.addr));
  } else {
    req.addr = nk_fuzz_addr(addrs[(a & 15) % (sizeof(addrs) / sizeof(addrs[0]))], 0);
    static const uint16_t ports[] = {0, 7000, 7002, 53, 1, 65535, 7000, 7000};
    req.addr.port = htons(ports[(a >> 4) & 7]);
    if (a & 0x80) req.addr.family = (uint16_t)(a & 0x40 ? 0 : AF_UNIX);
  }
  req.inode = in_u8(in) & 1 ? in_u64(in) : 0;

  /* The descriptors that go along: the low bits choose a kind of make_fd's (0: a proper
   * proxy), the next two how many: one, none, several kinds, or a proxy followed by up to
   * SCM_MAX_FD - 1 references to one eventfd. */
  uint8_t f = in_u8(in);
  int fds[NK_MAX_PASSED_FDS], nfds = 0, guest = -1;
  switch ((f >> 4) & 3) {
    case 0:
      fds[nfds++] = make_fd(f & 15, &guest);
      break;
    case 1:
      break;
    case 2: {
      int count = 2 + in_u8(in) % 8;
      for (int i = 0; i < count; i++) {
        int g = -1;
        fds[nfds++] = make_fd(in_u8(in) % 16, &g);
        if (g >= 0) {
          if (guest < 0) guest = g;
          else keep_fd(g);
        }
      }
      break;
    }
    default: {
      fds[nfds++] = make_fd(0, &guest);
      int e = eventfd(0, EFD_CLOEXEC);
      int count = in_u8(in) & 1 ? NK_MAX_PASSED_FDS - 1 : 1 + in_u8(in) % (NK_MAX_PASSED_FDS - 1);
      for (int i = 0; i < count && e >= 0; i++) fds[nfds++] = e;
    }
  }
  int valid = 0;
  for (int i = 0; i < nfds; i++)
    if (fds[i] >= 0) fds[valid++] = fds[i];
  nfds = valid;

  uint8_t shape = in_u8(in);
  size_t len = sizeof(req);
  switch (shape % 16) { /* mostly whole requests */
    case 13:
      len = sizeof(req) - 1 - in_u8(in) % 64;
      break;
    case 14:
      len = in_u8(in) & 1;
      break;
    case 15:
      len = sizeof(req) + 1;
      break;
  }
  static uint8_t buf[sizeof(struct nk_req) + 1];
  memcpy(buf, &req, sizeof(req));
  buf[sizeof(req)] = 0;
  union {
    char buf[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int) * NK_MAX_PASSED_FDS)];
    struct cmsghdr align;
  } cm;
  memset(&cm, 0, sizeof(cm));
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
  size_t clen = 0;
  if (shape & 0x10) { /* credentials first: the engine must skip a cmsg that is not SCM_RIGHTS */
    struct ucred cr = {.pid = getpid(), .uid = getuid(), .gid = getgid()};
    struct cmsghdr *c = (struct cmsghdr *)cm.buf;
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_CREDENTIALS;
    c->cmsg_len = CMSG_LEN(sizeof(cr));
    memcpy(CMSG_DATA(c), &cr, sizeof(cr));
    clen += CMSG_SPACE(sizeof(cr));
  }
  if (nfds) {
    struct cmsghdr *c = (struct cmsghdr *)(cm.buf + clen);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    clen += CMSG_SPACE(sizeof(int) * (size_t)nfds);
  }
  if (clen) {
    mh.msg_control = cm.buf;
    mh.msg_controllen = clen;
  }
  ssize_t sent = client >= 0 ? sendmsg(client, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) : -1;
  /* The harness's copies: the engine has its own now (or nothing was sent). Duplicates of one
   * descriptor are closed once. */
  for (int i = 0; i < nfds; i++) {
    bool dup_fd = false;
    for (int j = 0; j < i; j++) dup_fd |= fds[j] == fds[i];
    if (!dup_fd) close(fds[i]);
  }
  if (sent == (ssize_t)sizeof(req) && npending < MAX_PENDING) {
    pending[npending].op = req.op;
    pending[npending++].gfd = guest;
  }
  keep_fd(guest); /* closed when the input ends, whatever became of its socket */
}

static void close_guest(struct nk_fuzz_in *in) {
  if (!nknown) return;
  struct known *k = &known[in_u8(in) % nknown];
  for (int i = 0; i < nkeep; i++)
    if (keep[i] == k->gfd && k->gfd >= 0) {
      close(keep[i]);
      keep[i] = -1;
    }
  k->gfd = -1;
}

static void tick(int n) {
  for (int i = 0; i < n; i++) {
    nk_fuzz_tick();
    nk_fuzz_check_engine();
    read_replies();
  }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  setenv("NETKERNEL_SLOTS", "32", 1);
  setenv("NETKERNEL_RING_SIZE", "4096", 1);
  nk_fuzz_engine_init();
  int r = nk_nsm_add("nsm", nk_fuzz_ns_nsm_path, "kernel");
  if (r < 0) nk_fuzz_die("nsm: %s", strerror(-r));
  nsm = nk_nsm_find("nsm");
  nk_fuzz_neighbour_init("nsm");
  snprintf(ctl_path, sizeof(ctl_path), "%s/engine.sock", nk_fuzz_dir);
  snprintf(file_path, sizeof(file_path), "%s/file", nk_fuzz_dir);
  int fd = open(file_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0 || write(fd, "netkernel", 9) != 9) nk_fuzz_die("%s: %s", file_path, strerror(errno));
  close(fd);
  if ((r = nk_control_listen(ctl_path, -1)) < 0) nk_fuzz_die("control listen: %s", strerror(-r));
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct nk_fuzz_in in = {data, size};
  nk_fuzz_fd_baseline();
  nkeep = nknown = 0;
  int r = nk_tenant_add("fuzz", nk_fuzz_ns_tenant_path, "nsm", NK_FUZZ_TENANT_V4, NK_FUZZ_TENANT_V6,
                        0, 0, &T);
  if (r < 0) nk_fuzz_die("tenant: %s", strerror(-r));
  ctl_connect();
  NK_FUZZ_CHECK(T->ctls == 1, "the control connection was not accepted for the tenant");
  for (int ops = 0; in.n && ops < 256; ops++) {
    switch (in_u8(&in) % ACT_COUNT) {
      case ACT_REQ:
        send_req(&in);
        break;
      case ACT_TICK:
        tick(in_u8(&in) % 3 + 1);
        break;
      case ACT_RECONNECT:
        ctl_connect();
        break;
      case ACT_CLOSE_GUEST:
        close_guest(&in);
        break;
      case ACT_HANGUP:
        if (client >= 0) shutdown(client, in_u8(&in) % 3);
        break;
    }
  }
  tick(4);
  nk_fuzz_neighbour_ping("after the input");
  nk_control_forget_tenant(T);
  nk_tenant_del(T);
  nk_esock_reap();
  T = NULL;
  if (client >= 0) close(client);
  client = -1;
  for (int i = 0; i < nkeep; i++)
    if (keep[i] >= 0) close(keep[i]);
  nkeep = nknown = 0;
  NK_FUZZ_CHECK(nk_fuzz_only_neighbour_left() && !engine.graveyard && engine.nzombies == 0,
                "engine: state left after the tenant was deleted");
  nk_fuzz_fd_expect("after the input");
  return 0;
}
