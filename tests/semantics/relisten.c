/* A server that closes its listener and at once listens again on the same port (iperf3 does
 * after a failed test): Linux's close() frees the port before it returns, so the new bind()
 * and listen() succeed, every time, and the new listener accepts. Also with a connection the
 * old listener accepted still open (SO_REUSEADDR lets the port be listened on again). */
#include "sem.h"

int main(int argc, char **argv) {
  sem_init("relisten", argc, argv);
  struct sockaddr_storage la;
  int l = sem_listener(0, &la);
  uint16_t port = sem_port(&la);
  int cli = sem_connect(&la);
  int kept = (int)SYS(accept(l, NULL, NULL)); /* stays open throughout */
  for (int i = 0; i < 50; i++) {
    close(l);
    l = sem_bound(SOCK_STREAM, port);
    SYS(listen(l, 16));
    int c = sem_connect(&la);
    int s = (int)SYS(accept(l, NULL, NULL));
    sem_write_all(c, "x", 1);
    char b;
    sem_read_all(s, &b, 1);
    close(c);
    close(s);
  }
  sem_write_all(cli, "still", 5);
  char buf[5];
  sem_read_all(kept, buf, 5);
  CHECK(!memcmp(buf, "still", 5), "the first connection broke");
  close(l);
  close(cli);
  close(kept);
  sem_ok();
}
