/* CoreEngine main loop.
 *
 * Adaptive polling (DESIGN §C): after the last piece of work the engine keeps polling (epoll
 * with a zero timeout plus a scan of the tenants' doorbell bits) for spin_ns, then announces
 * that it sleeps in every region and blocks in epoll_wait. Guests ring the doorbell eventfd
 * only when they see it asleep, so while traffic flows nobody makes a wake-up system call, and
 * an idle engine costs no CPU.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>

#include "engine.h"

struct nk_engine engine;
int nk_debug;

int nk_epoll_add(int fd, uint32_t events, struct nk_handle *h) {
  struct epoll_event ev = {.events = events, .data.ptr = h};
  if (epoll_ctl(engine.epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
    if (errno == EEXIST) return nk_epoll_mod(fd, events, h);
    return -errno;
  }
  return 0;
}

int nk_epoll_mod(int fd, uint32_t events, struct nk_handle *h) {
  struct epoll_event ev = {.events = events, .data.ptr = h};
  return epoll_ctl(engine.epoll_fd, EPOLL_CTL_MOD, fd, &ev) < 0 ? -errno : 0;
}

void nk_epoll_del(int fd) { epoll_ctl(engine.epoll_fd, EPOLL_CTL_DEL, fd, NULL); }

/* A listening Unix socket at path (replacing a stale one) with the given file mode. */
int nk_unix_listen(const char *path, int type, mode_t mode, int backlog) {
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof(un.sun_path)) return -ENAMETOOLONG;
  strcpy(un.sun_path, path);
  int fd = socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  unlink(path);
  if (bind(fd, (struct sockaddr *)&un, sizeof(un)) < 0 || listen(fd, backlog) < 0 ||
      chmod(path, mode) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  return fd;
}

uint64_t nk_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void usage(void) {
  fprintf(stderr,
          "usage: netkernel-engine [--control PATH] [--admin PATH] [--control-fd FD] [--keep FD]\n"
          "       netkernel-engine --state-version\n"
          "  normally started by the NetKernel daemon (netkernel up)\n");
}

/* The sleep announcement of D2 and W4 (see main()): every tenant region's engine_sleeping and
 * every external NSM's evt.sleeping (seq_cst stores). */
static void set_sleeping(uint32_t v) {
  for (struct nk_tenant *t = engine.tenants; t; t = t->next)
    atomic_store(&t->rg->engine_sleeping, v);
  for (struct nk_nsm *m = engine.nsms; m; m = m->next)
    if (m->type->set_sleeping) m->type->set_sleeping(m, v != 0);
}

static bool scan_all(void) {
  bool any = false;
  for (struct nk_tenant *t = engine.tenants; t; t = t->next) any |= nk_tenant_scan_doorbells(t);
  for (struct nk_nsm *m = engine.nsms; m; m = m->next)
    if (m->type->poll) any |= m->type->poll(m);
  return any;
}

/* Sockets one tenant may have served per round when it has the engine to itself; with
 * others active, one per round. */
#define NK_TENANT_BUDGET 16
/* Engine time is shared by weight between the tenants that used it in the last 0.5 ms: a
 * tenant that floods the engine (many sockets, tiny writes) costs the others at most its
 * share of the engine's time, not all of it. */
#define NK_CONTEND_NS 500000ull
/* But a tenant served in the last 10 ms keeps the others' services short (one socket, a
 * bounded number of bytes) even while it is not contending: were a heavy tenant to get whole
 * rounds the moment a light one waited 0.5 ms for its peer, the light one's next request would
 * wait behind such a round, miss the window again, and so on — observed as a ping-pong
 * tenant falling to a quarter of its rate beside a flood. */
#define NK_GRANULE_NS   10000000ull
#define NK_CPU_BURST_NS 50000.0

static void queue_tenant(struct nk_tenant *t) {
  t->in_active = true;
  t->next_active = NULL;
  struct nk_tenant **q = &engine.active_tenants;
  while (*q) q = &(*q)->next_active;
  *q = t;
}

