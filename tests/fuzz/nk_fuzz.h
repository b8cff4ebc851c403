/* What the engine's libFuzzer harnesses (tests/fuzz/fuzz_*.c) share: the engine's loop, three
 * network namespaces, a reader for the fuzzer's bytes and the descriptor-count oracle.
 *
 * Each harness is one translation unit that includes csrc/engine/main.c (its main() renamed),
 * so it drives the engine through the loop's own static functions (dispatch, scan_all,
 * run_active) rather than a copy that could drift; every other engine source is compiled as
 * it is (tests/fuzz/build.py). Nothing in csrc/engine knows about the harnesses.
 *
 * Namespaces, made once per process with unshare(): the engine's own (the harness runs in
 * it, so the fuzzer never touches the host's network), an NSM's with the tenant's addresses
 * and a server of the harness's on its lo, and the tenant's (its loopback). Needs root.
 *
 * The oracles besides the sanitizers: after each input the tenant is deleted and the process
 * must hold exactly the descriptors it held before the input (the closer thread is waited
 * for), and the engine's own accounting must be back at zero. A hang is libFuzzer's -timeout:
 * every descriptor the harness reads or writes is non-blocking, so a slow input is the
 * engine's doing.
 */
#ifndef NK_FUZZ_H
#define NK_FUZZ_H

#include <arpa/inet.h>
#include <dirent.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <sched.h>
#include <stdarg.h>
#include <sys/ioctl.h>

#define main nk_engine_main
#include "main.c"
#undef main

#define NK_FUZZ_NSM_V4    "10.77.0.1" /* the harness's server on the NSM's lo */
#define NK_FUZZ_NSM_V6    "fd77::1"
#define NK_FUZZ_TENANT_V4 "10.77.0.2" /* the tenant's addresses, also on the NSM's lo */
#define NK_FUZZ_TENANT_V6 "fd77::2"

static int nk_fuzz_report = 2; /* stderr as it was at start: libFuzzer may close fd 2 */
static int nk_fuzz_ns_engine = -1, nk_fuzz_ns_nsm = -1, nk_fuzz_ns_tenant = -1;
static char nk_fuzz_ns_nsm_path[64], nk_fuzz_ns_tenant_path[64];
static char nk_fuzz_dir[64]; /* for the engine's Unix sockets */

__attribute__((format(printf, 1, 2), noreturn)) static void nk_fuzz_die(const char *fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
  va_end(ap);
  if (n < 0) n = 0;
  if (n > (int)sizeof(buf) - 2) n = (int)sizeof(buf) - 2;
  buf[n++] = '\n';
  (void)!write(nk_fuzz_report, "nk_fuzz: ", 9);
  (void)!write(nk_fuzz_report, buf, (size_t)n);
  abort();
}

#define NK_FUZZ_CHECK(cond, ...)           \
  do {                                     \
    if (!(cond)) nk_fuzz_die(__VA_ARGS__); \
  } while (0)

/* ---- the fuzzer's bytes: read in order, zeros once they run out ---- */

struct nk_fuzz_in {
  const uint8_t *p;
  size_t n;
};

static uint8_t in_u8(struct nk_fuzz_in *in) {
  if (!in->n) return 0;
  in->n--;
  return *in->p++;
}
static uint16_t in_u16(struct nk_fuzz_in *in) {
  uint16_t v = in_u8(in);
  return (uint16_t)(v | in_u8(in) << 8);
}
static uint32_t in_u32(struct nk_fuzz_in *in) {
  uint32_t v = in_u16(in);
  return v | (uint32_t)in_u16(in) << 16;
}
static uint64_t in_u64(struct nk_fuzz_in *in) {
  uint64_t v = in_u32(in);
  return v | (uint64_t)in_u32(in) << 32;
}
static void in_bytes(struct nk_fuzz_in *in, void *dst, size_t len) {
  size_t k = len < in->n ? len : in->n;
  memcpy(dst, in->p, k);
  memset((uint8_t *)dst + k, 0, len - k);
  in->p += k;
  in->n -= k;
}

/* ---- namespaces ---- */

