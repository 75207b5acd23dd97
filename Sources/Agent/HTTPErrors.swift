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
/// `{"error": {"code": N, "message": "..."}}` whose message says what is wrong and what to do.
enum HTTPErrors {
    static func response(for error: Error) -> Response {
        let (status, message) = status(for: error)
        return ControlAPI.error(status, message)
    }

    static func status(for error: Error) -> (HTTPResponse.Status, String) {
        switch error {
        case let e as APIError:
            switch e {
            case .badRequest: return (.badRequest, e.description)
            case .bodyTooLarge: return (.contentTooLarge, e.description)
            case .notFound: return (.notFound, e.description)
            }
        case is NIOTooManyBytesError:
            return (.contentTooLarge, "the body is over \(ControlAPI.maxBody) bytes")
        case let e as CacheError:
            switch e {
            case .invalidID: return (.badRequest, e.description)
            case .notCached, .upstream(.imageNotFound): return (.notFound, e.description)
            case .unsupportedFormat, .unsafe: return (.unprocessableContent, e.description)
            case .busy, .upstream(.notActive): return (.conflict, e.description)
            case .noRoom: return (HTTPResponse.Status(code: 507, reasonPhrase: "Insufficient Storage"), e.description)
            case .upstream: return (.badGateway, e.description)
            case .io: return (.internalServerError, e.description)
            }
        case let e as DiskError:
            switch e {
            case .invalidID, .invalidName, .sizeTooSmall, .sizeTooLarge: return (.badRequest, e.description)
            case .notFound: return (.notFound, e.description)
            case .exists, .busy, .imageNotActive: return (.conflict, e.description)
            case .unsafe: return (.unprocessableContent, e.description)
            case .baseTimeout, .leaseLost, .fenced: return (.serviceUnavailable, e.description)
            case .ceph(let c): return status(for: c)
            case .io: return (.internalServerError, e.description)
            }
        case let e as CephError:
            // The cluster is unreachable or refused us: the agent is fine, its backend is not.
            return (e.errno == ETIMEDOUT || e.errno == ENOTCONN ? .gatewayTimeout : .badGateway, e.description)
        case let e as GlanceError:
            return status(for: CacheError.upstream(e))
        case is CancellationError:
            return (.serviceUnavailable, "the agent is stopping; ask again once it is back")
        default:
            return (.internalServerError, "\(error)")
        }
    }
}
