import SystemIO
import CCeph
import Synchronization
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// A librados or librbd call that failed: the operation (with the pool and image it was about) and the errno.
public struct CephError: Error, CustomStringConvertible, Equatable, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var errnoName: String { SystemIO.errnoName(errno) }

    public var description: String {
        var hint = ""
        switch errno {
        case ETIMEDOUT:
            hint = ": the cluster did not answer in time; check that the mons in ceph.conf are reachable"
        case EACCES, EPERM:
            hint = ": the cephx user lacks a capability; it needs mon 'profile rbd' and osd 'profile rbd pool=...'"
        case ENOENT where operation.hasPrefix("rados_conf_read_file"):
            hint = ": ceph.conf not found"
        default: break
        }
        return "\(operation) failed: \(errnoName) (\(String(cString: strerror(errno))))\(hint)"
    }
}

/// Turns a librados/librbd return value into a throw: negative values are -errno.
@discardableResult
func check(_ result: Int32, _ operation: @autoclosure () -> String) throws(CephError) -> Int32 {
    if result < 0 { throw CephError(operation(), errno: -result) }
    return result
}

/// How to reach the cluster: the same three things every Ceph client takes, plus a bound on waiting.
public struct CephConfiguration: Sendable, Equatable {
    /// ceph.conf (mon addresses, fsid). nil: librados' default search (/etc/ceph/ceph.conf).
    public var confPath: String?
    /// The cephx id without "client." (Nova's `rbd_user`).
    public var user: String
    /// The keyring with that user's key. nil: whatever ceph.conf says.
    public var keyring: String?
    /// Seconds to wait for the mons on connect, and for every mon and OSD operation after it.
    public var timeout: Int

    public init(confPath: String? = nil, user: String = "admin", keyring: String? = nil, timeout: Int = 10) {
        self.confPath = confPath
        self.user = user
        self.keyring = keyring
        self.timeout = timeout
    }
}

/// A connected librados client. librados handles are thread-safe; every call blocks, so async callers run them
/// on the executor.
///
/// Every client is shut down (`rados_shutdown`) before the process exits, when its owner drops the last reference
/// (I/O contexts and images keep it alive while they are in use). A client still open when the process exits would have its threads (msgr-worker,
/// io_context_pool, ceph_timer) running while exit() runs librados' static destructors under them: that was the
/// crash at exit seen in the test process (boost::bad_get, SIGSEGV). `LiveClients` keeps the count; at exit with
/// clients still open it names them and ends the process with _exit, as Ceph's own CLI does (ceph PR 33950).
public final class RadosCluster: @unchecked Sendable {
    private let state: Mutex<rados_t?>
    let handle: rados_t
    public let configuration: CephConfiguration
    /// Who opened it, for the exit report ("RBDBackend pool vms").
    public let label: String

    /// Connects, or throws within about `timeout` seconds when the mons cannot be reached.
    public init(_ configuration: CephConfiguration, label: String = "client") throws(CephError) {
        self.configuration = configuration
        self.label = label
        try CephLibrary.load()
        var h: rados_t?
        try check(ceph.rados_create(&h, configuration.user), "rados_create(client.\(configuration.user))")
        guard let h else { throw CephError("rados_create", errno: ENOMEM) }
        do {
            try check(ceph.rados_conf_read_file(h, configuration.confPath), "rados_conf_read_file(\(configuration.confPath ?? "default"))")
            if let k = configuration.keyring { try check(ceph.rados_conf_set(h, "keyring", k), "rados_conf_set(keyring)") }
            let t = String(max(1, configuration.timeout))
            for option in ["client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"] {
                try check(ceph.rados_conf_set(h, option, t), "rados_conf_set(\(option))")
            }
            // A library inside a daemon: no admin socket, no log file of its own unless ceph.conf asks.
            _ = ceph.rados_conf_set(h, "admin_socket", "")
            // Writes are large, sequential and flushed before anything reads them: librbd's writeback cache
            // (32 MiB per open image) would only copy them once more.
            _ = ceph.rados_conf_set(h, "rbd_cache", "false")
            // Every aio write's buffer stays untouched until its completion has been waited for (`RBDImage.aioWrite`
            // says so), so librbd may send it as it is instead of copying each 4 MiB object first.
            _ = ceph.rados_conf_set(h, "rbd_disable_zero_copy_writes", "false")
            try check(ceph.rados_connect(h), "rados_connect(client.\(configuration.user), \(configuration.confPath ?? "default conf"))")
        } catch {
            ceph.rados_shutdown(h)
            throw error
        }
        handle = h
        state = Mutex(h)
        LiveClients.opened(self)
    }

