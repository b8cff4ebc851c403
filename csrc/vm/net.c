/* The guest half of a VM tenant's network, a thread of netkernel-vm-agent: inside the guest
 * it plays what the engine does locally for a namespace tenant. GuestLib, preloaded into the
 * guest's programs as anywhere, connects to NK_GUEST_SOCKET; this thread answers there by
 * relaying each request to the bridge on the host (csrc/vm/bridge.c) over the network port
 * (include/netkernel/vmnet.h), holds the other end of every guest proxy pair, and relays the
 * proxies' records: READY and NEWCONN from the engine, blockers from the programs.
 *
 * The tenant's region is the ivshmem BAR (PCI 1af4:1110, resource2), which GuestLib maps
 * through a descriptor this thread hands it at REGISTER: bytes go between the programs and
 * the host engine through it, never through this thread.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "netkernel/abi.h"
#include "netkernel/fdpass.h"
#include "netkernel/unixdiag.h"
#include "netkernel/vmnet.h"
#include "port.h"
#include "vm.h"

#define MAX_CONNS 1024

enum kind { K_PORT = 1, K_LISTEN, K_CTL, K_PROXY, K_DOORBELL, K_DNS };

struct conn { /* a GuestLib control connection */
  int fd;
  uint32_t op;     /* of the request waiting for its reply; 0 if none */
  uint32_t new_id; /* the proxy it brings */
};

static struct conn conns[MAX_CONNS];
/* By id: our end of each proxy pair (the program holds the other). */
static struct nk_vm_proxies proxies;
static uint32_t next_id = 1;
static int ep, port, bar = -1, doorbell = -1;
static uint8_t *region;
static int diag = -1;
static uint32_t *zombies; /* ids of zombie proxies */
static size_t nzombies, zcap;
static int dns = -1;

/* DNS: the guest's resolver asks 127.0.0.53 (its resolv.conf is the tenant's), which this
 * thread answers by relaying to the tenant's resolver on the host. A query leaves under an
 * id of ours (its slot here, and a random high byte), put back on the answer. */
enum { DNS_SLOTS = 256 };
static struct {
  struct sockaddr_in6 from;
  socklen_t fromlen;
  uint16_t id, ours;
  bool used;
} asked[DNS_SLOTS];
static unsigned dns_next;
static uint64_t region_len, bar_len; /* what we map of the region; the whole BAR */

static uint64_t tag(enum kind k, uint32_t v) { return (uint64_t)k << 32 | v; }

static struct nk_vm_proxy *proxy_of(uint32_t id) { return nk_vm_proxy(&proxies, id); }

static void put(uint16_t type, uint32_t a, uint32_t b, const void *p, uint32_t len) {
  if (!nk_vm_put(port, type, a, b, p, len)) { /* nobody can reach this guest any more */
    nk_vm_say("the network port failed: %s", strerror(errno));
    reboot(RB_POWER_OFF);
  }
}

static void close_fd(int fd) { close(fd); }

static void watch(int fd, uint32_t events, uint64_t t, int op) {
  struct epoll_event ev = {.events = events, .data.u64 = t};
  epoll_ctl(ep, op, fd, &ev);
}

/* The BAR of the ivshmem device: the tenant's region. */
static int open_bar(void) {
  DIR *d = opendir("/sys/bus/pci/devices");
  struct dirent *e;
  int fd = -1;
  while (d && (e = readdir(d)) && fd < 0) {
    if (e->d_name[0] == '.') continue;
    char path[300], v[16] = "", dv[16] = "";
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", e->d_name);
    FILE *f = fopen(path, "r");
    if (!f) continue;
    if (!fgets(v, sizeof(v), f)) v[0] = 0;
    fclose(f);
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", e->d_name);
    if (!(f = fopen(path, "r"))) continue;
    if (!fgets(dv, sizeof(dv), f)) dv[0] = 0;
    fclose(f);
    if (strncmp(v, "0x1af4", 6) || strncmp(dv, "0x1110", 6)) continue;
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource2", e->d_name);
    fd = open(path, O_RDWR | O_CLOEXEC);
  }
  if (d) closedir(d);
  return fd;
}

static void on_listen(int lfd) {
  int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd < 0) return;
  for (uint32_t c = 1; c < MAX_CONNS; c++)
    if (conns[c].fd < 0) {
      conns[c] = (struct conn){.fd = fd};
      watch(fd, EPOLLIN, tag(K_CTL, c), EPOLL_CTL_ADD);
      put(NK_VMNET_CTL_OPEN, c, 0, NULL, 0);
      return;
    }
  close(fd); /* more than MAX_CONNS threads at once: that GuestLib sees the engine as down */
}

