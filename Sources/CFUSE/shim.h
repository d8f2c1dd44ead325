// Thin bridge to libfuse3's low-level API. FUSE_USE_VERSION must be defined
// here: a cSettings define does not reach Swift's Clang importer.
#ifndef KMSFS_CFUSE_SHIM_H
#define KMSFS_CFUSE_SHIM_H

#define FUSE_USE_VERSION 35
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

#endif