    /// The last reference is gone, so no I/O context or image of this client is left: its threads stop here.
    deinit { shutdown() }

    private func shutdown() {
        guard let h = state.withLock({ s -> rados_t? in
            let h = s
            s = nil
            return h
        }) else { return }
        ceph.rados_shutdown(h)
        LiveClients.closed(self)
    }

    /// This client's address, as lockers and the blocklist know it ("127.0.0.1:0/998250503").
    public func address() throws(CephError) -> String {
        var out: UnsafeMutablePointer<CChar>?
        try check(ceph.rados_getaddrs(handle, &out), "rados_getaddrs")
        defer { ceph.rados_buffer_free(out) }
        return out.map { String(cString: $0) } ?? ""
    }

    /// Fences another client: the OSDs refuse its operations (ESHUTDOWN) from the next map epoch on, for
    /// `seconds`. This waits for that epoch, so nothing this client does afterwards can race the fenced one.
    public func blocklist(address: String, seconds: UInt32) throws(CephError) {
        var a = Array(address.utf8CString)
        try check(ceph.rados_blocklist_add(handle, &a, seconds), "rados_blocklist_add(\(address))")
        try check(ceph.rados_wait_for_latest_osdmap(handle), "rados_wait_for_latest_osdmap")
    }

    /// The cluster's fsid, as in `ceph fsid` and Glance's `rbd://<fsid>/...` locations.
    public func fsid() throws(CephError) -> String {
        var buf = [CChar](repeating: 0, count: 64)
        try check(ceph.rados_cluster_fsid(handle, &buf, buf.count), "rados_cluster_fsid")
        return String(cString: buf)
    }

    /// An I/O context on `pool`.
    public func ioContext(pool: String) throws(CephError) -> IOContext {
        var io: rados_ioctx_t?
        try check(ceph.rados_ioctx_create(handle, pool, &io), "rados_ioctx_create(\(pool))")
        return IOContext(io!, pool: pool, cluster: self)
    }

    /// Pools that exist.
    public func pools() throws(CephError) -> [String] {
        var size = 4096
        while true {
            var buf = [CChar](repeating: 0, count: size)
            let n = ceph.rados_pool_list(handle, &buf, size)
            try check(n, "rados_pool_list")
            if Int(n) <= size { return splitNulList(buf, Int(n)) }
            size = Int(n)
        }
    }

    /// This client's unique id, as lockers see it ("client.4123").
    public var instanceID: UInt64 { ceph.rados_get_instance_id(handle) }
}

/// cls_lock's `assert_locked` input, Ceph-encoded: ENCODE_START(1, 1), name, type (1: exclusive), cookie, tag
/// ("", as rados_lock_exclusive takes locks).
struct ClsLockAssert {
    var name: String
    var cookie: String
    var encoded: [UInt8] {
        func string(_ s: String) -> [UInt8] { le32(UInt32(s.utf8.count)) + Array(s.utf8) }
        func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }
        let body = string(name) + [1] + string(cookie) + string("")
        return [1, 1] + le32(UInt32(body.count)) + body
    }
}

/// The librados clients open in this process, and what to do about them at exit (see `RadosCluster`).
public enum LiveClients {
    private static let open = Mutex<[ObjectIdentifier: String]>([:])
    private static let hook = Mutex(false)

    static func opened(_ c: RadosCluster) {
        open.withLock { $0[ObjectIdentifier(c)] = c.label }
        hook.withLock { installed in
            guard !installed else { return }
            installed = true
            on_exit({ status, _ in LiveClients.atExit(status) }, nil)
        }
    }

    static func closed(_ c: RadosCluster) {
        _ = open.withLock { $0.removeValue(forKey: ObjectIdentifier(c)) }
    }

    /// Labels of the clients still open.
    public static var labels: [String] { open.withLock { Array($0.values) }.sorted() }

    static func atExit(_ status: Int32) {
        let still = labels
        guard !still.isEmpty else { return }
        let line = "imgconv: \(still.count) librados client(s) still open at exit (\(still.joined(separator: ", "))); "
            + "ending without running librados' destructors under its threads\n"
        line.withCString { _ = write(2, $0, strlen($0)) }
        fflush(nil)
        _exit(status)
    }
}