static void nk_fuzz_setns(int fd) {
  if (setns(fd, CLONE_NEWNET) < 0) nk_fuzz_die("setns: %s", strerror(errno));
}

static void nk_fuzz_lo_up(void) {
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  struct ifreq ifr = {0};
  strcpy(ifr.ifr_name, "lo");
  if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0) nk_fuzz_die("lo: %s", strerror(errno));
  ifr.ifr_flags |= IFF_UP;
  if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) nk_fuzz_die("lo up: %s", strerror(errno));
  close(s);
}

/* An address on lo of the current namespace (RTM_NEWADDR; no iproute2 needed). */
static void nk_fuzz_addr_add(const char *text) {
  struct nk_addr a;
  if (nk_addr_parse(text, &a) < 0) nk_fuzz_die("bad address %s", text);
  size_t alen = a.family == AF_INET ? 4 : 16;
  struct {
    struct nlmsghdr nh;
    struct ifaddrmsg ifa;
    char attrs[64];
  } req;
  memset(&req, 0, sizeof(req));
  req.nh.nlmsg_type = RTM_NEWADDR;
  req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
  req.ifa.ifa_family = (uint8_t)a.family;
  req.ifa.ifa_prefixlen = (uint8_t)(alen * 8);
  req.ifa.ifa_flags = IFA_F_NODAD;
  req.ifa.ifa_index = if_nametoindex("lo");
  size_t len = NLMSG_LENGTH(sizeof(struct ifaddrmsg));
  for (int type = IFA_LOCAL; type >= IFA_ADDRESS; type--) { /* both, for either family */
    struct rtattr *rta = (struct rtattr *)((char *)&req + NLMSG_ALIGN(len));
    rta->rta_type = (unsigned short)type;
    rta->rta_len = (unsigned short)RTA_LENGTH(alen);
    memcpy(RTA_DATA(rta), a.addr, alen);
    len = NLMSG_ALIGN(len) + RTA_ALIGN(rta->rta_len);
  }
  req.nh.nlmsg_len = (uint32_t)len;
  int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (s < 0 || send(s, &req, len, 0) < 0) nk_fuzz_die("netlink: %s", strerror(errno));
  union {
    char buf[4096];
    struct nlmsghdr align;
  } u;
  ssize_t n = recv(s, u.buf, sizeof(u.buf), 0);
  close(s);
  struct nlmsgerr *e = NLMSG_DATA(&u.align);
  if (n < (ssize_t)NLMSG_LENGTH(sizeof(*e)) || u.align.nlmsg_type != NLMSG_ERROR || e->error)
    nk_fuzz_die("address %s on lo: %s", text, n > 0 ? strerror(-e->error) : "no answer");
}

static int nk_fuzz_new_netns(char *path) {
  if (unshare(CLONE_NEWNET) < 0)
    nk_fuzz_die("unshare(CLONE_NEWNET): %s (the harnesses need root)", strerror(errno));
  int fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (fd < 0) nk_fuzz_die("/proc/self/ns/net: %s", strerror(errno));
  if (path) snprintf(path, 64, "/proc/self/fd/%d", fd);
  nk_fuzz_lo_up();
  return fd;
}

static void nk_fuzz_remove_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *de;
  char p[384];
  while ((de = readdir(d)))
    if (de->d_name[0] != '.') {
      snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
      unlink(p);
    }
  closedir(d);
  rmdir(dir);
}

static void nk_fuzz_cleanup_dir(void) { nk_fuzz_remove_dir(nk_fuzz_dir); }

/* A harness that crashed (that is what they are for) left its directory behind: those whose
 * process is gone are removed. */
static void nk_fuzz_remove_stale_dirs(void) {
  DIR *d = opendir("/tmp");
  if (!d) return;
  struct dirent *de;
  while ((de = readdir(d))) {
    int pid;
    char tail;
    if (sscanf(de->d_name, "nk-fuzz-%d%c", &pid, &tail) != 1 || pid <= 0) continue;
    if (kill(pid, 0) == 0 || errno != ESRCH) continue;
    char dir[300];
    snprintf(dir, sizeof(dir), "/tmp/%s", de->d_name);
    nk_fuzz_remove_dir(dir);
  }
  closedir(d);
}

