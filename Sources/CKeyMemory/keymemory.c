// An allocator for OpenSSL (CRYPTO_set_mem_functions) that places the memory
// of key-bearing objects in OpenSSL's secure heap. OpenSSL 3 has no per-object
// switch for this: an EVP_CIPHER_CTX or EVP_MAC_CTX keeps its key schedule in
// memory from the ordinary heap. No library offers such a switch, so this small
// allocator is ours: while a thread has called kmsfs_keymem_begin(), every
// allocation is tried in the secure heap first; frees and reallocs of secure
// blocks are recognised by address (the heap is one mapping) without taking
// OpenSSL's secure-heap lock on every free.
#include "CKeyMemory.h"

#include <openssl/crypto.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>

static _Thread_local int depth;
static atomic_uintptr_t lowest = UINTPTR_MAX;
static atomic_uintptr_t highest = 0;
static atomic_size_t live_secure;
static int installed;
static atomic_size_t limit;

void kmsfs_keymem_set_limit(size_t bytes) { atomic_store(&limit, bytes); }

int kmsfs_keymem_has_room(size_t n) {
    return CRYPTO_secure_malloc_initialized() != 0 && CRYPTO_secure_used() + n <= atomic_load_explicit(&limit, memory_order_relaxed);
}

int kmsfs_keymem_is_secure(const void *p) {
    uintptr_t a = (uintptr_t)p;
    return p != NULL && a >= atomic_load_explicit(&lowest, memory_order_relaxed)
        && a <= atomic_load_explicit(&highest, memory_order_relaxed);
}

static void note_secure(void *p) {
    uintptr_t a = (uintptr_t)p;
    uintptr_t seen = atomic_load_explicit(&lowest, memory_order_relaxed);
    while (a < seen && !atomic_compare_exchange_weak(&lowest, &seen, a)) {}
    seen = atomic_load_explicit(&highest, memory_order_relaxed);
    while (a > seen && !atomic_compare_exchange_weak(&highest, &seen, a)) {}
    atomic_fetch_add_explicit(&live_secure, CRYPTO_secure_actual_size(p), memory_order_relaxed);
}

static void *secure_or_null(size_t n, const char *file, int line) {
    if (n == 0 || !kmsfs_keymem_has_room(n)) return NULL;
    void *p = CRYPTO_secure_malloc(n, file, line);
    if (p != NULL) note_secure(p);
    return p;
}

static void secure_release(void *p, const char *file, int line) {
    atomic_fetch_sub_explicit(&live_secure, CRYPTO_secure_actual_size(p), memory_order_relaxed);
    CRYPTO_secure_free(p, file, line);  // wipes the block
}

static void *km_malloc(size_t n, const char *file, int line) {
    if (depth > 0) {
        void *p = secure_or_null(n, file, line);
        if (p != NULL) return p;
    }
    return malloc(n);
}

static void *km_realloc(void *p, size_t n, const char *file, int line) {
    if (!kmsfs_keymem_is_secure(p)) {
        if (depth > 0 && p == NULL) return km_malloc(n, file, line);
        return realloc(p, n);
    }
    if (n == 0) { secure_release(p, file, line); return NULL; }
    size_t old = CRYPTO_secure_actual_size(p);
    void *q = secure_or_null(n, file, line);
    if (q == NULL) q = malloc(n);
    if (q == NULL) return NULL;
    memcpy(q, p, old < n ? old : n);
    secure_release(p, file, line);
    return q;
}

static void km_free(void *p, const char *file, int line) {
    if (kmsfs_keymem_is_secure(p)) secure_release(p, file, line); else free(p);
}

__attribute__((constructor)) static void kmsfs_keymem_install(void) {
    installed = CRYPTO_set_mem_functions(km_malloc, km_realloc, km_free);
}

int kmsfs_keymem_installed(void) { return installed; }
void kmsfs_keymem_begin(void) { depth++; }
void kmsfs_keymem_end(void) { if (depth > 0) depth--; }
size_t kmsfs_keymem_secure_bytes(void) { return atomic_load_explicit(&live_secure, memory_order_relaxed); }

int kmsfs_keymem_forbid_core_dumps(void) {
    struct rlimit none = { 0, 0 };
    int a = setrlimit(RLIMIT_CORE, &none);
    int b = prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    return a == 0 && b == 0 ? 0 : -1;
}
