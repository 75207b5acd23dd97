import Dispatch
import Foundation
import Synchronization
import SystemIO
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The calling thread's name (/proc/thread-self/comm).
func threadName() -> String {
    String((try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
}

final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .relaxed) }
    func set() { value.store(true, ordering: .relaxed) }
}

@Suite("blocking executor")
struct BlockingExecutorTests {
    @Test func workRunsOffTheCallersThreadAndReturnsItsResult() async throws {
        let name = try await offload { threadName() }
        #expect(name.hasPrefix("imgconv-call-"))
        let job = try await offload(.jobs) { threadName() }
        #expect(job.hasPrefix("imgconv-job-"))
        #expect(threadName() != name)
        await #expect(throws: FileError.self) { try await offload { throw FileError("test", path: "/x", errno: EIO) } }
    }

    /// A finished job keeps nothing it captured alive (a librados client kept by a finished closure stayed open
    /// until exit, where librados' destructors crash under its threads).
    @Test func finishedWorkKeepsNothingAlive() async throws {
        final class Thing: Sendable {}
        weak var weak: Thing?
        do {
            let thing = Thing()
            weak = thing
            _ = try await offload { _ = thing }
            _ = try await offload(.jobs) { _ = thing }
            await cleanup { _ = thing }
        }
        try await Task.sleep(for: .milliseconds(50))
        #expect(weak == nil)
    }

    @Test func cancellingTheTaskStopsTheWork() async throws {
        let executor = BlockingExecutor(callThreads: 1, jobThreads: 1)
        let polls = Atomic<Int>(0)
        let stoppedAt = Atomic<UInt64>(0)
        let task = Task {
            try await offload(.jobs, executor: executor) { token in
                while !token.isCancelled {
                    polls.add(1, ordering: .relaxed)
                    usleep(1000)
                }
                stoppedAt.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed)
                throw CancellationError()
            }
        }
        while polls.load(ordering: .relaxed) == 0 { try await Task.sleep(for: .milliseconds(5)) }
        let cancelledAt = DispatchTime.now().uptimeNanoseconds
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        // The work saw the cancellation within a few polls (the await itself may wait for a busy pool). Without
        // the token the loop never ends; the bound is loose because this suite runs beside the Ceph tests on two
        // cores and the jobs lane runs at nice 10.
        let lag = Double(stoppedAt.load(ordering: .relaxed) - cancelledAt) / 1e9
        #expect(lag >= 0 && lag < 1, "the work stopped \(lag) s after the cancellation")
    }

    @Test func queuedWorkCancelledBeforeItStartsNeverRuns() async throws {
        let executor = BlockingExecutor(callThreads: 1, jobThreads: 1)
        let gate = Atomic<Bool>(false)
        let ran = Atomic<Bool>(false)
        // Occupy the only job thread.
        let blocker = Task { try await offload(.jobs, executor: executor) { while !gate.load(ordering: .relaxed) { usleep(1000) } } }
        try await Task.sleep(for: .milliseconds(20))
        let queued = Task { try await offload(.jobs, executor: executor) { ran.store(true, ordering: .relaxed) } }
        try await Task.sleep(for: .milliseconds(20))
        queued.cancel()
        gate.store(true, ordering: .relaxed)
        try await blocker.value
        await #expect(throws: CancellationError.self) { try await queued.value }
        let didRun = ran.load(ordering: .relaxed)
        #expect(!didRun)
    }

    @Test func longJobsDoNotStarveCalls() async throws {
        let executor = BlockingExecutor(callThreads: 2, jobThreads: 2)
        let stop = Flag()
        let jobs = (0..<6).map { _ in Task { try await offload(.jobs, executor: executor) { while !stop.isSet { usleep(1000) } } } }
        while executor.load.jobs.running < 2 { try await Task.sleep(for: .milliseconds(5)) }
        // A call submitted while every job thread is busy and four jobs wait starts at once on its own lane.
        let submitted = DispatchTime.now().uptimeNanoseconds
        let startedAt = try await offload(.calls, executor: executor) { DispatchTime.now().uptimeNanoseconds }
        let wait = Double(startedAt - submitted) / 1e9
        // Starved, the call would wait for `stop`, which is set only below: the bound is loose for a loaded machine.
        #expect(wait < 1, "the call waited \(wait) s for a thread")
        let load = executor.load
        #expect(load.jobs.running == 2 && load.jobs.queued == 4, "\(load)")
        stop.set()
        for j in jobs { try await j.value }
    }
}

@Suite("worker pool")
struct WorkerPoolTests {
    @Test func everyIndexRunsOnceAndTheWorkersRunAtBackgroundPriority() throws {
        let pool = WorkerPool(name: "test-work", threads: 3, nice: Niceness.background)
        let counts = Mutex([Int](repeating: 0, count: 1000))
        let nices = Mutex<Set<Int32>>([])
        let caller = threadName()
        var firstRanOn = ""
        pool.concurrentPerform(iterations: 1000, width: 4, first: { firstRanOn = threadName() }) { i in
            counts.withLock { $0[i] += 1 }
            if threadName().hasPrefix("test-work") {
                errno = 0
                let n = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)
                nices.withLock { _ = $0.insert(n) }
            }
        }
        #expect(firstRanOn == caller)
        let all = counts.withLock { $0 }
        #expect(all.allSatisfy { $0 == 1 })
        let seen = nices.withLock { $0 }
        #expect(seen.isEmpty || seen == [Niceness.background], "\(seen)")
    }
}

@Suite("files")
struct FileTests {
    @Test func outputFilesGetTheirModeWhateverTheUmask() throws {
        let dir = NSTemporaryDirectory() + "imgconv-sysio-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let old = umask(0o077)
        defer { umask(old) }
        try FileSystem.makeDirectory(dir + "/a/b", mode: 0o755)
        try FileSystem.writeAtomically(dir + "/a/b/file", Array("x".utf8), mode: 0o644)
        var st = stat()
        stat(dir + "/a/b/file", &st)
        #expect(st.st_mode & 0o777 == 0o644)
        stat(dir + "/a/b", &st)
        #expect(st.st_mode & 0o777 == 0o755)
        #expect(FileSystem.read(dir + "/a/b/file") == Array("x".utf8))
        #expect(try FileSystem.removeDirectoryIfEmpty(dir + "/a/b") == false)
        try FileSystem.remove(dir + "/a/b/file")
        try FileSystem.remove(dir + "/a/b/file")  // twice: missing is fine
        #expect(try FileSystem.removeDirectoryIfEmpty(dir + "/a/b"))
        #expect(FileSystem.list(dir + "/a").isEmpty)
    }
}