/* Refill t's engine-time tokens at its weighted share of the contending tenants. */
static void cpu_refill(struct nk_tenant *t, uint64_t now, uint32_t weights) {
  if (now > t->cpu_last_ns) {
    t->cpu_tokens += (double)(now - t->cpu_last_ns) * t->weight / (weights ? weights : 1);
    if (t->cpu_tokens > NK_CPU_BURST_NS) t->cpu_tokens = NK_CPU_BURST_NS;
  }
  t->cpu_last_ns = now;
}

static void note_service(struct nk_tenant *t, uint64_t now, uint64_t moved) {
  if (now - t->win_start_ns >= NK_GRANULE_NS) {
    t->prev_win_max = now - t->win_start_ns < 2 * NK_GRANULE_NS ? t->win_max : 0;
    t->win_max = 0;
    t->win_start_ns = now;
  }
  if (moved + 1 > t->win_max) t->win_max = moved + 1;
}

/* Served in the last 10-20 ms, and never more than a short service's worth at a time: a
 * ping-pong, a web client. A bulk sender's services reach the bound even while its program
 * waits for a CPU, because its backlog sits in the ring. */
static bool is_light(struct nk_tenant *t, uint64_t now) {
  if (now - t->win_start_ns >= 2 * NK_GRANULE_NS) return false; /* nothing known */
  uint64_t most = t->win_max > t->prev_win_max ? t->win_max : t->prev_win_max;
  return most && most <= NK_SERVICE_BYTES;
}

/* One round over the tenants with work. Bounded: what is activated meanwhile waits for the
 * next round. Tenants that came with new work go before those carried over with a backlog,
 * so a light tenant's request waits behind at most one service of a heavy one's. */
static bool run_active(void) {
  bool any = false;
  struct nk_tenant *round = engine.active_tenants;
  engine.active_tenants = NULL;
  uint64_t now = nk_now_ns();
  uint32_t weights = 0, contending = 0, recent = 0;
  bool light = false;
  for (struct nk_tenant *t = engine.tenants; t; t = t->next) {
    /* A tenant whose work waits for its rate limit or its share of a link, not for the
     * engine, does not contend: an unlimited neighbour keeps the whole engine meanwhile. */
    if (t->throttled_socks && !t->in_active) continue;
    /* A tenant in this round contends whenever it was last served: one that comes back after
     * a pause would otherwise get its first round free of charge, every time. */
    if (t->in_active || t->cpu_used_ns + NK_GRANULE_NS > now) {
      recent++;
      light |= is_light(t, now);
    }
    if (t->in_active || t->cpu_used_ns + NK_CONTEND_NS > now) {
      weights += t->weight;
      contending++;
    }
  }
  int budget = recent > 1 ? 1 : NK_TENANT_BUDGET;
  /* A socket with a large backlog would otherwise hold the engine for as long as the kernel
   * takes to move all of it (a 1 MiB ring: hundreds of microseconds) while others wait. How
   * long a service may be depends on who waits: a tenant doing request-sized work lately
   * (light) gets short ones, bulk tenants among themselves longer, cheaper ones. */
  engine.service_bytes = recent <= 1 ? UINT64_MAX
                         : light     ? NK_SERVICE_BYTES
                                     : NK_BULK_SERVICE_BYTES;
  for (int pass = 0; pass < 2; pass++) {
    for (struct nk_tenant **p = &round; *p;) {
      struct nk_tenant *t = *p;
      if (t->carried != (pass == 1)) {
        p = &t->next_active;
        continue;
      }
      *p = t->next_active;
      t->in_active = false;
      if (contending > 1) {
        cpu_refill(t, now, weights);
        if (t->carried && t->cpu_tokens < 0) { /* over its share: next round */
          /* Still contending: were it to drop out, it would come back alone, with the whole
           * budget, in a burst that the others wait behind. */
          t->cpu_used_ns = now;
          t->cpu_skips++;
          queue_tenant(t);
          continue;
        }
      }
      t->carried = false;
      uint64_t t0 = nk_now_ns(), moved = t->tx_bytes + t->rx_bytes;
      for (int n = 0; n < budget && t->active_head; n++) {
        struct nk_esock *es = t->active_head;
        t->active_head = es->next_active;
        if (!t->active_head) t->active_tail = NULL;
        es->active = false;
        nk_sock_service(es);
        any = true;
      }
      uint64_t t1 = nk_now_ns();
      t->cpu_used_ns = t1;
      t->cpu_total_ns += t1 - t0;
      if (contending > 1) t->cpu_tokens -= (double)(t1 - t0);
      note_service(t, t1, t->tx_bytes + t->rx_bytes - moved);
      if (t->active_head && !t->dead) {
        t->carried = true;
        if (!t->in_active) queue_tenant(t);
      }
    }
  }
  engine.service_bytes = UINT64_MAX;
  return any;
}

