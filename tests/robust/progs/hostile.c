/* A hostile tenant process: one attack on the engine per subcommand, each from the list of
 * trust-boundary findings in docs/threat-model.md. It runs inside a tenant (through
 * `netkernel run`), talks to the engine's control socket by hand where GuestLib would not
 * misbehave, and maps its tenant's region to write what a well-behaved GuestLib never writes.
 * The tests judge the engine from outside (is it alive, does a neighbour stall, what do
 * `ps` and `conns` say); this program only prints what it saw, one "key=value" per line.
 *
 *   hostile seal                          shrink and grow the region memfd
 *   hostile listenproxy SECONDS           a listening SEQPACKET socket as a proxy fd
 *   hostile linger MODE S                 a lingering TCP socket's last reference, passed in:
 *                                         proxy, extra, onproxy, passcred, reenable, nested
 *                                         (see do_linger)
 *   hostile ctlhold COUNT SECONDS         control connections opened and never written to
 *   hostile dgramflood SECONDS            datagrams to loopback, produced as fast as consumed
 *   hostile shmflood HOST PORT SECONDS    a closed shared-memory connection fed forever
 *   hostile fdflood SECONDS               control connections and sockets until refused
 *   hostile lie HOST PORT SECONDS         a connection whose slot shows a made-up address
 *   hostile tamper SECONDS                fault in the ring pages of every free slot
 *   hostile dnsflood SECONDS              queries to the DNS stub as fast as it takes them
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "netkernel/abi.h"
#include "netkernel/ring.h"

static int ctl_open(void) {
  const char *path = getenv("NETKERNEL_SOCKET");
  if (!path) return -1;
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  strncpy(un.sun_path, path, sizeof(un.sun_path) - 1);
  if (connect(fd, (struct sockaddr *)&un, sizeof(un)) < 0) {
    close(fd);
    return -1;
  }
  struct timeval tv = {.tv_sec = 3};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

/* One request with up to nfds fds attached; the reply's err (or -EIO when none came). With
 * give_up, the fds are closed as soon as they are sent: the engine then holds the last
 * reference to each. */
static int ctl_req_ex(int ctl, struct nk_req *req, const int *fds, int nfds, bool give_up,
                      struct nk_rep *rep, int *got_fds, int want) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * 16)];
    struct cmsghdr align;
  } cm;
  memset(&cm, 0, sizeof(cm));
  struct iovec iov = {.iov_base = req, .iov_len = sizeof(*req)};
  struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds) {
    mh.msg_control = cm.buf;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
  }
  if (sendmsg(ctl, &mh, MSG_NOSIGNAL) != sizeof(*req)) return -errno;
  for (int i = 0; give_up && i < nfds; i++) close(fds[i]);
  struct nk_rep r;
  struct iovec riov = {.iov_base = &r, .iov_len = sizeof(r)};
  union {
    char buf[CMSG_SPACE(sizeof(int) * 4)];
    struct cmsghdr align;
  } rcm;
  struct msghdr rh = {
      .msg_iov = &riov, .msg_iovlen = 1, .msg_control = rcm.buf, .msg_controllen = sizeof(rcm.buf)};
  if (recvmsg(ctl, &rh, MSG_CMSG_CLOEXEC) != sizeof(r)) return -EIO;
  int n = 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&rh); c; c = CMSG_NXTHDR(&rh, c)) {
    int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < k; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (n < want) got_fds[n++] = fd;
      else close(fd);
    }
  }
  if (rep) *rep = r;
  return r.err;
}

static int ctl_req(int ctl, struct nk_req *req, const int *fds, int nfds, struct nk_rep *rep,
                   int *got_fds, int want) {
  return ctl_req_ex(ctl, req, fds, nfds, false, rep, got_fds, want);
}

struct region {
  int memfd, bell;
  uint64_t size;
  uint8_t *base;
  struct nk_region *rg;
};

