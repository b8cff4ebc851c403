/* What the two threads of netkernel-vm-agent share (agent.c: commands; net.c: the network). */
#ifndef NETKERNEL_VM_AGENT_H
#define NETKERNEL_VM_AGENT_H

#include <stddef.h>

#define NK_VM_ROOT       "/mnt/root"                  /* the guest's root, as the agent sees it */
#define NK_GUEST_SOCKET  "/run/netkernel/engine.sock" /* where GuestLib finds "the engine" */
#define NK_GUEST_LIB_DIR "/run/netkernel/lib"         /* GuestLib, copied there at boot */

/* /dev/vportNpM of the virtio-serial port called name, opened; -1 if there is none. */
int nk_vm_open_port(const char *name);
/* Writes all of p to a port, or powers the guest off: a guest whose port broke is unreachable. */
void nk_vm_write_all(int fd, const void *p, size_t n);
void nk_vm_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void *nk_vm_net(void *arg);

#endif