static void dispatch(struct epoll_event *ev) {
  struct nk_handle *h = ev->data.ptr;
  switch (h->type) {
    case NK_H_CTL_LISTEN:
    case NK_H_CTL:
      nk_control_event(h, ev->events);
      break;
    case NK_H_ADMIN_LISTEN:
    case NK_H_ADMIN:
      nk_admin_event(h, ev->events);
      break;
    case NK_H_PROXY:
      if (!((struct nk_esock *)h->obj)->freed) nk_sock_proxy_event(h->obj, ev->events);
      break;
    case NK_H_DIRECT:
      if (!((struct nk_esock *)h->obj)->freed) nk_direct_event(h->obj, ev->events);
      break;
    case NK_H_ENDPOINT:
      if (!((struct nk_esock *)h->obj)->freed) nk_kernel_event(h->obj, h->idx, ev->events);
      break;
    case NK_H_DOORBELL: {
      struct nk_tenant *t = h->obj;
      if (t->dead) break;
      uint64_t v;
      while (read(t->doorbell_fd, &v, sizeof(v)) > 0) {}
      break;
    }
    case NK_H_DNS:
    case NK_H_DNS_UP:
      if (!((struct nk_tenant *)h->obj)->dead) nk_dns_event(h->obj, h->type == NK_H_DNS_UP);
      break;
    case NK_H_SIGNAL:
      engine.stop = true;
      break;
    case NK_H_NSM: {
      struct nk_nsm *m = h->obj;
      m->type->event(m, h->idx, ev->events);
      break;
    }
  }
}

