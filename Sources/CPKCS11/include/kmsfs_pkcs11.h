#ifndef KMSFS_PKCS11_H
#define KMSFS_PKCS11_H
#include <stddef.h>

/// A session with one token of a PKCS#11 module, logged in as the user.
/// Written in C by hand: it is the standard PKCS#11 C API (dlopen, C_Initialize,
/// sessions, C_Login, C_GenerateKey, C_Encrypt/C_Decrypt with CKM_AES_GCM),
/// whose attribute templates and mechanism parameters are C structs.
typedef struct kmsfs_p11 kmsfs_p11;

/// Loads `module`, finds the token labelled `token`, opens a read-write
/// session and logs in with `pin`. On failure returns NULL and writes a
/// message (with the CKR_ code) into `error`.
kmsfs_p11 *kmsfs_p11_open(const char *module, const char *token, const char *pin, size_t pin_length,
                          char *error, size_t error_size);
void kmsfs_p11_close(kmsfs_p11 *p);

/// 1 if a secret key labelled `label` exists, 0 if not, -1 on error.
int kmsfs_p11_find_key(kmsfs_p11 *p, const char *label, char *error, size_t error_size);

/// Generates a token AES-256 key labelled `label`: CKA_TOKEN, CKA_PRIVATE,
/// CKA_SENSITIVE true, CKA_EXTRACTABLE false, encrypt/decrypt only.
int kmsfs_p11_generate_aes(kmsfs_p11 *p, const char *label, char *error, size_t error_size);

/// CKA_EXTRACTABLE and CKA_SENSITIVE (0/1) of the secret key labelled
/// `label` — of the private key when `pair` is 1 — or -1 on error.
int kmsfs_p11_key_flags(kmsfs_p11 *p, const char *label, int pair, int *extractable, int *sensitive, char *error, size_t error_size);

/// AES-GCM inside the token under key `label`: `out` gets ciphertext ‖ tag
/// (in_length + 16 bytes). `iv` is 12 bytes.
int kmsfs_p11_gcm_encrypt(kmsfs_p11 *p, const char *label, const unsigned char *iv,
                          const unsigned char *aad, size_t aad_length,
                          const unsigned char *in, size_t in_length, unsigned char *out, size_t *out_length,
                          char *error, size_t error_size);

/// The reverse; returns 0 and the plaintext, or -2 when the tag does not verify.
int kmsfs_p11_gcm_decrypt(kmsfs_p11 *p, const char *label, const unsigned char *iv,
                          const unsigned char *aad, size_t aad_length,
                          const unsigned char *in, size_t in_length, unsigned char *out, size_t *out_length,
                          char *error, size_t error_size);

/// 0 if the token is still present, the session usable and (when `label` is
/// not NULL) the key labelled `label` still in it; -1 if not.
int kmsfs_p11_check(kmsfs_p11 *p, const char *label, char *error, size_t error_size);

/// 1 if a private key labelled `label` exists, 0 if not, -1 on error.
int kmsfs_p11_find_pair(kmsfs_p11 *p, const char *label, char *error, size_t error_size);

/// Generates a token key pair labelled `label`: RSA of `rsa_bits` (exponent
/// 65537) when `rsa_bits` > 0, else EC on the curve named by the DER OID
/// `ec_params`. The private key is CKA_SENSITIVE, not CKA_EXTRACTABLE, sign only.
int kmsfs_p11_generate_pair(kmsfs_p11 *p, const char *label, int rsa_bits, const unsigned char *ec_params, size_t ec_params_length,
                            char *error, size_t error_size);

/// The public key labelled `label`: RSA → modulus and public exponent; EC →
/// CKA_EC_PARAMS and CKA_EC_POINT (each buffer's size in, length out).
int kmsfs_p11_public_key(kmsfs_p11 *p, const char *label, int *is_rsa, unsigned char *first, size_t *first_length,
                         unsigned char *second, size_t *second_length, char *error, size_t error_size);

/// Signs inside the token with the private key labelled `label`: RSA with
/// CKM_SHA256_RSA_PKCS over the message; EC with CKM_ECDSA over a digest
/// (the signature is r ‖ s).
int kmsfs_p11_sign(kmsfs_p11 *p, const char *label, int rsa, const unsigned char *in, size_t in_length,
                   unsigned char *out, size_t *out_length, char *error, size_t error_size);
#endif