/// Names separated by NUL, ended by an empty name.
func splitNulList(_ buf: [CChar], _ length: Int) -> [String] {
    var out: [String] = []
    var start = 0
    for i in 0..<min(length, buf.count) where buf[i] == 0 {
        if i > start { out.append(String(decoding: buf[start..<i].map { UInt8(bitPattern: $0) }, as: UTF8.self)) }
        start = i + 1
    }
    return out
}

/// A pool. Creating, listing, cloning and removing images, and leases on RADOS objects.
public final class IOContext: @unchecked Sendable {
    let handle: rados_ioctx_t
    public let pool: String
    /// Keeps the connection alive as long as the context.
    public let cluster: RadosCluster

    init(_ handle: rados_ioctx_t, pool: String, cluster: RadosCluster) {
        self.handle = handle
        self.pool = pool
        self.cluster = cluster
    }

    deinit { ceph.rados_ioctx_destroy(handle) }

    // MARK: images

    /// Image names in the pool.
    public func listImages() throws(CephError) -> [String] {
        var count = 64
        while true {
            var specs = [rbd_image_spec_t](repeating: rbd_image_spec_t(), count: count)
            var n = count
            let r = ceph.rbd_list2(handle, &specs, &n)
            if r == -ERANGE { count = n + 16; continue }
            try check(r, "rbd_list2(\(pool))")
            var names: [String] = []
            for i in 0..<n { names.append(String(cString: specs[i].name)) }
            ceph.rbd_image_spec_list_cleanup(&specs, n)
            return names.sorted()
        }
    }

    /// Creates a format-2 image with layering (clones need it). `order` is log2 of the object size (22: 4 MiB).
    public func createImage(_ name: String, size: UInt64, order: Int = 22, features: UInt64 = UInt64(RBD_FEATURE_LAYERING)) throws(CephError) {
        var opts: rbd_image_options_t?
        ceph.rbd_image_options_create(&opts)
        defer { ceph.rbd_image_options_destroy(opts) }
        _ = ceph.rbd_image_options_set_uint64(opts, Int32(RBD_IMAGE_OPTION_FORMAT), 2)
        _ = ceph.rbd_image_options_set_uint64(opts, Int32(RBD_IMAGE_OPTION_FEATURES), features)
        _ = ceph.rbd_image_options_set_uint64(opts, Int32(RBD_IMAGE_OPTION_ORDER), UInt64(order))
        try check(ceph.rbd_create4(handle, name, size, opts), "rbd_create(\(pool)/\(name), \(size) bytes)")
    }

    /// Opens an image (at a snapshot, read-only, when `snapshot` is given).
    public func openImage(_ name: String, snapshot: String? = nil, readOnly: Bool = false) throws(CephError) -> RBDImage {
        var img: rbd_image_t?
        if readOnly || snapshot != nil {
            try check(ceph.rbd_open_read_only(handle, name, &img, snapshot), "rbd_open(\(pool)/\(name)\(snapshot.map { "@" + $0 } ?? ""))")
        } else {
            try check(ceph.rbd_open(handle, name, &img, nil), "rbd_open(\(pool)/\(name))")
        }
        return RBDImage(img!, name: name, io: self)
    }

    /// Whether an image of that name exists.
    public func imageExists(_ name: String) throws(CephError) -> Bool {
        do {
            let img = try openImage(name, readOnly: true)
            img.close()
            return true
        } catch where error.errno == ENOENT {
            return false
        }
    }

    /// Removes an image (it must have no snapshots and no open writers).
    public func removeImage(_ name: String) throws(CephError) {
        try check(ceph.rbd_remove(handle, name), "rbd_remove(\(pool)/\(name))")
    }

    public func renameImage(_ from: String, to: String) throws(CephError) {
        try check(ceph.rbd_rename(handle, from, to), "rbd_rename(\(pool)/\(from) -> \(to))")
    }

    /// Clones `self/parent@snapshot` (protected) into `destination/name`: format 2, layering, copy-on-write.
    public func clone(parent: String, snapshot: String, into destination: IOContext, name: String,
                      features: UInt64 = UInt64(RBD_FEATURE_LAYERING)) throws(CephError) {
        var order: Int32 = 0
        try check(ceph.rbd_clone2(handle, parent, snapshot, destination.handle, name, features, &order, 0, 0),
                  "rbd_clone(\(pool)/\(parent)@\(snapshot) -> \(destination.pool)/\(name))")
    }

    // MARK: leases on RADOS objects

