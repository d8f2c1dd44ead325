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

/// OpenSSL's secure heap (OPENSSL_secure_* are macros adding file and line).
static inline void *kmsfs_secure_zalloc(size_t n) { return OPENSSL_secure_zalloc(n); }
static inline void kmsfs_secure_clear_free(void *p, size_t n) { OPENSSL_secure_clear_free(p, n); }

/// EVP_MAX_MD_SIZE and friends are fine as constants; these wrap the
/// `EVP_PKEY_CTX_set_ec_paramgen_curve_nid` family, which are macros in some
/// 3.0 builds.
static inline int kmsfs_ec_paramgen_curve(EVP_PKEY_CTX *ctx, int nid) {
    return EVP_PKEY_CTX_set_ec_paramgen_curve_nid(ctx, nid);
}
static inline int kmsfs_rsa_keygen_bits(EVP_PKEY_CTX *ctx, int bits) {
    return EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, bits);
}

#include <openssl/core_names.h>

/// An HMAC-SHA256 context with its digest set and no key: callers dup it and
/// init with their key, so no algorithm is looked up by name per call. The
/// OSSL_PARAM array holds raw pointers, so it is built here, not in Swift.
static inline EVP_MAC_CTX *kmsfs_hmac_sha256_template(void) {
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (mac == NULL) return NULL;
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac);
    if (ctx == NULL) return NULL;
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    if (EVP_MAC_CTX_set_params(ctx, params) != 1) { EVP_MAC_CTX_free(ctx); return NULL; }
    return ctx;
}

/// HKDF-SHA256 (extract and expand, no salt) of `key` with `info` into
/// `out`, through `kdf` fetched once by the caller: the EVP_PKEY route looks
/// the KDF up by name on every call. A fresh context per call (OpenSSL 3.0
/// can neither dup an HKDF context nor reliably reuse one); freeing it
/// cleanses its copy of the key.
static inline int kmsfs_hkdf_sha256(EVP_KDF *kdf, const unsigned char *key, size_t keylen,
                                    const unsigned char *info, size_t infolen, unsigned char *out, size_t outlen) {
    EVP_KDF_CTX *ctx = EVP_KDF_CTX_new(kdf);
    if (ctx == NULL) return 0;
    OSSL_PARAM params[4];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)key, keylen);
    params[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, infolen);
    params[3] = OSSL_PARAM_construct_end();
    int ok = EVP_KDF_derive(ctx, out, outlen, params);
    EVP_KDF_CTX_free(ctx);
    return ok;
}

/// An AES-CMAC context over `cipher` ("AES-256-CBC" or "AES-128-CBC") keyed
/// with `key`, for callers that keep it and restart it per message
/// (EVP_MAC_init with no key).
static inline EVP_MAC_CTX *kmsfs_cmac_new(const char *cipher, const unsigned char *key, size_t keylen) {
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "CMAC", NULL);
    if (mac == NULL) return NULL;
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac);
    if (ctx == NULL) return NULL;
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_CIPHER, (char *)cipher, 0);
    params[1] = OSSL_PARAM_construct_end();
    if (EVP_MAC_init(ctx, key, keylen, params) != 1) { EVP_MAC_CTX_free(ctx); return NULL; }
    return ctx;
}

#endif
