// The PKCS#11 calls kmsfs makes, through the standard C API and p11-kit's
// pkcs11.h (types only; the module is loaded with dlopen, as any PKCS#11
// consumer does). See include/kmsfs_pkcs11.h.
#include "kmsfs_pkcs11.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <p11-kit/pkcs11.h>

struct kmsfs_p11 {
    void *library;
    CK_FUNCTION_LIST_PTR f;
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE session;
    pthread_mutex_t lock;  // one session: operations are serialised
    // The key the last operation used: a create or open then costs one
    // C_Encrypt/C_Decrypt, not a C_FindObjects round as well.
    CK_OBJECT_HANDLE cached_key;
    char cached_label[256];
};

static void fail(char *error, size_t size, const char *what, CK_RV rv) {
    if (error && size) snprintf(error, size, "%s failed: CKR 0x%lx", what, (unsigned long)rv);
}

static int label_equals(const unsigned char *padded, size_t size, const char *label) {
    size_t n = strlen(label);
    if (n > size) return 0;
    if (memcmp(padded, label, n) != 0) return 0;
    for (size_t i = n; i < size; i++) if (padded[i] != ' ') return 0;
    return 1;
}

kmsfs_p11 *kmsfs_p11_open(const char *module, const char *token, const char *pin, size_t pin_length,
                          char *error, size_t error_size) {
    void *library = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        if (error) snprintf(error, error_size, "cannot load PKCS#11 module %s: %s", module, dlerror());
        return NULL;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(library, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR f = NULL;
    CK_RV rv;
    if (!get || (rv = get(&f)) != CKR_OK || !f) {
        if (error) snprintf(error, error_size, "%s is not a PKCS#11 module (no C_GetFunctionList)", module);
        dlclose(library);
        return NULL;
    }
    CK_C_INITIALIZE_ARGS args;
    memset(&args, 0, sizeof args);
    args.flags = CKF_OS_LOCKING_OK;
    rv = f->C_Initialize(&args);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) { fail(error, error_size, "C_Initialize", rv); dlclose(library); return NULL; }
    CK_ULONG count = 0;
    if ((rv = f->C_GetSlotList(CK_TRUE, NULL, &count)) != CKR_OK) { fail(error, error_size, "C_GetSlotList", rv); return NULL; }
    CK_SLOT_ID *slots = calloc(count ? count : 1, sizeof *slots);
    if ((rv = f->C_GetSlotList(CK_TRUE, slots, &count)) != CKR_OK) { free(slots); fail(error, error_size, "C_GetSlotList", rv); return NULL; }
    int found = 0;
    CK_SLOT_ID slot = 0;
    for (CK_ULONG i = 0; i < count && !found; i++) {
        CK_TOKEN_INFO info;
        if (f->C_GetTokenInfo(slots[i], &info) == CKR_OK && label_equals(info.label, sizeof info.label, token)) {
            slot = slots[i];
            found = 1;
        }
    }
    free(slots);
    if (!found) {
        if (error) snprintf(error, error_size, "no token labelled '%s' in %s", token, module);
        return NULL;
    }
    CK_SESSION_HANDLE session;
    if ((rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session)) != CKR_OK) {
        fail(error, error_size, "C_OpenSession", rv);
        return NULL;
    }
    rv = f->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)pin, (CK_ULONG)pin_length);
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        f->C_CloseSession(session);
        if (error) snprintf(error, error_size, "C_Login to token '%s' failed (CKR 0x%lx)%s", token, (unsigned long)rv,
                            rv == CKR_PIN_INCORRECT ? ": wrong PIN" : "");
        return NULL;
    }
    kmsfs_p11 *p = calloc(1, sizeof *p);
    p->library = library;
    p->f = f;
    p->slot = slot;
    p->session = session;
    pthread_mutex_init(&p->lock, NULL);
    return p;
}