    /// Takes or renews an exclusive lock `name` on `object` (created if missing) for `seconds`: a lease that
    /// Ceph itself expires when the holder stops renewing it (a crashed agent). Returns false if another
    /// (client, cookie) holds it.
    public func lease(object: String, name: String, cookie: String, description: String, seconds: Int, renew: Bool) throws(CephError) -> Bool {
        var duration = timeval(tv_sec: seconds, tv_usec: 0)
        let flags: UInt8 = renew ? UInt8(LIBRADOS_LOCK_FLAG_RENEW) : 0
        let r = ceph.rados_lock_exclusive(handle, object, name, cookie, description, &duration, flags)
        if r == -EBUSY || (r == -EEXIST && !renew) { return false }
        try check(r, "rados_lock_exclusive(\(pool)/\(object), \(name))")
        return true
    }

    /// Releases a lease this client holds; a lease already expired or taken over is not an error.
    public func releaseLease(object: String, name: String, cookie: String) throws(CephError) {
        let r = ceph.rados_unlock(handle, object, name, cookie)
        if r == -ENOENT { return }
        try check(r, "rados_unlock(\(pool)/\(object), \(name))")
    }

    /// The (client, cookie) pairs holding lock `name` on `object`.
    public func lockers(object: String, name: String) throws(CephError) -> [(client: String, cookie: String)] {
        var size = 1024
        while true {
            var exclusive: Int32 = 0
            var tag = [CChar](repeating: 0, count: size), clients = tag, cookies = tag, addrs = tag
            var tl = size, cl = size, kl = size, al = size
            let n = ceph.rados_list_lockers(handle, object, name, &exclusive, &tag, &tl, &clients, &cl, &cookies, &kl, &addrs, &al)
            if n == -ERANGE { size = max(tl, cl, kl, al) + 64; continue }
            if n == -ENOENT { return [] }
            try check(Int32(n), "rados_list_lockers(\(pool)/\(object), \(name))")
            return Array(zip(splitNulList(clients, cl), splitNulList(cookies, kl)).prefix(Int(n)))
                .map { (client: $0.0, cookie: $0.1) }
        }
    }

    /// An extended attribute of a RADOS object; nil when the object or the attribute does not exist.
    public func xattr(object: String, name: String) throws(CephError) -> [UInt8]? {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = ceph.rados_getxattr(handle, object, name, &buf, buf.count)
        if n == -ENOENT || n == -ENODATA { return nil }
        try check(n, "rados_getxattr(\(pool)/\(object), \(name))")
        return buf[0..<Int(n)].map { UInt8(bitPattern: $0) }
    }

    /// Sets (or, with nil, removes) an extended attribute of `object` only while this client holds exclusive lock
    /// `lock` with `cookie`: one atomic operation, asserted by the OSD (cls_lock's assert_locked). False when the
    /// lock is no longer held (expired, taken over).
    public func guardedSetXattr(object: String, lock: String, cookie: String, name: String, value: [UInt8]?) throws(CephError) -> Bool {
        guard let op = ceph.rados_create_write_op() else { throw CephError("rados_create_write_op", errno: ENOMEM) }
        defer { ceph.rados_release_write_op(op) }
        let assertion = ClsLockAssert(name: lock, cookie: cookie).encoded
        var prval: Int32 = 0
        assertion.withUnsafeBufferPointer { a in
            a.withMemoryRebound(to: CChar.self) { ceph.rados_write_op_exec(op, "lock", "assert_locked", $0.baseAddress, $0.count, &prval) }
        }
        if let value {
            value.withUnsafeBufferPointer { v in
                v.withMemoryRebound(to: CChar.self) { ceph.rados_write_op_setxattr(op, name, $0.baseAddress, $0.count) }
            }
        } else {
            ceph.rados_write_op_rmxattr(op, name)
        }
        let r = ceph.rados_write_op_operate(op, handle, object, nil, 0)
        if r == -EBUSY || r == -ENOENT || prval == -EBUSY || prval == -ENOENT { return false }
        if value == nil && r == -ENODATA { return true }
        try check(r, "rados_write_op_operate(\(pool)/\(object): assert \(lock) held, set \(name))")
        return true
    }

    /// Removes a RADOS object (not an RBD image).
    public func removeObject(_ object: String) throws(CephError) {
        let r = ceph.rados_remove(handle, object)
        if r == -ENOENT { return }
        try check(r, "rados_remove(\(pool)/\(object))")
    }
}