/* The engine as main() sets it up, in namespaces of the harness's own. */
static void nk_fuzz_engine_init(void) {
  nk_fuzz_report = fcntl(2, F_DUPFD_CLOEXEC, 3);
  if (nk_fuzz_report < 0) nk_fuzz_report = 2;
  signal(SIGPIPE, SIG_IGN);
  const char *dbg = getenv("NK_FUZZ_DEBUG");
  nk_debug = dbg ? atoi(dbg) : 0;
  nk_fuzz_ns_engine = nk_fuzz_new_netns(NULL);
  nk_fuzz_ns_nsm = nk_fuzz_new_netns(nk_fuzz_ns_nsm_path);
  nk_fuzz_addr_add(NK_FUZZ_NSM_V4);
  nk_fuzz_addr_add(NK_FUZZ_NSM_V6);
  nk_fuzz_addr_add(NK_FUZZ_TENANT_V4);
  nk_fuzz_addr_add(NK_FUZZ_TENANT_V6);
  nk_fuzz_ns_tenant = nk_fuzz_new_netns(nk_fuzz_ns_tenant_path);
  nk_fuzz_setns(nk_fuzz_ns_engine);

  nk_fuzz_remove_stale_dirs();
  snprintf(nk_fuzz_dir, sizeof(nk_fuzz_dir), "/tmp/nk-fuzz-%d", (int)getpid());
  if (mkdir(nk_fuzz_dir, 0700) < 0 && errno != EEXIST) nk_fuzz_die("mkdir: %s", strerror(errno));
  atexit(nk_fuzz_cleanup_dir);

  engine.spin_ns = 0;
  engine.epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  engine.self_netns = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  struct stat st;
  if (engine.epoll_fd < 0 || engine.self_netns < 0 || fstat(engine.self_netns, &st) < 0)
    nk_fuzz_die("engine setup: %s", strerror(errno));
  engine.self_netns_ino = st.st_ino;
  engine.next_wake_ns = UINT64_MAX;
  engine.service_bytes = UINT64_MAX;
  int r = nk_fds_init();
  if (r < 0) nk_fuzz_die("closer thread: %s", strerror(-r));
  nk_sock_calibrate();
  nk_sockopt_init(); /* kept open for good, like diag.c's socket below */
  /* diag.c opens its engine-namespace netlink socket on first use and keeps it: open it now,
   * so that it is part of the baseline rather than a leak of the first input that needs it. */
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0) {
    nk_diag_peer_of_fd(NULL, sv[0]);
    close(sv[0]);
    close(sv[1]);
  }
}

/* One round of the engine's loop, as main() runs it after epoll_wait, without sleeping. */
static void nk_fuzz_tick(void) {
  struct epoll_event evs[256];
  int n = epoll_wait(engine.epoll_fd, evs, 256, 0);
  for (int i = 0; i < n; i++) dispatch(&evs[i]);
  nk_policy_wake_due(nk_now_ns());
  scan_all();
  run_active();
  nk_esock_reap();
}

/* The engine's sleep announcement and the look for work a guest or NSM posted meanwhile (D2,
 * W4 in main()), then the housekeeping the loop does on its timers. */
static inline void nk_fuzz_sleep_cycle(void) {
  set_sleeping(1);
  atomic_thread_fence(memory_order_seq_cst);
  scan_all();
  set_sleeping(0);
  nk_sock_sweep_zombies();
  nk_tenant_trim_all();
}

/* ---- engine invariants (engine-private state only: the tenant may write the region) ---- */

