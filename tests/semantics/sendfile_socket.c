/* sendfile() from a 4 MiB temporary file to a connected TCP socket: the first MiB with a NULL
 * offset (moves the file position), the rest with an offset pointer (advances the pointer,
 * leaves the file position alone); the peer's checksum of the 4 MiB matches the file's. */
#include <sys/sendfile.h>
#include <sys/stat.h>

#include "sem.h"

#define FILE_SIZE (4u << 20)
#define FIRST     (1u << 20)

int main(int argc, char **argv) {
  sem_init("sendfile_socket", argc, argv);
  const char *dir = getenv("TMPDIR");
  char path[4096];
  snprintf(path, sizeof path, "%s/nk-sendfile-XXXXXX", dir && *dir ? dir : "/tmp");
  int f = (int)SYS(mkstemp(path));
  unlink(path);
  static uint8_t chunk[65536];
  uint64_t want = SEM_FNV_INIT;
  for (uint32_t off = 0; off < FILE_SIZE; off += sizeof chunk) {
    for (uint32_t i = 0; i < sizeof chunk; i++) chunk[i] = sem_byte((uint64_t)off * 7 + i);
    sem_write_all(f, chunk, sizeof chunk);
    want = sem_fnv(want, chunk, sizeof chunk);
  }
  SYS(lseek(f, 0, SEEK_SET));

  struct sockaddr_storage la;
  int l = sem_listener(0, &la);
  pid_t pid = sem_fork();
  if (pid == 0) { /* the peer: sum everything until EOF, send the sum back */
    int s = (int)SYS(accept(l, NULL, NULL));
    uint64_t h = SEM_FNV_INIT, n = 0;
    for (;;) {
      ssize_t r = read(s, chunk, sizeof chunk);
      if (r < 0 && errno == EINTR) continue;
      CHECK(r >= 0, "peer read: %s", strerror(errno));
      if (r == 0) break;
      h = sem_fnv(h, chunk, (size_t)r);
      n += (uint64_t)r;
    }
    sem_write_all(s, &n, sizeof n);
    sem_write_all(s, &h, sizeof h);
    _exit(0);
  }
  int c = sem_connect(&la);

  size_t left = FIRST;
  while (left > 0) {
    ssize_t n = sendfile(c, f, NULL, left);
    if (n < 0 && errno == EINTR) continue;
    CHECK(n > 0, "sendfile(NULL offset) = %zd: %s", n, strerror(errno));
    left -= (size_t)n;
  }
  EXPECT_EQ(SYS(lseek(f, 0, SEEK_CUR)), FIRST);
  off_t off = FIRST;
  while ((uint64_t)off < FILE_SIZE) {
    off_t before = off;
    ssize_t n = sendfile(c, f, &off, FILE_SIZE - (size_t)off);
    if (n < 0 && errno == EINTR) continue;
    CHECK(n > 0, "sendfile(offset %lld) = %zd: %s", (long long)off, n, strerror(errno));
    EXPECT_EQ(off - before, n);
  }
  EXPECT_EQ(SYS(lseek(f, 0, SEEK_CUR)), FIRST); /* untouched by the offset form */
  /* At end of file sendfile returns 0. */
  EXPECT_EQ(sendfile(c, f, &off, 100), 0);
  SYS(shutdown(c, SHUT_WR));

  uint64_t n, h;
  sem_read_all(c, &n, sizeof n);
  sem_read_all(c, &h, sizeof h);
  EXPECT_EQ(n, FILE_SIZE);
  CHECK(h == want, "peer checksum %016llx, file %016llx", (unsigned long long)h,
        (unsigned long long)want);
  sem_wait_child(pid);
  close(c);
  close(f);
  sem_ok();
}
