import Cache
import Disks
import Foundation
import Glance
import Testing
@testable import Agent

/// The contract (api/openapi.yaml, served as JSON) against the routes the server really registers. The responses
/// of a running agent are validated against the document's schemas by the Python client's tests
/// (clients/python/tests), which call every route.
@Suite("OpenAPI contract")
struct OpenAPITests {
    struct NoSource: ImageSource {
        func show(_ id: String) async throws -> GlanceImage { throw GlanceError.imageNotFound(id) }
        func download(_ image: GlanceImage, into sink: any DownloadSink, throttled: Bool, progress: DownloadProgress?) async throws -> DownloadResult {
            throw GlanceError.imageNotFound(image.id)
        }
    }

    /// "METHOD /path" for every operation of the served document.
    static func documented() throws -> Set<String> {
        let doc = try #require(try JSONSerialization.jsonObject(with: Data(OpenAPIDocument.json.utf8)) as? [String: Any])
        #expect(doc["openapi"] as? String == "3.1.0")
        let paths = try #require(doc["paths"] as? [String: [String: Any]])
        let methods: Set<String> = ["get", "put", "post", "delete", "patch", "head", "options"]
        return Set(paths.flatMap { path, item in item.keys.filter(methods.contains).map { "\($0.uppercased()) \(path)" } })
    }

    @Test func everyRouteTheServerAnswersIsDocumentedAndNothingElse() async throws {
        let dir = NSTemporaryDirectory() + "imgconv-openapi-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cache = try ImageCache(config: CacheConfig(directory: dir + "/cache"), source: NoSource())
        let disks = DiskService(backend: LocalBackend(instancesDir: dir + "/instances", stateDir: dir + "/state"),
                                source: NoSource(), cache: cache)
        let router = ControlAPI.router(cache: cache, disks: disks)
        let served = Set(router.routes.map { "\($0.method.rawValue) \($0.path)" })
        #expect(served.count >= 15, "\(served.sorted())")
        let documented = try Self.documented()
        #expect(served.subtracting(documented).isEmpty, "routes the server answers that api/openapi.yaml lacks: \(served.subtracting(documented).sorted())")
        #expect(documented.subtracting(served).isEmpty, "operations api/openapi.yaml lists that the server lacks: \(documented.subtracting(served).sorted())")
    }

    /// Every error type the server can answer is one the document lists (and so one the client has a class for).
    @Test func everyErrorTypeIsDocumented() throws {
        let doc = try #require(try JSONSerialization.jsonObject(with: Data(OpenAPIDocument.json.utf8)) as? [String: Any])
        let schemas = ((doc["components"] as? [String: Any])?["schemas"] as? [String: Any]) ?? [:]
        let listed = Set(((schemas["ErrorType"] as? [String: Any])?["enum"] as? [String]) ?? [])
        #expect(listed == Set(HTTPErrors.ErrorType.allCases.map(\.rawValue)))
    }
}
