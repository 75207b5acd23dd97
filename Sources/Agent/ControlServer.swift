import Cache
import Disks
import RBD
import Foundation
import Glance
import Hummingbird
import Logging
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

extension ucred: @retroactive @unchecked Sendable {}

/// Who may talk to the control socket: root, the agent's own user, and the configured uids and gids.
public struct PeerPolicy: Sendable {
    public var allowedUIDs: Set<UInt32>
    public var allowedGIDs: Set<UInt32>
    public init(allowedUIDs: [UInt32], allowedGIDs: [UInt32]) {
        self.allowedUIDs = Set(allowedUIDs).union([0, getuid()])
        self.allowedGIDs = Set(allowedGIDs)
    }
    public func allows(uid: UInt32, gid: UInt32) -> Bool { allowedUIDs.contains(uid) || allowedGIDs.contains(gid) }
}

/// The request context of the control API: it keeps the connection's channel to read the peer's credentials.
public struct ControlContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel
    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// Refuses peers whose SO_PEERCRED uid/gid the policy does not allow, with 403.
struct PeerCredentialsMiddleware: RouterMiddleware {
    typealias Context = ControlContext
    let policy: PeerPolicy
    let logger: Logger

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let provider = context.channel as? SocketOptionProvider else {
            return ControlAPI.error(.forbidden, "cannot read the peer's credentials")
        }
        let cred: ucred
        do {
            cred = try await provider.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SO_PEERCRED).get()
        } catch {
            return ControlAPI.error(.forbidden, "cannot read the peer's credentials: \(error)")
        }
        guard policy.allows(uid: cred.uid, gid: cred.gid) else {
            logger.warning("refused a control-socket peer", metadata: ["uid": "\(cred.uid)", "gid": "\(cred.gid)", "pid": "\(cred.pid)"])
            return ControlAPI.error(.forbidden, "uid \(cred.uid) / gid \(cred.gid) is not allowed on this socket ([agent] allowed_uids, allowed_gids)")
        }
        return try await next(request, context)
    }
}

