/* The exec port of a VM tenant: frames between the host's VM supervisor and the guest agent
 * over a virtio-serial port (src/netkernel/vm.py, csrc/vm/agent.c).
 *
 * A byte stream of frames, each a header and `len` bytes of payload. Little-endian, fixed
 * width. Both ends treat what they read as untrusted: the guest is a tenant (hostile), and a
 * frame that breaks these rules ends the port.
 */
#ifndef NETKERNEL_VMPORT_H
#define NETKERNEL_VMPORT_H

#include <stdint.h>

#define NK_VMPORT_NAME    "nk.exec" /* the virtserialport's name, as the guest sees it */
#define NK_VMPORT_MAX     65536     /* largest payload */
#define NK_VMPORT_MAXCHAN 256       /* channels (commands) at once */

struct nk_vmframe {
  uint32_t len;  /* payload bytes that follow, at most NK_VMPORT_MAX */
  uint16_t type; /* enum nk_vmframe_type */
  uint16_t chan; /* the command it belongs to; 0 for the port itself */
};
_Static_assert(sizeof(struct nk_vmframe) == 8, "nk_vmframe is ABI");

enum nk_vmframe_type {
  /* host -> guest */
  NK_VM_EXEC = 1,      /* payload: cwd\0 argv0\0 ... argvN\0 \0 env0\0 ... envM\0 */
  NK_VM_STDIN = 2,     /* bytes for the command's stdin */
  NK_VM_STDIN_EOF = 3, /* its stdin is closed */
  NK_VM_SIGNAL = 4,    /* payload: uint32_t signal number, sent to the command's group */
  NK_VM_POWEROFF = 5,  /* end every command and power the guest off */
  /* guest -> host */
  NK_VM_READY = 16,  /* the agent is up; payload: the guest's uptime in ms (uint32_t) */
  NK_VM_STDOUT = 17, /* bytes the command wrote to stdout */
  NK_VM_STDERR = 18, /* ... to stderr */
  NK_VM_EXIT = 19,   /* payload: int32_t exit status as the shell gives it (128+N on signal N) */
};

#endif