static void nk_fuzz_check_tenant(struct nk_tenant *t) {
  /* Slots below the high-water mark are in use or on the free stack; none above is. */
  NK_FUZZ_CHECK(t->hwm <= t->nslots && t->nsocks + t->nfree == t->hwm && t->cold <= t->nfree,
                "tenant %s: %u sockets + %u free (%u cold) != %u used slots of %u", t->name,
                t->nsocks, t->nfree, t->cold, t->hwm, t->nslots);
  uint32_t n = 0;
  uint64_t sock_fds = 0;
  for (uint32_t i = 0; i < t->nslots; i++) {
    struct nk_esock *es = t->socks[i];
    if (!es) continue;
    NK_FUZZ_CHECK(i < t->hwm, "slot %u in use above the high-water mark %u", i, t->hwm);
    n++;
    sock_fds += NK_SOCK_FDS + es->ep_fds;
    NK_FUZZ_CHECK(es->slot == i && es->t == t && !es->freed, "slot %u: socket %p is not its own", i,
                  (void *)es);
    NK_FUZZ_CHECK(es->ep_count >= 0 && es->ep_count <= NK_MAX_EP, "slot %u: %d endpoints", i,
                  es->ep_count);
  }
  NK_FUZZ_CHECK(n == t->nsocks, "tenant %s: %u sockets in slots, nsocks %u", t->name, n, t->nsocks);
  /* A socket linked twice would make this list a cycle (see nk_sock_service's comment). */
  uint32_t linked = 0;
  struct nk_esock *last = NULL;
  for (struct nk_esock *es = t->active_head; es; es = es->next_active) {
    NK_FUZZ_CHECK(++linked <= t->nsocks, "tenant %s: active list longer than its sockets", t->name);
    NK_FUZZ_CHECK(es->active && !es->freed && es->t == t, "slot %u on the active list, not active",
                  es->slot);
    last = es;
  }
  NK_FUZZ_CHECK(last == t->active_tail, "tenant %s: active tail is not the list's last", t->name);
  NK_FUZZ_CHECK(t->fds >= sock_fds && t->fds <= sock_fds + t->ctls,
                "tenant %s: %u descriptors taken for %u sockets (%llu) and %u control connections",
                t->name, t->fds, t->nsocks, (unsigned long long)sock_fds, t->ctls);
}

static void nk_fuzz_check_engine(void) {
  uint64_t fds = 0;
  uint32_t zombies = 0;
  for (struct nk_tenant *t = engine.tenants; t; t = t->next) {
    nk_fuzz_check_tenant(t);
    fds += t->fds;
    for (uint32_t i = 0; i < t->nslots; i++) zombies += t->socks[i] && t->socks[i]->zombie;
  }
  NK_FUZZ_CHECK(fds == engine.fds_taken, "engine: %llu descriptors taken, tenants hold %llu",
                (unsigned long long)engine.fds_taken, (unsigned long long)fds);
  NK_FUZZ_CHECK(zombies == engine.nzombies, "engine: nzombies %u, zombie sockets %u",
                engine.nzombies, zombies);
  uint32_t listed = 0;
  for (struct nk_esock **p = &engine.zombies; *p; p = &(*p)->next_zombie) {
    NK_FUZZ_CHECK(++listed <= zombies && (*p)->zombie && !(*p)->freed && (*p)->prev_zombie == p,
                  "zombie list broken at its entry %u", listed);
  }
  NK_FUZZ_CHECK(listed == zombies, "engine: %u zombies listed of %u", listed, zombies);
  uint32_t throttled = 0;
  for (struct nk_esock *es = engine.throttled; es; es = es->next_throttled)
    NK_FUZZ_CHECK(++throttled <= 1u << 20 && es->throttled && !es->freed, "throttled list broken");
}

/* ---- the descriptor oracle ---- */

#define NK_FUZZ_MAX_FD 4096
static char nk_fuzz_fd_what[NK_FUZZ_MAX_FD][48]; /* the baseline's descriptors, by number */

static int nk_fuzz_fd_scan(bool record) {
  DIR *d = opendir("/proc/self/fd");
  if (!d) nk_fuzz_die("/proc/self/fd: %s", strerror(errno));
  int n = 0, self = dirfd(d);
  struct dirent *de;
  while ((de = readdir(d))) {
    if (de->d_name[0] == '.') continue;
    int fd = atoi(de->d_name);
    if (fd == self) continue;
    n++;
    if (record && fd < NK_FUZZ_MAX_FD) {
      char p[64];
      snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
      ssize_t k = readlink(p, nk_fuzz_fd_what[fd], sizeof(nk_fuzz_fd_what[fd]) - 1);
      nk_fuzz_fd_what[fd][k > 0 ? k : 0] = 0;
    }
  }
  closedir(d);
  return n;
}

