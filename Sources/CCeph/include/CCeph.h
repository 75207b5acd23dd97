// librados and librbd, loaded on first use (dlopen) rather than linked: a command that never touches Ceph (every
// `imgconv convert`, `info`, `check`) does not map them, their dependencies (boost, libssl) or run their static
// constructors, which cost about 20 MiB of RSS and 20 ms at start-up.
//
// Swift calls them through `imgconv_ceph_api`, one pointer per function with the type of the function's own
// declaration (so the compiler checks every call against librados.h and librbd.h); calling a declared function
// directly would not link, so no call can bypass the loader by mistake.
#ifndef IMGCONV_CCEPH_H
#define IMGCONV_CCEPH_H

#include <rados/librados.h>
#include <rbd/librbd.h>
#include <stddef.h>
#include <sys/time.h>

// Every function imgconv uses (Sources/RBD). Add one here before using it.
#define IMGCONV_CEPH_FUNCTIONS(X) \
    X(rados_blocklist_add) \
    X(rados_buffer_free) \
    X(rados_cluster_fsid) \
    X(rados_conf_read_file) \
    X(rados_conf_set) \
    X(rados_connect) \
    X(rados_create) \
    X(rados_create_write_op) \
    X(rados_get_instance_id) \
    X(rados_getaddrs) \
    X(rados_getxattr) \
    X(rados_ioctx_create) \
    X(rados_ioctx_destroy) \
    X(rados_list_lockers) \
    X(rados_lock_exclusive) \
    X(rados_notify2) \
    X(rados_notify_ack) \
    X(rados_pool_list) \
    X(rados_release_write_op) \
    X(rados_remove) \
    X(rados_shutdown) \
    X(rados_unlock) \
    X(rados_unwatch2) \
    X(rados_wait_for_latest_osdmap) \
    X(rados_watch3) \
    X(rados_watch_flush) \
    X(rados_write_op_exec) \
    X(rados_write_op_operate) \
    X(rados_write_op_rmxattr) \
    X(rados_write_op_setxattr) \
    X(rbd_aio_create_completion) \
    X(rbd_aio_discard) \
    X(rbd_aio_get_return_value) \
    X(rbd_aio_read) \
    X(rbd_aio_release) \
    X(rbd_aio_wait_for_complete) \
    X(rbd_aio_write) \
    X(rbd_clone2) \
    X(rbd_close) \
    X(rbd_create4) \
    X(rbd_flatten) \
    X(rbd_flush) \
    X(rbd_get_parent) \
    X(rbd_image_options_create) \
    X(rbd_image_options_destroy) \
    X(rbd_image_options_set_uint64) \
    X(rbd_image_spec_list_cleanup) \
    X(rbd_linked_image_spec_cleanup) \
    X(rbd_linked_image_spec_list_cleanup) \
    X(rbd_list2) \
    X(rbd_list_children3) \
    X(rbd_metadata_get) \
    X(rbd_metadata_set) \
    X(rbd_open) \
    X(rbd_open_read_only) \
    X(rbd_read) \
    X(rbd_remove) \
    X(rbd_rename) \
    X(rbd_resize) \
    X(rbd_snap_create) \
    X(rbd_snap_is_protected) \
    X(rbd_snap_list) \
    X(rbd_snap_list_end) \
    X(rbd_snap_protect) \
    X(rbd_snap_remove) \
    X(rbd_snap_spec_cleanup) \
    X(rbd_snap_unprotect) \
    X(rbd_stat) \

typedef struct imgconv_ceph_api {
#define IMGCONV_CEPH_FIELD(name) __typeof__(name) *_Nonnull name;
    IMGCONV_CEPH_FUNCTIONS(IMGCONV_CEPH_FIELD)
#undef IMGCONV_CEPH_FIELD
} imgconv_ceph_api;

// Loads librados.so.2 and librbd.so.1 and fills `api`. Returns 0, or -1 with the reason in `error` (dlerror's
// text: the library that is missing, or the symbol it lacks).
int imgconv_ceph_load(imgconv_ceph_api *_Nonnull api, char *_Nonnull error, size_t error_size);

#endif