static int reg(struct region *R) {
  int ctl = ctl_open();
  if (ctl < 0) return -1;
  struct nk_req req = {.op = NK_OP_REGISTER};
  struct nk_rep rep;
  int fds[2] = {-1, -1};
  if (ctl_req(ctl, &req, NULL, 0, &rep, fds, 2) != 0 || fds[0] < 0) return -1;
  struct nk_reginfo info;
  memcpy(&info, rep.optval, sizeof(info));
  R->memfd = fds[0];
  R->bell = fds[1];
  R->size = info.region_size;
  R->base = mmap(NULL, R->size, PROT_READ | PROT_WRITE, MAP_SHARED, R->memfd, 0);
  if (R->base == MAP_FAILED) return -1;
  R->rg = (struct nk_region *)R->base;
  return 0;
}

static struct nk_slot *slot_at(struct region *R, uint32_t i) {
  return (struct nk_slot *)(R->base + R->rg->slots_off + (uint64_t)i * sizeof(struct nk_slot));
}

/* The slot of a NetKernel socket: its proxy fd's inode is in the slot header. */
static int slot_of_fd(struct region *R, int fd) {
  struct stat st;
  if (fstat(fd, &st) < 0) return -1;
  for (uint32_t i = 0; i < R->rg->nslots; i++)
    if (slot_at(R, i)->inode == st.st_ino) return (int)i;
  return -1;
}

static void rings(struct region *R, uint32_t i, struct nk_ring *tx, struct nk_ring *rx) {
  struct nk_slot *s = slot_at(R, i);
  uint8_t *b = R->base + R->rg->rings_off + (uint64_t)i * 2u * R->rg->ring_size;
  if (tx) nk_ring_init(tx, b, R->rg->ring_size, &s->tx_head, &s->tx_tail);
  if (rx) nk_ring_init(rx, b + R->rg->ring_size, R->rg->ring_size, &s->rx_head, &s->rx_tail);
}