/// The HTTP/1.1 control API, JSON throughout.
public enum ControlAPI {
    static func json(_ status: HTTPResponse.Status, _ object: Any) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }

    static func error(_ status: HTTPResponse.Status, _ message: String) -> Response {
        json(status, ["error": ["code": Int(status.code), "message": message]])
    }

    static func encode<T: Encodable>(_ value: T) -> Any {
        let enc = JSONEncoder()
        guard let data = try? enc.encode(value), let o = try? JSONSerialization.jsonObject(with: data) else { return [:] as [String: Any] }
        return o
    }

    static func imageJSON(_ row: CachedImage) -> Any { encode(row) }

    /// Maps a cache error to its HTTP status.
    static func response(for error: Error) -> Response {
        switch error {
        case let e as CacheError:
            switch e {
            case .invalidID: return self.error(.badRequest, e.description)
            case .notCached: return self.error(.notFound, e.description)
            case .upstream(.imageNotFound): return self.error(.notFound, e.description)
            case .unsupportedFormat, .unsafe: return self.error(.unprocessableContent, e.description)
            case .busy: return self.error(.conflict, e.description)
            case .noRoom: return self.error(HTTPResponse.Status(code: 507, reasonPhrase: "Insufficient Storage"), e.description)
            case .upstream(.notActive): return self.error(.conflict, e.description)
            case .upstream: return self.error(.badGateway, e.description)
            case .io: return self.error(.internalServerError, e.description)
            }
        case let e as DiskError:
            switch e {
            case .invalidID, .invalidName, .sizeTooSmall: return self.error(.badRequest, e.description)
            case .notFound: return self.error(.notFound, e.description)
            case .exists, .busy, .imageNotActive: return self.error(.conflict, e.description)
            case .unsafe: return self.error(.unprocessableContent, e.description)
            case .baseTimeout, .leaseLost: return self.error(.serviceUnavailable, e.description)
            case .ceph(let c): return response(for: c)
            case .io: return self.error(.internalServerError, e.description)
            }
        case let e as CephError:
            // The cluster is unreachable or refused us: the agent is fine, its backend is not.
            return self.error(e.errno == ETIMEDOUT || e.errno == ENOTCONN ? .gatewayTimeout : .badGateway, e.description)
        case let e as GlanceError:
            return response(for: CacheError.upstream(e))
        default:
            return self.error(.internalServerError, "\(error)")
        }
    }

    /// `POST /v1/disks` body.
    struct DiskBody: Decodable {
        var instance_uuid: String
        var image_id: String
        var size: UInt64?
    }

    static func diskRoutes(_ router: Router<ControlContext>, disks: DiskService, idleDefault: Double) {
        router.post("/v1/disks") { request, ctx in
            do {
                let body = try await request.body.collect(upTo: 64 << 10)
                guard let req = try? JSONDecoder().decode(DiskBody.self, from: Data(buffer: body)) else {
                    return self.error(.badRequest, "expected JSON {\"instance_uuid\": UUID, \"image_id\": UUID, \"size\": bytes (optional)}")
                }
                let info = try await disks.create(DiskRequest(instanceUUID: req.instance_uuid, imageID: req.image_id, size: req.size))
                return json(.created, encode(info))
            } catch { return response(for: error) }
        }
        router.get("/v1/disks") { _, _ in
            do { return json(.ok, ["backend": disks.backend.name, "disks": try await disks.backend.list().map(encode)]) } catch { return response(for: error) }
        }
        router.get("/v1/disks/:name") { _, ctx in
            do { return json(.ok, encode(try await disks.backend.get(ctx.parameters.get("name") ?? ""))) } catch { return response(for: error) }
        }
        router.delete("/v1/disks/:name") { _, ctx in
            do {
                try await disks.backend.remove(ctx.parameters.get("name") ?? "")
                return Response(status: .noContent)
            } catch { return response(for: error) }
        }
        router.post("/v1/disks/:name/flatten") { _, ctx in
            do { return json(.ok, encode(try await disks.backend.flatten(ctx.parameters.get("name") ?? ""))) } catch { return response(for: error) }
        }
        // Removes idle bases now; `?idle=SECONDS` overrides [disks] gc_idle for this run, and `?image=ID` (repeatable)
        // looks only at the bases of those Glance images.
        router.post("/v1/bases/gc") { request, _ in
            do {
                let query = request.uri.queryParameters
                let idle = query.get("idle").flatMap(Double.init) ?? idleDefault
                let images = query.getAll("image")
                return json(.ok, ["removed": try await disks.backend.collectGarbage(idleSeconds: idle,
                                                                                   images: images.isEmpty ? nil : Set(images))])
            } catch { return response(for: error) }
        }
    }

    public static func router(cache: ImageCache, disks: DiskService? = nil, gcIdle: Double = 86400, policy: PeerPolicy,
                              logger: Logger) -> Router<ControlContext> {
        let router = Router(context: ControlContext.self)
        router.add(middleware: PeerCredentialsMiddleware(policy: policy, logger: logger))
        if let disks { diskRoutes(router, disks: disks, idleDefault: gcIdle) }

        router.get("/v1/health") { _, _ in
            let used = (try? await cache.usedBytes()) ?? 0
            return json(.ok, ["status": "ok", "cache_bytes": used, "cache_max_bytes": cache.config.maxSize])
        }
        router.get("/v1/images") { _, _ in
            do {
                return json(.ok, ["images": try await cache.images().map(imageJSON)])
            } catch { return response(for: error) }
        }
        router.get("/v1/images/:id") { _, ctx in
            let id = ctx.parameters.get("id") ?? ""
            do {
                guard let row = try await cache.image(id) else { throw CacheError.notCached(id) }
                return json(.ok, imageJSON(row))
            } catch { return response(for: error) }
        }
        router.put("/v1/images/:id") { _, ctx in
            let id = ctx.parameters.get("id") ?? ""
            do {
                switch try await cache.ensure(id) {
                case let .ready(row): return json(.ok, imageJSON(row))
                case let .pending(job): return json(.accepted, encode(job))
                }
            } catch { return response(for: error) }
        }
        router.delete("/v1/images/:id") { _, ctx in
            let id = ctx.parameters.get("id") ?? ""
            do {
                try await cache.evict(id)
                return Response(status: .noContent)
            } catch { return response(for: error) }
        }
        router.put("/v1/images/:id/pin") { _, ctx in
            do { return json(.ok, imageJSON(try await cache.setPinned(ctx.parameters.get("id") ?? "", true))) }
            catch { return response(for: error) }
        }
        router.delete("/v1/images/:id/pin") { _, ctx in
            do { return json(.ok, imageJSON(try await cache.setPinned(ctx.parameters.get("id") ?? "", false))) }
            catch { return response(for: error) }
        }
        router.post("/v1/images/:id/verify") { _, ctx in
            let id = ctx.parameters.get("id") ?? ""
            do {
                guard ImageID.isValid(id) else { throw CacheError.invalidID(id) }
                guard try await cache.image(id)?.state == .ready else { throw CacheError.notCached(id) }
                let r = try await cache.scrub([id])
                let ok = r.first?.ok ?? false
                return json(ok ? .ok : .unprocessableContent, ["image_id": id, "ok": ok, "detail": r.first?.detail ?? ""])
            } catch { return response(for: error) }
        }
        router.get("/v1/jobs") { _, _ in
            json(.ok, ["jobs": await cache.allJobs().map { encode($0) }])
        }
        router.get("/v1/jobs/:id") { _, ctx in
            let id = ctx.parameters.get("id") ?? ""
            guard ImageID.isValid(id) else { return error(.badRequest, "'\(id.prefix(80))' is not a job id (a UUID)") }
            guard let job = await cache.job(id.lowercased()) else { return error(.notFound, "no job \(id)") }
            return json(.ok, encode(job))
        }
        router.get("/v1/events") { _, _ in
            let stream = cache.events.subscribe()
            let body = stream.map { job -> ByteBuffer in
                let data = (try? JSONEncoder().encode(job)) ?? Data()
                return ByteBuffer(string: "event: job\ndata: \(String(decoding: data, as: UTF8.self))\n\n")
            }
            var headers = HTTPFields()
            headers[.contentType] = "text/event-stream"
            headers[.cacheControl] = "no-cache"
            return Response(status: .ok, headers: headers, body: ResponseBody(asyncSequence: body))
        }
        router.get("/metrics") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; version=0.0.4"
            var text = await Metrics.render(cache: cache)
            if let disks {
                text += "# HELP imgconv_disks_total Boot-disk events by kind (clones by path, bases built, take-overs).\n# TYPE imgconv_disks_total counter\n"
                for (name, value) in disks.backend.counters { text += "imgconv_disks_total{kind=\"\(name)\"} \(value)\n" }
            }
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        return router
    }
}

/// Prometheus text exposition of the cache's counters and the process's memory.
enum Metrics {
    static func render(cache: ImageCache) async -> String {
        let m = await cache.metrics
        let rows = (try? await cache.images()) ?? []
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
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", [("", "\(IdleTrim.residentBytes() ?? 0)")])
        metric("imgconv_memory_trims_total", "counter", "Times freed memory went back to the system after an idle interval.",
               [("", "\(IdleTrim.count.load(ordering: .relaxed))")])
        return out
    }
}
