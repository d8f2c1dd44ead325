// Thin bridge to libfuse3's low-level API. FUSE_USE_VERSION must be defined
// here: a cSettings define does not reach Swift's Clang importer.
#ifndef KMSFS_CFUSE_SHIM_H
#define KMSFS_CFUSE_SHIM_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <errno.h>

/// FUSE_ARGS_INIT is a macro; Swift needs a function.
static inline struct fuse_args kmsfs_fuse_args_init(int argc, char **argv) {
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    return args;
}

/// fuse_session_loop_mt is a macro over a versioned symbol.
static inline int kmsfs_session_loop_mt(struct fuse_session *se, struct fuse_loop_config *config) {
    return fuse_session_loop_mt(se, config);
}

#endif