static void ring_bell(struct region *R, uint32_t i) {
  atomic_fetch_or(&R->rg->doorbell[i >> 6], 1ull << (i & 63));
  atomic_fetch_or(&R->rg->doorbell_summary, 1ull << ((i >> 6) & 63));
  uint64_t one = 1;
  if (write(R->bell, &one, 8) < 0) { /* counter full: the engine is awake */
  }
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *ename(int e) {
  const char *n = strerrorname_np(e < 0 ? -e : e);
  return e == 0 ? "0" : n ? n : "?";
}

/* ---- attacks ---- */

static int do_seal(void) {
  struct region R;
  if (reg(&R) < 0) return 1;
  int grow = ftruncate(R.memfd, (off_t)R.size * 2) < 0 ? errno : 0;
  int shrink = ftruncate(R.memfd, 0) < 0 ? errno : 0;
  printf("shrink=%s\ngrow=%s\n", ename(shrink), ename(grow));
  /* Make the engine look at the region: with it gone, its next access is a SIGBUS. */
  uint64_t one = 1;
  if (write(R.bell, &one, 8) < 0) { /* counter full */
  }
  sleep(1);
  return 0;
}

/* NK_OP_SOCKET with fd (and extra) attached; with give_up they are closed once sent. */
static int proxy_socket_req(int ctl, int fd, int extra, bool give_up) {
  struct nk_req req = {.op = NK_OP_SOCKET, .arg0 = AF_INET, .arg1 = SOCK_STREAM, .inode = 1};
  int fds[2] = {fd, extra};
  struct nk_rep rep;
  return ctl_req_ex(ctl, &req, fds, extra >= 0 ? 2 : 1, give_up, &rep, NULL, 0);
}

static int do_listenproxy(int secs) {
  int ctl = ctl_open();
  int l = socket(AF_UNIX, SOCK_SEQPACKET, 0);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  snprintf(un.sun_path + 1, sizeof(un.sun_path) - 1, "nk-hostile-%d", (int)getpid());
  if (ctl < 0 || l < 0 || bind(l, (struct sockaddr *)&un, sizeof(un)) < 0 || listen(l, 4) < 0)
    return 1;
  printf("reply=%s\n", ename(proxy_socket_req(ctl, l, -1, false)));
  fflush(stdout);
  sleep((unsigned)secs);
  return 0;
}

/* A TCP connection in the tenant's own namespace whose close() lingers: the receiving end never
 * reads, the sender's buffer is full, SO_LINGER is 60 s. Made with raw system calls: GuestLib
 * would turn these sockets into NetKernel sockets. */
static int lingering_socket(void) {
  int l = (int)syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t al = sizeof(a);
  int small = 4096;
  syscall(SYS_setsockopt, l, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)); /* inherited */
  if (syscall(SYS_bind, l, &a, sizeof(a)) < 0 || syscall(SYS_listen, l, 1) < 0 ||
      syscall(SYS_getsockname, l, &a, &al) < 0)
    return -1;
  int c = (int)syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
  syscall(SYS_setsockopt, c, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
  if (syscall(SYS_connect, c, &a, sizeof(a)) < 0) return -1;
  /* Fill the receiver's window and our send buffer: the FIN then waits behind unacked data. */
  static char junk[65536];
  for (int k = 0; k < 20; k++) {
    while (syscall(SYS_sendto, c, junk, sizeof(junk), MSG_DONTWAIT, NULL, 0) > 0) {}
    usleep(10000);
  }
  struct linger lg = {1, 60};
  syscall(SYS_setsockopt, c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  return c; /* the listener `l` stays open and never accepts */
}

/* A blocker-sized record carrying n descriptors. */
static int send_fds(int fd, const int *fds, int n) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * 253)];
    struct cmsghdr align;
  } cm;
  memset(&cm, 0, sizeof(cm));
  static char blocker[NK_BLOCKER_SIZE];
  struct iovec iov = {.iov_base = blocker, .iov_len = sizeof(blocker)};
  struct msghdr mh = {.msg_iov = &iov,
                      .msg_iovlen = 1,
                      .msg_control = cm.buf,
                      .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n)};
  struct cmsghdr *h = CMSG_FIRSTHDR(&mh);
  h->cmsg_level = SOL_SOCKET;
  h->cmsg_type = SCM_RIGHTS;
  h->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
  memcpy(CMSG_DATA(h), fds, sizeof(int) * (size_t)n);
  return sendmsg(fd, &mh, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* The lingering socket's last reference must end up in the engine: each mode closes our copy
 * while the fd is still in flight, before the engine (asleep: we wait for it to settle) can
 * have taken it. The reply, if any, comes after whatever the engine did with it. */
static int do_linger(const char *mode, int secs) {
  int ctl = ctl_open();
  int c = lingering_socket();
  if (ctl < 0 || c < 0) return 1;
  usleep(50000); /* let the engine go to sleep: it wakes after our close, not before */
  int r = 0;
  if (!strcmp(mode, "proxy")) {
    r = proxy_socket_req(ctl, c, -1, true); /* not a proxy fd at all: refused and closed */
  } else if (!strcmp(mode, "extra")) {
    int sv[2];
    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv);
    r = proxy_socket_req(ctl, sv[1], c, true); /* an fd more than the request asks for */
  } else if (!strcmp(mode, "reenable")) {
    /* A copy of the engine's proxy end kept: descriptors allowed on it again once the engine
     * refused them, the socket queued there, and both our ends closed. The engine's close
     * of its end is then the one that releases it. */
    int sv[2];
    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv);
    int mine = dup(sv[1]);
    r = proxy_socket_req(ctl, sv[1], -1, true);
    usleep(50000); /* the engine sleeps: what follows is done before it wakes */
    int on = 1;
    setsockopt(mine, SOL_SOCKET, 83 /* SO_PASSRIGHTS */, &on, sizeof(on));
    /* Plain records first: the engine reads one at a time, as blockers, and those it has not
     * read when our end goes are released by its close. */
    static char blocker[NK_BLOCKER_SIZE];
    for (int i = 0; i < 4; i++) send(sv[0], blocker, sizeof(blocker), MSG_NOSIGNAL);
    if (send_fds(sv[0], &c, 1) < 0) return 1;
    close(c);
    close(mine);
    close(sv[0]);
  } else if (!strcmp(mode, "nested")) {
    /* Inside a UNIX socket passed as an fd too many: closing that socket releases what is
     * queued on it, in the closer's context, which must not be stuck by it. */
    int u[2], sv[2];
    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, u);
    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv);
    if (send_fds(u[0], &c, 1) < 0) return 1;
    close(c);
    close(u[0]);
    r = proxy_socket_req(ctl, sv[1], u[1], true);
  } else {
    /* Over a proxy fd: a blocker record that carries the socket, queued for the engine end
     * before the engine has that end. The engine reads blockers without taking fds. With
     * passcred, the engine end is also asked to receive credentials and a pidfd (the tenant
     * made the pair: it may set options on either end), which take room from the
     * descriptors; the record carries as many as a message may, the lingering one last. */
    bool passcred = !strcmp(mode, "passcred");
    int sv[2];
    socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv);
    int fds[253], n = 1;
    if (passcred) {
      int on = 1;
      setsockopt(sv[1], SOL_SOCKET, SO_PASSCRED, &on, sizeof(on));
      setsockopt(sv[1], SOL_SOCKET, 76 /* SO_PASSPIDFD */, &on, sizeof(on));
      int null = open("/dev/null", O_RDONLY);
      for (n = 0; n < 252; n++) fds[n] = null;
      n = 253;
    }
    fds[n - 1] = c;
    if (send_fds(sv[0], fds, n) < 0) return 1;
    close(c);
    r = proxy_socket_req(ctl, sv[1], -1, true);
    usleep(100000);
    close(sv[0]); /* and the engine end goes, with whatever is still queued on it */
  }
  printf("result=%s\n", ename(r));
  fflush(stdout);
  sleep((unsigned)secs);
  return 0;
}

