/// Everything that can go wrong talking to Keystone or Glance, each case saying what failed and what to check.
public enum GlanceError: Error, Sendable, CustomStringConvertible, Equatable {
    /// Keystone refused the credentials or the scope.
    case authentication(status: Int, detail: String)
    /// The catalog has no endpoint of that type, interface and region.
    case noEndpoint(service: String, interface: String, region: String?)
    /// Glance answered 404 for the image.
    case imageNotFound(String)
    /// An unexpected HTTP status.
    case http(method: String, url: String, status: Int, detail: String)
    /// Connection problems that outlasted every retry.
    case transport(url: String, attempts: Int, detail: String)
    /// A body that is not what the API documents.
    case malformedResponse(url: String, detail: String)
    /// A hash over the downloaded bytes differs from what Glance recorded.
    case integrity(imageID: String, algorithm: String, expected: String, actual: String)
    /// The image has no usable hash, or names an algorithm we do not implement.
    case unsupportedHash(imageID: String, algorithm: String)
    /// The image is not downloadable (status not active, no data).
    case notActive(imageID: String, status: String)
    /// More bytes arrived than the image size Glance recorded.
    case sizeMismatch(imageID: String, expected: UInt64, actual: UInt64)

    public var description: String {
        switch self {
        case let .authentication(status, detail):
            return "Keystone refused authentication (HTTP \(status)): \(detail); check [glance] auth_url, the user or application credential and the project scope"
        case let .noEndpoint(service, interface, region):
            return "the Keystone catalog has no \(interface) endpoint for service type \(service)\(region.map { " in region \($0)" } ?? ""); set [glance] api_servers or region_name"
        case let .imageNotFound(id):
            return "Glance has no image \(id) visible to this project"
        case let .http(method, url, status, detail):
            return "\(method) \(url) answered HTTP \(status): \(detail)"
        case let .transport(url, attempts, detail):
            return "\(url): gave up after \(attempts) attempts: \(detail)"
        case let .malformedResponse(url, detail):
            return "\(url): unexpected response: \(detail)"
        case let .integrity(id, algorithm, expected, actual):
            return "image \(id): \(algorithm) of the downloaded bytes is \(actual) but Glance recorded \(expected); the stored image is corrupt or was altered, nothing was cached"
        case let .unsupportedHash(id, algorithm):
            return "image \(id): cannot verify hash algorithm '\(algorithm)'; supported: md5, sha1, sha224, sha256, sha384, sha512 (or set [glance] verify_hash = false)"
        case let .notActive(id, status):
            return "image \(id) is \(status), not active: it has no data to download yet"
        case let .sizeMismatch(id, expected, actual):
            return "image \(id): Glance says \(expected) bytes but the download gave \(actual)"
        }
    }
}
