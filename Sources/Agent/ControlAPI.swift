import Cache
import Disks
import Foundation
import Glance
import Hummingbird
import Logging
import NIOCore

/// The request context of the control API.
public struct ControlContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
    }
}

/// The HTTP/1.1 control API, JSON throughout. Who may connect is decided before HTTP (`GuardedHTTPChannel`);
/// every input is bounded and checked here before any work starts (`maxBody`, canonical ids, typed fields),
/// errors are mapped in one place (`HTTPErrors`), and nothing here blocks: a route either answers from memory or
/// awaits work that runs on the executor.
public enum ControlAPI {
    /// The largest request body taken (413 beyond).
    public static let maxBody = 64 << 10

    static func json(_ status: HTTPResponse.Status, _ object: Any) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }

    static func error(_ status: HTTPResponse.Status, _ type: HTTPErrors.ErrorType, _ message: String) -> Response {
        json(status, ["error": ["code": Int(status.code), "type": type.rawValue, "message": message]])
    }

    static func encode<T: Encodable>(_ value: T) -> Any {
        guard let data = try? JSONEncoder().encode(value), let o = try? JSONSerialization.jsonObject(with: data) else { return [:] as [String: Any] }
        return o
    }

    /// Runs a route; any error becomes its HTTP answer.
    static func answer(_ body: () async throws -> Response) async -> Response {
        do { return try await body() } catch { return HTTPErrors.response(for: error) }
    }

    /// An image (or instance) id from a path or a query, in canonical form: ids are normalised here, once.
    static func imageID(_ raw: String?) throws -> String {
        guard let raw, let id = ImageID.normalized(raw) else { throw CacheError.invalidID(raw ?? "") }
        return id
    }

    static func diskName(_ raw: String?) throws -> String {
        guard let raw, let name = DiskService.normalizedName(raw) else { throw DiskError.invalidName(raw ?? "") }
        return name
    }

    /// The body, at most `maxBody` bytes: a Content-Length over it is refused before a byte is read.
    static func body(_ request: Request) async throws -> Data {
        if let length = request.headers[.contentLength].flatMap(Int.init), length > maxBody { throw APIError.bodyTooLarge(limit: maxBody) }
        return Data(buffer: try await request.body.collect(upTo: maxBody))
    }

    /// `POST /v1/disks` body: a JSON object with exactly these fields, each checked with a message naming it.
    struct DiskBody: Decodable {
        var instanceUUID: String
        var imageID: String
        var size: UInt64?

        struct Key: CodingKey {
            var stringValue: String
            var intValue: Int? { nil }
            init(stringValue: String) { self.stringValue = stringValue }
            init?(intValue: Int) { nil }
        }
        static let fields = ["instance_uuid", "image_id", "size"]

        init(from decoder: Decoder) throws {
            let c: KeyedDecodingContainer<Key>
            do { c = try decoder.container(keyedBy: Key.self) } catch {
                throw APIError.badRequest(field: nil, "the body must be a JSON object {\"instance_uuid\": UUID, \"image_id\": UUID, \"size\": bytes (optional)}")
            }
            if let unknown = c.allKeys.first(where: { !Self.fields.contains($0.stringValue) }) {
                throw APIError.badRequest(field: unknown.stringValue, "unknown field (the fields are \(Self.fields.joined(separator: ", ")))")
            }
            func uuid(_ name: String) throws -> String {
                let key = Key(stringValue: name)
                guard c.contains(key) else { throw APIError.badRequest(field: name, "missing (a UUID)") }
                guard let s = try? c.decode(String.self, forKey: key) else { throw APIError.badRequest(field: name, "must be a string (a UUID)") }
                guard let id = ImageID.normalized(s) else { throw APIError.badRequest(field: name, "'\(s.prefix(80))' is not a UUID") }
                return id
            }
            instanceUUID = try uuid("instance_uuid")
            imageID = try uuid("image_id")
            let sizeKey = Key(stringValue: "size")
            if c.contains(sizeKey), !((try? c.decodeNil(forKey: sizeKey)) ?? false) {
                guard let n = try? c.decode(UInt64.self, forKey: sizeKey) else {
                    throw APIError.badRequest(field: "size", "must be a JSON integer of bytes (no fraction, no string, not negative)")
                }
                size = n
            }
        }

        static func parse(_ data: Data) throws -> DiskBody {
            do {
                return try JSONDecoder().decode(DiskBody.self, from: data)
            } catch let e as APIError {
                throw e
            } catch {
                throw APIError.badRequest(field: nil, "the body is not JSON (\(error.localizedDescription))")
            }
        }
    }

    static func diskRoutes(_ router: Router<ControlContext>, disks: DiskService, idleDefault: Double) {
        // `?wait=false`: 202 with the job at once (GET /v1/jobs/{id}, then GET /v1/disks/{disk}).
        router.post("/v1/disks") { request, _ in
            await answer {
                let wait = try flag(request.uri.queryParameters.get("wait"), name: "wait", default: true)
                let b = try DiskBody.parse(try await body(request))
                let req = DiskRequest(instanceUUID: b.instanceUUID, imageID: b.imageID, size: b.size)
                if !wait { return json(.accepted, encode(try disks.start(req))) }
                return json(.created, encode(try await disks.create(req)))
            }
        }
        router.get("/v1/disks") { _, _ in
            await answer { json(.ok, ["backend": disks.backend.name, "disks": try await disks.backend.list().map(encode)]) }
        }
        router.get("/v1/disks/:name") { _, ctx in
            await answer { json(.ok, encode(try await disks.backend.get(try diskName(ctx.parameters.get("name"))))) }
        }
        router.delete("/v1/disks/:name") { _, ctx in
            await answer {
                try await disks.backend.remove(try diskName(ctx.parameters.get("name")))
                return Response(status: .noContent)
            }
        }
        router.post("/v1/disks/:name/flatten") { _, ctx in
            await answer { json(.ok, encode(try await disks.backend.flatten(try diskName(ctx.parameters.get("name"))))) }
        }
        // Removes idle bases now; `?idle=SECONDS` overrides [disks] gc_idle for this run, and `?image=ID` (repeatable)
        // looks only at the bases of those Glance images.
        router.post("/v1/bases/gc") { request, _ in
            await answer {
                let query = request.uri.queryParameters
                var idle = idleDefault
                if let raw = query.get("idle") {
                    guard let v = Double(raw), v.isFinite, v >= 0, v <= 3650 * 86400 else {
                        throw APIError.badRequest(field: "idle", "'\(raw.prefix(40))' is not a number of seconds from 0 to 3650 days")
                    }
                    idle = v
                }
                let images = try query.getAll("image").map { try imageID($0) }
                return json(.ok, ["removed": try await disks.backend.collectGarbage(idleSeconds: idle,
                                                                                   images: images.isEmpty ? nil : Set(images))])
            }
        }
    }

    static func flag(_ raw: String?, name: String, default value: Bool) throws -> Bool {
        switch raw {
        case nil: return value
        case "true", "1": return true
        case "false", "0": return false
        default: throw APIError.badRequest(field: name, "'\(raw!.prefix(40))' is not true or false")
        }
    }

    public static func router(cache: ImageCache, disks: DiskService? = nil, gcIdle: Double = 86400) -> Router<ControlContext> {
        let router = Router(context: ControlContext.self)
        router.add(middleware: JSONErrors())
        if let disks { diskRoutes(router, disks: disks, idleDefault: gcIdle) }

        // The contract (api/openapi.yaml), as JSON.
        router.get("/v1/openapi.json") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "application/json"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: OpenAPIDocument.json)))
        }

        // Answers from memory, never waiting for the cache actor or the executor.
        router.get("/v1/health") { _, _ in
            json(.ok, ["status": "ok", "cache_bytes": cache.usedBytes(), "cache_max_bytes": cache.config.maxSize])
        }
        router.get("/v1/images") { _, _ in
            json(.ok, ["images": cache.images().map(encode)])
        }
        router.get("/v1/images/:id") { _, ctx in
            await answer {
                let id = try imageID(ctx.parameters.get("id"))
                guard let row = try await cache.image(id) else { throw CacheError.notCached(id) }
                return json(.ok, encode(row))
            }
        }
        router.put("/v1/images/:id") { _, ctx in
            await answer {
                switch try await cache.ensure(try imageID(ctx.parameters.get("id"))) {
                case let .ready(row): return json(.ok, encode(row))
                case let .pending(job): return json(.accepted, encode(job))
                }
            }
        }
        router.delete("/v1/images/:id") { _, ctx in
            await answer {
                try await cache.evict(try imageID(ctx.parameters.get("id")))
                return Response(status: .noContent)
            }
        }
        router.put("/v1/images/:id/pin") { _, ctx in
            await answer { json(.ok, encode(try await cache.setPinned(try imageID(ctx.parameters.get("id")), true))) }
        }
        router.delete("/v1/images/:id/pin") { _, ctx in
            await answer { json(.ok, encode(try await cache.setPinned(try imageID(ctx.parameters.get("id")), false))) }
        }
        router.post("/v1/images/:id/verify") { _, ctx in
            await answer {
                let id = try imageID(ctx.parameters.get("id"))
                guard try await cache.image(id)?.state == .ready else { throw CacheError.notCached(id) }
                let r = try await cache.scrub([id])
                let ok = r.first?.ok ?? false
                return json(ok ? .ok : .unprocessableContent, ["image_id": id, "ok": ok, "detail": r.first?.detail ?? ""])
            }
        }
        router.get("/v1/jobs") { _, _ in
            json(.ok, ["jobs": cache.allJobs().map { encode($0) }])
        }
        router.get("/v1/jobs/:id") { _, ctx in
            await answer {
                guard let raw = ctx.parameters.get("id"), let id = ImageID.normalized(raw) else {
                    throw APIError.badRequest(field: "id", "'\((ctx.parameters.get("id") ?? "").prefix(80))' is not a job id (a UUID)")
                }
                guard let job = cache.job(id) else { throw APIError.notFound("no job \(id)") }
                return json(.ok, encode(job))
            }
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
            let text = await Metrics.render(cache: cache, disks: disks)
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        return router
    }
}

/// Hummingbird's own errors (no such route, a method the route does not take) in the API's error shape.
struct JSONErrors: RouterMiddleware {
    typealias Context = ControlContext
    func handle(_ request: Request, context: ControlContext, next: (Request, ControlContext) async throws -> Response) async throws -> Response {
        do { return try await next(request, context) } catch { return HTTPErrors.response(for: error) }
    }
}
