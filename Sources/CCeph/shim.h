#include <rados/librados.h>
#include <rbd/librbd.h>
#include <sys/time.h>