/* Descriptors open now that were not in the baseline (or changed), for the report. */
static void nk_fuzz_fd_diff(char *out, size_t len) {
  size_t used = 0;
  out[0] = 0;
  for (int fd = 0; fd < NK_FUZZ_MAX_FD && used + 80 < len; fd++) {
    char p[64], what[48];
    snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
    ssize_t k = readlink(p, what, sizeof(what) - 1);
    if (k < 0) {
      if (nk_fuzz_fd_what[fd][0])
        used += (size_t)snprintf(out + used, len - used, " -%d(%s)", fd, nk_fuzz_fd_what[fd]);
      continue;
    }
    what[k] = 0;
    if (strcmp(what, nk_fuzz_fd_what[fd]) != 0)
      used += (size_t)snprintf(out + used, len - used, " +%d(%s)", fd, what);
  }
}

static int nk_fuzz_baseline = -1;

/* The baseline: what is open when an input starts. Taken per input, since libFuzzer opens
 * descriptors of its own between inputs (the symbolizer's pipes when it reports new
 * functions); the input must end with exactly these. */
static void nk_fuzz_fd_baseline(void) { nk_fuzz_baseline = nk_fuzz_fd_scan(true); }

/* Every descriptor the input made must be closed again, by the engine or by its closer thread
 * (given two seconds: it closes in batches, and a close may take a while), and none of the
 * baseline's may have been closed (a double close in the engine closes someone else's). */
static void nk_fuzz_fd_expect(const char *when) {
  int n = 0;
  for (int i = 0; i < 2000; i++) {
    n = nk_fuzz_fd_scan(false);
    if (n == nk_fuzz_baseline) return;
    if (n < nk_fuzz_baseline) break;
    usleep(1000);
  }
  char diff[1024];
  nk_fuzz_fd_diff(diff, sizeof(diff));
  nk_fuzz_die("%s: %d descriptors open, %d before the input:%s", when, n, nk_fuzz_baseline, diff);
}

/* ---- small helpers ---- */

static struct nk_addr nk_fuzz_addr(const char *ip, uint16_t port) {
  struct nk_addr a;
  if (nk_addr_parse(ip, &a) < 0) nk_fuzz_die("bad address %s", ip);
  a.port = htons(port);
  return a;
}

/* A TCP connection closed with a reset: no TIME_WAIT left behind by thousands of inputs. */
static void nk_fuzz_close_rst(int fd) {
  if (fd < 0) return;
  struct linger l = {1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close(fd);
}

/* A socket in namespace ns: non-blocking, bound to ip:port when ip is given. */
static inline int nk_fuzz_socket_in(int ns, int family, int type, const char *ip, uint16_t port) {
  nk_fuzz_setns(ns);
  int fd = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  nk_fuzz_setns(nk_fuzz_ns_engine);
  if (fd < 0) nk_fuzz_die("socket: %s", strerror(errno));
  int one = 1, zero = 0;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
  if (ip) {
    struct nk_addr a = nk_fuzz_addr(ip, port);
    struct sockaddr_storage ss;
    socklen_t l = nk_addr_to_sa(&a, &ss);
    if (bind(fd, (struct sockaddr *)&ss, l) < 0)
      nk_fuzz_die("bind %s:%u: %s", ip, port, strerror(errno));
  }
  return fd;
}

/* Accepts and resets whatever waits on a listener, reads away what waits on a datagram
 * socket: the next input starts from the same state. */
static inline void nk_fuzz_drain_server(int fd, bool listener) {
  for (int i = 0; i < 1024; i++) {
    if (listener) {
      int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
      if (c < 0) return;
      nk_fuzz_close_rst(c);
    } else {
      char b[1];
      if (recv(fd, b, sizeof(b), MSG_DONTWAIT | MSG_TRUNC) < 0) return;
    }
  }
}

/* socket() as GuestLib makes it: a SEQPACKET pair in namespace ns, the engine's end
 * registered for tenant t as handle_req(NK_OP_SOCKET) does; *guest gets the application's end
 * (non-blocking, a one-byte send buffer so that a blocked guest is quick to reach). */
static struct nk_esock *nk_fuzz_guest_socket(struct nk_tenant *t, int ns, int family, int type,
                                             int *guest) {
  int sv[2];
  nk_fuzz_setns(ns);
  int r = socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv);
  nk_fuzz_setns(nk_fuzz_ns_engine);
  if (r < 0) nk_fuzz_die("socketpair: %s", strerror(errno));
  int one = 1;
  setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
  fcntl(sv[0], F_SETFL, O_NONBLOCK);
  struct stat st;
  fstat(sv[0], &st);
  struct nk_esock *es = nk_esock_alloc(t, sv[1], family, type, st.st_ino);
  if (!es) {
    close(sv[0]);
    close(sv[1]);
    return NULL;
  }
  es->proxy_rights_refused = nk_fd_refuse_rights(es->proxy, false);
  es->proxy_in_tenant_ns = true;
  nk_epoll_add(es->proxy, EPOLLIN, &es->h_proxy);
  *guest = sv[0];
  return es;
}