static void end_conn(uint32_t c) {
  struct conn *k = &conns[c];
  close(k->fd);
  *k = (struct conn){.fd = -1};
  put(NK_VMNET_CTL_CLOSE, c, 0, NULL, 0);
}

/* A request from GuestLib: to the bridge, with a proxy id for the engine end it brings. */
static void on_ctl(uint32_t c) {
  struct conn *k = &conns[c];
  struct nk_req req;
  int fd;
  ssize_t n =
      nk_recv_with_fds(k->fd, &req, sizeof(req), &fd, 1, MSG_CMSG_CLOEXEC | MSG_DONTWAIT, close_fd);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) {
    if (fd >= 0) close(fd);
    end_conn(c);
    return;
  }
  bool brings = req.op == NK_OP_SOCKET || req.op == NK_OP_RENEW;
  if (n != sizeof(req) || k->op || (brings && fd < 0) || req.op == NK_OP_ATTACH ||
      next_id >= NK_VMNET_IDS) {
    /* Not what GuestLib sends (or a relay's attach, which a guest has no use for). */
    if (fd >= 0) close(fd);
    struct nk_rep rep = {.err = n != sizeof(req) ? -EPROTO : -EOPNOTSUPP};
    send(k->fd, &rep, sizeof(rep), MSG_NOSIGNAL | MSG_DONTWAIT);
    return;
  }
  uint32_t id = 0;
  if (brings) {
    id = next_id++; /* not reused, as the bridge's: see there */
    *proxy_of(id) = (struct nk_vm_proxy){.fd = fd, .ino = req.inode};
  } else if (fd >= 0) {
    close(fd);
  }
  k->op = req.op;
  k->new_id = id;
  put(NK_VMNET_CTL_REQ, c, id, &req, sizeof(req));
}