/* Keeps a UDP socket's transmit ring full of small datagrams to its own loopback address:
 * datagrams to loopback cost no policy tokens, so only a budget ends the engine's pass. */
static int do_dgramflood(int secs) {
  int u = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t al = sizeof(a);
  if (bind(u, (struct sockaddr *)&a, sizeof(a)) < 0 ||
      getsockname(u, (struct sockaddr *)&a, &al) < 0)
    return 1;
  sendto(u, "x", 1, 0, (struct sockaddr *)&a, al);
  struct region R;
  if (reg(&R) < 0) return 1;
  int slot = slot_of_fd(&R, u);
  if (slot < 0) return 1;
  struct nk_ring tx, rx;
  rings(&R, (uint32_t)slot, &tx, &rx);
  struct nk_dgram h = {.len = 8};
  h.addr.family = AF_INET;
  h.addr.port = a.sin_port;
  memcpy(h.addr.addr, &a.sin_addr, 4);
  uint32_t need = (uint32_t)NK_DGRAM_SPACE(8);
  double end = now_s() + secs;
  unsigned long n = 0;
  while (now_s() < end) {
    for (int i = 0; i < 1024; i++) {
      /* Our own receive ring: drop what comes back, so the loop never stalls on it. */
      atomic_store(rx.tail, atomic_load(rx.head));
      if (nk_ring_space(&tx) < need) break;
      uint32_t head = atomic_load_explicit(tx.head, memory_order_relaxed);
      nk_ring_copy_in(&tx, head, &h, sizeof(h));
      nk_ring_produce(&tx, need);
      n++;
    }
    ring_bell(&R, (uint32_t)slot);
  }
  printf("datagrams=%lu\n", n);
  return 0;
}

struct feeder {
  struct region *R;
  int tx_slot, rx_slot;
  double end;
};

/* Advances the closed sender's transmit head and the receiver's receive tail: the engine
 * finds bytes to move and room to move them into, for as long as we run. */
