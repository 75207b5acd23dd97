import CCeph
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A watch on a RADOS object (`rados_watch3`): every notify on the object bumps `generation` and wakes the tasks
/// waiting in `changed(since:timeout:)`. librados delivers notifies on its own threads; they are acknowledged at
/// once, so a notifier waits only for watchers that are gone.
///
/// Lost notifies are possible (the watch's connection to the OSD was reset: `rados_watcherrcb_t`, which wakes
/// the waiters too), so a waiter still re-checks what it waits for on a timeout.
public final class ObjectWatch: Sendable {
    public let io: IOContext
    public let object: String
    private struct State {
        var generation = 0
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
        var nextWaiter = 0
    }
    private let state = Mutex(State())
    /// librados' id of the watch; 0 once closed.
    private let handle = Atomic<UInt64>(0)
    /// The retain the C callbacks' `arg` holds, released on `close` after librados has flushed its callbacks.
    private let retained = Mutex<Unmanaged<ObjectWatch>?>(nil)

    /// Registers the watch. `timeout`: seconds after which the OSD drops a watcher that stopped pinging (a killed
    /// process); its notifies' wait ends then too. Blocking.
    init(io: IOContext, object: String, timeout: UInt32) throws(CephError) {
        self.io = io
        self.object = object
        let unmanaged = Unmanaged.passRetained(self)
        var cookie: UInt64 = 0
        let r = ceph.rados_watch3(io.handle, object, &cookie, { arg, notifyID, handle, _, _, _ in
            guard let arg else { return }
            let watch = Unmanaged<ObjectWatch>.fromOpaque(arg).takeUnretainedValue()
            _ = ceph.rados_notify_ack(watch.io.handle, watch.object, notifyID, handle, nil, 0)
            watch.bump()
        }, { arg, _, _ in
            guard let arg else { return }
            Unmanaged<ObjectWatch>.fromOpaque(arg).takeUnretainedValue().bump()
        }, timeout, unmanaged.toOpaque())
        if r < 0 {
            unmanaged.release()
            try check(r, "rados_watch3(\(io.pool)/\(object))")
        }
        handle.store(cookie, ordering: .relaxed)
        retained.withLock { $0 = unmanaged }
    }

    /// Notifies so far: read it before checking what is awaited, pass it to `changed(since:timeout:)`.
    public var generation: Int { state.withLock { $0.generation } }

    private func bump() {
        let woken = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.generation += 1
            defer { s.waiters = [:] }
            return Array(s.waiters.values)
        }
        for c in woken { c.resume() }
    }

    /// Returns when a notify arrived after `generation`, after `timeout`, or when the task is cancelled. Never
    /// blocks a thread.
    public func changed(since generation: Int, timeout: Duration) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { try? await Task.sleep(for: timeout) }
            group.addTask { await self.arrival(since: generation) }
            await group.next()
            group.cancelAll()
        }
    }

    private func arrival(since generation: Int) async {
        let id = state.withLock { s -> Int in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let now = state.withLock { s -> Bool in
                    if s.generation > generation || Task.isCancelled { return true }
                    s.waiters[id] = c
                    return false
                }
                if now { c.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }

    /// Unregisters the watch and waits for callbacks in flight. Blocking; idempotent.
    public func close() {
        let cookie = handle.exchange(0, ordering: .relaxed)
        guard cookie != 0 else { return }
        _ = ceph.rados_unwatch2(io.handle, cookie)
        _ = ceph.rados_watch_flush(io.cluster.handle)
        retained.withLock { $0?.release(); $0 = nil }
        bump()
    }
}

extension IOContext {
    /// Watches `object` (which must exist). Blocking.
    public func watch(object: String, timeout: UInt32 = 10) throws(CephError) -> ObjectWatch {
        try ObjectWatch(io: self, object: object, timeout: timeout)
    }

    /// Notifies the watchers of `object` and waits up to `timeoutMilliseconds` for their acknowledgements
    /// (a watcher that is gone is waited for until then). Blocking.
    public func notify(object: String, timeoutMilliseconds: UInt64) throws(CephError) {
        var reply: UnsafeMutablePointer<CChar>?
        var length = 0
        let r = ceph.rados_notify2(handle, object, nil, 0, timeoutMilliseconds, &reply, &length)
        if let reply { ceph.rados_buffer_free(reply) }
        if r == -ETIMEDOUT { return }
        try check(r, "rados_notify2(\(pool)/\(object))")
    }
}