/* ---- the stall oracle: a neighbour tenant's ping ----
 *
 * A tenant of its own, made once per process and kept across inputs, with one TCP connection
 * through a kernel NSM to a server of the harness's. After each input's operations, while the
 * input's tenant still holds whatever state the input left, the neighbour sends one byte and
 * its peer one byte back: both must arrive within a few rounds of the loop. A loop over the
 * fuzzed tenant's state without a budget hangs (libFuzzer's -timeout); one with a budget that
 * still serves that tenant ahead of everyone, or a state that wedges shared machinery (the
 * NSM's link, the throttled list, the active-tenant ring), fails here. */

#define NK_FUZZ_NEIGHBOUR_V4   "10.77.0.3"
#define NK_FUZZ_NEIGHBOUR_V6   "fd77::3"
#define NK_FUZZ_NEIGHBOUR_PORT 7100
#define NK_FUZZ_PING_ROUNDS    16

static struct {
  struct nk_tenant *t;
  uint32_t slot;
  int guest, peer, server; /* GuestLib's proxy end, the network's end, its listener */
  uint8_t seq;
} nk_fuzz_nbr = {.guest = -1, .peer = -1, .server = -1};

static void nk_fuzz_ring_bell(struct nk_tenant *t, uint32_t i) {
  struct nk_region *rg = t->rg;
  atomic_fetch_or(&rg->doorbell[i >> 6], 1ull << (i & 63));
  atomic_fetch_or(&rg->doorbell_summary, 1ull << ((i >> 6) & 63));
  if (atomic_load(&rg->engine_sleeping) && atomic_exchange(&rg->engine_sleeping, 0)) {
    uint64_t one = 1;
    (void)!write(t->doorbell_fd, &one, sizeof(one));
  }
}

/* READY records on the neighbour's proxy end, taken back as GuestLib does. */
static void nk_fuzz_neighbour_drain(void) {
  char buf[256];
  while (recv(nk_fuzz_nbr.guest, buf, sizeof(buf), MSG_DONTWAIT) > 0) {}
  struct nk_slot *s = &nk_fuzz_nbr.t->slots[nk_fuzz_nbr.slot];
  atomic_store(&s->rx_ack, atomic_load(&s->ready_sent));
  atomic_fetch_add(&s->rx_seen, 1);
}

