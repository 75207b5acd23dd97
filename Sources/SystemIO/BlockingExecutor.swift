#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Set when the work a token was handed to should stop; blocking work polls it between units (a window of a
/// conversion, a MiB of a hash). Cancelling the Swift task that awaits `offload` sets it.
public final class CancellationToken: Sendable {
    private let flag = Atomic<Bool>(false)

    public init() {}

    public var isCancelled: Bool { flag.load(ordering: .relaxed) }

    public func cancel() { flag.store(true, ordering: .relaxed) }

    /// Throws `CancellationError` once cancelled.
    public func check() throws {
        if isCancelled { throw CancellationError() }
    }
}

/// Dedicated threads for blocking work: fsync, large reads and writes, unlink of large files, SQLite, librbd and
/// librados calls, conversions and hashes. None of it may run on an actor or on Swift's cooperative pool, whose
/// few threads (one per core) also serve the control API; a blocked pool thread is a control API that does not
/// answer (swift-nio's NIOThreadPool and NonBlockingFileIO do the same for an event loop).
///
/// Two lanes, so long jobs cannot starve short calls: `jobs` runs conversions, builds, downloads' writes and
/// scrubs, at most `jobThreads` at once (the rest wait their turn, which also bounds how hard a node is hit);
/// `calls` runs short blocking calls (a stat, an rbd open, an fsync of a small file, an index write).
public final class BlockingExecutor: Sendable {
    public enum Lane: Sendable { case calls, jobs }

    /// The process's executor: 8 threads for calls, 8 for jobs (each job may use more threads of its own: the
    /// converter's workers).
    public static let shared = BlockingExecutor(callThreads: 8, jobThreads: 8)

    private let calls: ThreadPool
    private let jobs: ThreadPool

    /// Job threads run at background priority (`Niceness`); call threads at the process's.
    public init(callThreads: Int, jobThreads: Int) {
        calls = ThreadPool(name: "imgconv-call", threads: callThreads)
        jobs = ThreadPool(name: "imgconv-job", threads: jobThreads, nice: Niceness.background)
    }

    /// Queues `work` on `lane`.
    public func submit(_ lane: Lane, _ work: @escaping @Sendable () -> Void) {
        (lane == .calls ? calls : jobs).submit(work)
    }

    /// Jobs waiting for a thread, and running (for /metrics).
    public var load: (calls: (queued: Int, running: Int), jobs: (queued: Int, running: Int)) {
        (calls.load, jobs.load)
    }
}

/// Runs blocking `work` on the executor and waits for it without blocking the caller's thread. Cancelling the
/// calling task sets the token `work` receives; work still queued when cancelled never starts.
public func offload<T: Sendable>(_ lane: BlockingExecutor.Lane = .calls, executor: BlockingExecutor = .shared,
                                 _ work: @escaping @Sendable (CancellationToken) throws -> T) async throws -> T {
    let token = CancellationToken()
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, Error>) in
            executor.submit(lane) {
                if token.isCancelled {
                    c.resume(throwing: CancellationError())
                    return
                }
                do { c.resume(returning: try work(token)) } catch { c.resume(throwing: error) }
            }
        }
    } onCancel: {
        token.cancel()
    }
}

/// `offload` for work that has nothing to poll (one system call).
public func offload<T: Sendable>(_ lane: BlockingExecutor.Lane = .calls, executor: BlockingExecutor = .shared,
                                 _ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await offload(lane, executor: executor) { (_: CancellationToken) in try work() }
}

/// Runs blocking clean-up (removing a temporary file, closing a descriptor) on the executor and waits for it,
/// whether or not the calling task is cancelled: the one kind of work a cancellation must never skip.
public func cleanup(executor: BlockingExecutor = .shared, _ work: @escaping @Sendable () -> Void) async {
    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
        executor.submit(.calls) {
            work()
            c.resume()
        }
    }
}

