#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization
import SystemIO

/// Hands the memory freed by finished builds and downloads back to the system once the agent is idle.
///
/// A build frees its buffers (4 MiB conversion and write buffers, the 16 MiB window of a streamed download), but
/// glibc keeps the freed pages in its arenas for the next allocation: over back-to-back builds the resident size
/// settles at about 220 MiB, for an agent that spends most of its life idle on a compute node. Returning the pages
/// after every build would cost the next build the page faults of fresh memory (measured: 0.07 s on a 1 GiB
/// qcow2, 4 %), so the pages go back only after `idleSeconds` in which the process used almost no CPU; a burst
/// of builds keeps reusing them.
///
/// With `pageOutCode`, the same idle moment also hands back the resident pages of the read-only file mappings
/// (`Residency.pageOut`): the executable, the Swift runtime and Foundation, and librados/librbd, which stay mapped
/// once a build has loaded them (their STB_GNU_UNIQUE symbols make them impossible to unload). They were 65 of the
/// 73 MiB an idle agent kept; the next request pages in what it runs.
struct IdleTrim {
    /// Trims done, for /metrics.
    static let count = Atomic<Int>(0)
    /// Bytes of file mappings the last trim advised out (0 without `pageOutCode`), for /metrics.
    static let pagedOutBytes = Atomic<Int>(0)

    /// CPU seconds between two checks below which the agent counts as idle (0.5 % of one core).
    let idleCPU: Double
    private var lastCPU: Double
    private var trimmed = true

    /// `cpuSeconds`: the process's CPU time now, where the first interval starts.
    init(idleSeconds: Double, cpuSeconds: Double) {
        idleCPU = idleSeconds * 0.005
        lastCPU = cpuSeconds
    }

    /// Takes the process's CPU seconds at each check, `idleSeconds` apart; true when now is the time to trim:
    /// the first idle check after some work.
    mutating func check(cpuSeconds: Double) -> Bool {
        defer { lastCPU = cpuSeconds }
        if cpuSeconds - lastCPU > idleCPU {
            trimmed = false
            return false
        }
        if trimmed { return false }
        trimmed = true
        return true
    }

    /// User plus system CPU seconds of this process.
    static func processCPUSeconds() -> Double {
        var u = rusage()
        getrusage(RUSAGE_SELF, &u)
        return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
    }

    /// Returns freed heap pages (and with `pageOutCode` the code's pages) to the system: blocking, off the pool.
    /// Resident bytes before and after, and what was paged out.
    static func trimNow(pageOutCode: Bool) -> Trimmed {
        let before = Residency.residentBytes()
        _ = malloc_trim(0)
        let pagedOut = pageOutCode ? Residency.pageOut() : nil
        return Trimmed(before: before, after: Residency.residentBytes(), pagedOut: pagedOut)
    }

    struct Trimmed: Sendable {
        var before: UInt64?
        var after: UInt64?
        var pagedOut: Residency.Result?
    }

    /// Checks every `idleSeconds` until cancelled.
    static func run(idleSeconds: Double, pageOutCode: Bool, logger: Logger) async {
        var state = IdleTrim(idleSeconds: idleSeconds, cpuSeconds: processCPUSeconds())
        while !Task.isCancelled {
            try? await Task.sleep(nanoseconds: UInt64(idleSeconds * 1e9))
            if Task.isCancelled { return }
            guard state.check(cpuSeconds: processCPUSeconds()) else { continue }
            let trimmed: Trimmed
            do {
                trimmed = try await offload { () -> Trimmed in trimNow(pageOutCode: pageOutCode) }
            } catch {
                return
            }
            let (before, after, pagedOut) = (trimmed.before, trimmed.after, trimmed.pagedOut)
            count.add(1, ordering: .relaxed)
            pagedOutBytes.store(Int(pagedOut?.bytes ?? 0), ordering: .relaxed)
            var metadata: Logger.Metadata = [:]
            if let before, let after {
                metadata["rss_before_mib"] = "\(before >> 20)"
                metadata["rss_after_mib"] = "\(after >> 20)"
            }
            if let pagedOut {
                metadata["file_mappings_paged_out"] = "\(pagedOut.mappings)"
                if pagedOut.refused > 0 { metadata["file_mappings_refused"] = "\(pagedOut.refused)" }
            }
            logger.debug("idle: returned freed memory", metadata: metadata)
        }
    }
}

/// glibc's `int malloc_trim(size_t pad)` (malloc.h, which the Glibc module does not import).
@_silgen_name("malloc_trim")
private func malloc_trim(_ pad: Int) -> Int32

/// glibc's `int mallopt(int param, int value)`.
@_silgen_name("mallopt")
private func mallopt(_ param: Int32, _ value: Int32) -> Int32

/// glibc's malloc, set for an agent whose allocations are few and large (buffers) and whose life is mostly idle.
///
/// - Arenas capped (`M_ARENA_MAX`). By default every thread that allocates while the others hold their arenas
///   gets one of its own, up to 8 per core, and a freed page stays in the arena that served it: measured on a
///   first-instance build, 70 MiB of the agent's 171 MiB peak were thread arenas, and 33 MiB stayed after the idle
///   trim. Contention on two arenas costs nothing measurable here.
/// - A fixed mmap threshold (`M_MMAP_THRESHOLD`, 256 KiB). glibc's threshold otherwise rises to the size of the
///   largest block freed (up to 32 MiB), so after the first build every 4 MiB buffer comes from the heap, where
///   buffers of overlapping lifetimes fragment it: 27–43 MiB of heap at the peak, against 2 MiB with the threshold
///   fixed. A buffer that big is mapped on its own and unmapped when freed.
public enum MallocTuning {
    static let M_MMAP_THRESHOLD: Int32 = -3
    static let M_ARENA_MAX: Int32 = -8

    public static func forAgent() {
        _ = mallopt(M_ARENA_MAX, 2)
        _ = mallopt(M_MMAP_THRESHOLD, 256 << 10)
    }
}
