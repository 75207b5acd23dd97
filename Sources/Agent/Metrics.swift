import Cache
import Disks
import SystemIO

/// Prometheus text exposition of the cache's counters and the process's memory.
enum Metrics {
    static func render(cache: ImageCache, disks: DiskService?) async -> String {
        let m = await cache.metrics
        let rows = cache.images()
        let used = rows.reduce(UInt64(0)) { $0 + $1.diskBytes }
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, String)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, value) in samples { out += "\(name)\(labels) \(value)\n" }
        }
        metric("imgconv_bytes_fetched_total", "counter", "Bytes downloaded from Glance.", [("", "\(m.bytesFetched)")])
        metric("imgconv_cache_bytes", "gauge", "Bytes the cached images occupy on disk.", [("", "\(used)")])
        metric("imgconv_cache_max_bytes", "gauge", "The configured [cache] max_size.", [("", "\(cache.config.maxSize)")])
        var byState: [String: Int] = [:]
        for r in rows { byState[r.state.rawValue, default: 0] += 1 }
        metric("imgconv_cache_images", "gauge", "Images in the index by state.",
               ["queued", "fetching", "verifying", "converting", "ready", "error"].map { ("{state=\"\($0)\"}", "\(byState[$0] ?? 0)") })
        metric("imgconv_cache_hits_total", "counter", "Requests for an image that was ready.", [("", "\(m.hits)")])
        metric("imgconv_cache_misses_total", "counter", "Requests that started a fetch.", [("", "\(m.misses)")])
        metric("imgconv_cache_evictions_total", "counter", "Images evicted.", [("", "\(m.evictions)")])
        metric("imgconv_download_resumes_total", "counter", "Downloads resumed with a Range request.", [("", "\(m.resumes)")])
        metric("imgconv_job_errors_total", "counter", "Failed jobs by cause.",
               m.errors.sorted { $0.key < $1.key }.map { ("{kind=\"\($0.key)\"}", "\($0.value)") })
        var hist: [(String, String)] = zip(CacheMetrics.buckets, m.bucketCounts).map { ("_bucket{le=\"\($0.0)\"}", "\($0.1)") }
        hist.append(("_bucket{le=\"+Inf\"}", "\(m.jobsFinished)"))
        hist.append(("_sum", "\(m.jobSeconds)"))
        hist.append(("_count", "\(m.jobsFinished)"))
        out += "# HELP imgconv_job_duration_seconds Fetch job durations.\n# TYPE imgconv_job_duration_seconds histogram\n"
        for (suffix, v) in hist { out += "imgconv_job_duration_seconds\(suffix) \(v)\n" }
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", [("", "\(Residency.residentBytes() ?? 0)")])
        metric("imgconv_memory_trims_total", "counter", "Times freed memory went back to the system after an idle interval.",
               [("", "\(IdleTrim.count.load(ordering: .relaxed))")])
        if let r = Residency.resident() {
            metric("imgconv_resident_memory_bytes", "gauge", "Resident memory by kind: anonymous (heap, buffers, stacks) or file (code of the executable and libraries).",
                   [("{kind=\"anonymous\"}", "\(r.anonymous)"), ("{kind=\"file\"}", "\(r.file)")])
        }
        metric("imgconv_memory_trim_paged_out_bytes", "gauge", "Bytes of read-only file mappings the last idle trim handed back (memory_trim_code).",
               [("", "\(IdleTrim.pagedOutBytes.load(ordering: .relaxed))")])
        let load = BlockingExecutor.shared.load
        metric("imgconv_executor_queued", "gauge", "Blocking work waiting for a thread, by lane.",
               [("{lane=\"calls\"}", "\(load.calls.queued)"), ("{lane=\"jobs\"}", "\(load.jobs.queued)")])
        metric("imgconv_executor_running", "gauge", "Blocking work running, by lane.",
               [("{lane=\"calls\"}", "\(load.calls.running)"), ("{lane=\"jobs\"}", "\(load.jobs.running)")])
        if let disks {
            metric("imgconv_disks_total", "counter", "Boot-disk events by kind (clones by path, bases built, take-overs).",
                   disks.backend.counters.map { ("{kind=\"\($0.name)\"}", "\($0.value)") })
        }
        return out
    }
}
