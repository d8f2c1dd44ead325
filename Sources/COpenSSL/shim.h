// Thin bridge to OpenSSL 3 libcrypto for Swift. Only what the Swift importer
// cannot reach on its own (function-like macros) lives here; no logic.
#ifndef KMSFS_COPENSSL_SHIM_H
#define KMSFS_COPENSSL_SHIM_H

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>
#include <openssl/ec.h>
#include <openssl/rsa.h>
#include <openssl/obj_mac.h>
#include <openssl/x509.h>
#include <openssl/opensslv.h>

/// OPENSSL_free is a macro; Swift needs a function.
static inline void kmsfs_openssl_free(void *p) { OPENSSL_free(p); }

/// EVP_MAX_MD_SIZE and friends are fine as constants; these wrap the
/// `EVP_PKEY_CTX_set_ec_paramgen_curve_nid` family, which are macros in some
/// 3.0 builds.
static inline int kmsfs_ec_paramgen_curve(EVP_PKEY_CTX *ctx, int nid) {
    return EVP_PKEY_CTX_set_ec_paramgen_curve_nid(ctx, nid);
}
static inline int kmsfs_rsa_keygen_bits(EVP_PKEY_CTX *ctx, int bits) {
    return EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, bits);
}

#endif