static void on_rep(uint32_t c, const char *p, uint32_t len) {
  if (c >= MAX_CONNS || len != sizeof(struct nk_rep) || !conns[c].op) return;
  struct conn *k = &conns[c];
  struct nk_rep rep;
  memcpy(&rep, p, sizeof(rep));
  int fds[2] = {bar, doorbell}, nfds = 0;
  if (k->op == NK_OP_REGISTER && rep.err == 0) {
    struct nk_reginfo info;
    memcpy(&info, rep.optval, sizeof(info));
    if (bar < 0 || info.region_size > bar_len) rep.err = -ENODEV; /* no BAR, or too small */
    else nfds = 2;
  }
  if (k->new_id) {
    struct nk_vm_proxy *q = proxy_of(k->new_id);
    if (rep.err == 0) {
      int big = 1 << 20; /* room for the records the engine sends before they are read */
      setsockopt(q->fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
      watch(q->fd, EPOLLIN, tag(K_PROXY, k->new_id), EPOLL_CTL_ADD);
    } else {
      close(q->fd);
      q->fd = -1;
    }
  }
  k->op = 0;
  k->new_id = 0;
  nk_send_with_fds(sendmsg, k->fd, &rep, sizeof(rep), fds, nfds, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* A program queued a blocker on a proxy (its transmit ring is full), or closed its end. */
static void on_proxy(uint32_t id, uint32_t events) {
  struct nk_vm_proxy *q = proxy_of(id);
  if (!q || q->fd < 0) return;
  if (events & EPOLLIN && !q->blocked) {
    char probe[NK_BLOCKER_SIZE];
    ssize_t n = recv(q->fd, probe, sizeof(probe), MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) {
      /* Left queued until the engine has taken the bridge's copy: until then the program's
       * end stays unwritable, as it would with the engine holding this end. */
      q->blocked = true;
      watch(q->fd, 0, tag(K_PROXY, id), EPOLL_CTL_MOD);
      put(NK_VMNET_BLOCK, id, 0, NULL, 0);
      return;
    }
  }
  if (events & (EPOLLHUP | EPOLLERR)) {
    close(q->fd);
    q->fd = -1;
    q->blocked = false;
    put(NK_VMNET_CLOSED, id, 0, NULL, 0);
  }
}

/* Whether the socket with inode ino still exists in the guest: 1 yes, 0 no, -errno. */
static int diag_exists(uint64_t ino) {
  if (diag < 0) diag = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
  return diag < 0 ? -errno : nk_unix_diag(diag, ino, NULL);
}

/* Zombies whose program end is gone: the bridge lets the host's go, and the engine the slot. */
static void sweep(void) {
  size_t kept = 0;
  for (size_t i = 0; i < nzombies; i++) {
    struct nk_vm_proxy *q = proxy_of(zombies[i]);
    int r = q && q->ino ? diag_exists(q->ino) : 0;
    if (r != 0) { /* still there (or no answer: look again) */
      zombies[kept++] = zombies[i];
      continue;
    }
    if (q) q->zombie = false;
    put(NK_VMNET_CLOSED, zombies[i], 0, NULL, 0);
  }
  nzombies = kept;
}

static void on_dns_query(void) {
  char q[NK_VMNET_MAX];
  for (;;) {
    struct sockaddr_in6 from;
    socklen_t fl = sizeof(from);
    ssize_t n = recvfrom(dns, q, sizeof(q), MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
    if (n < 0) return;
    if (n < 12) continue;
    unsigned i = dns_next++ % DNS_SLOTS; /* the oldest unanswered query gives way */
    uint16_t id;
    memcpy(&id, q, 2);
    uint16_t ours = (uint16_t)(i | (unsigned)(rand() & 0xff) << 8);
    asked[i].from = from;
    asked[i].fromlen = fl;
    asked[i].id = id;
    asked[i].ours = ours;
    asked[i].used = true;
    memcpy(q, &ours, 2);
    put(NK_VMNET_DNS, 0, 0, q, (uint32_t)n);
  }
}

static void on_dns_answer(char *p, uint32_t len) {
  if (len < 12 || dns < 0) return;
  uint16_t ours;
  memcpy(&ours, p, 2);
  unsigned i = ours & 0xff;
  if (!asked[i].used || asked[i].ours != ours) return; /* late, or not an answer of ours */
  asked[i].used = false;
  memcpy(p, &asked[i].id, 2);
  sendto(dns, p, len, MSG_DONTWAIT, (struct sockaddr *)&asked[i].from, asked[i].fromlen);
}

static void on_frame(struct nk_vmnet *h, char *p) {
  switch (h->type) {
    case NK_VMNET_DNS_ANSWER:
      on_dns_answer(p, h->len);
      break;
    case NK_VMNET_CTL_REP:
      on_rep(h->a, p, h->len);
      break;
    case NK_VMNET_READY: {
      struct nk_vm_proxy *q = proxy_of(h->a);
      if (q && q->fd >= 0 && h->len == 1) send(q->fd, p, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      break;
    }
    case NK_VMNET_NEWCONN: {
      struct nk_vm_proxy *l = proxy_of(h->a), *q = proxy_of(h->b);
      if (!l || !q || !(h->b & NK_VMNET_HOSTID) || q->fd >= 0 ||
          h->len != sizeof(struct nk_newconn))
        break;
      struct nk_newconn nc;
      memcpy(&nc, p, sizeof(nc));
      int sv[2];
      if (l->fd < 0 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        put(NK_VMNET_CLOSED, h->b, 0, NULL, 0);
        break;
      }
      int one = 1, big = 1 << 20;
      setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one));
      setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
      /* GuestLib finds a socket by its proxy's inode, which the engine wrote into the slot as
     * the host end's: the guest end's goes there before the program can see the socket. */
      struct stat st;
      fstat(sv[0], &st);
      if (region && nc.slot < ((struct nk_region *)region)->nslots) {
        struct nk_region *rg = (struct nk_region *)region;
        uint64_t off = rg->slots_off + (uint64_t)nc.slot * sizeof(struct nk_slot);
        if (off + sizeof(struct nk_slot) <= region_len)
          __atomic_store_n(&((struct nk_slot *)(region + off))->inode, (uint64_t)st.st_ino,
                           __ATOMIC_RELEASE);
      }
      *q = (struct nk_vm_proxy){.fd = sv[1], .ino = (uint64_t)st.st_ino};
      watch(sv[1], EPOLLIN, tag(K_PROXY, h->b), EPOLL_CTL_ADD);
      nk_send_with_fds(sendmsg, l->fd, &nc, sizeof(nc), &sv[0], 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      close(sv[0]);
      break;
    }
    case NK_VMNET_UNBLOCK: {
      struct nk_vm_proxy *q = proxy_of(h->a);
      if (!q || q->fd < 0 || !q->blocked) break;
      char rec[NK_BLOCKER_SIZE];
      recv(q->fd, rec, sizeof(rec), MSG_DONTWAIT); /* the program's end is writable again */
      q->blocked = false;
      watch(q->fd, EPOLLIN, tag(K_PROXY, h->a), EPOLL_CTL_MOD);
      break;
    }
    case NK_VMNET_HUP: {
      /* As the engine does for a namespace tenant: close our end, so the program's reads
       * POLLIN|POLLOUT|POLLHUP as Linux reports, and keep the socket until the program's end
       * is gone (its ring may hold bytes it has not read yet). */
      struct nk_vm_proxy *q = proxy_of(h->a);
      if (!q || q->fd < 0 || q->zombie) break;
      close(q->fd);
      q->fd = -1;
      q->blocked = false;
      if (nzombies == zcap) {
        uint32_t *z = realloc(zombies, (zcap = zcap ? 2 * zcap : 64) * sizeof(*z));
        if (!z) {
          put(NK_VMNET_CLOSED, h->a, 0, NULL, 0); /* no room to wait: let it go now */
          break;
        }
        zombies = z;
      }
      q->zombie = true;
      zombies[nzombies++] = h->a;
      break;
    }
    default:
      break;
  }
}

static void on_port(void) {
  static struct nk_vm_reader in;
  int r = nk_vm_read(port, &in, on_frame);
  if (r == 0) usleep(100000); /* no bridge on the other side yet */
  if (r < 0) {                /* the host's bridge is ours; a broken one ends the network */
    nk_vm_say("a frame longer than %u bytes from the bridge: the network stops", NK_VMNET_MAX);
    close(port);
    pthread_exit(NULL);
  }
}

void *nk_vm_net(void *arg) {
  (void)arg;
  port = nk_vm_open_port(NK_VMNET_NAME);
  if (port < 0) {
    nk_vm_say("no network port: the guest has no network");
    return NULL;
  }
  /* Only the header and the slot array: the guest kernel builds a BAR mapping's page tables
   * whole, and the rings are the programs' business. */
  bar = open_bar();
  struct nk_region *hdr = bar >= 0 ? mmap(NULL, 4096, PROT_READ, MAP_SHARED, bar, 0) : MAP_FAILED;
  if (hdr != MAP_FAILED && hdr->magic == NK_REGION_MAGIC && hdr->rings_off <= (1ull << 32)) {
    region_len = hdr->rings_off;
    region = mmap(NULL, region_len, PROT_READ | PROT_WRITE, MAP_SHARED, bar, 0);
    if (region == MAP_FAILED) region = NULL;
  }
  if (hdr != MAP_FAILED) munmap(hdr, 4096);
  struct stat st;
  bar_len = bar >= 0 && fstat(bar, &st) == 0 ? (uint64_t)st.st_size : 0;
  if (!region) {
    nk_vm_say("no NetKernel region on the ivshmem device: the guest has no network");
    return NULL;
  }
  if (nk_vm_proxies_init(&proxies) < 0) return NULL;
  for (int c = 0; c < MAX_CONNS; c++) conns[c].fd = -1;
  doorbell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  int lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  snprintf(un.sun_path, sizeof(un.sun_path), "%s%s", NK_VM_ROOT, NK_GUEST_SOCKET);
  unlink(un.sun_path);
  if (lfd < 0 || bind(lfd, (struct sockaddr *)&un, sizeof(un)) < 0 || listen(lfd, 256) < 0) {
    nk_vm_say("cannot listen on %s: %s", un.sun_path, strerror(errno));
    return NULL;
  }
  chmod(un.sun_path, 0666); /* the guest's programs may run as any user */
  ep = epoll_create1(EPOLL_CLOEXEC);
  /* The guest's lo is up (init.sh); the resolver's address is on it. */
  dns = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  struct sockaddr_in stub = {.sin_family = AF_INET, .sin_port = htons(53)};
  inet_pton(AF_INET, NK_DNS_STUB, &stub.sin_addr);
  if (dns >= 0 && bind(dns, (struct sockaddr *)&stub, sizeof(stub)) == 0) {
    watch(dns, EPOLLIN, tag(K_DNS, 0), EPOLL_CTL_ADD);
  } else {
    nk_vm_say("no DNS relay on %s: %s", NK_DNS_STUB, strerror(errno));
  }
  watch(port, EPOLLIN, tag(K_PORT, 0), EPOLL_CTL_ADD);
  watch(lfd, EPOLLIN, tag(K_LISTEN, 0), EPOLL_CTL_ADD);
  watch(doorbell, EPOLLIN, tag(K_DOORBELL, 0), EPOLL_CTL_ADD);
  for (;;) {
    struct epoll_event evs[64];
    /* While connections wait for their program's end to go, look every 100 ms; else sleep. */
    int k = epoll_wait(ep, evs, 64, nzombies ? 100 : -1);
    if (nzombies) sweep();
    for (int i = 0; i < k; i++) {
      uint32_t v = (uint32_t)evs[i].data.u64;
      switch ((enum kind)(evs[i].data.u64 >> 32)) {
        case K_PORT:
          on_port();
          break;
        case K_LISTEN:
          on_listen(lfd);
          break;
        case K_CTL:
          if (conns[v].fd >= 0) on_ctl(v);
          break;
        case K_PROXY:
          on_proxy(v, evs[i].events);
          break;
        case K_DNS:
          on_dns_query();
          break;
        case K_DOORBELL: {
          uint64_t n;
          if (read(doorbell, &n, sizeof(n)) == sizeof(n)) put(NK_VMNET_KICK, 0, 0, NULL, 0);
          break;
        }
      }
    }
  }
}