static void *feed(void *arg) {
  struct feeder *f = arg;
  struct nk_ring tx, rx;
  rings(f->R, (uint32_t)f->tx_slot, &tx, NULL);
  rings(f->R, (uint32_t)f->rx_slot, NULL, &rx);
  while (now_s() < f->end) {
    atomic_store(rx.tail, atomic_load(rx.head));
    uint32_t space = nk_ring_space(&tx);
    if (space) nk_ring_produce(&tx, space);
    ring_bell(f->R, (uint32_t)f->tx_slot);
  }
  return NULL;
}

static int resolve(const char *host, const char *port, struct sockaddr_storage *ss,
                   socklen_t *len) {
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST}, *ai;
  if (getaddrinfo(host, port, &hints, &ai)) return -1;
  memcpy(ss, ai->ai_addr, ai->ai_addrlen);
  *len = ai->ai_addrlen;
  freeaddrinfo(ai);
  return 0;
}

static int do_shmflood(const char *host, const char *port, int secs) {
  struct sockaddr_storage ss;
  socklen_t sl;
  if (resolve(host, port, &ss, &sl) < 0) return 1;
  int l = socket(ss.ss_family, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(l, (struct sockaddr *)&ss, sl) < 0 || listen(l, 4) < 0) return 1;
  int c = socket(ss.ss_family, SOCK_STREAM, 0);
  if (connect(c, (struct sockaddr *)&ss, sl) < 0) return 1;
  int a = accept(l, NULL, NULL);
  if (a < 0) return 1;
  struct region R;
  if (reg(&R) < 0) return 1;
  struct feeder f = {
      .R = &R, .tx_slot = slot_of_fd(&R, c), .rx_slot = slot_of_fd(&R, a), .end = now_s() + secs};
  if (f.tx_slot < 0 || f.rx_slot < 0) return 1;
  pthread_t th;
  pthread_create(&th, NULL, feed, &f);
  usleep(100000);
  close(c); /* the engine flushes what is left into the peer before it lets go */
  pthread_join(th, NULL);
  printf("done=1\n");
  return 0;
}

static int do_fdflood(int secs) {
  /* Control connections: each is an fd in the engine. Held for `secs`, then let go. */
  static int conns[65536];
  int ctls = 0, ctl_err = 0;
  while (ctls < 65536) {
    int c = ctl_open();
    if (c < 0) {
      ctl_err = errno;
      break;
    }
    /* The engine may accept and then refuse: a request tells. */
    struct nk_req req = {.op = NK_OP_GETSOCKOPT, .slot = UINT32_MAX};
    int r = ctl_req(c, &req, NULL, 0, NULL, NULL, 0);
    if (r != -EBADF) {
      ctl_err = -r;
      close(c);
      break;
    }
    conns[ctls++] = c;
  }
  printf("ctls=%d\nctl_err=%s\n", ctls, ename(ctl_err));
  sleep((unsigned)secs);
  for (int i = 0; i < ctls; i++) close(conns[i]);
  /* Sockets with a dual-stack wildcard bind: four engine fds each. */
  int socks = 0, sock_err = 0;
  for (int i = 0; i < 100000; i++) {
    int s = socket(AF_INET6, SOCK_STREAM, 0);
    if (s < 0) {
      sock_err = errno;
      break;
    }
    struct sockaddr_in6 a = {.sin6_family = AF_INET6};
    if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
      sock_err = errno;
      close(s);
      break;
    }
    socks++;
  }
  printf("socks=%d\nsock_err=%s\n", socks, ename(sock_err));
  sleep((unsigned)secs);
  return 0;
}

/* Control connections that never send a request: each is a descriptor in the engine, held
 * for as long as we hold ours. As many as our own limit allows, up to count. */
static int do_ctlhold(int count, int secs) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  int n = 0;
  while (n < count && ctl_open() >= 0) n++;
  printf("held=%d\n", n);
  fflush(stdout);
  sleep((unsigned)secs);
  return 0;
}

