/* SO_SNDBUF and SO_RCVBUF set before the connection bound how much a sender may write ahead
 * of a receiver that does not read: a non-blocking sender gets EAGAIN after some tens of KiB,
 * not megabytes, and every byte then arrives in order. Without them the same sender gets
 * much further (the control: the bound comes from the options). In a tenant the options
 * size the socket's shared-memory rings (DESIGN §B), besides the NSM's kernel buffers. */
#include <netinet/tcp.h>

#include "sem.h"

#define SMALL (16 * 1024)
#define BOUND (512 * 1024)

/* Bytes a non-blocking sender writes before it stays unwritable for half a second. */
static uint64_t fill(int fd) {
  static uint8_t buf[65536];
  uint64_t sent = 0;
  for (;;) {
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = sem_byte(sent + i);
    ssize_t n = send(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
      sent += (uint64_t)n;
      CHECK(sent < 64u << 20, "64 MiB went into a connection whose receiver reads nothing");
      continue;
    }
    CHECK(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK), "send: %s", strerror(errno));
    if (!(sem_poll(fd, POLLOUT, 500) & POLLOUT)) return sent;
  }
}

static void drain(int fd, uint64_t n) {
  static uint8_t buf[65536];
  for (uint64_t got = 0; got < n;) {
    size_t want = n - got < sizeof buf ? (size_t)(n - got) : sizeof buf;
    ssize_t r = recv(fd, buf, want, 0);
    CHECK(r > 0, "recv after %llu of %llu bytes: %s", (unsigned long long)got,
          (unsigned long long)n, r < 0 ? strerror(errno) : "end of stream");
    for (ssize_t i = 0; i < r; i++)
      CHECK(buf[i] == sem_byte(got + (uint64_t)i), "byte %llu wrong",
            (unsigned long long)(got + i));
    got += (uint64_t)r;
  }
}

static uint64_t ahead(int small) {
  struct sockaddr_storage la;
  int l = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  sem_set_int(l, SOL_SOCKET, SO_REUSEADDR, 1);
  if (small) sem_set_int(l, SOL_SOCKET, SO_RCVBUF, SMALL); /* the accepted socket inherits it */
  la = sem_addr;
  SYS(bind(l, (struct sockaddr *)&la, sem_len(&la)));
  SYS(listen(l, 8));
  la = sem_local(l);
  int c = (int)SYS(socket(sem_family, SOCK_STREAM, 0));
  if (small) sem_set_int(c, SOL_SOCKET, SO_SNDBUF, SMALL);
  SYS(connect(c, (struct sockaddr *)&la, sem_len(&la)));
  int a = (int)SYS(accept(l, NULL, NULL));
  uint64_t sent = fill(c);
  drain(a, sent);
  close(c);
  close(a);
  close(l);
  return sent;
}

int main(int argc, char **argv) {
  sem_init("small_buffers", argc, argv);
  uint64_t small = ahead(1), large = ahead(0);
  CHECK(small < BOUND, "with %d-byte buffers the sender wrote %llu bytes ahead", SMALL,
        (unsigned long long)small);
  CHECK(large > BOUND, "control: with default buffers the sender wrote only %llu bytes ahead",
        (unsigned long long)large);
  printf("# %s: ahead with small buffers %llu, with default ones %llu\n", sem_fmt(&sem_addr),
         (unsigned long long)small, (unsigned long long)large);
  sem_ok();
}