/// A fixed set of threads taking closures from one FIFO queue.
final class ThreadPool: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// Taken entries are set to nil at once: a finished closure must not keep what it captured alive.
    private var queue: [(@Sendable () -> Void)?] = []
    private var head = 0
    private var running = 0
    let name: String

    init(name: String, threads: Int, nice: Int32 = 0) {
        self.name = name
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
        for i in 0..<max(1, threads) {
            let box = Unmanaged.passRetained(WorkerStart(pool: self, name: "\(name)-\(i)", nice: nice))
            var thread = pthread_t()
            var attr = pthread_attr_t()
            pthread_attr_init(&attr)
            pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
            let r = pthread_create(&thread, &attr, { arg in
                let start = Unmanaged<WorkerStart>.fromOpaque(arg!).takeRetainedValue()
                _ = pthread_setname_np(pthread_self(), String(start.name.prefix(15)))
                if start.nice > 0 { Niceness.lowerCurrentThread(to: start.nice) }
                start.pool.work()
                return nil
            }, box.toOpaque())
            pthread_attr_destroy(&attr)
            precondition(r == 0, "cannot start a blocking-work thread: errno \(r)")
        }
    }

    func submit(_ work: @escaping @Sendable () -> Void) {
        pthread_mutex_lock(mutex)
        queue.append(work)
        pthread_cond_signal(cond)
        pthread_mutex_unlock(mutex)
    }

    var load: (queued: Int, running: Int) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return (queue.count - head, running)
    }

    private func work() {
        while true {
            pthread_mutex_lock(mutex)
            while head == queue.count { pthread_cond_wait(cond, mutex) }
            let next = queue[head]!
            queue[head] = nil
            head += 1
            if head > 1024 && head * 2 > queue.count {
                queue.removeFirst(head)
                head = 0
            }
            running += 1
            pthread_mutex_unlock(mutex)
            next()
            pthread_mutex_lock(mutex)
            running -= 1
            pthread_mutex_unlock(mutex)
        }
    }

    private final class WorkerStart {
        let pool: ThreadPool
        let name: String
        let nice: Int32
        init(pool: ThreadPool, name: String, nice: Int32) {
            self.pool = pool
            self.name = name
            self.nice = nice
        }
    }
}

/// The scheduling priority of background work: CPU-heavy threads (conversions, hashes, base builds) run at nice
/// 10, so on a hypervisor the guests, nova-compute and the agent's own control API (its event loop stays at the
/// process's priority) come first. Lowering a thread's priority needs no privilege.
public enum Niceness {
    public static let background: Int32 = 10

    /// Lowers the calling thread's priority to `nice` (never raises it).
    public static func lowerCurrentThread(to nice: Int32) {
        errno = 0
        let current = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(gettid()))
        if errno == 0 && current >= nice { return }
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(gettid()), nice)
    }
}

/// A fixed set of low-priority threads for the data-parallel parts of background jobs (the converter's workers and
/// writer, a download's hash and write), in place of Dispatch's shared threads, whose priority the agent cannot
/// set without changing it for everything else that uses them.
public final class WorkerPool: Sendable {
    /// The agent's pool: as many threads as cores (at most 8), at background priority.
    public static let background = WorkerPool(name: "imgconv-work", threads: max(2, min(8, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))),
                                              nice: Niceness.background)

    let pool: ThreadPool
    public let threads: Int

    public init(name: String, threads: Int, nice: Int32) {
        self.threads = threads
        pool = ThreadPool(name: name, threads: threads, nice: nice)
    }

    /// Queues `work` on one of the pool's threads.
    public func submit(_ work: @escaping @Sendable () -> Void) { pool.submit(work) }

    /// Runs `body` for every index in `0..<iterations`, on the calling thread and up to `width - 1` of the pool's
    /// threads, and returns when every index is done and every helper has ended (as Dispatch's
    /// concurrentPerform): whatever `body` points to stays valid until then. Helpers queued behind other work find
    /// nothing left to do and end at once.
    ///
    /// `first` runs on the calling thread before it joins in: work that may block (a write into a file a reader
    /// throttles) stays off the pool, whose threads must never wait for anything.
    public func concurrentPerform(iterations: Int, width: Int, first: () -> Void = {},
                                  _ body: @escaping @Sendable (Int) -> Void) {
        let helpers = min(width - 1, iterations)
        guard helpers > 0 else {
            first()
            for i in 0..<iterations { body(i) }
            return
        }
        let next = Counter()
        let done = Countdown(helpers)
        for _ in 0..<helpers {
            pool.submit {
                Self.drain(next, iterations, body)
                done.signal()
            }
        }
        first()
        Self.drain(next, iterations, body)
        done.wait()
    }

    private static func drain(_ next: Counter, _ iterations: Int, _ body: (Int) -> Void) {
        while true {
            let i = next.take()
            if i >= iterations { return }
            body(i)
        }
    }
}

/// The next index to take.
private final class Counter: Sendable {
    private let value = Atomic<Int>(0)
    func take() -> Int { value.add(1, ordering: .relaxed).oldValue }
}

/// Counts helpers down to zero; `wait` blocks until every one has signalled.
private final class Countdown: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var remaining: Int

    init(_ count: Int) {
        remaining = count
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        pthread_cond_destroy(cond)
        mutex.deallocate()
        cond.deallocate()
    }

    func signal() {
        pthread_mutex_lock(mutex)
        remaining -= 1
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }

    func wait() {
        pthread_mutex_lock(mutex)
        while remaining > 0 { pthread_cond_wait(cond, mutex) }
        pthread_mutex_unlock(mutex)
    }
}
