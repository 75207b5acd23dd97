import CCeph
#if canImport(Glibc)
import Glibc
#endif

/// Where a clone's data comes from.
public struct ParentSpec: Sendable, Equatable, CustomStringConvertible {
    public var pool: String
    public var image: String
    public var snapshot: String
    public init(pool: String, image: String, snapshot: String) {
        self.pool = pool
        self.image = image
        self.snapshot = snapshot
    }
    public var description: String { "\(pool)/\(image)@\(snapshot)" }
}

public struct SnapshotInfo: Sendable, Equatable {
    public var id: UInt64
    public var name: String
    public var size: UInt64
}

/// An open RBD image. librbd's calls are thread-safe; `close` must come last (deinit calls it too).
public final class RBDImage: @unchecked Sendable {
    private var handle: rbd_image_t?
    public let name: String
    public let io: IOContext

    init(_ handle: rbd_image_t, name: String, io: IOContext) {
        self.handle = handle
        self.name = name
        self.io = io
    }

    deinit { close() }

    var spec: String { "\(io.pool)/\(name)" }

    func h() throws(CephError) -> rbd_image_t {
        guard let handle else { throw CephError("\(spec): image already closed", errno: EBADF) }
        return handle
    }

    public func close() {
        if let handle { _ = ceph.rbd_close(handle) }
        handle = nil
    }

    // MARK: size

    public struct Stat: Sendable, Equatable {
        public var size: UInt64
        public var objectSize: UInt64
        public var order: Int
    }

    public func stat() throws(CephError) -> Stat {
        var info = rbd_image_info_t()
        try check(ceph.rbd_stat(try h(), &info, MemoryLayout<rbd_image_info_t>.size), "rbd_stat(\(spec))")
        return Stat(size: info.size, objectSize: info.obj_size, order: Int(info.order))
    }

    public func resize(_ size: UInt64) throws(CephError) {
        try check(ceph.rbd_resize(try h(), size), "rbd_resize(\(spec), \(size))")
    }

    // MARK: data

    /// Reads up to `count` bytes at `offset` (a short read only at the end of the image).
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(CephError) -> Int {
        let n = ceph.rbd_read(try h(), offset, buffer.count, buffer.baseAddress?.assumingMemoryBound(to: CChar.self))
        if n < 0 { throw CephError("rbd_read(\(spec), \(offset))", errno: Int32(-n)) }
        return n
    }

    /// Starts an asynchronous read into `buffer` at `offset`; the completion's `wait` gives the bytes read. The
    /// buffer must stay valid, and untouched, until then.
    public func aioRead(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(CephError) -> Completion {
        let c = try Completion(operation: "rbd_aio_read(\(spec), \(offset), \(buffer.count))")
        let r = ceph.rbd_aio_read(try h(), offset, buffer.count, buffer.baseAddress?.assumingMemoryBound(to: CChar.self), c.handle)
        if r < 0 { c.release(); throw CephError(c.operation, errno: -r) }
        return c
    }

    /// Starts an asynchronous write of `buffer` at `offset`. The buffer must stay valid and unchanged until the
    /// returned completion has been waited for: the cluster handle lets librbd send it without a copy.
    public func aioWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(CephError) -> Completion {
        let c = try Completion(operation: "rbd_aio_write(\(spec), \(offset), \(buffer.count))")
        let r = ceph.rbd_aio_write(try h(), offset, buffer.count, buffer.baseAddress?.assumingMemoryBound(to: CChar.self), c.handle)
        if r < 0 { c.release(); throw CephError(c.operation, errno: -r) }
        return c
    }

    /// Starts an asynchronous discard: the range reads as zeros and frees its space where whole objects allow.
    public func aioDiscard(at offset: UInt64, length: UInt64) throws(CephError) -> Completion {
        let c = try Completion(operation: "rbd_aio_discard(\(spec), \(offset), \(length))")
        let r = ceph.rbd_aio_discard(try h(), offset, length, c.handle)
        if r < 0 { c.release(); throw CephError(c.operation, errno: -r) }
        return c
    }

    /// Writes everything synchronously.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(CephError) {
        try aioWrite(buffer, at: offset).wait()
    }

    public func discard(at offset: UInt64, length: UInt64) throws(CephError) {
        try aioDiscard(at: offset, length: length).wait()
    }

    /// Makes every completed write durable.
    public func flush() throws(CephError) {
        try check(ceph.rbd_flush(try h()), "rbd_flush(\(spec))")
    }

    // MARK: snapshots

    public func snapshots() throws(CephError) -> [SnapshotInfo] {
        var max: Int32 = 16
        while true {
            var snaps = [rbd_snap_info_t](repeating: rbd_snap_info_t(), count: Int(max))
            var m = max
            let n = ceph.rbd_snap_list(try h(), &snaps, &m)
            if n == -ERANGE { max = m + 4; continue }
            try check(n, "rbd_snap_list(\(spec))")
            let out = (0..<Int(n)).map { SnapshotInfo(id: snaps[$0].id, name: String(cString: snaps[$0].name), size: snaps[$0].size) }
            ceph.rbd_snap_list_end(&snaps)
            return out
        }
    }

