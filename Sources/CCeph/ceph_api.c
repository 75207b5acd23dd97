#include "CCeph.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

int imgconv_ceph_load(imgconv_ceph_api *api, char *error, size_t error_size) {
    // RTLD_GLOBAL: librbd resolves librados' symbols through the global scope, as when both are linked.
    void *rados = dlopen("librados.so.2", RTLD_NOW | RTLD_GLOBAL);
    if (rados == NULL) {
        snprintf(error, error_size, "%s", dlerror());
        return -1;
    }
    void *rbd = dlopen("librbd.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (rbd == NULL) {
        snprintf(error, error_size, "%s", dlerror());
        return -1;
    }
#define IMGCONV_CEPH_RESOLVE(name)                                                   \
    {                                                                                \
        void *library = strncmp(#name, "rbd_", 4) == 0 ? rbd : rados;                \
        void *symbol = dlsym(library, #name);                                        \
        if (symbol == NULL) {                                                        \
            snprintf(error, error_size, "%s: %s", #name, dlerror());                 \
            return -1;                                                               \
        }                                                                            \
        api->name = (__typeof__(name) *)symbol;                                      \
    }
    IMGCONV_CEPH_FUNCTIONS(IMGCONV_CEPH_RESOLVE)
#undef IMGCONV_CEPH_RESOLVE
    // Both stay loaded for the life of the process: librados' threads run its code until exit.
    return 0;
}
