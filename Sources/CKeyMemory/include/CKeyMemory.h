#ifndef KMSFS_KEY_MEMORY_H
#define KMSFS_KEY_MEMORY_H

#include <stddef.h>

/// Whether OpenSSL's allocations go through kmsfs's allocator (installed by a
/// constructor before OpenSSL allocates anything). 1 installed, 0 not.
int kmsfs_keymem_installed(void);

/// Between begin and end (per thread, nestable), every allocation OpenSSL
/// makes — the key schedules of cipher and MAC contexts being keyed or
/// copied, private-key BIGNUMs being decoded — comes from OpenSSL's secure
/// heap (locked, excluded from core dumps, wiped on free) while it has room.
void kmsfs_keymem_begin(void);
void kmsfs_keymem_end(void);

/// Sets the bytes of the secure heap kmsfs may fill (keys and key schedules);
/// the rest stays for OpenSSL's own secure allocations (its private DRBG
/// reseeds from there, and fails if the heap is full).
void kmsfs_keymem_set_limit(size_t bytes);

/// Whether `n` more bytes fit in the secure heap under that limit.
int kmsfs_keymem_has_room(size_t n);

/// Bytes OpenSSL allocated in the secure heap through this allocator that are still live (tests, status).
size_t kmsfs_keymem_secure_bytes(void);

/// Whether `p` is a block of the secure heap this allocator handed out.
int kmsfs_keymem_is_secure(const void *p);

/// Makes this process non-dumpable (no core file, no ptrace by other
/// non-root users) and sets its core size limit to 0. Returns 0 on success.
int kmsfs_keymem_forbid_core_dumps(void);

#endif