    public func createSnapshot(_ snap: String) throws(CephError) {
        try check(ceph.rbd_snap_create(try h(), snap), "rbd_snap_create(\(spec)@\(snap))")
    }

    public func removeSnapshot(_ snap: String) throws(CephError) {
        try check(ceph.rbd_snap_remove(try h(), snap), "rbd_snap_remove(\(spec)@\(snap))")
    }

    public func protectSnapshot(_ snap: String) throws(CephError) {
        try check(ceph.rbd_snap_protect(try h(), snap), "rbd_snap_protect(\(spec)@\(snap))")
    }

    /// Fails with EBUSY while clones of the snapshot exist.
    public func unprotectSnapshot(_ snap: String) throws(CephError) {
        try check(ceph.rbd_snap_unprotect(try h(), snap), "rbd_snap_unprotect(\(spec)@\(snap))")
    }

    public func isProtected(_ snap: String) throws(CephError) -> Bool {
        var p: Int32 = 0
        try check(ceph.rbd_snap_is_protected(try h(), snap, &p), "rbd_snap_is_protected(\(spec)@\(snap))")
        return p != 0
    }

    // MARK: layering

    /// The parent of a clone; nil for an image that is not one (or no longer is, after flatten).
    public func parent() throws(CephError) -> ParentSpec? {
        var image = rbd_linked_image_spec_t()
        var snap = rbd_snap_spec_t()
        let r = ceph.rbd_get_parent(try h(), &image, &snap)
        if r == -ENOENT { return nil }
        try check(r, "rbd_get_parent(\(spec))")
        defer {
            ceph.rbd_linked_image_spec_cleanup(&image)
            ceph.rbd_snap_spec_cleanup(&snap)
        }
        return ParentSpec(pool: String(cString: image.pool_name), image: String(cString: image.image_name),
                          snapshot: String(cString: snap.name))
    }

    /// Clones of this image's snapshot (open the image at the snapshot first: `openImage(_, snapshot:)`),
    /// as "pool/name".
    public func children() throws(CephError) -> [String] {
        var count = 16
        while true {
            var specs = [rbd_linked_image_spec_t](repeating: rbd_linked_image_spec_t(), count: count)
            var n = count
            let r = ceph.rbd_list_children3(try h(), &specs, &n)
            if r == -ERANGE { count = n + 8; continue }
            try check(r, "rbd_list_children(\(spec))")
            let out = (0..<n).filter { !specs[$0].trash }.map { "\(String(cString: specs[$0].pool_name))/\(String(cString: specs[$0].image_name))" }
            ceph.rbd_linked_image_spec_list_cleanup(&specs, n)
            return out
        }
    }

    /// Copies the parent's data into the clone and detaches it.
    public func flatten() throws(CephError) {
        try check(ceph.rbd_flatten(try h()), "rbd_flatten(\(spec))")
    }

    // MARK: metadata

    public func metadata(_ key: String) throws(CephError) -> String? {
        var size = 256
        while true {
            var buf = [CChar](repeating: 0, count: size)
            var len = size
            let r = ceph.rbd_metadata_get(try h(), key, &buf, &len)
            if r == -ENOENT { return nil }
            if r == -ERANGE { size = len + 1; continue }
            try check(r, "rbd_metadata_get(\(spec), \(key))")
            return String(cString: buf)
        }
    }

    public func setMetadata(_ key: String, _ value: String) throws(CephError) {
        try check(ceph.rbd_metadata_set(try h(), key, value), "rbd_metadata_set(\(spec), \(key))")
    }
}

/// One asynchronous librbd operation. Wait for it exactly once; waiting releases it.
public final class Completion: @unchecked Sendable {
    fileprivate var handle: rbd_completion_t?
    let operation: String

    init(operation: String) throws(CephError) {
        self.operation = operation
        var c: rbd_completion_t?
        try check(ceph.rbd_aio_create_completion(nil, nil, &c), "rbd_aio_create_completion")
        handle = c
    }

    fileprivate func release() {
        if let handle { ceph.rbd_aio_release(handle) }
        handle = nil
    }

    /// Blocks until the operation is done; throws its error, or returns its result (the bytes read by a read).
    @discardableResult
    public func wait() throws(CephError) -> Int {
        guard let handle else { return 0 }
        _ = ceph.rbd_aio_wait_for_complete(handle)
        let r = ceph.rbd_aio_get_return_value(handle)
        release()
        if r < 0 { throw CephError(operation, errno: Int32(-r)) }
        return Int(r)
    }

    deinit {
        // Never release an operation still in flight: librbd would write into freed memory.
        if let handle {
            _ = ceph.rbd_aio_wait_for_complete(handle)
            ceph.rbd_aio_release(handle)
        }
    }
}
