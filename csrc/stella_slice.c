/* stella_slice.c - asks the scheduler for a short time slice for the calling thread.
 *
 * The sender's loop thread (stella_sender.c) shares its CPU with the caller's own work
 * (a trigger deciding and settling batches in Lua and SQLite). Each answer wakes the loop
 * for a few microseconds; under Linux's EEVDF scheduler (6.6 and later) a woken thread
 * with the default slice may wait for most of the running thread's slice before it runs,
 * and the answer sits unread for that long. A short slice (sched_attr.sched_runtime for
 * SCHED_OTHER, honoured since Linux 6.12, no privilege needed) gives the woken loop an
 * earlier deadline, so it preempts the caller at once and goes back to sleep. Elsewhere,
 * and on kernels that refuse or ignore it, nothing changes: the call's result is not
 * needed. Linux only; a separate file because it needs _GNU_SOURCE for syscall(). */
#if defined(__linux__)
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "stella.h"

#if defined(__linux__) && defined(SYS_sched_getattr) && defined(SYS_sched_setattr)
/* struct sched_attr as the kernel's uapi defines it (SCHED_ATTR_SIZE_VER0, 48 bytes);
 * glibc before 2.41 declares neither it nor a wrapper. */
typedef struct {
  uint32_t size, sched_policy;
  uint64_t sched_flags;
  int32_t sched_nice;
  uint32_t sched_priority;
  uint64_t sched_runtime, sched_deadline, sched_period;
} slice_attr;

void stella_short_slice(long slice_ns) {
  slice_attr a;
  memset(&a, 0, sizeof a);
  /* read first: the thread keeps its policy and nice value, only the slice changes */
  if (syscall(SYS_sched_getattr, 0, &a, (unsigned)sizeof a, 0U) != 0) return;
  if (a.sched_policy != 0) return;   /* SCHED_OTHER only: a real-time policy is the user's choice */
  a.size = sizeof a;
  a.sched_flags = 0;
  a.sched_runtime = (uint64_t)slice_ns;
  (void)syscall(SYS_sched_setattr, 0, &a, 0U);
}
#else
void stella_short_slice(long slice_ns) { (void)slice_ns; }
#endif
