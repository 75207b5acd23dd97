import Cache
import Disks
import Foundation
import Glance
import Hummingbird
import NIOCore
import RBD
#if canImport(Glibc)
import Glibc
#endif

/// A request the control API cannot take as it is: which part of it, and why.
enum APIError: Error, CustomStringConvertible {
    /// A body, field or query parameter that is missing, of the wrong type or out of range.
    case badRequest(field: String?, String)
    /// The body is over `ControlAPI.maxBody`.
    case bodyTooLarge(limit: Int)
    case notFound(String)

    var description: String {
        switch self {
        case let .badRequest(field?, message): return "'\(field)': \(message)"
        case let .badRequest(nil, message): return message
        case let .bodyTooLarge(limit): return "the body is over \(limit) bytes"
        case let .notFound(s): return s
        }
    }
}

/// Every error the control API answers with, mapped to HTTP in this one place: a JSON body
/// `{"error": {"code": N, "type": "...", "message": "..."}}` whose `type` is one of `ErrorType` (what a client
/// branches on; api/openapi.yaml lists them) and whose message says what is wrong and what to do.
enum HTTPErrors {
    /// The machine-readable kind of an error; each is one exception class in the Python client.
    enum ErrorType: String, CaseIterable {
        case invalidRequest = "invalid_request"
        case bodyTooLarge = "body_too_large"
        case forbidden
        case tooManyConnections = "too_many_connections"
        case notFound = "not_found"
        case imageNotCached = "image_not_cached"
        case imageNotFound = "image_not_found"
        case diskNotFound = "disk_not_found"
        case busy
        case diskExists = "disk_exists"
        case imageNotActive = "image_not_active"
        case unsafeImage = "unsafe_image"
        case unsupportedFormat = "unsupported_format"
        case noRoom = "no_room"
        case upstreamError = "upstream_error"
        case backendUnavailable = "backend_unavailable"
        case agentStopping = "agent_stopping"
        case internalError = "internal_error"
    }

    static func response(for error: Error) -> Response {
        let (status, type, message) = status(for: error)
        return ControlAPI.error(status, type, message)
    }

    static func status(for error: Error) -> (HTTPResponse.Status, ErrorType, String) {
        switch error {
        case let e as APIError:
            switch e {
            case .badRequest: return (.badRequest, .invalidRequest, e.description)
            case .bodyTooLarge: return (.contentTooLarge, .bodyTooLarge, e.description)
            case .notFound: return (.notFound, .notFound, e.description)
            }
        case is NIOTooManyBytesError:
            return (.contentTooLarge, .bodyTooLarge, "the body is over \(ControlAPI.maxBody) bytes")
        case let e as CacheError:
            switch e {
            case .invalidID: return (.badRequest, .invalidRequest, e.description)
            case .notCached: return (.notFound, .imageNotCached, e.description)
            case .upstream(.imageNotFound): return (.notFound, .imageNotFound, e.description)
            case .unsupportedFormat: return (.unprocessableContent, .unsupportedFormat, e.description)
            case .unsafe: return (.unprocessableContent, .unsafeImage, e.description)
            case .busy: return (.conflict, .busy, e.description)
            case .upstream(.notActive): return (.conflict, .imageNotActive, e.description)
            case .noRoom: return (HTTPResponse.Status(code: 507, reasonPhrase: "Insufficient Storage"), .noRoom, e.description)
            case .upstream: return (.badGateway, .upstreamError, e.description)
            case .io: return (.internalServerError, .internalError, e.description)
            }
        case let e as DiskError:
            switch e {
            case .invalidID, .invalidName, .sizeTooSmall, .sizeTooLarge: return (.badRequest, .invalidRequest, e.description)
            case .notFound: return (.notFound, .diskNotFound, e.description)
            case .exists: return (.conflict, .diskExists, e.description)
            case .busy: return (.conflict, .busy, e.description)
            case .imageNotActive: return (.conflict, .imageNotActive, e.description)
            case .unsafe: return (.unprocessableContent, .unsafeImage, e.description)
            case .baseTimeout, .leaseLost, .fenced: return (.serviceUnavailable, .backendUnavailable, e.description)
            case .ceph(let c): return status(for: c)
            case .io: return (.internalServerError, .internalError, e.description)
            }
        case let e as CephError:
            // The cluster is unreachable or refused us: the agent is fine, its backend is not.
            return (e.errno == ETIMEDOUT || e.errno == ENOTCONN ? .gatewayTimeout : .badGateway, .backendUnavailable, e.description)
        case let e as GlanceError:
            return status(for: CacheError.upstream(e))
        case is CancellationError:
            return (.serviceUnavailable, .agentStopping, "the agent is stopping; ask again once it is back")
        case let e as HTTPError where e.status == .notFound:
            return (.notFound, .notFound, "no such route; GET /v1/openapi.json lists them")
        case let e as HTTPError where e.status == .methodNotAllowed:
            return (.methodNotAllowed, .invalidRequest, "this route does not take that method; GET /v1/openapi.json lists them")
        default:
            return (.internalServerError, .internalError, "\(error)")
        }
    }
}
