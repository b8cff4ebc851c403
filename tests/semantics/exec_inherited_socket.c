/* A connected socket inherited across fork + exec: the program re-execs itself with the fd
 * number; the exec'd child checks it is the same socket, talks over it both ways, and checks
 * that a SOCK_CLOEXEC socket did not survive the exec.
 * Regression named after the bug: exec with inherited sockets. */
#include "sem.h"

static int child_main(int fd, int cloexec_fd, const char *peer) {
  sem_name = "exec_inherited_socket(child)";
  sem_watchdog();
  int type = 0;
  socklen_t tl = sizeof type;
  SYS(getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl));
  EXPECT_EQ(type, SOCK_STREAM);
  struct sockaddr_storage pa = sem_peer(fd);
  CHECK(!strcmp(sem_fmt(&pa), peer), "peer after exec %s, before %s", sem_fmt(&pa), peer);
  EXPECT_ERR(fcntl(cloexec_fd, F_GETFD), EBADF);
  char msg[64];
  int n = snprintf(msg, sizeof msg, "ping from %d", (int)getpid());
  sem_write_all(fd, msg, (size_t)n);
  char buf[4];
  sem_read_all(fd, buf, 4);
  CHECK(!memcmp(buf, "pong", 4), "child got a bad reply");
  sem_write_all(fd, "done", 4);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 5 && !strcmp(argv[1], "--child"))
    return child_main(atoi(argv[2]), atoi(argv[3]), argv[4]);
  sem_init("exec_inherited_socket", argc, argv);
  int cli, srv;
  sem_pair(&cli, &srv);
  int ce = (int)SYS(socket(sem_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  struct sockaddr_storage pa = sem_peer(cli);
  char fdarg[16], cearg[16], peer[INET6_ADDRSTRLEN + 16];
  snprintf(fdarg, sizeof fdarg, "%d", cli);
  snprintf(cearg, sizeof cearg, "%d", ce);
  snprintf(peer, sizeof peer, "%s", sem_fmt(&pa));

  pid_t pid = sem_fork();
  if (pid == 0) {
    char *args[] = {argv[0], "--child", fdarg, cearg, peer, NULL};
    execv("/proc/self/exe", args);
    printf("FAIL exec_inherited_socket: execv: %s\n", strerror(errno));
    _exit(1);
  }
  close(cli); /* only the exec'd child holds the client end now */
  char buf[64];
  char want[64];
  int wn = snprintf(want, sizeof want, "ping from %d", (int)pid);
  sem_read_all(srv, buf, (size_t)wn);
  CHECK(!memcmp(buf, want, (size_t)wn), "got '%.*s', expected '%s'", wn, buf, want);
  sem_write_all(srv, "pong", 4);
  sem_read_all(srv, buf, 4);
  CHECK(!memcmp(buf, "done", 4), "no 'done' from the child");
  sem_wait_child(pid);
  /* The child exited: the last reference to the client end is gone, so EOF. */
  CHECK(sem_poll(srv, POLLIN, 5000) & POLLIN, "no EOF after the child exited");
  EXPECT_EQ(read(srv, buf, sizeof buf), 0);
  sem_ok();
}