void kmsfs_p11_close(kmsfs_p11 *p) {
    if (!p) return;
    p->f->C_Logout(p->session);
    p->f->C_CloseSession(p->session);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

/// The handle of the object of class `cls` labelled `label` (0 if none), under the lock.
static CK_RV find_class(kmsfs_p11 *p, CK_OBJECT_CLASS cls, const char *label, CK_OBJECT_HANDLE *out) {
    CK_ATTRIBUTE template[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    CK_RV rv = p->f->C_FindObjectsInit(p->session, template, 2);
    if (rv != CKR_OK) return rv;
    CK_ULONG n = 0;
    *out = 0;
    rv = p->f->C_FindObjects(p->session, out, 1, &n);
    p->f->C_FindObjectsFinal(p->session);
    if (n == 0) *out = 0;
    return rv;
}

/// The handle of the secret key labelled `label` (0 if none), under the lock.
static CK_RV find(kmsfs_p11 *p, const char *label, CK_OBJECT_HANDLE *out) {
    return find_class(p, CKO_SECRET_KEY, label, out);
}

int kmsfs_p11_find_key(kmsfs_p11 *p, const char *label, char *error, size_t error_size) {
    pthread_mutex_lock(&p->lock);
    CK_OBJECT_HANDLE key;
    CK_RV rv = find(p, label, &key);
    pthread_mutex_unlock(&p->lock);
    if (rv != CKR_OK) { fail(error, error_size, "C_FindObjects", rv); return -1; }
    return key != 0;
}

int kmsfs_p11_generate_aes(kmsfs_p11 *p, const char *label, char *error, size_t error_size) {
    CK_MECHANISM mechanism = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ULONG length = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE template[] = {
        {CKA_CLASS, &cls, sizeof cls}, {CKA_KEY_TYPE, &type, sizeof type}, {CKA_VALUE_LEN, &length, sizeof length},
        {CKA_LABEL, (void *)label, strlen(label)}, {CKA_TOKEN, &yes, sizeof yes}, {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes}, {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_ENCRYPT, &yes, sizeof yes}, {CKA_DECRYPT, &yes, sizeof yes},
        {CKA_WRAP, &no, sizeof no}, {CKA_UNWRAP, &no, sizeof no}, {CKA_SIGN, &no, sizeof no}, {CKA_VERIFY, &no, sizeof no},
    };
    CK_OBJECT_HANDLE key;
    pthread_mutex_lock(&p->lock);
    CK_RV rv = p->f->C_GenerateKey(p->session, &mechanism, template, sizeof template / sizeof template[0], &key);
    pthread_mutex_unlock(&p->lock);
    if (rv != CKR_OK) { fail(error, error_size, "C_GenerateKey(CKM_AES_KEY_GEN)", rv); return -1; }
    return 0;
}

int kmsfs_p11_key_flags(kmsfs_p11 *p, const char *label, int pair, int *extractable, int *sensitive, char *error, size_t error_size) {
    pthread_mutex_lock(&p->lock);
    CK_OBJECT_HANDLE key;
    CK_RV rv = find_class(p, pair ? CKO_PRIVATE_KEY : CKO_SECRET_KEY, label, &key);
    CK_BBOOL e = CK_TRUE, s = CK_FALSE;
    if (rv == CKR_OK && key) {
        CK_ATTRIBUTE template[] = {{CKA_EXTRACTABLE, &e, sizeof e}, {CKA_SENSITIVE, &s, sizeof s}};
        rv = p->f->C_GetAttributeValue(p->session, key, template, 2);
    }
    pthread_mutex_unlock(&p->lock);
    if (rv != CKR_OK || !key) { fail(error, error_size, key ? "C_GetAttributeValue" : "finding the key", rv); return -1; }
    *extractable = e == CK_TRUE;
    *sensitive = s == CK_TRUE;
    return 0;
}

static int gcm(kmsfs_p11 *p, int encrypt, const char *label, const unsigned char *iv, const unsigned char *aad, size_t aad_length,
               const unsigned char *in, size_t in_length, unsigned char *out, size_t *out_length, char *error, size_t error_size) {
    CK_GCM_PARAMS params;
    memset(&params, 0, sizeof params);
    params.pIv = (CK_BYTE_PTR)iv;
    params.ulIvLen = 12;
    params.ulIvBits = 96;
    params.pAAD = (CK_BYTE_PTR)aad;
    params.ulAADLen = aad_length;
    params.ulTagBits = 128;
    CK_MECHANISM mechanism = {CKM_AES_GCM, &params, sizeof params};
    pthread_mutex_lock(&p->lock);
    CK_OBJECT_HANDLE key = 0;
    CK_RV rv = CKR_OK;
    if (p->cached_key && strcmp(p->cached_label, label) == 0) {
        key = p->cached_key;
    } else {
        rv = find(p, label, &key);
        if (rv == CKR_OK && !key) rv = CKR_KEY_HANDLE_INVALID;
        if (rv == CKR_OK && strlen(label) < sizeof p->cached_label) {
            strcpy(p->cached_label, label);
            p->cached_key = key;
        }
    }
    if (rv == CKR_OK) rv = encrypt ? p->f->C_EncryptInit(p->session, &mechanism, key) : p->f->C_DecryptInit(p->session, &mechanism, key);
    if (rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID) p->cached_key = 0;
    CK_ULONG n = *out_length;
    if (rv == CKR_OK) {
        rv = encrypt ? p->f->C_Encrypt(p->session, (CK_BYTE_PTR)in, in_length, out, &n)
                     : p->f->C_Decrypt(p->session, (CK_BYTE_PTR)in, in_length, out, &n);
    }
    pthread_mutex_unlock(&p->lock);
    if (rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE) return -2;
    if (rv != CKR_OK) { fail(error, error_size, encrypt ? "C_Encrypt(CKM_AES_GCM)" : "C_Decrypt(CKM_AES_GCM)", rv); return -1; }
    *out_length = n;
    return 0;
}

int kmsfs_p11_gcm_encrypt(kmsfs_p11 *p, const char *label, const unsigned char *iv, const unsigned char *aad, size_t aad_length,
                          const unsigned char *in, size_t in_length, unsigned char *out, size_t *out_length, char *error, size_t error_size) {
    return gcm(p, 1, label, iv, aad, aad_length, in, in_length, out, out_length, error, error_size);
}

int kmsfs_p11_gcm_decrypt(kmsfs_p11 *p, const char *label, const unsigned char *iv, const unsigned char *aad, size_t aad_length,
                          const unsigned char *in, size_t in_length, unsigned char *out, size_t *out_length, char *error, size_t error_size) {
    return gcm(p, 0, label, iv, aad, aad_length, in, in_length, out, out_length, error, error_size);
}

int kmsfs_p11_check(kmsfs_p11 *p, const char *label, char *error, size_t error_size) {
    CK_SESSION_INFO info;
    pthread_mutex_lock(&p->lock);
    CK_RV rv = p->f->C_GetSessionInfo(p->session, &info);
    // The session alone can outlive its token in a software token's memory:
    // the key must still be findable there too.
    CK_OBJECT_HANDLE key = 0;
    if (rv == CKR_OK && label) {
        rv = find(p, label, &key);
        if (rv == CKR_OK && !key) rv = find_class(p, CKO_PRIVATE_KEY, label, &key);
        if (rv == CKR_OK && !key) rv = CKR_KEY_HANDLE_INVALID;
    }
    pthread_mutex_unlock(&p->lock);
    if (rv != CKR_OK) { fail(error, error_size, key ? "C_GetSessionInfo" : "finding the key", rv); return -1; }
    return 0;
}

int kmsfs_p11_find_pair(kmsfs_p11 *p, const char *label, char *error, size_t error_size) {
    pthread_mutex_lock(&p->lock);
    CK_OBJECT_HANDLE key;
    CK_RV rv = find_class(p, CKO_PRIVATE_KEY, label, &key);
    pthread_mutex_unlock(&p->lock);
    if (rv != CKR_OK) { fail(error, error_size, "C_FindObjects", rv); return -1; }
    return key != 0;
}

int kmsfs_p11_generate_pair(kmsfs_p11 *p, const char *label, int rsa_bits, const unsigned char *ec_params, size_t ec_params_length,
                            char *error, size_t error_size) {
    CK_MECHANISM mechanism = {rsa_bits ? CKM_RSA_PKCS_KEY_PAIR_GEN : CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ULONG bits = (CK_ULONG)rsa_bits;
    CK_BYTE exponent[] = {1, 0, 1};
    unsigned char id[16];
    size_t label_length = strlen(label);
    memset(id, 0, sizeof id);
    memcpy(id, label, label_length < sizeof id ? label_length : sizeof id);
    CK_ATTRIBUTE public_template[6] = {
        {CKA_LABEL, (void *)label, label_length}, {CKA_ID, id, sizeof id}, {CKA_TOKEN, &yes, sizeof yes},
        {CKA_VERIFY, &yes, sizeof yes},
    };
    CK_ULONG public_count = 4;
    if (rsa_bits) {
        public_template[public_count++] = (CK_ATTRIBUTE){CKA_MODULUS_BITS, &bits, sizeof bits};
        public_template[public_count++] = (CK_ATTRIBUTE){CKA_PUBLIC_EXPONENT, exponent, sizeof exponent};
    } else {
        public_template[public_count++] = (CK_ATTRIBUTE){CKA_EC_PARAMS, (void *)ec_params, ec_params_length};
    }
    CK_ATTRIBUTE private_template[] = {
        {CKA_LABEL, (void *)label, label_length}, {CKA_ID, id, sizeof id}, {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes}, {CKA_SENSITIVE, &yes, sizeof yes}, {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_SIGN, &yes, sizeof yes}, {CKA_DECRYPT, &no, sizeof no}, {CKA_UNWRAP, &no, sizeof no},
    };
    CK_OBJECT_HANDLE public_key, private_key;
    pthread_mutex_lock(&p->lock);
    CK_RV rv = p->f->C_GenerateKeyPair(p->session, &mechanism, public_template, public_count,
                                       private_template, sizeof private_template / sizeof private_template[0], &public_key, &private_key);
    pthread_mutex_unlock(&p->lock);
    if (rv != CKR_OK) { fail(error, error_size, rsa_bits ? "C_GenerateKeyPair(CKM_RSA_PKCS_KEY_PAIR_GEN)" : "C_GenerateKeyPair(CKM_EC_KEY_PAIR_GEN)", rv); return -1; }
    return 0;
}

/// One attribute of an object into `out` (its length in `*length`).
static CK_RV attribute(kmsfs_p11 *p, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type, unsigned char *out, size_t *length) {
    CK_ATTRIBUTE a = {type, out, *length};
    CK_RV rv = p->f->C_GetAttributeValue(p->session, object, &a, 1);
    if (rv == CKR_OK) *length = a.ulValueLen;
    return rv;
}

int kmsfs_p11_public_key(kmsfs_p11 *p, const char *label, int *is_rsa, unsigned char *first, size_t *first_length,
                         unsigned char *second, size_t *second_length, char *error, size_t error_size) {
    pthread_mutex_lock(&p->lock);
    CK_OBJECT_HANDLE key;
    CK_RV rv = find_class(p, CKO_PUBLIC_KEY, label, &key);
    if (rv == CKR_OK && !key) rv = CKR_KEY_HANDLE_INVALID;
    CK_KEY_TYPE type = 0;
    if (rv == CKR_OK) {
        CK_ATTRIBUTE a = {CKA_KEY_TYPE, &type, sizeof type};
        rv = p->f->C_GetAttributeValue(p->session, key, &a, 1);
    }
    if (rv == CKR_OK) {
        *is_rsa = type == CKK_RSA;
        rv = attribute(p, key, *is_rsa ? CKA_MODULUS : CKA_EC_PARAMS, first, first_length);
        if (rv == CKR_OK) rv = attribute(p, key, *is_rsa ? CKA_PUBLIC_EXPONENT : CKA_EC_POINT, second, second_length);
    }
    pthread_mutex_unlock(&p->lock);
    if (rv != CKR_OK) { fail(error, error_size, "reading the public key", rv); return -1; }
    return 0;
}

int kmsfs_p11_sign(kmsfs_p11 *p, const char *label, int rsa, const unsigned char *in, size_t in_length,
                   unsigned char *out, size_t *out_length, char *error, size_t error_size) {
    CK_MECHANISM mechanism = {rsa ? CKM_SHA256_RSA_PKCS : CKM_ECDSA, NULL, 0};
    pthread_mutex_lock(&p->lock);
    CK_OBJECT_HANDLE key;
    CK_RV rv = find_class(p, CKO_PRIVATE_KEY, label, &key);
    if (rv == CKR_OK && !key) rv = CKR_KEY_HANDLE_INVALID;
    if (rv == CKR_OK) rv = p->f->C_SignInit(p->session, &mechanism, key);
    CK_ULONG n = *out_length;
    if (rv == CKR_OK) rv = p->f->C_Sign(p->session, (CK_BYTE_PTR)in, in_length, out, &n);
    pthread_mutex_unlock(&p->lock);
    if (rv != CKR_OK) { fail(error, error_size, rsa ? "C_Sign(CKM_SHA256_RSA_PKCS)" : "C_Sign(CKM_ECDSA)", rv); return -1; }
    *out_length = n;
    return 0;
}