static int do_lie(const char *host, const char *port, int secs) {
  struct sockaddr_storage ss;
  socklen_t sl;
  if (resolve(host, port, &ss, &sl) < 0) return 1;
  int c = socket(ss.ss_family, SOCK_STREAM, 0);
  if (connect(c, (struct sockaddr *)&ss, sl) < 0) return 1;
  struct region R;
  if (reg(&R) < 0) return 1;
  int slot = slot_of_fd(&R, c);
  if (slot < 0) return 1;
  struct nk_slot *s = slot_at(&R, (uint32_t)slot);
  struct nk_addr fake = {.family = AF_INET, .port = htons(666)};
  uint8_t ip[4] = {10, 66, 66, 66};
  memcpy(fake.addr, ip, 4);
  double end = now_s() + secs;
  while (now_s() < end) { /* the engine may write them back: keep lying */
    s->local = fake;
    s->peer = fake;
    usleep(1000);
  }
  printf("slot=%d\n", slot);
  return 0;
}

/* Touches every page of the ring memory of the slots that are not in use. */
static int do_tamper(int secs) {
  struct region R;
  if (reg(&R) < 0) return 1;
  uint64_t touched = 0;
  uint64_t ring2 = 2ull * R.rg->ring_size;
  for (uint32_t i = 0; i < R.rg->nslots && touched < (256ull << 20); i++) {
    if (slot_at(&R, i)->kind != NK_KIND_FREE) continue;
    uint8_t *b = R.base + R.rg->rings_off + (uint64_t)i * ring2;
    for (uint64_t off = 0; off < ring2; off += 4096) b[off] = 1;
    touched += ring2;
  }
  printf("touched=%llu\n", (unsigned long long)touched);
  fflush(stdout);
  sleep((unsigned)secs);
  return 0;
}

static int do_dnsflood(int secs) {
  int u = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53)};
  inet_pton(AF_INET, "127.0.0.53", &a.sin_addr);
  /* A query for "flood.invalid" A, with a changing id. */
  unsigned char q[] = {0,   0,   1, 0,   0,   1,   0,   0,   0,   0,   0, 0, 5, 'f', 'l', 'o',
                       'o', 'd', 7, 'i', 'n', 'v', 'a', 'l', 'i', 'd', 0, 0, 1, 0,   1};
  double end = now_s() + secs;
  unsigned long n = 0;
  char buf[512];
  while (now_s() < end) {
    q[0] = (unsigned char)(n >> 8);
    q[1] = (unsigned char)n;
    if (sendto(u, q, sizeof(q), MSG_DONTWAIT, (struct sockaddr *)&a, sizeof(a)) > 0) n++;
    while (recv(u, buf, sizeof(buf), MSG_DONTWAIT) > 0) {}
  }
  printf("queries=%lu\n", n);
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  const char *cmd = argc > 1 ? argv[1] : "";
  if (!strcmp(cmd, "seal")) return do_seal();
  if (!strcmp(cmd, "listenproxy") && argc == 3) return do_listenproxy(atoi(argv[2]));
  if (!strcmp(cmd, "linger") && argc == 4) return do_linger(argv[2], atoi(argv[3]));
  if (!strcmp(cmd, "dgramflood") && argc == 3) return do_dgramflood(atoi(argv[2]));
  if (!strcmp(cmd, "shmflood") && argc == 5) return do_shmflood(argv[2], argv[3], atoi(argv[4]));
  if (!strcmp(cmd, "fdflood") && argc == 3) return do_fdflood(atoi(argv[2]));
  if (!strcmp(cmd, "ctlhold") && argc == 4) return do_ctlhold(atoi(argv[2]), atoi(argv[3]));
  if (!strcmp(cmd, "lie") && argc == 5) return do_lie(argv[2], argv[3], atoi(argv[4]));
  if (!strcmp(cmd, "tamper") && argc == 3) return do_tamper(atoi(argv[2]));
  if (!strcmp(cmd, "dnsflood") && argc == 3) return do_dnsflood(atoi(argv[2]));
  fprintf(stderr,
          "usage: hostile seal|listenproxy S|linger MODE S|dgramflood S|"
          "shmflood HOST PORT S|fdflood S|ctlhold N S|lie HOST PORT S|tamper S|"
          "dnsflood S\n");
  return 2;
}
