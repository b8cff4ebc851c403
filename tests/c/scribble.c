/* A hostile tenant process: it opens real connections through GuestLib, then registers with
 * the engine by hand, maps its tenant's region and writes garbage everywhere it can: slot
 * headers, ring indices, ring bytes, doorbell bits, and random control requests. The engine
 * must survive and keep serving other tenants (DESIGN §D). Usage: scribble HOST PORT SECONDS.
 * Exit 0 when it ran to the end (whatever its own sockets did). */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "netkernel/abi.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static int open_conn(const char *host, const char *port) {
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
  if (getaddrinfo(host, port, &hints, &ai)) return -1;
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (fd >= 0) connect(fd, ai->ai_addr, ai->ai_addrlen);
  freeaddrinfo(ai);
  return fd;
}

static int ctl_open(void) {
  const char *path = getenv("NETKERNEL_SOCKET");
  if (!path) return -1;
  int fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
  struct sockaddr_un un = {.sun_family = AF_UNIX};
  strncpy(un.sun_path, path, sizeof(un.sun_path) - 1);
  if (connect(fd, (struct sockaddr *)&un, sizeof(un)) < 0) return -1;
  struct timeval tv = {.tv_sec = 2};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: scribble HOST PORT SECONDS\n");
    return 2;
  }
  rng ^= (uint64_t)getpid() << 20;
  int conns[8];
  for (int i = 0; i < 8; i++) conns[i] = open_conn(argv[1], argv[2]);
  usleep(200000);

  int ctl = ctl_open();
  if (ctl < 0) {
    perror("scribble: control socket");
    return 1;
  }
  struct nk_req req = {.op = NK_OP_REGISTER};
  send(ctl, &req, sizeof(req), 0);
  struct nk_rep rep;
  union {
    char buf[CMSG_SPACE(2 * sizeof(int))];
    struct cmsghdr a;
  } cm;
  struct iovec iov = {.iov_base = &rep, .iov_len = sizeof(rep)};
  struct msghdr mh = {
      .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof(cm.buf)};
  if (recvmsg(ctl, &mh, 0) != sizeof(rep) || !CMSG_FIRSTHDR(&mh)) {
    fprintf(stderr, "scribble: register failed\n");
    return 1;
  }
  int fds[2];
  memcpy(fds, CMSG_DATA(CMSG_FIRSTHDR(&mh)), sizeof(fds));
  struct nk_reginfo info;
  memcpy(&info, rep.optval, sizeof(info));
  uint8_t *base = mmap(NULL, info.region_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
  if (base == MAP_FAILED) {
    perror("scribble: mmap");
    return 1;
  }
  struct nk_region *rg = (void *)base;
  uint64_t hot = rg->rings_off; /* headers and slots: where garbage hurts most */
  uint64_t ring_bytes = (uint64_t)rg->nslots * 2u * rg->ring_size;

  time_t end = time(NULL) + atoi(argv[3]);
  unsigned long ops = 0;
  char junk[4096];
  while (time(NULL) < end) {
    for (int i = 0; i < 256; i++, ops++) {
      switch (rnd() % 8) {
        case 0: /* random bytes into the slot table */
        case 1: {
          uint64_t off = rg->slots_off + rnd() % (hot - rg->slots_off - 8);
          uint64_t v = rnd();
          memcpy(base + off, &v, 8);
          break;
        }
        case 2: /* ring indices of the first slots set to nonsense */
          for (uint32_t s = 0; s < 32; s++) {
            struct nk_slot *sl = (void *)(base + rg->slots_off + s * sizeof(struct nk_slot));
            atomic_store(&sl->tx_head.v, (uint32_t)rnd());
            atomic_store(&sl->rx_tail.v, (uint32_t)rnd());
          }
          break;
        case 3: /* doorbells for every slot, and a wake-up */
          for (uint32_t w = 0; w < NK_DOORBELL_WORDS(rg->nslots); w++)
            atomic_store(&rg->doorbell[w], ~0ull);
          atomic_store(&rg->doorbell_summary, ~0ull);
          {
            uint64_t one = 1;
            if (write(fds[1], &one, 8) < 0) { /* engine counter full */
            }
          }
          break;
        case 4: { /* random ring bytes */
          uint64_t off = rg->rings_off + rnd() % (ring_bytes - 8);
          uint64_t v = rnd();
          memcpy(base + off, &v, 8);
          break;
        }
        case 5: { /* a random control request */
          struct nk_req r;
          for (size_t k = 0; k < sizeof(r); k += 8) {
            uint64_t v = rnd();
            memcpy((char *)&r + k, &v, sizeof(r) - k < 8 ? sizeof(r) - k : 8);
          }
          if (rnd() % 2) r.op = (uint32_t)(rnd() % 12);
          if (rnd() % 2) r.slot = (uint32_t)(rnd() % 64);
          if (send(ctl, &r, sizeof(r), MSG_NOSIGNAL) == sizeof(r)) {
            if (recv(ctl, &rep, sizeof(rep), 0) < 0 && errno != EAGAIN) ctl = ctl_open();
          } else {
            ctl = ctl_open();
          }
          if (ctl < 0) ctl = ctl_open();
          break;
        }
        case 6: { /* traffic on the real connections, with the engine reading garbage */
          int c = conns[rnd() % 8];
          if (c >= 0) {
            if (send(c, junk, rnd() % sizeof(junk), MSG_DONTWAIT | MSG_NOSIGNAL) < 0) { /* ok */
            }
            if (recv(c, junk, sizeof(junk), MSG_DONTWAIT) < 0) { /* ok */
            }
          }
          break;
        }
        case 7: { /* churn: close and reopen a connection */
          int k = (int)(rnd() % 8);
          if (conns[k] >= 0) close(conns[k]);
          conns[k] = open_conn(argv[1], argv[2]);
          break;
        }
      }
    }
    usleep(1000);
  }
  printf("scribble: %lu operations\n", ops);
  return 0;
}