/* The neighbour on the kernel NSM `nsm_name`, whose namespace is nk_fuzz_ns_nsm. */
static void nk_fuzz_neighbour_init(const char *nsm_name) {
  char ns_path[64];
  int ns = nk_fuzz_new_netns(ns_path);
  nk_fuzz_setns(nk_fuzz_ns_nsm);
  nk_fuzz_addr_add(NK_FUZZ_NEIGHBOUR_V4);
  nk_fuzz_addr_add(NK_FUZZ_NEIGHBOUR_V6);
  nk_fuzz_setns(nk_fuzz_ns_engine);
  int r = nk_tenant_add("neighbour", ns_path, nsm_name, NK_FUZZ_NEIGHBOUR_V4, NK_FUZZ_NEIGHBOUR_V6,
                        0, 0, &nk_fuzz_nbr.t);
  if (r < 0) nk_fuzz_die("neighbour tenant: %s", strerror(-r));
  nk_fuzz_nbr.server = nk_fuzz_socket_in(nk_fuzz_ns_nsm, AF_INET, SOCK_STREAM, NK_FUZZ_NSM_V4,
                                         NK_FUZZ_NEIGHBOUR_PORT);
  if (listen(nk_fuzz_nbr.server, 4) < 0) nk_fuzz_die("listen: %s", strerror(errno));
  /* socket() and connect() as GuestLib and the control path make them. */
  struct nk_esock *es =
      nk_fuzz_guest_socket(nk_fuzz_nbr.t, ns, AF_INET, SOCK_STREAM, &nk_fuzz_nbr.guest);
  close(ns); /* the engine holds the namespace now */
  if (!es) nk_fuzz_die("neighbour socket: no slot");
  nk_fuzz_nbr.slot = es->slot;
  struct nk_addr a = nk_fuzz_addr(NK_FUZZ_NSM_V4, NK_FUZZ_NEIGHBOUR_PORT);
  int inprog;
  if ((r = nk_sock_connect(es, &a, &inprog)) < 0)
    nk_fuzz_die("neighbour connect: %s", strerror(-r));
  for (int i = 0; i < 100 && nk_fuzz_nbr.peer < 0; i++) {
    nk_fuzz_tick();
    nk_fuzz_nbr.peer = accept4(nk_fuzz_nbr.server, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  }
  if (nk_fuzz_nbr.peer < 0) nk_fuzz_die("the neighbour's connection was not made");
  for (int i = 0; i < 4; i++) nk_fuzz_tick();
  nk_fuzz_neighbour_drain();
}

/* One byte each way; `what` names the input's stage for the report. */
static void nk_fuzz_neighbour_ping(const char *what) {
  struct nk_tenant *t = nk_fuzz_nbr.t;
  uint32_t i = nk_fuzz_nbr.slot, size = t->ring_size;
  struct nk_slot *s = &t->slots[i];
  uint8_t *tx = t->rings + (uint64_t)i * 2u * size, *rx = tx + size;
  uint8_t seq = ++nk_fuzz_nbr.seq;
  uint32_t head = atomic_load(&s->tx_head.v);
  tx[head % size] = seq;
  atomic_store(&s->tx_head.v, head + 1);
  nk_fuzz_ring_bell(t, i);
  if (send(nk_fuzz_nbr.peer, &seq, 1, MSG_DONTWAIT | MSG_NOSIGNAL) != 1)
    nk_fuzz_die("neighbour's peer: send: %s", strerror(errno));
  bool out = false, in = false;
  for (int k = 0; k < NK_FUZZ_PING_ROUNDS && !(out && in); k++) {
    nk_fuzz_tick();
    uint8_t b;
    if (!out && recv(nk_fuzz_nbr.peer, &b, 1, MSG_DONTWAIT) == 1) {
      NK_FUZZ_CHECK(b == seq, "neighbour: its peer read %u, it sent %u", b, seq);
      out = true;
    }
    uint32_t rh = atomic_load(&s->rx_head.v), rt = atomic_load(&s->rx_tail.v);
    if (!in && rh != rt) {
      NK_FUZZ_CHECK(rh - rt == 1 && rx[rt % size] == seq,
                    "neighbour: received %u bytes, first %u, "
                    "its peer sent one, %u",
                    rh - rt, rx[rt % size], seq);
      atomic_store(&s->rx_tail.v, rt + 1);
      in = true;
    }
    nk_fuzz_neighbour_drain();
  }
  NK_FUZZ_CHECK(out && in,
                "stall %s: the neighbour tenant's ping was not %s within %d rounds of "
                "the loop",
                what, out ? "answered" : "sent", NK_FUZZ_PING_ROUNDS);
}

/* Only the neighbour is left, holding just its own socket (each harness's teardown check). */
static bool nk_fuzz_only_neighbour_left(void) {
  struct nk_tenant *n = nk_fuzz_nbr.t;
  return engine.tenants == n && n && !n->next && n->nsocks == 1 && engine.fds_taken == n->fds;
}

#endif