int main(int argc, char **argv) {
  const char *ctl = "/run/netkernel/engine.sock", *adm = "/run/netkernel/admin.sock";
  int ctl_fd = -1, keep_fd = -1;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--control") && i + 1 < argc) ctl = argv[++i];
    else if (!strcmp(argv[i], "--admin") && i + 1 < argc) adm = argv[++i];
    else if (!strcmp(argv[i], "--control-fd") && i + 1 < argc) ctl_fd = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--keep") && i + 1 < argc) keep_fd = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--state-version")) {
      /* For `netkernel upgrade`: can this binary take sockets over from the running one? */
      printf("%s\n", nk_state_version());
      return 0;
    } else {
      usage();
      return 2;
    }
  }
  const char *dbg = getenv("NETKERNEL_DEBUG");
  nk_debug = dbg ? atoi(dbg) : 0;
  const char *spin = getenv("NETKERNEL_SPIN_US");
  engine.spin_ns = (spin ? strtoull(spin, NULL, 10) : 50) * 1000ull;
  engine.epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  engine.self_netns = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (engine.epoll_fd < 0 || engine.self_netns < 0) {
    perror("netkernel-engine: setup");
    return 1;
  }
  struct stat st;
  fstat(engine.self_netns, &st);
  engine.self_netns_ino = st.st_ino;
  nk_sockopt_init();
  signal(SIGPIPE, SIG_IGN);
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigprocmask(SIG_BLOCK, &mask, NULL);
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  static struct nk_handle h_sig = {NK_H_SIGNAL, 0, NULL};
  nk_epoll_add(sfd, EPOLLIN, &h_sig);
  int r;
  /* After the signal mask: the closer thread inherits it, so SIGTERM stays with signalfd. */
  if ((r = nk_fds_init()) < 0) {
    fprintf(stderr, "netkernel-engine: cannot start its closer thread: %s\n", strerror(-r));
    return 1;
  }
  nk_sock_calibrate();
  /* Before the admin socket: the daemon adds tenants back only once this engine took what
   * the last one left. A daemon that does not answer costs that, never the start. */
  if (keep_fd >= 0) {
    fcntl(keep_fd, F_SETFD, FD_CLOEXEC);
    (void)nk_keep_init(keep_fd);
  }
  if (ctl_fd >= 0) { /* accept_ctl() takes connections until EAGAIN */
    fcntl(ctl_fd, F_SETFD, FD_CLOEXEC);
    fcntl(ctl_fd, F_SETFL, fcntl(ctl_fd, F_GETFL) | O_NONBLOCK);
  }
  if ((r = nk_control_listen(ctl, ctl_fd)) < 0 || (r = nk_admin_listen(adm)) < 0) {
    fprintf(stderr, "netkernel-engine: cannot listen on %s / %s: %s\n", ctl, adm, strerror(-r));
    return 1;
  }
  NK_INFO("ready: control %s, admin %s, spin %llu us, %llu descriptors", ctl, adm,
          (unsigned long long)(engine.spin_ns / 1000), (unsigned long long)engine.fd_limit);

  struct epoll_event evs[256];
  uint64_t last_work = nk_now_ns();
  engine.next_wake_ns = UINT64_MAX;
  engine.service_bytes = UINT64_MAX;
  while (!engine.stop) {
    int64_t timeout_ns = 0;
    bool slept = false;
    uint64_t now = nk_now_ns();
    /* The spare descriptor goes when a listener's connection is dropped for lack of them
     * (fds.c); it comes back once there are descriptors again. */
    if (engine.spare_fd < 0) engine.spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (!engine.active_tenants && now - last_work > engine.spin_ns) {
      /* D2 and W4: announce sleep, fence, then look once more (doorbell bits, NSM event
       * queues) for work posted meanwhile. D2 pairs with D1 in GuestLib's doorbell(), W4 with
       * W3 in ServiceLib's nk_sl_flush(): each publishes its work, then loads our flag after
       * a seq_cst RMW or fence, so either this look finds the work or they see us asleep. */
      set_sleeping(1);
      atomic_thread_fence(memory_order_seq_cst);
      if (scan_all()) {
        set_sleeping(0);
      } else {
        /* Sockets waiting for their guest end to close are checked a few times a second;
         * throttled sockets are woken when their tokens are due. */
        timeout_ns = engine.nzombies ? 100000000 : -1;
        if (engine.throttled) {
          int64_t due = engine.next_wake_ns > now ? (int64_t)(engine.next_wake_ns - now) : 0;
          if (timeout_ns < 0 || due < timeout_ns) timeout_ns = due;
        }
        if (nk_tenant_trim_due()) {
          int64_t due = engine.next_trim_ns > now ? (int64_t)(engine.next_trim_ns - now) : 0;
          if (timeout_ns < 0 || due < timeout_ns) timeout_ns = due;
        }
        slept = true;
      }
    }
    if (engine.nzombies && nk_now_ns() >= engine.next_sweep_ns) {
      nk_sock_sweep_zombies();
      engine.next_sweep_ns = nk_now_ns() + 100000000ull;
    }
    /* Regions of tenants with max_memory are checked once a second, and free slots beyond
     * the warm ones give their pages back (tenant.c: trim, cool). */
    if (nk_tenant_trim_due() && nk_now_ns() >= engine.next_trim_ns) {
      bool more = nk_tenant_trim_all();
      engine.next_trim_ns = nk_now_ns() + (more ? 100000000ull : 1000000000ull);
    }
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
    int n = epoll_pwait2(engine.epoll_fd, evs, 256, timeout_ns < 0 ? NULL : &ts, NULL);
    if (slept) set_sleeping(0);
    if (n < 0 && errno != EINTR) {
      perror("netkernel-engine: epoll_wait");
      return 1;
    }
    for (int i = 0; i < n; i++) dispatch(&evs[i]);
    bool work = n > 0;
    nk_policy_wake_due(nk_now_ns());
    nk_cc_tick(nk_now_ns());
    work |= scan_all();
    work |= run_active();
    nk_esock_reap();
    if (work) last_work = nk_now_ns();
  }
  NK_INFO("stopping");
  if (ctl_fd < 0) unlink(ctl);
  unlink(adm);
  return 0;
}
